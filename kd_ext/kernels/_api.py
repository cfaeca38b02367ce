"""Validated, dispatching entry points of :mod:`kd_ext.kernels`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from kd_ext.kernels import native
from kd_ext.kernels._options import (
    Backend,
    Distance,
    Fusion,
    KernelOptions,
    ScoreMode,
    _choice,
    gaussian_radius,
    validate_top_k,
)

Array = Any  # numpy.ndarray or torch.Tensor

DISTANCES = tuple(member.value for member in Distance)
"""Values of :class:`Distance`."""
FUSIONS = tuple(member.value for member in Fusion)
"""Values of :class:`Fusion`."""
SCORE_MODES = tuple(member.value for member in ScoreMode)
"""Values of :class:`ScoreMode`."""
BACKENDS = tuple(member.value for member in Backend)
"""Values of :class:`Backend`."""


def native_available() -> bool:
    """Return whether the compiled CPU kernels are importable.

    Returns:
        ``True`` when ``kd_ext._native`` imported.
    """
    return native.available()


def cuda_available() -> bool:
    """Return whether the compiled CUDA kernels exist and a CUDA device is visible.

    Returns:
        ``True`` when CUDA tensors can use the native kernels.
    """
    return native.cuda_available()


def gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of the kernels' blur, in numpy: the one Python copy of the native rule.

    ``2 * floor(4 * sigma + 0.5) + 1`` taps ``exp(-x^2 / (2 sigma^2))``, computed in float64, summed in order and
    divided by their sum, then rounded once to float32, as the compiled kernels build them
    (``kd_ext._native.gaussian_kernel_1d``). The torch reference (:func:`kd_ext.kernels.reference.gaussian_taps`)
    and the edge's numpy blur (:func:`kd_ext.edge.tail.gaussian_blur`) use these taps; needs no torch and no
    compiled extension.

    Args:
        sigma: Standard deviation, ``> 0``.

    Returns:
        np.ndarray: ``float32`` taps of shape ``[2 * radius + 1]``, summing to 1.
    """
    radius = gaussian_radius(sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets * offsets) / (sigma * sigma))
    total = np.add.accumulate(taps)[-1]  # the native kernels' left-to-right sum
    return (taps / total).astype(np.float32)


# --------------------------------------------------------------------------- validation


def _torch() -> Any:
    return sys.modules.get("torch")


def _is_torch(value: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def _kind(value: object, what: str) -> str:
    if isinstance(value, np.ndarray):
        return "numpy"
    if _is_torch(value):
        return "torch"
    msg = f"{what} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
    raise TypeError(msg)


def _dtype_name(value: Array) -> str:
    return str(value.dtype).replace("torch.", "")


def _check_float32(value: Array, what: str) -> None:
    if _dtype_name(value) != "float32":
        msg = (
            f"{what} has dtype {_dtype_name(value)}; the kernels take float32 only. "
            "Convert with tensor.float() or array.astype(numpy.float32)."
        )
        raise TypeError(msg)


def _device(value: Array) -> str:
    return str(value.device) if _is_torch(value) else "cpu"


def _contiguous(value: Array) -> Array:
    """Return ``value`` in C-contiguous layout (a copy only when it is not already)."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    return value.contiguous()


def _check_pair(index: int, teacher: Array, student: Array, batch: int) -> None:
    for what, value in ((f"teacher_features[{index}]", teacher), (f"student_features[{index}]", student)):
        if value.ndim != 4:
            msg = f"{what} must be 4-D [B, C, H, W], got shape {tuple(value.shape)}"
            raise ValueError(msg)
        _check_float32(value, what)
    if tuple(teacher.shape) != tuple(student.shape):
        msg = (
            f"teacher and student features at scale {index} differ in shape: {tuple(teacher.shape)} vs "
            f"{tuple(student.shape)}; pair features of the same layer"
        )
        raise ValueError(msg)
    if any(int(d) == 0 for d in teacher.shape):
        msg = f"features at scale {index} are empty (shape {tuple(teacher.shape)}); pass a non-empty batch"
        raise ValueError(msg)
    if int(teacher.shape[0]) != batch:
        msg = f"batch size differs across scales: scale 0 has {batch}, scale {index} has {int(teacher.shape[0])}"
        raise ValueError(msg)


def _check_features(
    teacher_features: Sequence[Array], student_features: Sequence[Array]
) -> tuple[list[Array], list[Array], str, str]:
    """Validate both feature lists; returns contiguous copies-if-needed, the kind and the device."""
    for what, feats in (("teacher_features", teacher_features), ("student_features", student_features)):
        if not isinstance(feats, (list, tuple)):
            msg = f"{what} must be a list or tuple of [B, C, H, W] tensors/arrays, got {type(feats).__name__}"
            raise TypeError(msg)
    if len(teacher_features) == 0:
        msg = "teacher_features is empty; pass at least one feature scale"
        raise ValueError(msg)
    if len(teacher_features) != len(student_features):
        msg = (
            f"teacher_features and student_features have different lengths "
            f"({len(teacher_features)} vs {len(student_features)}); pass one student map per teacher map"
        )
        raise ValueError(msg)
    kinds = {_kind(f, "each feature map") for f in [*teacher_features, *student_features]}
    if len(kinds) > 1:
        msg = "do not mix numpy arrays and torch tensors in one call; convert them to one type"
        raise TypeError(msg)
    kind = kinds.pop()
    devices = {_device(f) for f in [*teacher_features, *student_features]}
    if len(devices) > 1:
        msg = f"all features must be on one device, got {sorted(devices)}; move them with .to(device)"
        raise ValueError(msg)
    device = devices.pop()
    if _exporting():
        # Shapes are symbolic while tracing; the traced graph re-validates nothing, so skip the
        # per-shape checks (they would only emit TracerWarnings) and let the reference run.
        return list(teacher_features), list(student_features), kind, device
    batch = int(teacher_features[0].shape[0]) if teacher_features[0].ndim == 4 else 0
    for index, (teacher, student) in enumerate(zip(teacher_features, student_features, strict=True)):
        _check_pair(index, teacher, student, batch)
    teachers = [_contiguous(t) for t in teacher_features]
    students = [_contiguous(s) for s in student_features]
    return teachers, students, kind, device


def _check_map(anomaly_map: Array) -> tuple[Array, str, str]:
    kind = _kind(anomaly_map, "anomaly_map")
    if anomaly_map.ndim != 4 or int(anomaly_map.shape[1]) != 1:
        msg = f"anomaly_map must have shape [B, 1, H, W], got {tuple(anomaly_map.shape)}"
        raise ValueError(msg)
    if any(int(d) == 0 for d in anomaly_map.shape):
        msg = f"anomaly_map is empty (shape {tuple(anomaly_map.shape)})"
        raise ValueError(msg)
    _check_float32(anomaly_map, "anomaly_map")
    return _contiguous(anomaly_map), kind, _device(anomaly_map)


# --------------------------------------------------------------------------- dispatch


def _exporting() -> bool:
    torch = _torch()
    if torch is None:
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or (compiling is not None and compiling())
    )


def _needs_grad(values: Sequence[Array], kind: str) -> bool:
    return kind == "torch" and _torch().is_grad_enabled() and any(v.requires_grad for v in values)


def _select(backend: Backend | str, values: Sequence[Array], kind: str, device: str) -> str:
    """Return ``"cpu"``, ``"cuda"`` (native kernels) or ``"reference"``."""
    backend = _choice(backend, Backend, "backend")
    if backend is Backend.REFERENCE:
        return "reference"
    reason = None
    if not native.available():
        reason = "the compiled extension kd_ext._native is not available"
    elif _exporting():
        reason = "torch is tracing/exporting (the native kernels are opaque to tracers)"
    elif _needs_grad(values, kind):
        reason = "autograd is required (inputs require grad); the native kernels have no backward"
    elif device.startswith("cuda") and not native.cuda_available():
        reason = "kd_ext._native has no usable CUDA kernels (built without CUDA, or no CUDA device)"
    elif not (device == "cpu" or device.startswith("cuda")):
        reason = f"device {device} is not supported by the native kernels"
    if reason is None:
        return "cuda" if device.startswith("cuda") else "cpu"
    if backend is Backend.NATIVE:
        msg = f"backend='native' cannot be used: {reason}; use backend='auto' or 'reference'"
        raise RuntimeError(msg)
    return "reference"


def _as_numpy(value: Array, kind: str) -> np.ndarray:
    return value if kind == "numpy" else value.detach().numpy()


def _reference_inputs(values: Sequence[Array], kind: str) -> list[Any]:
    if kind == "torch":
        return list(values)
    try:
        import torch  # noqa: PLC0415 - torch stays optional for numpy callers of the native path
    except ImportError as error:  # pragma: no cover - torch is a dependency of the full package
        msg = "the reference backend needs torch; install torch or build the native extension"
        raise RuntimeError(msg) from error
    return [torch.from_numpy(v) for v in values]


def _from_reference(value: Any, kind: str) -> Array:
    return value.numpy() if kind == "numpy" else value


def _run(
    teacher_features: Sequence[Array],
    student_features: Sequence[Array],
    options: KernelOptions,
    backend: Backend | str,
) -> tuple[Array, Array | None]:
    """Check the features against ``options`` (already checked) and run the chosen backend."""
    teachers, students, kind, device = _check_features(teacher_features, student_features)
    options.check_scales(len(teachers))
    path = _select(backend, [*teachers, *students], kind, device)
    if path == "cpu":
        maps, scores = native.anomaly_map_cpu(
            [_as_numpy(t, kind) for t in teachers], [_as_numpy(s, kind) for s in students], options
        )
        if kind == "torch":
            torch = _torch()
            return torch.from_numpy(maps), None if scores is None else torch.from_numpy(scores)
        return maps, scores
    if path == "cuda":
        torch = _torch()
        batch = int(teachers[0].shape[0])
        dev = teachers[0].device
        maps = torch.empty((batch, 1, *options.output_size), dtype=torch.float32, device=dev)
        scores = None if options.score is None else torch.empty((batch,), dtype=torch.float32, device=dev)
        native.anomaly_map_cuda(
            [t.detach() for t in teachers],
            [s.detach() for s in students],
            maps,
            scores,
            options,
            stream=torch.cuda.current_stream(dev).cuda_stream,
        )
        return maps, scores
    from kd_ext.kernels import reference  # noqa: PLC0415 - imports torch, only when needed

    maps = reference.anomaly_map(_reference_inputs(teachers, kind), _reference_inputs(students, kind), options)
    scores = None if options.score is None else reference.image_score(maps, options.score, options.top_k)
    return _from_reference(maps, kind), None if scores is None else _from_reference(scores, kind)


# --------------------------------------------------------------------------- public API


def anomaly_map(
    teacher_features: Sequence[Array],
    student_features: Sequence[Array],
    output_size: int | Sequence[int],
    *,
    distance: Distance | str = Distance.COSINE,
    fusion: Fusion | str = Fusion.SUM,
    weights: Sequence[float] | None = None,
    align_corners: bool = False,
    sigma: float = 4.0,
    backend: Backend | str = Backend.AUTO,
) -> Array:
    """Fused anomaly maps from multi-scale teacher/student features.

    Per scale ``k`` the channel-wise distance of ``teacher_features[k]`` and ``student_features[k]``
    is computed at the feature resolution, upsampled bilinearly to ``output_size``, fused across
    scales and smoothed by a separable Gaussian (kernel ``2 * floor(4 * sigma + 0.5) + 1``, reflect
    padding), all in one pass per image on the native backend.

    Settings matching anomalib: Reverse Distillation ``AnomalyMapGenerator`` is
    ``distance="cosine", fusion="sum"`` (mode ``add``) or ``"product"`` (``multiply``),
    ``align_corners=True, sigma=4``; STFPM is ``distance="l2", fusion="product",
    align_corners=False, sigma=0``.

    Inputs are torch tensors or numpy arrays, float32, ``[B, C_k, H_k, W_k]``, all on one device;
    the result has the same type and device. C-contiguous inputs are read without copying;
    non-contiguous or channels-last inputs are first copied to contiguous NCHW (documented copy).
    NaN in a feature propagates: the affected output region (upsampling footprint widened by the
    blur) is NaN.

    Args:
        teacher_features: Per-scale teacher features.
        student_features: Per-scale student features, same shapes as the teacher's.
        output_size: ``(H, W)`` of the maps, or one int for square maps; at most
            :data:`MAX_MAP_PIXELS` pixels per map on every backend.
        distance: :class:`Distance` or its value: ``"cosine"`` (``1 - cos``, eps 1e-8 per norm) or
            ``"l2"`` (STFPM ``0.5 * |t/|t| - s/|s||^2``).
        fusion: :class:`Fusion` or its value: ``"sum"``, ``"mean"``, ``"product"`` or ``"weighted"``.
        weights: Per-scale weights, a weighted sum (``fusion="weighted"``, or ``"sum"`` with weights):
            one number per scale, not all zero, rounded to float32 for every backend and then finite
            with ``sum(|w|)`` small enough that no map overflows (see :func:`validate_weights`).
        align_corners: ``align_corners`` of the bilinear upsampling (as ``F.interpolate``).
        sigma: Gaussian sigma; ``0`` disables smoothing. Checked by :func:`validate_sigma`: finite,
            ``>= 0``, and the radius must be below ``H`` and ``W``.
        backend: :class:`Backend` or its value: ``"auto"`` (native kernels for CPU float32 — or
            CUDA when built with CUDA — and the torch reference while tracing/exporting/compiling or
            when autograd is needed), ``"native"`` (fail rather than fall back) or ``"reference"``
            (pure torch).

    Returns:
        Maps ``[B, 1, H, W]`` float32, torch tensor or numpy array like the inputs.

    Raises:
        TypeError: Wrong container/array types or dtypes.
        ValueError: Inconsistent shapes, empty inputs, bad sizes, sigma, weights or option names.
        RuntimeError: ``backend="native"`` when the native kernels cannot be used.
        MemoryError: The native kernels cannot allocate the maps or their working memory (the
            message names the sizes; use a smaller batch or output_size).

    Example:
        >>> import numpy as np
        >>> from kd_ext import kernels
        >>> t = [np.random.rand(2, 8, 16, 16).astype(np.float32)]
        >>> s = [np.random.rand(2, 8, 16, 16).astype(np.float32)]
        >>> kernels.anomaly_map(t, s, (64, 64), sigma=2.0).shape
        (2, 1, 64, 64)
    """
    options = KernelOptions(output_size, distance, fusion, weights, align_corners, sigma, score=None)
    maps, _ = _run(teacher_features, student_features, options, backend)
    return maps


def anomaly_map_and_score(
    teacher_features: Sequence[Array],
    student_features: Sequence[Array],
    output_size: int | Sequence[int],
    *,
    distance: Distance | str = Distance.COSINE,
    fusion: Fusion | str = Fusion.SUM,
    weights: Sequence[float] | None = None,
    align_corners: bool = False,
    sigma: float = 4.0,
    score: ScoreMode | str = ScoreMode.MAX,
    top_k: int | None = None,
    backend: Backend | str = Backend.AUTO,
) -> tuple[Array, Array]:
    """Anomaly maps and image scores in one fused call.

    Same arguments and behaviour as :func:`anomaly_map` (options checked once, as one
    :class:`KernelOptions`), plus the image score of each map
    (see :func:`image_score`); with ``score="max"`` the maximum is taken while the map is written.

    Args:
        teacher_features: Per-scale teacher features ``[B, C_k, H_k, W_k]``.
        student_features: Per-scale student features.
        output_size: ``(H, W)`` or one int.
        distance: ``"cosine"`` or ``"l2"``.
        fusion: ``"sum"``, ``"mean"``, ``"product"`` or ``"weighted"``.
        weights: Per-scale weights (weighted sum).
        align_corners: Bilinear ``align_corners``.
        sigma: Gaussian sigma (0 = off).
        score: :class:`ScoreMode` or its value: ``"max"`` or ``"topk"`` (mean of the ``top_k`` largest
            values).
        top_k: Number of values for ``score="topk"``, in ``[1, H * W]``.
        backend: ``"auto"``, ``"native"`` or ``"reference"``.

    Returns:
        ``(maps [B, 1, H, W], scores [B])``, torch tensors or numpy arrays like the inputs.
        A NaN anywhere in an image's map gives a NaN score.

    Raises:
        TypeError: Wrong container/array types or dtypes.
        ValueError: Inconsistent shapes, empty inputs, bad sizes, sigma, weights, options or top_k.
        RuntimeError: ``backend="native"`` when the native kernels cannot be used.
        MemoryError: The native kernels cannot allocate the maps or their working memory.
    """
    options = KernelOptions(output_size, distance, fusion, weights, align_corners, sigma, score=score, top_k=top_k)
    return _run(teacher_features, student_features, options, backend)


def image_score(
    anomaly_map: Array,
    mode: ScoreMode | str = ScoreMode.MAX,
    top_k: int | None = None,
    *,
    backend: Backend | str = Backend.AUTO,
) -> Array:
    """Image scores of anomaly maps.

    Args:
        anomaly_map: Maps ``[B, 1, H, W]`` float32 (torch tensor or numpy array).
        mode: :class:`ScoreMode` or its value: ``"max"`` or ``"topk"`` (mean of the ``top_k`` largest
            values).
        top_k: Number of values for ``mode="topk"``, in ``[1, H * W]``; must be ``None`` for ``"max"``.
        backend: ``"auto"``, ``"native"`` or ``"reference"``.

    Returns:
        Scores ``[B]`` of the input's type and device. NaN anywhere in a map gives a NaN score.

    Raises:
        TypeError: Wrong type or dtype.
        ValueError: Wrong shape, empty map, bad mode or top_k.
        RuntimeError: ``backend="native"`` when the native kernels cannot be used.
    """
    maps, kind, device = _check_map(anomaly_map)
    mode = _choice(mode, ScoreMode, "score mode")
    k = validate_top_k(mode, top_k, int(maps.shape[2]) * int(maps.shape[3]))
    path = _select(backend, [maps], kind, device)
    if path == "cpu":
        scores = native.image_score_cpu(_as_numpy(maps, kind), mode, k)
        return _torch().from_numpy(scores) if kind == "torch" else scores
    if path == "cuda":
        torch = _torch()
        scores = torch.empty((int(maps.shape[0]),), dtype=torch.float32, device=maps.device)
        native.image_score_cuda(maps.detach(), scores, mode, k, torch.cuda.current_stream(maps.device).cuda_stream)
        return scores
    from kd_ext.kernels import reference  # noqa: PLC0415 - imports torch, only when needed

    (ref_maps,) = _reference_inputs([maps], kind)
    return _from_reference(reference.image_score(ref_maps, mode, k), kind)
