"""Features export: an IR that ends at the per-scale teacher/student features, its tail described in ``rt_info``.

The graph is the model's pre-processor and networks (anomalib's ``AnomalibModule.forward`` without the anomaly-map
tail and the post-processor). Its outputs are the distinct feature tensors the tail reads, named
``feature/<index>`` (a teacher level shared by several students or groups is output once), and, for a model with
a fitted normal-feature prior, the prior's Mahalanobis distances on its own grid (``prior/distance``, computed in
the graph by :meth:`~kd_ext.models.components.prior.NormalFeaturePrior.distance_grid` with the fitted mean and
precision as constants). The model describes its tail itself (``model.tail()``, a
:class:`~kd_ext.edge.contract.MapTail`: distance, fusion, sigma, score rule, MTHF's two-stage fusion statistics, the
prior's rule, scope and map statistics) and names the features it reads (``model.tail_features``); bound here to
the IR's outputs, the map size and the post-processor's normalisation statistics and thresholds, it goes as the
:class:`~kd_ext.edge.contract.AnomalyTail` into ``rt_info[kd_ext][tail]``, and :class:`kd_ext.edge.EdgeModel` runs
that tail with :mod:`kd_ext.kernels` and numpy (:mod:`kd_ext.edge.tail`).

Supported: BiDirMSKD and MTHF, with or without a fitted prior.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from kd_ext.edge.contract import PRIOR_OUTPUT, AnomalyTail, MapTail, Normalization, feature_output

if TYPE_CHECKING:
    from anomalib.models import AnomalibModule

    from kd_ext.models.components.prior import PriorFusion

Layout = tuple[list[torch.Tensor], list[list[tuple[int, int]]]]
"""Distinct feature tensors and, per group of the model's tail, its ``(teacher index, student index)`` pairs."""


@runtime_checkable
class TailModel(Protocol):
    """A torch model with a features export: it describes its tail and names the features the tail reads."""

    def tail(self, statistics: bool = True) -> MapTail:
        """The model's :class:`~kd_ext.edge.contract.MapTail`."""
        ...

    def tail_features(
        self, images: torch.Tensor
    ) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[torch.Tensor]]:
        """The ``(teacher, student)`` pairs of each group of the tail, and the teacher features the prior reads."""
        ...


def _unique(tensors: list[torch.Tensor], seen: dict[int, int], value: torch.Tensor) -> int:
    key = id(value)
    if key not in seen:
        seen[key] = len(tensors)
        tensors.append(value)
    return seen[key]


def _tail_model(model: nn.Module) -> TailModel:
    if not supports_features(model):
        msg = (
            f"export mode 'features' supports BiDirMSKD and MTHF, not {type(model).__name__}; export it with "
            "mode='standard' (anomalib's whole forward)."
        )
        raise ValueError(msg)
    return model  # type: ignore[return-value]


def fitted_prior(model: nn.Module) -> PriorFusion | None:
    """The model's normal-feature prior fusion when it is fitted (it then decides the outputs), else ``None``."""
    fusion = getattr(model, "prior_fusion", None)
    return fusion if fusion is not None and bool(getattr(fusion, "ready", False)) else None


def feature_layout(model: nn.Module, images: torch.Tensor) -> tuple[Layout, torch.Tensor | None]:
    """The distinct feature tensors of ``images``, how the tail pairs them, and the prior's distances.

    Args:
        model: A torch model with a tail (:class:`TailModel`: BiDirMSKD or MTHF), in eval mode.
        images: Pre-processed images.

    Returns:
        tuple: The :data:`Layout` (tensors in output order, per group of the model's tail the index pairs), and the
        fitted prior's distances ``[B, 1, h, w]`` on its own grid (``None`` without a fitted prior).

    Raises:
        ValueError: If the model has no features export.
    """
    tensors: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    groups_of, prior_features = _tail_model(model).tail_features(images)
    groups = [[(_unique(tensors, seen, t), _unique(tensors, seen, s)) for t, s in pairs] for pairs in groups_of]
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
    """Whether a torch model can be exported with ``mode="features"``: it describes its tail (:class:`TailModel`).

    Args:
        model: The anomalib module's ``model``.

    Returns:
        bool: ``True`` when :func:`anomaly_tail` accepts it (BiDirMSKD and MTHF, prior or not).
    """
    return isinstance(model, TailModel)


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

    The model's own :class:`~kd_ext.edge.contract.MapTail` (``model.tail()``) bound to the IR's feature outputs,
    the map size and the post-processor's statistics and thresholds.

    Args:
        module: Trained BiDirMSKD or MTHF.
        input_size: ``(H, W)`` of the IR's input.

    Returns:
        tuple: The :class:`AnomalyTail` and how many feature tensors the IR outputs.

    Raises:
        ValueError: If the model cannot be exported this way (named, with the fix).
    """
    model = _tail_model(module.model)
    graph = FeatureGraph(module).eval()
    with torch.no_grad():
        images = graph.preprocess(torch.zeros(1, 3, *input_size))
        (tensors, groups), _ = feature_layout(module.model, images)
    normalization, image_threshold, pixel_threshold = _post_processing(module)
    tail = model.tail().bind(
        output_size=(int(images.shape[-2]), int(images.shape[-1])),
        pairs=tuple(tuple((feature_output(t), feature_output(s)) for t, s in pairs) for pairs in groups),
        normalization=normalization,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
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
    "TailModel",
    "anomaly_tail",
    "export_features_onnx",
    "feature_layout",
    "features_map_function",
    "fitted_prior",
    "supports_features",
]
