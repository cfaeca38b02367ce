"""Lean edge runtime: score images with an exported OpenVINO IR using only openvino, numpy and Pillow.

Importing this package never imports torch or anomalib (checked by the test suite), so a deployment needs
``pip install openvino numpy pillow`` and the IR, nothing else.

Post-processing placement: the anomaly-map tail (per-scale ``1 - cos`` distances, upsampling, fusion,
Gaussian blur, image score, normalisation and thresholds) runs **inside the IR**, as anomalib exports it.
Measured (``benchmarks/results/edge.md``): with it, the FP32 IR already runs BiDirMSKD 7x faster than torch
eager and INT8 13x, and maps match torch to 1e-6. The alternative -- an IR returning the raw per-scale
features, fed to the fused C++ kernel ``kd_ext._native.anomaly_map`` -- is timed by ``benchmarks/edge.py``
(section "Where the anomaly-map tail runs") but that section has not completed yet on this machine. Against
it: ~2 MB of raw features per image leave OpenVINO instead of ~0.33 MB (map + mask), the normalisation and
thresholds would be re-implemented outside the IR, the runtime would depend on the compiled extension, and
anomalib's ``OpenVINOInferencer`` would no longer understand the IR.

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
