"""Lean edge runtime: score images with an exported OpenVINO IR using only openvino, numpy and Pillow.

Importing this package never imports torch or anomalib (checked by the test suite), so a deployment needs
``pip install openvino numpy pillow`` and the IR, nothing else.

Post-processing placement (measured, see ``benchmarks/results/edge.md``): the anomaly-map tail
(per-scale ``1 - cos`` distances, upsampling, fusion, Gaussian blur, image score, normalisation and
thresholds) runs **inside the IR**, as anomalib exports it. The alternative, an IR that returns the raw
per-scale teacher/student features and the fused C++ kernel of ``kd_ext._native`` on them, was measured
on the same machine: the tail is a small part of the IR's time, while returning raw features
multiplies the data leaving OpenVINO (~1.5 MB per image instead of 0.5 MB), needs the normalisation and
thresholds to be re-implemented outside the IR, and ties the runtime to the compiled extension. The
in-IR path is also the only one anomalib's own tools (``OpenVINOInferencer``) understand.

Precision: this CPU runs "FP32" IRs in bf16 unless told otherwise, which moved anomaly maps by up to 0.04.
:class:`EdgeModel` therefore sets ``INFERENCE_PRECISION_HINT`` explicitly (``f32`` by default, for FP32,
FP16 and INT8 IRs alike: INT8 ops run in int8, the rest in f32) and reports the precision the compiled
model actually uses.

Example:
    >>> from kd_ext.edge import EdgeModel, score_folder
    >>> model = EdgeModel("exports/weights/openvino/model.xml")  # doctest: +SKIP
    >>> report = score_folder(model, "images/", "out/")  # doctest: +SKIP
"""

from .errors import EdgeError, EdgeInputError, EdgeModelError
from .folder import FolderReport, list_images, load_image, score_folder
from .runtime import EdgeModel, Prediction

__all__ = [
    "EdgeError",
    "EdgeInputError",
    "EdgeModel",
    "EdgeModelError",
    "FolderReport",
    "Prediction",
    "list_images",
    "load_image",
    "score_folder",
]
