"""Export kd_ext (and other anomalib) models to ONNX and OpenVINO IR, FP32 / FP16 / INT8.

anomalib's own route works for kd_ext models (``anomalib export --model BiDirMSKD --export_type openvino
--ckpt_path ...`` and ``Engine.export``): for BiDirMSKD and MTHF it writes the *features* IR below where it applies
(anomalib's whole-forward IR with ``--onnx_kwargs '{"export_mode": "standard"}'``), and kd_ext models calibrate
``INT8_PTQ`` / ``INT8_ACQ`` on normal *training* images, keep the anomaly-map tail in floating point and check INT8
anomaly maps against FP32 on held-out training images (see :class:`KDExtExportMixin`).
:func:`export_openvino` does the same for any anomalib model and records what it did in the IR's ``rt_info``; its
precision names are anomalib's ``CompressionType`` values (:class:`Precision`: ``fp32``, ``fp16``, ``int8`` weights
only, ``int8_ptq``, ``int8_acq``). Its ``mode`` (:class:`ExportMode`) is ``"standard"`` (anomalib's whole forward)
or, for BiDirMSKD and MTHF, ``"features"``: the IR ends at the per-scale features and kd_ext's edge runtime runs the
anomaly-map tail with the C++ kernel (:mod:`kd_ext.export.features`).

Example:
    >>> from kd_ext.export import export_openvino
    >>> xml = export_openvino(model, "exports", precision="int8_ptq", calibration=datamodule)  # doctest: +SKIP
"""

from kd_ext.edge.contract import ExportMode

from .mixin import KDExtExportMixin
from .openvino import PRECISIONS, RT_INFO_KEY, Precision, export_onnx, export_openvino, resolve_precision
from .quantization import (
    MAX_MAP_ERROR,
    anomaly_map_ignored_scope,
    quantize_on_training_images,
    quantize_with_accuracy_control,
    training_calibration_dataset,
)

__all__ = [
    "MAX_MAP_ERROR",
    "PRECISIONS",
    "RT_INFO_KEY",
    "ExportMode",
    "KDExtExportMixin",
    "Precision",
    "anomaly_map_ignored_scope",
    "export_onnx",
    "export_openvino",
    "quantize_on_training_images",
    "quantize_with_accuracy_control",
    "resolve_precision",
    "training_calibration_dataset",
]
