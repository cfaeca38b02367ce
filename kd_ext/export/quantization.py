"""INT8 quantisation of anomaly-detection IRs with NNCF, calibrated on normal training images.

anomalib's ``INT8_PTQ`` calibrates on ``datamodule.val_dataloader()`` (for MVTecAD the *test* images, anomalies
included) and quantises every quantisable op, including the anomaly-map tail (``1 - cos`` distances, upsampling,
the Gaussian-blur convolution, score reduction and the normalisation/threshold post-processor). Here calibration
uses the normal training images (what the model is supposed to see) and :func:`anomaly_map_ignored_scope` keeps
everything after the networks' last convolutions in floating point.

Quantising the networks alone can still move the normalised anomaly maps, so :func:`quantize_on_training_images`
holds every :data:`HOLDOUT_EVERY`-th training image out of calibration and lets NNCF's accuracy control put the
most sensitive ops back into floating point until the INT8 maps of those normal images are within
:data:`MAX_MAP_ERROR` of the FP32 maps. That needs no labels and no test images. Measured effects (map error,
AUROC, reverted ops, latency) are in ``benchmarks/results/edge.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    import nncf
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from torchmetrics import Metric

logger = logging.getLogger(__name__)

NETWORK_OP_TYPES = ("Convolution", "GroupConvolution")
MAX_MAP_ERROR = 0.02
"""Default bound on the mean absolute difference between INT8 and FP32 normalised anomaly maps (threshold 0.5)
on held-out normal training images."""
HOLDOUT_EVERY = 10
"""Every ``HOLDOUT_EVERY``-th training image checks the INT8 maps instead of calibrating (at least one)."""


def _static_hw(ov_model: ov.Model) -> tuple[int, int] | None:
    shape = ov_model.input(0).get_partial_shape()
    if shape.rank.is_static and shape.rank.get_length() == 4 and shape[2].is_static and shape[3].is_static:
        return shape[2].get_length(), shape[3].get_length()
    return None


def _batch_images(batch: Any, size: tuple[int, int] | None) -> np.ndarray:
    image = batch["image"] if isinstance(batch, dict) else batch.image
    if size is not None and tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    return image.detach().cpu().numpy().astype(np.float32)


def _training_loader(datamodule: AnomalibDataModule, indices: list[int] | None = None) -> DataLoader:
    datamodule.setup("fit")
    dataset = datamodule.train_data
    if len(dataset) == 0:
        msg = "The datamodule has no training images to calibrate INT8 quantisation on."
        raise ValueError(msg)
    subset = dataset if indices is None else Subset(dataset, indices)
    batch_size = getattr(datamodule, "train_batch_size", 8)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate_fn, num_workers=0)


def training_calibration_dataset(
    datamodule: AnomalibDataModule,
    ov_model: ov.Model,
    indices: list[int] | None = None,
) -> nncf.Dataset:
    """NNCF calibration data from the datamodule's normal training images, in a fixed order.

    Images are resized to the IR's input size when it is static (the IR resizes again internally, which is
    then the identity).

    Args:
        datamodule: Datamodule whose ``train_data`` holds normal images.
        ov_model: The FP32 OpenVINO model to be quantised.
        indices: Training images to use (all by default).

    Returns:
        nncf.Dataset: Calibration dataset yielding ``float32`` NCHW batches.

    Raises:
        ValueError: If the datamodule has no training images.
    """
    import nncf  # noqa: PLC0415

    loader = _training_loader(datamodule, indices)
    logger.info("Calibrating INT8 on %d normal training images.", len(loader.dataset))
    size = _static_hw(ov_model)
    return nncf.Dataset(loader, lambda batch: _batch_images(batch, size))


def holdout_split(n_images: int, every: int = HOLDOUT_EVERY) -> tuple[list[int], list[int]]:
    """Split training-image indices into calibration and held-out (map-check) images.

    Args:
        n_images: Number of training images.
        every: Every ``every``-th image is held out; at least one when there are two or more images.

    Returns:
        tuple[list[int], list[int]]: Calibration indices and held-out indices (empty for a single image).
    """
    held = list(range(every - 1, n_images, every))
    if not held and n_images >= 2:
        held = [n_images - 1]
    held_set = set(held)
    return [index for index in range(n_images) if index not in held_set], held


MapFunction = Callable[[dict[str, np.ndarray]], np.ndarray]
"""Maps of a compiled IR's outputs by name (a features IR's tail); ``None``: the IR's ``anomaly_map`` output."""


def _maps(compiled: Any, image: np.ndarray, maps: MapFunction | None) -> np.ndarray:
    result = compiled(image)
    if maps is not None:
        return np.asarray(maps({port.get_any_name(): value for port, value in result.items()})).reshape(-1)
    names = {name for output in compiled.outputs for name in output.get_names()}
    return np.asarray(result["anomaly_map" if "anomaly_map" in names else "pred_score"]).reshape(-1)


def map_fidelity_dataset(
    ov_model: ov.Model,
    datamodule: AnomalibDataModule,
    indices: list[int],
    maps: MapFunction | None = None,
) -> nncf.Dataset:
    """Held-out normal images paired with the FP32 model's anomaly maps (scores for map-less models).

    Args:
        ov_model: The FP32 OpenVINO model.
        datamodule: Datamodule with the normal training images.
        indices: The held-out training images.
        maps: Maps of the IR's outputs (a features IR's tail), or ``None`` for its ``anomaly_map`` output.

    Returns:
        nncf.Dataset: Items ``(image [1, 3, H, W], fp32_map)``; the model input is the image.
    """
    import nncf  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415

    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    size = _static_hw(ov_model)
    items = []
    for batch in _training_loader(datamodule, indices):
        images = _batch_images(batch, size)
        for image in images:
            item = image[None]
            items.append((item, _maps(compiled, item, maps)))
    return nncf.Dataset(items, lambda item: item[0])


def map_fidelity(
    compiled: Any, items: Iterable[tuple[np.ndarray, np.ndarray]], maps: MapFunction | None = None
) -> tuple[float, list[float]]:
    """NNCF validation function: ``1 -`` mean absolute difference to the FP32 maps (1.0 = identical).

    Args:
        compiled: Compiled (quantised) model.
        items: ``(image, fp32_map)`` pairs from :func:`map_fidelity_dataset`.
        maps: As in :func:`map_fidelity_dataset`.

    Returns:
        tuple[float, list[float]]: The mean fidelity and each image's, as NNCF ranks per sample.
    """
    per_image = [1.0 - float(np.abs(_maps(compiled, image, maps) - reference).mean()) for image, reference in items]
    return float(np.mean(per_image)), per_image


def _producers(node: ov.Node) -> Iterator[ov.Node]:
    for value in node.input_values():
        yield value.get_node()


def anomaly_map_ignored_scope(ov_model: ov.Model) -> nncf.IgnoredScope:
    """Ops to keep in floating point: everything that no network convolution depends on.

    The "network" is every (group) convolution whose kernel has more than one input or output channel
    (the teacher, the students, the decoder); the single-channel Gaussian-blur convolution is not part of
    it. What no network convolution consumes, directly or indirectly, is the anomaly-map tail: distances,
    upsampling, map fusion, blur, image score, Mahalanobis distances (Padim) and the post-processor.

    Args:
        ov_model: The OpenVINO model.

    Returns:
        nncf.IgnoredScope: The tail's op names (not validated, so it also fits models without a tail).
    """
    import nncf  # noqa: PLC0415

    network = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in NETWORK_OP_TYPES:
            continue
        weight = op.input_value(1).get_partial_shape()
        if weight.is_static and int(np.prod([d for d in weight.to_shape()][:-2])) > 1:
            network.append(op)
    needed: set[str] = set()
    stack = list(network)
    while stack:
        op = stack.pop()
        name = op.get_friendly_name()
        if name in needed:
            continue
        needed.add(name)
        stack.extend(_producers(op))
    skip_types = {"Parameter", "Constant", "Result"}
    names = [
        op.get_friendly_name()
        for op in ov_model.get_ordered_ops()
        if op.get_friendly_name() not in needed and op.get_type_name() not in skip_types
    ]
    return nncf.IgnoredScope(names=names, validate=False)


def quantize_on_training_images(
    ov_model: ov.Model,
    datamodule: AnomalibDataModule,
    subset_size: int = 300,
    max_map_error: float | None = MAX_MAP_ERROR,
    maps: MapFunction | None = None,
) -> ov.Model:
    """INT8 post-training quantisation on normal training images, anomaly maps kept close to FP32.

    With ``max_map_error`` set, every :data:`HOLDOUT_EVERY`-th training image is held out of calibration and
    NNCF's accuracy control reverts the most sensitive quantised ops to floating point until the mean absolute
    difference between INT8 and FP32 normalised anomaly maps on those images is at most ``max_map_error``.
    No labels and no test images are involved. The anomaly-map tail stays in float either way.

    Args:
        ov_model: FP32 OpenVINO model.
        datamodule: Datamodule with the normal training images.
        subset_size: Maximum number of calibration batches NNCF draws.
        max_map_error: Largest accepted mean map difference, or ``None`` for plain PTQ on all training images.
        maps: Maps of the IR's outputs by name (a features IR's tail, see
            :func:`kd_ext.export.features.features_map_function`); ``None``: the IR's ``anomaly_map`` output.

    Returns:
        ov.Model: The quantised model.

    Raises:
        ValueError: If ``max_map_error`` is outside ``[0, 1]`` or there are no training images.
    """
    import nncf  # noqa: PLC0415

    if max_map_error is not None and not 0 <= max_map_error <= 1:
        msg = f"max_map_error must be between 0 and 1 (normalised maps), got {max_map_error}."
        raise ValueError(msg)
    ignored_scope = anomaly_map_ignored_scope(ov_model)
    datamodule.setup("fit")
    calibration_indices, held_out = holdout_split(len(datamodule.train_data))
    if max_map_error is None or not held_out:
        if max_map_error is not None:
            logger.warning("One training image only: nothing to hold out, INT8 maps are not checked.")
        calibration = training_calibration_dataset(datamodule, ov_model)
        return nncf.quantize(ov_model, calibration, subset_size=subset_size, ignored_scope=ignored_scope)
    logger.info("Checking INT8 anomaly maps against FP32 on %d held-out training images.", len(held_out))
    return nncf.quantize_with_accuracy_control(
        ov_model,
        training_calibration_dataset(datamodule, ov_model, calibration_indices),
        map_fidelity_dataset(ov_model, datamodule, held_out, maps),
        partial(map_fidelity, maps=maps),
        max_drop=max_map_error,
        subset_size=subset_size,
        ignored_scope=ignored_scope,
    )


def _default_metric() -> Metric:
    from anomalib.metrics import AUROC  # noqa: PLC0415

    return AUROC(fields=["pred_score", "gt_label"])


def quantize_with_accuracy_control(
    ov_model: ov.Model,
    datamodule: AnomalibDataModule,
    metric: Metric | None = None,
    max_drop: float = 0.01,
    subset_size: int = 300,
) -> ov.Model:
    """NNCF accuracy-aware INT8 quantisation (anomalib's ``INT8_ACQ``), calibrated on training images.

    Accuracy is measured on ``datamodule.test_dataloader()`` (labelled images), as anomalib does; quantised
    ops are reverted to float until the metric drops by at most ``max_drop``. Note that the test images
    then take part in choosing the model: report accuracy on other data where possible.

    Args:
        ov_model: FP32 OpenVINO model.
        datamodule: Datamodule with training (calibration) and test (validation) images.
        metric: anomalib metric (higher is better); image AUROC on ``pred_score`` by default.
        max_drop: Largest accepted absolute metric drop.
        subset_size: Maximum number of calibration batches.

    Returns:
        ov.Model: The quantised model.

    Raises:
        ValueError: If ``max_drop`` is outside ``[0, 1]``.
    """
    import nncf  # noqa: PLC0415
    from anomalib.data import ImageBatch  # noqa: PLC0415

    if not 0 <= max_drop <= 1:
        msg = f"max_drop must be between 0 and 1, got {max_drop}."
        raise ValueError(msg)
    metric = metric if metric is not None else _default_metric()
    size = _static_hw(ov_model)
    calibration = training_calibration_dataset(datamodule, ov_model)
    datamodule.setup("test")
    validation = nncf.Dataset(datamodule.test_dataloader())

    def validate(compiled: Any, batches: Iterable[Any]) -> float:
        metric.reset()
        for batch in batches:
            images = _batch_images(batch, size)
            outputs = {key.get_any_name(): value for key, value in compiled(images).items()}
            gt_mask = batch.gt_mask
            if gt_mask is not None and size is not None and tuple(gt_mask.shape[-2:]) != size:
                gt_mask = F.interpolate(gt_mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()
            result = ImageBatch(
                image=torch.from_numpy(images),
                gt_label=batch.gt_label,
                gt_mask=gt_mask[:, None] if gt_mask is not None else None,
                pred_score=torch.from_numpy(outputs["pred_score"]).reshape(-1),
                pred_label=torch.from_numpy(outputs["pred_label"]).reshape(-1) if "pred_label" in outputs else None,
                anomaly_map=torch.from_numpy(outputs["anomaly_map"]) if "anomaly_map" in outputs else None,
                pred_mask=torch.from_numpy(outputs["pred_mask"]) if "pred_mask" in outputs else None,
            )
            metric.update(result)
        return float(metric.compute())

    return nncf.quantize_with_accuracy_control(
        ov_model,
        calibration,
        validation,
        validate,
        max_drop=max_drop,
        subset_size=subset_size,
        ignored_scope=anomaly_map_ignored_scope(ov_model),
    )
