"""Thin, torch-free wrapper of the compiled ``kd_ext._native`` module.

CPU arrays go through the buffer protocol (numpy arrays; a torch CPU tensor's ``.numpy()`` is a
zero-copy view), CUDA arrays through ``__cuda_array_interface__`` pointers. Nothing here imports
torch, so the edge path can use the kernels with numpy only. The option rules were applied when the
:class:`~kd_ext.kernels.KernelOptions` was built; the binding checks only what its memory safety needs
(shapes, dtypes, layout, sizes) and raises ``ValueError``/``TypeError`` for bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from kd_ext.kernels._options import KernelOptions, ScoreMode

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
        ``{"openmp": bool, "cuda": bool, "cuda_devices": int, "threads": int}``: whether the CPU thread
        pool takes its size from OpenMP's settings (``OMP_NUM_THREADS``), whether CUDA kernels were
        built, the visible CUDA devices and the CPU threads a call may use (all false/0 without the
        extension).
    """
    if _module is None:
        return {"openmp": False, "cuda": False, "cuda_devices": 0, "threads": 0}
    return dict(_module.build_info())


def cuda_available() -> bool:
    """Return whether the extension has CUDA kernels and a CUDA device is visible.

    Returns:
        ``True`` when the CUDA kernels can run.
    """
    return _module is not None and hasattr(_module, "cuda_device_count") and _module.cuda_device_count() > 0


def _option_args(options: KernelOptions) -> dict[str, Any]:
    """The binding's keyword arguments for checked options (enum values as strings)."""
    return {
        "out_h": options.output_size[0],
        "out_w": options.output_size[1],
        "distance": options.distance.value,
        "fusion": options.fusion.value,
        "weights": None if options.weights is None else list(options.weights),
        "align_corners": options.align_corners,
        "sigma": options.sigma,
        "score": "none" if options.score is None else options.score.value,
        "top_k": options.top_k or 1,
    }


def anomaly_map_cpu(
    teacher_features: Sequence[np.ndarray],
    student_features: Sequence[np.ndarray],
    options: KernelOptions,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the fused CPU kernel on C-contiguous float32 arrays (no copies).

    Args:
        teacher_features: Per-scale teacher arrays ``[B, C_k, H_k, W_k]``.
        student_features: Matching student arrays.
        options: The call's checked options.

    Returns:
        ``(maps [B, 1, H, W], scores [B] or None)`` as new float32 arrays (no scores when
        ``options.score`` is ``None``).
    """
    return module().anomaly_map(list(teacher_features), list(student_features), **_option_args(options))


def image_score_cpu(anomaly_map: np.ndarray, mode: ScoreMode, top_k: int | None) -> np.ndarray:
    """Image scores of C-contiguous float32 maps ``[B, 1, H, W]``.

    Args:
        anomaly_map: Maps.
        mode: Checked score mode.
        top_k: Values averaged for ``ScoreMode.TOPK`` (``None`` for ``MAX``).

    Returns:
        Scores ``[B]``.
    """
    return module().image_score(anomaly_map, ScoreMode(mode).value, top_k or 1)


def _cuda_module() -> ModuleType:
    mod = module()
    if not hasattr(mod, "anomaly_map_cuda"):
        msg = "kd_ext._native was built without CUDA; rebuild with a CUDA toolkit or use backend='reference'"
        raise RuntimeError(msg)
    return mod


def anomaly_map_cuda(
    teacher_features: Sequence[Any],
    student_features: Sequence[Any],
    out: Any,
    scores: Any,
    options: KernelOptions,
    stream: int,
) -> None:
    """Run the CUDA kernel on arrays exposing ``__cuda_array_interface__``.

    Args:
        teacher_features: Per-scale teacher CUDA arrays ``[B, C_k, H_k, W_k]`` (float32, contiguous).
        student_features: Matching student CUDA arrays.
        out: Preallocated float32 CUDA array ``[B, 1, H, W]`` for the maps.
        scores: Preallocated float32 CUDA array ``[B]`` (or ``None`` when ``options.score`` is ``None``).
        options: The call's checked options.
        stream: ``cudaStream_t`` handle as an int (0 = legacy default stream).

    Raises:
        RuntimeError: If the extension has no CUDA kernels or no CUDA device is visible.
    """
    _cuda_module().anomaly_map_cuda(
        list(teacher_features), list(student_features), out, scores, **_option_args(options), stream=int(stream)
    )


def image_score_cuda(anomaly_map: Any, scores: Any, mode: ScoreMode, top_k: int | None, stream: int) -> None:
    """CUDA image scores of float32 maps ``[B, 1, H, W]`` into the preallocated ``scores`` ``[B]``.

    Args:
        anomaly_map: CUDA maps.
        scores: Preallocated CUDA array ``[B]``.
        mode: Checked score mode.
        top_k: Values averaged for ``ScoreMode.TOPK`` (``None`` for ``MAX``).
        stream: ``cudaStream_t`` handle as an int.

    Raises:
        RuntimeError: If the extension has no CUDA kernels.
    """
    _cuda_module().image_score_cuda(anomaly_map, scores, ScoreMode(mode).value, top_k or 1, int(stream))
