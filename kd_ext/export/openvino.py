"""ONNX / OpenVINO export with FP32, FP16 and INT8 (NNCF) precision, calibrated on normal training images.

Why not anomalib's ``INT8_PTQ`` as is: it calibrates on ``datamodule.val_dataloader()`` (for MVTecAD the
*test* images, anomalies included) and quantises every quantisable op, including the anomaly-map tail
(``1 - cos`` distances, upsampling, the Gaussian-blur convolution, score reduction and the
normalisation/threshold post-processor). On this project that produced constant scores (image AUROC 0.5)
for Padim. Here calibration uses the normal training images (what the model is supposed to see) and
:func:`anomaly_map_ignored_scope` keeps everything after the networks' last convolutions in floating point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from kd_ext.edge.runtime import RT_INFO_KEY, file_sha256

if TYPE_CHECKING:
    import nncf
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule
    from torchmetrics import Metric

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int8_acq", "int8_weights")
"""``fp32``; ``fp16`` (FP16 weights); ``int8`` (NNCF PTQ on training images); ``int8_acq`` (NNCF accuracy-aware
PTQ: calibration on training images, accuracy on the test loader); ``int8_weights`` (weights only, no data)."""
NETWORK_OP_TYPES = ("Convolution", "GroupConvolution")
_PLACEHOLDER = "kd_ext_sha256_placeholder_" + "0" * 38


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


def training_calibration_dataset(datamodule: AnomalibDataModule, ov_model: ov.Model) -> nncf.Dataset:
    """NNCF calibration data from the datamodule's normal training images.

    Images are resized to the IR's input size when it is static (the IR resizes again internally, which is
    then the identity).

    Args:
        datamodule: Datamodule whose ``train_dataloader`` yields normal images.
        ov_model: The FP32 OpenVINO model to be quantised.

    Returns:
        nncf.Dataset: Calibration dataset yielding ``float32`` NCHW batches.

    Raises:
        ValueError: If the datamodule has no training images.
    """
    import nncf  # noqa: PLC0415

    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if len(loader.dataset) == 0:
        msg = "The datamodule has no training images to calibrate INT8 quantisation on."
        raise ValueError(msg)
    if len(loader.dataset) < 300:
        logger.info("Calibrating INT8 on %d normal training images.", len(loader.dataset))
    size = _static_hw(ov_model)
    return nncf.Dataset(loader, lambda batch: _batch_images(batch, size))


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
) -> ov.Model:
    """INT8 post-training quantisation calibrated on normal training images, anomaly-map tail in float.

    Args:
        ov_model: FP32 OpenVINO model.
        datamodule: Datamodule with the normal training images.
        subset_size: Maximum number of calibration batches NNCF draws.

    Returns:
        ov.Model: The quantised model.
    """
    import nncf  # noqa: PLC0415

    return nncf.quantize(
        ov_model,
        training_calibration_dataset(datamodule, ov_model),
        subset_size=subset_size,
        ignored_scope=anomaly_map_ignored_scope(ov_model),
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
            outputs = {key.get_any_name(): value for key, value in compiled(_batch_images(batch, size)).items()}
            gt_mask = batch.gt_mask
            if gt_mask is not None and size is not None and tuple(gt_mask.shape[-2:]) != size:
                gt_mask = F.interpolate(gt_mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()
            result = ImageBatch(
                image=torch.from_numpy(_batch_images(batch, size)),
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


def _compress(
    ov_model: ov.Model,
    precision: str,
    calibration: AnomalibDataModule | None,
    metric: Metric | None,
    max_drop: float,
    subset_size: int,
) -> ov.Model:
    if precision in {"fp32", "fp16"}:
        return ov_model
    if precision == "int8_weights":
        import nncf  # noqa: PLC0415

        return nncf.compress_weights(ov_model)
    if calibration is None:
        msg = f"precision='{precision}' needs calibration=<datamodule with normal training images>."
        raise ValueError(msg)
    if precision == "int8":
        return quantize_on_training_images(ov_model, calibration, subset_size)
    return quantize_with_accuracy_control(ov_model, calibration, metric, max_drop, subset_size)


def save_ir(ov_model: ov.Model, xml_path: Path, compress_to_fp16: bool, info: dict[str, str]) -> Path:
    """Save an IR atomically, recording ``info`` and the weights' SHA-256 in ``rt_info``.

    The pair is written under temporary names, the ``.bin`` is hashed, the hash replaces a placeholder of the
    same length in the ``.xml``, then both are renamed
    (``.bin`` first) so that a crash never leaves a complete-looking pair.

    Args:
        ov_model: Model to save.
        xml_path: Destination ``.xml`` (its ``.bin`` goes next to it).
        compress_to_fp16: Store weights as FP16.
        info: Extra ``rt_info`` entries under :data:`RT_INFO_KEY`.

    Returns:
        Path: ``xml_path``.
    """
    import openvino as ov  # noqa: PLC0415

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_xml = xml_path.with_name(f".{xml_path.stem}.{os.getpid()}.partial.xml")
    tmp_bin = tmp_xml.with_suffix(".bin")
    try:
        for key, value in info.items():
            ov_model.set_rt_info(str(value), [RT_INFO_KEY, key])
        ov_model.set_rt_info(_PLACEHOLDER, [RT_INFO_KEY, "weights_sha256"])
        ov.save_model(ov_model, tmp_xml, compress_to_fp16=compress_to_fp16)
        text = tmp_xml.read_text(encoding="utf-8")
        if text.count(_PLACEHOLDER) != 1:
            msg = f"Could not record the weights' checksum in {tmp_xml}."
            raise RuntimeError(msg)
        tmp_xml.write_text(text.replace(_PLACEHOLDER, file_sha256(tmp_bin)), encoding="utf-8")
        tmp_bin.replace(xml_path.with_suffix(".bin"))
        tmp_xml.replace(xml_path)
    finally:
        tmp_xml.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)
    return xml_path


def export_onnx(
    model: AnomalibModule,
    export_root: str | Path,
    input_size: tuple[int, int] | None = (256, 256),
    model_file_name: str = "model",
) -> Path:
    """Export the whole model (pre-processor, network, post-processor) to ONNX via anomalib.

    anomalib asks for opset 14; the dynamo exporter writes opset 18 and its down-conversion stops at
    ``Pad`` (reflect padding of the blur, TF-"same" padding of the EfficientNet teacher), so the file is
    opset 18. OpenVINO reads it.

    Args:
        model: Trained anomalib model (kd_ext or anomalib's).
        export_root: Output root; the file goes to ``<export_root>/weights/onnx/<name>.onnx``.
        input_size: Static ``(H, W)``, or ``None`` for dynamic height and width.
        model_file_name: File name without suffix.

    Returns:
        Path: The ``.onnx`` file.
    """
    model.eval()
    return model.to_onnx(export_root, model_file_name=model_file_name, input_size=input_size)


def export_openvino(
    model: AnomalibModule,
    export_root: str | Path,
    precision: str = "fp32",
    calibration: AnomalibDataModule | None = None,
    input_size: tuple[int, int] | None = (256, 256),
    model_file_name: str = "model",
    metric: Metric | None = None,
    max_drop: float = 0.01,
    subset_size: int = 300,
    convert: Callable[[Path], ov.Model] | None = None,
) -> Path:
    """Export an anomalib model to OpenVINO IR at the given precision.

    The IR is the whole ``AnomalibModule.forward``: it takes ``float32`` RGB images in ``[0, 1]``,
    ``[N, 3, H, W]`` (batch dynamic), and outputs anomalib's ``InferenceBatch`` fields ``pred_score``,
    ``pred_label``, ``anomaly_map``, ``pred_mask`` (normalised so that the threshold is 0.5, when the
    model's post-processor has statistics).

    Args:
        model: Trained anomalib model.
        export_root: Output root; the IR goes to ``<export_root>/weights/openvino/<name>.xml`` like anomalib's.
        precision: One of :data:`PRECISIONS`.
        calibration: Datamodule whose *training* images calibrate ``int8`` / ``int8_acq`` (its test images
            are the accuracy check of ``int8_acq``).
        input_size: Static ``(H, W)`` (recommended: batching and INT8 calibration need a fixed size), or
            ``None`` for dynamic height and width.
        model_file_name: File name without suffix.
        metric: Metric for ``int8_acq`` (image AUROC by default).
        max_drop: Largest accepted metric drop for ``int8_acq``.
        subset_size: Maximum number of calibration batches.
        convert: ONNX-to-OpenVINO conversion (``openvino.convert_model`` by default).

    Returns:
        Path: The ``.xml`` file (its ``.bin`` is next to it).

    Raises:
        ValueError: If the precision is unknown or INT8 is asked for without calibration data.
    """
    import openvino as ov  # noqa: PLC0415

    if precision not in PRECISIONS:
        msg = f"Unknown precision '{precision}'; choose one of {PRECISIONS}."
        raise ValueError(msg)
    if precision in {"int8", "int8_acq"} and calibration is None:
        msg = f"precision='{precision}' needs calibration=<datamodule with normal training images>."
        raise ValueError(msg)
    xml_path = Path(export_root) / "weights" / "openvino" / f"{model_file_name}.xml"
    with TemporaryDirectory() as onnx_dir:
        onnx_path = export_onnx(model, onnx_dir, input_size, model_file_name)
        ov_model = (convert or ov.convert_model)(onnx_path)
    ov_model = _compress(ov_model, precision, calibration, metric, max_drop, subset_size)
    info = {
        "precision": precision,
        "model": type(model).__name__,
        "calibration": "normal training images" if precision in {"int8", "int8_acq"} else "none",
        "input_size": "dynamic" if input_size is None else f"{input_size[0]}x{input_size[1]}",
        "threshold": "0.5 (normalised)" if getattr(model, "post_processor", None) else "none",
    }
    return save_ir(ov_model, xml_path, compress_to_fp16=precision == "fp16", info=info)
