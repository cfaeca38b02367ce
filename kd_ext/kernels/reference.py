"""Pure-torch reference of the fused anomaly-map kernels.

This module is the oracle for the native kernels, the fallback when the compiled extension is
missing (or autograd is needed), and the export path: every operation is traceable by
``torch.onnx.export`` (opset 14) and ``torch.jit.trace`` -- ``F.cosine_similarity`` /
``F.normalize``, ``F.interpolate(mode="bilinear")``, ``F.pad(mode="reflect")`` and two 1-D
``conv2d`` passes for the separable Gaussian blur.

The functions here assume validated arguments; use :mod:`kd_ext.kernels` for checked entry points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F  # noqa: N812

from kd_ext.kernels._api import gaussian_taps as numpy_gaussian_taps
from kd_ext.kernels._options import Distance, Fusion, KernelOptions, ScoreMode, gaussian_radius

__all__ = [
    "anomaly_map",
    "distance_map",
    "gaussian_blur",
    "gaussian_radius",
    "gaussian_taps",
    "image_score",
]


def gaussian_taps(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Return normalised 1-D Gaussian taps (float32) of size ``2 * floor(4 * sigma + 0.5) + 1``.

    The taps of :func:`kd_ext.kernels.gaussian_taps` (the native kernels' rule) as a tensor.

    Args:
        sigma: Standard deviation, ``> 0``.
        device: Device of the returned tensor.

    Returns:
        Tensor of shape ``[2 * radius + 1]`` summing to 1.
    """
    return torch.from_numpy(numpy_gaussian_taps(sigma)).to(device=device)


def distance_map(
    teacher: torch.Tensor, student: torch.Tensor, distance: Distance | str = Distance.COSINE
) -> torch.Tensor:
    """Per-pixel teacher/student distance over channels.

    Args:
        teacher: Teacher features ``[B, C, H, W]``.
        student: Student features of the same shape.
        distance: :class:`~kd_ext.kernels.Distance` or its value: ``"cosine"`` for ``1 - cos(t, s)``
            (per-norm eps 1e-8, as ``F.cosine_similarity``) or ``"l2"`` for
            ``0.5 * |t/|t| - s/|s||^2`` (``F.normalize``, eps 1e-12, as anomalib's STFPM).

    Returns:
        Distance map ``[B, 1, H, W]``.
    """
    if Distance(distance) is Distance.COSINE:
        return (1.0 - F.cosine_similarity(teacher, student, dim=1)).unsqueeze(1)
    diff = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
    return 0.5 * (diff * diff).sum(dim=1, keepdim=True)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (anomalib ``GaussianBlur2d``, border reflect).

    Args:
        maps: Maps ``[B, 1, H, W]``; ``H`` and ``W`` must exceed the radius.
        sigma: Standard deviation; ``0`` returns ``maps`` unchanged.

    Returns:
        Blurred maps of the same shape.
    """
    if sigma <= 0:
        return maps
    radius = gaussian_radius(sigma)
    taps = gaussian_taps(sigma, device=maps.device).to(maps.dtype)
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    size = 2 * radius + 1
    rows = F.conv2d(padded, taps.view(1, 1, 1, size))
    return F.conv2d(rows, taps.view(1, 1, size, 1))


def anomaly_map(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    options: KernelOptions,
) -> torch.Tensor:
    """Anomaly maps from multi-scale teacher/student features (reference of the native kernel).

    Args:
        teacher_features: Per-scale teacher features ``[B, C_k, H_k, W_k]``.
        student_features: Matching student features.
        options: The call's checked options (distance, fusion and weights, ``align_corners``,
            sigma, output size; the score options are not used here).

    Returns:
        Maps ``[B, 1, H, W]``.
    """
    fused: torch.Tensor | None = None
    for index, (teacher, student) in enumerate(zip(teacher_features, student_features, strict=True)):
        layer = distance_map(teacher, student, options.distance)
        layer = F.interpolate(layer, size=options.output_size, mode="bilinear", align_corners=options.align_corners)
        if options.weights is not None:
            layer = layer * options.weights[index]
        if fused is None:
            fused = layer
        elif options.fusion is Fusion.PRODUCT:
            fused = fused * layer
        else:
            fused = fused + layer
    if fused is None:
        msg = "anomaly_map needs at least one feature scale"
        raise ValueError(msg)
    if options.fusion is Fusion.MEAN:
        fused = fused / len(teacher_features)
    return gaussian_blur(fused, options.sigma)


def image_score(
    anomaly_map: torch.Tensor, mode: ScoreMode | str = ScoreMode.MAX, top_k: int | None = None
) -> torch.Tensor:
    """Image scores of anomaly maps.

    Args:
        anomaly_map: Maps ``[B, 1, H, W]``.
        mode: :class:`~kd_ext.kernels.ScoreMode` or its value: ``"max"`` or ``"topk"`` (mean of the
            ``top_k`` largest values).
        top_k: Number of values averaged for ``mode="topk"``.

    Returns:
        Scores ``[B]``. A NaN anywhere in an image's map gives a NaN score.
    """
    flat = anomaly_map.reshape(anomaly_map.shape[0], -1)
    if ScoreMode(mode) is ScoreMode.MAX:
        return flat.amax(dim=1)
    if top_k is None:
        msg = "mode='topk' needs top_k"
        raise ValueError(msg)
    return torch.topk(flat, int(top_k), dim=1).values.mean(dim=1)
