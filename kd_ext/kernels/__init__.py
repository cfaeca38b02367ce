"""Fused teacher/student anomaly-map kernels.

One call turns multi-scale teacher and student feature maps into anomaly maps ``[B, 1, H, W]``
and image scores ``[B]``: per-scale distance (cosine or STFPM L2), bilinear upsampling (both
``align_corners`` conventions), fusion (sum, mean, product, weighted), separable Gaussian
smoothing (reflect) and the image score (max or mean of top-k).

Backends: the torch-free native kernels in ``kd_ext._native`` (CPU kernels on a thread pool; CUDA
when built with a CUDA toolkit) and a pure-torch reference (:mod:`kd_ext.kernels.reference`) used for
export, for autograd and as the fallback. Numpy inputs give numpy outputs and need no torch on the
native path. The options are str Enums (:class:`Distance`, :class:`Fusion`, :class:`ScoreMode`,
:class:`Backend`; their string values are accepted too), checked once per call as one frozen
:class:`KernelOptions` that every backend receives, so every backend accepts and refuses the same
options (:func:`validate_sigma`, at most :data:`MAX_MAP_PIXELS` pixels per map); models check their
``sigma`` with :func:`validate_sigma`.

Example:
    >>> from kd_ext import kernels
    >>> maps, scores = kernels.anomaly_map_and_score(
    ...     teacher_features, student_features, (256, 256),
    ...     distance="cosine", fusion="sum", align_corners=True, sigma=4.0,
    ... )  # doctest: +SKIP
"""

from kd_ext.kernels._api import (
    BACKENDS,
    DISTANCES,
    FUSIONS,
    SCORE_MODES,
    anomaly_map,
    anomaly_map_and_score,
    cuda_available,
    gaussian_taps,
    image_score,
    native_available,
)
from kd_ext.kernels._options import (
    MAX_MAP_PIXELS,
    Backend,
    Distance,
    Fusion,
    KernelOptions,
    ScoreMode,
    validate_sigma,
)
from kd_ext.kernels.native import build_info

__all__ = [
    "BACKENDS",
    "DISTANCES",
    "FUSIONS",
    "MAX_MAP_PIXELS",
    "SCORE_MODES",
    "Backend",
    "Distance",
    "Fusion",
    "KernelOptions",
    "ScoreMode",
    "anomaly_map",
    "anomaly_map_and_score",
    "build_info",
    "cuda_available",
    "gaussian_taps",
    "image_score",
    "native_available",
    "validate_sigma",
]
