"""Thin, torch-free wrapper of the compiled ``kd_ext._native`` module.

CPU arrays go through the buffer protocol (numpy arrays; a torch CPU tensor's ``.numpy()`` is a
zero-copy view), CUDA arrays through ``__cuda_array_interface__`` pointers. Nothing here imports
torch, so the edge path can use the kernels with numpy only. The binding validates every argument
and raises ``ValueError``/``TypeError`` for bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

try:
    from kd_ext import _native as _module
except ImportError:  # pragma: no cover - depends on how the package was installed
    _module = None

__all__ = [
    "anomaly_map_cpu",
    "anomaly_map_cuda",
    "available",
    "build_info",
    "cuda_available",
    "image_score_cpu",
    "image_score_cuda",
    "module",
]


def module() -> ModuleType:
    """Return the compiled module.

    Returns:
        ``kd_ext._native``.

    Raises:
        RuntimeError: If the extension is not built.
    """
    if _module is None:
        msg = "kd_ext._native is not available; reinstall kd_ext (pip install -e .) or use backend='reference'"
        raise RuntimeError(msg)
    return _module


def available() -> bool:
    """Return whether the compiled extension imported.

    Returns:
        ``True`` when ``kd_ext._native`` is importable.
    """
    return _module is not None


def build_info() -> dict[str, Any]:
    """Return the features the extension was built with.

    Returns:
        ``{"openmp": bool, "cuda": bool, "cuda_devices": int}`` (all false/0 without the extension).
    """
    if _module is None:
        return {"openmp": False, "cuda": False, "cuda_devices": 0}
    return dict(_module.build_info())


def cuda_available() -> bool:
    """Return whether the extension has CUDA kernels and a CUDA device is visible.

    Returns:
        ``True`` when the CUDA kernels can run.
    """
    return _module is not None and hasattr(_module, "cuda_device_count") and _module.cuda_device_count() > 0


def anomaly_map_cpu(
    teacher_features: Sequence[np.ndarray],
    student_features: Sequence[np.ndarray],
    output_size: tuple[int, int],
    *,
    distance: str,
    fusion: str,
    weights: Sequence[float] | None,
    align_corners: bool,
    sigma: float,
    score: str,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the fused CPU kernel on C-contiguous float32 arrays (no copies).

    Args:
        teacher_features: Per-scale teacher arrays ``[B, C_k, H_k, W_k]``.
        student_features: Matching student arrays.
        output_size: ``(H, W)``.
        distance: ``"cosine"`` or ``"l2"``.
        fusion: ``"sum"``, ``"mean"``, ``"product"`` or ``"weighted"``.
        weights: Per-scale weights for ``"weighted"``, else ``None``.
        align_corners: Bilinear ``align_corners``.
        sigma: Blur sigma (0 = off).
        score: ``"none"``, ``"max"`` or ``"topk"``.
        top_k: Values averaged for ``"topk"``.

    Returns:
        ``(maps [B, 1, H, W], scores [B] or None)`` as new float32 arrays.
    """
    weight_list = None if weights is None else [float(w) for w in weights]
    return module().anomaly_map(
        list(teacher_features),
        list(student_features),
        int(output_size[0]),
        int(output_size[1]),
        distance,
        fusion,
        weight_list,
        bool(align_corners),
        float(sigma),
        score,
        int(top_k),
    )


def image_score_cpu(anomaly_map: np.ndarray, mode: str, top_k: int) -> np.ndarray:
    """Image scores of C-contiguous float32 maps ``[B, 1, H, W]``.

    Args:
        anomaly_map: Maps.
        mode: ``"max"`` or ``"topk"``.
        top_k: Values averaged for ``"topk"``.

    Returns:
        Scores ``[B]``.
    """
    return module().image_score(anomaly_map, mode, int(top_k))


def anomaly_map_cuda(
    teacher_features: Sequence[Any],
    student_features: Sequence[Any],
    out: Any,
    scores: Any,
    output_size: tuple[int, int],
    *,
    distance: str,
    fusion: str,
    weights: Sequence[float] | None,
    align_corners: bool,
    sigma: float,
    score: str,
    top_k: int,
    stream: int,
) -> None:
    """Run the CUDA kernel on arrays exposing ``__cuda_array_interface__``.

    Args:
        teacher_features: Per-scale teacher CUDA arrays ``[B, C_k, H_k, W_k]`` (float32, contiguous).
        student_features: Matching student CUDA arrays.
        out: Preallocated float32 CUDA array ``[B, 1, H, W]`` for the maps.
        scores: Preallocated float32 CUDA array ``[B]`` (or ``None`` when ``score == "none"``).
        output_size: ``(H, W)``.
        distance: ``"cosine"`` or ``"l2"``.
        fusion: ``"sum"``, ``"mean"``, ``"product"`` or ``"weighted"``.
        weights: Per-scale weights for ``"weighted"``, else ``None``.
        align_corners: Bilinear ``align_corners``.
        sigma: Blur sigma (0 = off).
        score: ``"none"``, ``"max"`` or ``"topk"``.
        top_k: Values averaged for ``"topk"``.
        stream: ``cudaStream_t`` handle as an int (0 = legacy default stream).

    Raises:
        RuntimeError: If the extension has no CUDA kernels or no CUDA device is visible.
    """
    mod = module()
    if not hasattr(mod, "anomaly_map_cuda"):
        msg = "kd_ext._native was built without CUDA; rebuild with a CUDA toolkit or use backend='reference'"
        raise RuntimeError(msg)
    weight_list = None if weights is None else [float(w) for w in weights]
    mod.anomaly_map_cuda(
        list(teacher_features),
        list(student_features),
        out,
        scores,
        int(output_size[0]),
        int(output_size[1]),
        distance,
        fusion,
        weight_list,
        bool(align_corners),
        float(sigma),
        score,
        int(top_k),
        int(stream),
    )


def image_score_cuda(anomaly_map: Any, scores: Any, mode: str, top_k: int, stream: int) -> None:
    """CUDA image scores of float32 maps ``[B, 1, H, W]`` into the preallocated ``scores`` ``[B]``.

    Args:
        anomaly_map: CUDA maps.
        scores: Preallocated CUDA array ``[B]``.
        mode: ``"max"`` or ``"topk"``.
        top_k: Values averaged for ``"topk"``.
        stream: ``cudaStream_t`` handle as an int.

    Raises:
        RuntimeError: If the extension has no CUDA kernels.
    """
    mod = module()
    if not hasattr(mod, "image_score_cuda"):
        msg = "kd_ext._native was built without CUDA; rebuild with a CUDA toolkit or use backend='reference'"
        raise RuntimeError(msg)
    mod.image_score_cuda(anomaly_map, scores, mode, int(top_k), int(stream))
