"""Lean edge runtime: score images with an exported OpenVINO IR using only openvino, numpy and Pillow.

A 1-D model's IR (SignalKD) scores files of series instead (:func:`score_series`, numpy and openvino only), with
the preprocessing its model was trained with (:mod:`kd_ext.edge.series_preprocessing`).

Importing this package never imports torch or anomalib (checked by the test suite), so a deployment needs
``pip install openvino numpy pillow`` and the IR, nothing else.

Post-processing placement: the anomaly-map tail (per-scale ``1 - cos`` distances, upsampling, fusion,
Gaussian blur, image score, normalisation and thresholds) runs **inside the IR**, as anomalib exports it, so
that the IR stays a standard anomalib IR (``OpenVINOInferencer`` reads it too), the runtime needs no compiled
extension and the normalisation and thresholds are not re-implemented outside the model. Measured
(``benchmarks/results/edge.md``, 10-epoch BiDirMSKD, batch 8, loaded 2-core CPU): the in-IR tail costs
11.4 ms per image, the fused C++ kernel ``kd_ext._native.anomaly_map`` on the raw per-scale features 1.3 ms
(torch 3.1 ms), identical maps; the whole IR takes 87.5 ms (FP32) and 54.5 ms (INT8) per image at batch 1. A
raw-feature IR (2.0 MB out per image instead of 0.33 MB) plus the C++ tail would save roughly 12 % (FP32) to
19 % (INT8) of the latency, at the price of a non-standard IR, a compiled dependency on the device and a second
copy of anomalib's normalisation; MTHF's two-stage fusion is not a kernel at all. We keep the tail in the IR.

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
