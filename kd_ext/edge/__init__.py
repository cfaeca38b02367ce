"""Lean edge runtime: score images with an exported OpenVINO IR using only openvino, numpy and Pillow.

A 1-D model's IR (SignalKD) scores files of series instead (:func:`score_series`, numpy and openvino only), with
the preprocessing its model was trained with (:mod:`kd_ext.edge.series_preprocessing`).

Importing this package never imports torch or anomalib (checked by the test suite), so a deployment needs
``pip install openvino numpy pillow`` and the IR, nothing else.

Post-processing placement: a standard IR (anomalib's export) runs the anomaly-map tail (per-scale ``1 - cos``
distances, upsampling, fusion, Gaussian blur, image score, normalisation and thresholds) inside the IR, so that
any anomalib runtime reads it. A features IR (``kd_ext.export.export_openvino(..., mode="features")``) ends at the
per-scale teacher/student features and records the tail in its ``rt_info``; :class:`EdgeModel` detects it and
runs the tail in kd_ext's fused C++ kernel (:mod:`kd_ext.kernels`, ``kd_ext._native``) plus numpy for anomalib's
normalisation and thresholds (:mod:`kd_ext.edge.tail`), with the same outputs. Which is faster, and by how much,
is measured in ``benchmarks/results/edge.md``. The names both sides use are in :mod:`kd_ext.edge.contract`.

Precision: this CPU runs "FP32" IRs in bf16 unless told otherwise, which moved anomaly maps by up to 0.04.
:class:`EdgeModel` therefore sets ``INFERENCE_PRECISION_HINT`` explicitly (``f32`` by default, for FP32,
FP16 and INT8 IRs alike: INT8 ops run in int8, the rest in f32) and reports the precision the compiled
model actually uses.

Example:
    >>> from kd_ext.edge import EdgeModel, score_folder
    >>> model = EdgeModel("exports/weights/openvino/model.xml")  # doctest: +SKIP
    >>> report = score_folder(model, "images/", "out/")  # doctest: +SKIP
"""

from .errors import EdgeError, EdgeInputError, EdgeInterruptedError, EdgeModelError, TerminationSignal
from .folder import (
    FolderReport,
    list_images,
    load_image,
    remove_stale_staging,
    score_folder,
    terminate_as_interrupt,
    text_name,
    to_rgb,
)
from .runtime import EdgeModel, Prediction
from .series import SeriesReport, load_series, score_series

__all__ = [
    "EdgeError",
    "EdgeInputError",
    "EdgeInterruptedError",
    "EdgeModel",
    "EdgeModelError",
    "FolderReport",
    "Prediction",
    "SeriesReport",
    "TerminationSignal",
    "list_images",
    "load_image",
    "load_series",
    "remove_stale_staging",
    "score_folder",
    "score_series",
    "terminate_as_interrupt",
    "text_name",
    "to_rgb",
]
