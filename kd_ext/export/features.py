"""Features export: an IR that ends at the per-scale teacher/student features, its tail described in ``rt_info``.

The graph is the model's pre-processor and networks (anomalib's ``AnomalibModule.forward`` without the anomaly-map
tail and the post-processor). Its outputs are the distinct feature tensors the tail reads, named
``feature/<index>`` (a teacher level shared by several students or groups is output once), and, for a model with
a fitted normal-feature prior, the prior's Mahalanobis distances on its own grid (``prior/distance``, computed in
the graph by :meth:`~kd_ext.models.components.prior.NormalFeaturePrior.distance_grid` with the fitted mean and
precision as constants). The :class:`~kd_ext.edge.contract.AnomalyTail` built here from the model's settings
(distance, fusion, sigma, score mode and top-k, output size, MTHF's two-stage fusion statistics, the prior's rule,
scope and map statistics, the post-processor's normalisation statistics and thresholds) goes into
``rt_info[kd_ext][tail]``, and :class:`kd_ext.edge.EdgeModel` runs that tail with :mod:`kd_ext.kernels` and numpy
(:mod:`kd_ext.edge.tail`).

Supported: BiDirMSKD and MTHF, with or without a fitted prior.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kd_ext.edge.contract import PRIOR_OUTPUT, AnomalyTail, Normalization, TailGroup, TailPrior, feature_output

if TYPE_CHECKING:
    from anomalib.models import AnomalibModule

    from kd_ext.models.components.prior import PriorFusion

Layout = tuple[list[torch.Tensor], list[tuple[list[tuple[int, int]], str]]]
"""Distinct feature tensors and, per group, ``([(teacher index, student index)], fusion)``."""


def _unique(tensors: list[torch.Tensor], seen: dict[int, int], value: torch.Tensor) -> int:
    key = id(value)
    if key not in seen:
        seen[key] = len(tensors)
        tensors.append(value)
    return seen[key]


Groups = list[tuple[list[tuple[torch.Tensor, torch.Tensor]], str]]
"""Per group: ``(teacher, student)`` feature pairs and the group's kernel fusion."""


def _groups_of(model: nn.Module, images: torch.Tensor) -> tuple[Groups, list[torch.Tensor]]:
    """The groups of ``images`` (see :data:`Groups`) and the teacher features the model's prior reads."""
    from kd_ext.models.bidirmskd.torch_model import BiDirMSKDModel  # noqa: PLC0415
    from kd_ext.models.mthf.torch_model import MTHFModel  # noqa: PLC0415

    if isinstance(model, BiDirMSKDModel):
        teacher, forward, reverse = model.distill(images)
        pairs = [
            (t, s)
            for student in (forward, reverse)
            if student is not None
            for t, s in zip(teacher, student, strict=True)
        ]
        return [(pairs, model.anomaly_map_generator.fusion)], teacher
    if isinstance(model, MTHFModel):
        teachers = model.teacher_features(images)
        groups = model.distill(images, teachers)
        pairs_of = [list(zip(teacher, student, strict=True)) for teacher, student in groups.values()]
        if model.anomaly_map_generator.fusion_stages == 1:
            return [([pair for pairs in pairs_of for pair in pairs], "mean")], teachers[model.teacher_name]
        return [(pairs, "mean") for pairs in pairs_of], teachers[model.teacher_name]
    msg = (
        f"export mode 'features' supports BiDirMSKD and MTHF, not {type(model).__name__}; export it with "
        "mode='standard' (anomalib's whole forward)."
    )
    raise ValueError(msg)


def fitted_prior(model: nn.Module) -> PriorFusion | None:
    """The model's normal-feature prior fusion when it is fitted (it then decides the outputs), else ``None``."""
    fusion = getattr(model, "prior_fusion", None)
    return fusion if fusion is not None and bool(getattr(fusion, "ready", False)) else None


def feature_layout(model: nn.Module, images: torch.Tensor) -> tuple[Layout, torch.Tensor | None]:
    """The distinct feature tensors of ``images``, how the tail pairs them, and the prior's distances.

    Args:
        model: A BiDirMSKD or MTHF torch model (eval mode).
        images: Pre-processed images.

    Returns:
        tuple: The :data:`Layout` (tensors in output order, per group the index pairs and fusion), and the fitted
        prior's distances ``[B, 1, h, w]`` on its own grid (``None`` without a fitted prior).

    Raises:
        ValueError: If the model has no features export.
    """
    tensors: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    groups_of, prior_features = _groups_of(model, images)
    groups = [
        ([(_unique(tensors, seen, t), _unique(tensors, seen, s)) for t, s in pairs], fusion)
        for pairs, fusion in groups_of
    ]
    fusion = fitted_prior(model)
    distances = None if fusion is None else fusion.prior.distance_grid(prior_features)
    return (tensors, groups), distances


class FeatureGraph(nn.Module):
    """Pre-processor and networks of an anomalib module, returning the features of :func:`feature_layout`.

    Args:
        module: The trained anomalib module.
    """

    def __init__(self, module: AnomalibModule) -> None:
        super().__init__()
        self.pre_processor = module.pre_processor if module.pre_processor else None
        self.model = module.model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The pre-processor's export transform (identity without one)."""
        return self.pre_processor(images) if self.pre_processor is not None else images

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The distinct per-scale features in output order, then the fitted prior's distances (if any)."""
        (tensors, _), distances = feature_layout(self.model, self.preprocess(images))
        return (*tensors, distances) if distances is not None else tuple(tensors)


def supports_features(model: nn.Module) -> bool:
    """Whether a torch model can be exported with ``mode="features"`` (BiDirMSKD or MTHF, prior or not).

    Args:
        model: The anomalib module's ``model``.

    Returns:
        bool: ``True`` when :func:`anomaly_tail` accepts it.
    """
    from kd_ext.models.bidirmskd.torch_model import BiDirMSKDModel  # noqa: PLC0415
    from kd_ext.models.mthf.torch_model import MTHFModel  # noqa: PLC0415

    return isinstance(model, (BiDirMSKDModel, MTHFModel))


def _tail_prior(model: nn.Module) -> TailPrior | None:
    fusion = fitted_prior(model)
    if fusion is None:
        return None
    standardiser = fusion.standardiser
    mean = tuple(float(value) for value in standardiser.map_mean)
    std = tuple(float(value) for value in standardiser.map_std)
    return TailPrior(
        output=PRIOR_OUTPUT,
        rule=standardiser.rule.value,
        scope=fusion.scope.value,
        map_mean=(mean[0], mean[1]),
        map_std=(std[0], std[1]),
    )


def _post_processing(module: AnomalibModule) -> tuple[Normalization | None, float | None, float | None]:
    post = getattr(module, "post_processor", None)
    if not post:
        return None, None, None
    normalization = None
    if post.enable_normalization:
        normalization = Normalization(
            image_min=float(post.image_min),
            image_max=float(post.image_max),
            image_threshold=float(post.image_threshold),
            pixel_min=float(post.pixel_min),
            pixel_max=float(post.pixel_max),
            pixel_threshold=float(post.pixel_threshold),
        )
    if not post.enable_thresholding:
        return normalization, None, None
    return normalization, float(post.normalized_image_threshold), float(post.normalized_pixel_threshold)


def anomaly_tail(module: AnomalibModule, input_size: tuple[int, int]) -> tuple[AnomalyTail, int]:
    """The tail of ``module``'s features IR for images of ``input_size``, and the number of feature outputs.

    Args:
        module: Trained BiDirMSKD or MTHF.
        input_size: ``(H, W)`` of the IR's input.

    Returns:
        tuple: The :class:`AnomalyTail` and how many feature tensors the IR outputs.

    Raises:
        ValueError: If the model cannot be exported this way (named, with the fix).
    """
    from kd_ext.models.mthf.torch_model import MTHFModel  # noqa: PLC0415

    model = module.model
    graph = FeatureGraph(module).eval()
    with torch.no_grad():
        images = graph.preprocess(torch.zeros(1, 3, *input_size))
        (tensors, groups), _ = feature_layout(model, images)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    top_k = None if model.score_mode == "max" else max(1, int(height * width * model.top_k_ratio))
    normalization, image_threshold, pixel_threshold = _post_processing(module)
    tail_groups = tuple(
        TailGroup(pairs=tuple((feature_output(t), feature_output(s)) for t, s in pairs), fusion=fusion)
        for pairs, fusion in groups
    )
    stage2: dict[str, object] = {}
    generator = model.anomaly_map_generator
    if isinstance(model, MTHFModel) and generator.fusion_stages == 2:
        stage2 = {
            "group_fusion": generator.group_fusion,
            "group_mean": tuple(float(value) for value in generator.map_mean),
            "group_std": tuple(float(value) for value in generator.map_std),
        }
    tail = AnomalyTail(
        output_size=(height, width),
        groups=tail_groups,
        distance="cosine",
        align_corners=False,
        sigma=float(generator.sigma),
        score=model.score_mode,
        top_k=top_k,
        normalization=normalization,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        prior=_tail_prior(model),
        **stage2,
    )
    return tail, len(tensors)


def export_features_onnx(module: AnomalibModule, onnx_path: Path, input_size: tuple[int, int], outputs: int) -> Path:
    """Trace :class:`FeatureGraph` to ONNX as anomalib traces its models (dynamo, batch dynamic).

    Args:
        module: The trained anomalib module.
        onnx_path: Destination file.
        input_size: Static ``(H, W)``.
        outputs: Number of feature outputs (from :func:`anomaly_tail`); a fitted prior's output comes after them.

    Returns:
        Path: ``onnx_path``.
    """
    graph = FeatureGraph(module).eval()
    names = [feature_output(index) for index in range(outputs)]
    if fitted_prior(module.model) is not None:
        names.append(PRIOR_OUTPUT)
    batch = torch.export.Dim("batch_size")
    torch.onnx.export(
        graph,
        (torch.zeros(2, 3, *input_size),),
        str(onnx_path),
        opset_version=14,
        input_names=["input"],
        output_names=names,
        dynamo=True,
        dynamic_shapes=({0: batch},),
    )
    return onnx_path


def features_map_function(tail: AnomalyTail) -> Callable[[dict[str, object]], object]:
    """Normalised maps from a compiled features IR's outputs (for the INT8 map check).

    The maps are the normalised anomaly maps. When the anomaly map does not carry the prior (its scope is
    ``"score"``), the fused map the image score is taken from is appended as a second channel, normalised with
    the image statistics (as the score is), so that the check also bounds the prior's part of the score.

    Args:
        tail: The IR's tail.

    Returns:
        Callable: ``outputs by name -> maps [B, 1 or 2, H, W]``.
    """
    import numpy as np  # noqa: PLC0415

    from kd_ext.edge.tail import normalize, post_process, raw_maps_and_score  # noqa: PLC0415

    def maps(outputs: dict[str, object]) -> object:
        features = {name: np.ascontiguousarray(outputs[name], dtype=np.float32) for name in tail.feature_names}
        anomaly_maps, scores, score_maps = raw_maps_and_score(tail, features)
        normalised = post_process(tail, anomaly_maps, scores)["anomaly_map"]
        if score_maps is anomaly_maps:
            return normalised
        stats = tail.normalization
        if stats is not None:
            score_maps = normalize(score_maps, stats.image_min, stats.image_max, stats.image_threshold)
        return np.concatenate([normalised, score_maps], axis=1)

    return maps


__all__ = [
    "FeatureGraph",
    "anomaly_tail",
    "export_features_onnx",
    "feature_layout",
    "features_map_function",
    "fitted_prior",
    "supports_features",
]
