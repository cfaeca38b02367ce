"""ONNX / OpenVINO export with FP32, FP16 and INT8 (NNCF) precision, named as anomalib's ``CompressionType``.

INT8 quantisation (``int8_ptq``, ``int8_acq``) is calibrated on normal training images with the anomaly-map tail
kept in floating point; see
:mod:`kd_ext.export.quantization`. Every IR records what was done in its ``rt_info`` and is written atomically.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

from kd_ext.edge.contract import CHECKSUM_KEY, EXPORT_MODE_KEY, RT_INFO_KEY, TAIL_KEY, ExportMode, file_sha256

from .quantization import MAX_MAP_ERROR, MapFunction, quantize_on_training_images, quantize_with_accuracy_control

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule
    from torchmetrics import Metric


class Precision(str, Enum):
    """Precision of an exported IR; the compressed ones carry the names of anomalib's ``CompressionType``.

    Attributes:
        FP32: No compression.
        FP16: FP16 weights (anomalib's ``FP16``).
        INT8: INT8 weights, dequantised before inference; no data needed (anomalib's ``INT8``).
        INT8_PTQ: NNCF post-training quantisation calibrated on normal training images, the anomaly-map tail kept
            in floating point and the maps checked against FP32 on held-out training images (anomalib's
            ``INT8_PTQ``, with kd_ext's calibration).
        INT8_ACQ: NNCF accuracy-aware quantisation: calibration on training images, accuracy on the test loader
            (anomalib's ``INT8_ACQ``).
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_PTQ = "int8_ptq"
    INT8_ACQ = "int8_acq"


PRECISIONS = tuple(member.value for member in Precision)
"""Values of :class:`Precision` (anomalib's ``CompressionType`` values and ``fp32``)."""
DEPRECATED_PRECISIONS = {"int8_weights": Precision.INT8}
"""kd_ext's former names, accepted with a ``FutureWarning`` (the former ``"int8"``: see :func:`resolve_precision`)."""
CALIBRATED = (Precision.INT8_PTQ, Precision.INT8_ACQ)
"""Precisions that need ``calibration`` (a datamodule with normal training images)."""


def resolve_precision(precision: Precision | str | None, calibration: object | None = None) -> Precision:
    """Return the :class:`Precision` a name stands for.

    Accepted: :class:`Precision` members, anomalib's ``CompressionType`` members, their values or names in any case
    (``"int8_ptq"``, ``"INT8_PTQ"``), and ``None`` (no compression, as anomalib's ``compression_type=None``).
    kd_ext's former names still work with a ``FutureWarning``: ``"int8_weights"`` is ``int8``, and the plain string
    ``"int8"`` *with* ``calibration`` data is taken in its former kd_ext meaning, ``int8_ptq`` (without calibration,
    or as an Enum member, ``int8`` is anomalib's weight-only INT8).

    Args:
        precision: The requested precision.
        calibration: The calibration datamodule of the call, if any (decides the former ``"int8"``).

    Returns:
        Precision: The precision to export.

    Raises:
        ValueError: If the name is unknown.
    """
    if precision is None:
        return Precision.FP32
    from_enum = isinstance(precision, Enum)
    name = str(precision.value if from_enum else precision).lower()
    if name in DEPRECATED_PRECISIONS:
        resolved = DEPRECATED_PRECISIONS[name]
        warnings.warn(
            f"precision='{name}' is deprecated; use '{resolved.value}' (anomalib's CompressionType name).",
            FutureWarning,
            stacklevel=3,
        )
        return resolved
    if name == Precision.INT8.value and calibration is not None and not from_enum:
        warnings.warn(
            "precision='int8' with calibration data is kd_ext's former name of 'int8_ptq' (INT8 post-training "
            "quantisation) and is exported as such; 'int8' now follows anomalib's CompressionType and means INT8 "
            "weights only (no calibration). Pass precision='int8_ptq'.",
            FutureWarning,
            stacklevel=3,
        )
        return Precision.INT8_PTQ
    try:
        return Precision(name)
    except ValueError:
        msg = f"Unknown precision '{name}'; choose one of {PRECISIONS} (anomalib's CompressionType values)."
        raise ValueError(msg) from None


_PLACEHOLDER = "kd_ext_sha256_placeholder_" + "0" * 38

AUTO_INPUT_SIZE = "auto"
"""Default ``input_size`` of the exports: see :func:`resolve_input_size`."""
IMAGE_INPUT_SIZE = (256, 256)
"""What ``"auto"`` exports an image model at."""


def takes_series(model: AnomalibModule) -> bool:
    """Whether ``model`` is a 1-D model (SignalKD): it takes series ``[N, C, L]`` of its training length.

    Args:
        model: An anomalib model.

    Returns:
        bool: ``True`` for a model of series, ``False`` for an image model.
    """
    from kd_ext.models.signal_kd.torch_model import SignalKDModel  # noqa: PLC0415

    return isinstance(getattr(model, "model", None), SignalKDModel)


def resolve_input_size(
    model: AnomalibModule, input_size: tuple[int, int] | str | None = AUTO_INPUT_SIZE
) -> tuple[int, int] | None:
    """The ``input_size`` an export passes to the model's ``to_onnx``.

    ``"auto"`` is the model's own input: ``None`` for a 1-D model (its ``to_onnx`` then exports series of the
    length it was trained on, the only length it takes) and :data:`IMAGE_INPUT_SIZE` for an image model. A
    ``(H, W)`` or ``None`` (dynamic height and width of an image model) is returned as given.

    Args:
        model: The model to export.
        input_size: ``"auto"``, a static ``(H, W)`` or ``None``.

    Returns:
        tuple[int, int] | None: The size for ``to_onnx``.

    Raises:
        ValueError: If ``input_size`` is another string.
    """
    if not isinstance(input_size, str):
        return input_size
    if input_size != AUTO_INPUT_SIZE:
        msg = f"input_size must be (H, W), None (dynamic) or '{AUTO_INPUT_SIZE}' (the model's own), got {input_size!r}."
        raise ValueError(msg)
    return None if takes_series(model) else IMAGE_INPUT_SIZE


def _size_info(model: AnomalibModule, input_size: tuple[int, int] | None) -> str:
    """The IR's input size as recorded in its ``rt_info``."""
    if takes_series(model):
        return f"{int(model.model.series_length)} time steps"
    return "dynamic" if input_size is None else f"{input_size[0]}x{input_size[1]}"


def _compress(
    ov_model: ov.Model,
    precision: Precision,
    calibration: AnomalibDataModule | None,
    metric: Metric | None,
    max_drop: float,
    subset_size: int,
    max_map_error: float | None,
    maps: MapFunction | None = None,
) -> ov.Model:
    if precision in {Precision.FP32, Precision.FP16}:
        return ov_model
    if precision is Precision.INT8:
        import nncf  # noqa: PLC0415

        return nncf.compress_weights(ov_model)
    if calibration is None:
        msg = f"precision='{precision.value}' needs calibration=<datamodule with normal training images>."
        raise ValueError(msg)
    if precision is Precision.INT8_PTQ:
        return quantize_on_training_images(ov_model, calibration, subset_size, max_map_error, maps)
    return quantize_with_accuracy_control(ov_model, calibration, metric, max_drop, subset_size)


def _export_mode(
    mode: ExportMode | str, precision: Precision, input_size: tuple[int, int] | None, model: AnomalibModule
) -> ExportMode:
    try:
        mode = ExportMode(mode)
    except ValueError:
        choices = [member.value for member in ExportMode]
        msg = f"Unknown export mode '{mode}'; choose one of {choices}."
        raise ValueError(msg) from None
    if mode is ExportMode.AUTO:
        from .features import supports_features  # noqa: PLC0415

        usable = input_size is not None and precision is not Precision.INT8_ACQ and supports_features(model.model)
        return ExportMode.FEATURES if usable else ExportMode.STANDARD
    if mode is ExportMode.FEATURES and input_size is None:
        msg = "mode='features' needs a static input_size (the anomaly-map size is fixed at export), e.g. (256, 256)."
        raise ValueError(msg)
    if mode is ExportMode.FEATURES and precision is Precision.INT8_ACQ:
        msg = "int8_acq checks the IR's scores, which a features IR does not output; use int8_ptq or mode='standard'."
        raise ValueError(msg)
    return mode


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
        ov_model.set_rt_info(_PLACEHOLDER, [RT_INFO_KEY, CHECKSUM_KEY])
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
    input_size: tuple[int, int] | str | None = AUTO_INPUT_SIZE,
    model_file_name: str = "model",
) -> Path:
    """Export the whole model (pre-processor, network, post-processor) to ONNX via anomalib.

    anomalib asks for opset 14; the dynamo exporter writes opset 18 and its down-conversion stops at
    ``Pad`` (reflect padding of the blur, TF-"same" padding of the EfficientNet teacher), so the file is
    opset 18. OpenVINO reads it.

    Args:
        model: Trained anomalib model (kd_ext or anomalib's).
        export_root: Output root; the file goes to ``<export_root>/weights/onnx/<name>.onnx``.
        input_size: ``"auto"`` (the model's own: a 1-D model's series length, else ``(256, 256)``), a static
            ``(H, W)``, or ``None`` for dynamic height and width (see :func:`resolve_input_size`).
        model_file_name: File name without suffix.

    Returns:
        Path: The ``.onnx`` file.
    """
    input_size = resolve_input_size(model, input_size)
    model.eval()
    return model.to_onnx(export_root, model_file_name=model_file_name, input_size=input_size)


def export_openvino(
    model: AnomalibModule,
    export_root: str | Path,
    precision: Precision | str | None = Precision.FP32,
    calibration: AnomalibDataModule | None = None,
    input_size: tuple[int, int] | str | None = AUTO_INPUT_SIZE,
    model_file_name: str = "model",
    metric: Metric | None = None,
    max_drop: float = 0.01,
    subset_size: int = 300,
    convert: Callable[[Path], ov.Model] | None = None,
    max_map_error: float | None = MAX_MAP_ERROR,
    mode: ExportMode | str = ExportMode.AUTO,
) -> Path:
    """Export an anomalib model to OpenVINO IR at the given precision.

    With ``mode="standard"`` the IR is the whole ``AnomalibModule.forward``: it takes ``float32`` RGB images in
    ``[0, 1]``, ``[N, 3, H, W]`` (batch dynamic), and outputs anomalib's ``InferenceBatch`` fields ``pred_score``,
    ``pred_label``, ``anomaly_map``, ``pred_mask`` (normalised so that the threshold is 0.5, when the
    model's post-processor has statistics). With ``mode="features"`` (BiDirMSKD and MTHF) the IR takes the same
    input and ends at the per-scale teacher/student features; the anomaly-map tail and the post-processor are
    recorded in its ``rt_info`` and :class:`kd_ext.edge.EdgeModel` runs them with :mod:`kd_ext.kernels`, giving the
    same four fields (:mod:`kd_ext.export.features`). Only :class:`kd_ext.edge.EdgeModel` reads a features IR.

    Args:
        model: Trained anomalib model.
        export_root: Output root; the IR goes to ``<export_root>/weights/openvino/<name>.xml`` like anomalib's.
        precision: A :class:`Precision`, anomalib ``CompressionType`` or their value (see
            :func:`resolve_precision`; kd_ext's former names are deprecated).
        calibration: Datamodule whose *training* images calibrate ``int8_ptq`` / ``int8_acq`` (its test images
            are the accuracy check of ``int8_acq``).
        input_size: ``"auto"`` (default): the model's own input, series of its training length for a 1-D model
            (SignalKD), ``(256, 256)`` for an image model; a static ``(H, W)`` (recommended for images: batching and
            INT8 calibration need a fixed size); or ``None`` for dynamic height and width (see
            :func:`resolve_input_size`).
        model_file_name: File name without suffix.
        metric: Metric for ``int8_acq`` (image AUROC by default).
        max_drop: Largest accepted metric drop for ``int8_acq``.
        subset_size: Maximum number of calibration batches.
        convert: ONNX-to-OpenVINO conversion (``openvino.convert_model`` by default).
        max_map_error: For ``int8_ptq``: largest mean difference between INT8 and FP32 normalised anomaly maps on
            held-out normal training images (ops are reverted to float until it holds), or ``None`` for plain
            PTQ. See :func:`kd_ext.export.quantize_on_training_images`.
        mode: :class:`~kd_ext.edge.contract.ExportMode` or its value: ``"standard"`` (anomalib's IR),
            ``"features"`` (needs a static ``input_size``; not with ``int8_acq``) or ``"auto"`` (default:
            ``"features"`` where it applies, else ``"standard"``; the features IR was the faster one with the same
            outputs in ``benchmarks/results/edge.md``).

    Returns:
        Path: The ``.xml`` file (its ``.bin`` is next to it).

    Raises:
        ValueError: If the precision or ``input_size`` is unknown, or INT8 is asked for without calibration data.
    """
    import openvino as ov  # noqa: PLC0415

    precision = resolve_precision(precision, calibration)
    input_size = resolve_input_size(model, input_size)
    mode = _export_mode(mode, precision, input_size, model)
    if precision in CALIBRATED and calibration is None:
        msg = f"precision='{precision.value}' needs calibration=<datamodule with normal training images>."
        raise ValueError(msg)
    xml_path = Path(export_root) / "weights" / "openvino" / f"{model_file_name}.xml"
    tail = maps = None
    with TemporaryDirectory() as onnx_dir:
        if mode is ExportMode.FEATURES:
            from .features import anomaly_tail, export_features_onnx, features_map_function  # noqa: PLC0415

            model.eval()
            tail, outputs = anomaly_tail(model, input_size)
            maps = features_map_function(tail)
            onnx_path = export_features_onnx(model, Path(onnx_dir) / f"{model_file_name}.onnx", input_size, outputs)
        else:
            onnx_path = export_onnx(model, onnx_dir, input_size, model_file_name)
        ov_model = (convert or ov.convert_model)(onnx_path)
    ov_model = _compress(ov_model, precision, calibration, metric, max_drop, subset_size, max_map_error, maps)
    info = {
        EXPORT_MODE_KEY: mode.value,
        "precision": precision.value,
        "model": type(model).__name__,
        "calibration": "normal training images" if precision in CALIBRATED else "none",
        "input_size": _size_info(model, input_size),
        "threshold": "0.5 (normalised)" if getattr(model, "post_processor", None) else "none",
    }
    if precision is Precision.INT8_PTQ:
        info["max_map_error"] = "none (plain PTQ)" if max_map_error is None else str(max_map_error)
    if tail is not None:
        info[TAIL_KEY] = tail.to_json()
    return save_ir(ov_model, xml_path, compress_to_fp16=precision == "fp16", info=info)
