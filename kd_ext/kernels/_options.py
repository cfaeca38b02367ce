"""Option rules of the fused anomaly-map kernels, one place for every backend.

:mod:`kd_ext.kernels` checks its arguments here before it dispatches to the native CPU, native CUDA
or torch reference backend, so a call is accepted or refused the same way whichever backend runs
it; models call :func:`validate_sigma` in their constructors. Nothing here imports torch.

The compiled binding re-checks only the bounds its own memory safety needs (the same pixel cap,
exported there as ``MAX_MAP_PIXELS``, and the blur radius), so that a direct call cannot crash.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = [
    "MAX_MAP_PIXELS",
    "gaussian_radius",
    "validate_output_size",
    "validate_sigma",
    "validate_weights",
]

MAX_MAP_PIXELS = 2**30 - 1
"""Most pixels ``H * W`` of one output map (4 GiB of float32), for every backend."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def gaussian_radius(sigma: float) -> int:
    """Return the blur radius ``floor(4 * sigma + 0.5)`` (kernel size ``2 * radius + 1``).

    This is the radius rule of every backend's Gaussian smoothing (anomalib's anomaly-map
    generators use the same one).

    Args:
        sigma: Standard deviation of the Gaussian, ``>= 0``.

    Returns:
        The radius in pixels (0 for ``sigma == 0``).
    """
    return math.floor(4.0 * sigma + 0.5) if sigma > 0 else 0


def validate_sigma(sigma: float, map_size: tuple[int, int] | None = None) -> float:
    """Check a Gaussian smoothing sigma and return it as a float.

    ``sigma == 0`` disables smoothing. A positive sigma blurs with ``2 * floor(4 * sigma + 0.5) + 1``
    taps and reflect padding, which needs the radius ``floor(4 * sigma + 0.5)`` to be smaller than
    the map's height and width; that is checked when ``map_size`` is given.

    Args:
        sigma: Standard deviation of the Gaussian, a finite number ``>= 0``.
        map_size: ``(H, W)`` of the map that will be smoothed, or ``None`` to skip the size check.

    Returns:
        ``sigma`` as a float.

    Raises:
        TypeError: If ``sigma`` is not a real number or ``map_size`` is not a pair of ints.
        ValueError: If ``sigma`` is NaN, infinite or negative, if ``map_size`` is not positive, or
            if the blur radius does not fit the map.

    Example:
        >>> from kd_ext.kernels import validate_sigma
        >>> validate_sigma(4, (256, 256))
        4.0
    """
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        msg = f"sigma must be a number, got {type(sigma).__name__}; pass a float >= 0 (0 disables smoothing)"
        raise TypeError(msg)
    value = float(sigma)
    if not math.isfinite(value) or value < 0:
        msg = f"sigma must be >= 0 and finite (0 disables smoothing), got {value}"
        raise ValueError(msg)
    if map_size is None or value == 0:
        return value
    if isinstance(map_size, (str, bytes)) or not isinstance(map_size, Sequence) or len(map_size) != 2:
        msg = f"map_size must be a pair of ints (H, W), got {map_size!r}"
        raise TypeError(msg)
    if not all(_is_int(v) for v in map_size):
        msg = f"map_size must be a pair of ints (H, W), got {map_size!r}"
        raise TypeError(msg)
    height, width = int(map_size[0]), int(map_size[1])
    if height <= 0 or width <= 0:
        msg = f"map_size must be positive, got {(height, width)}"
        raise ValueError(msg)
    radius = gaussian_radius(value)
    smallest = min(height, width)
    if radius >= smallest:
        msg = (
            f"sigma={value} gives a Gaussian blur radius of {radius} (2*floor(4*sigma+0.5)+1 = {2 * radius + 1} "
            f"taps), which must be smaller than the map height and width {(height, width)} for reflect padding; "
            f"use sigma < {(smallest - 0.5) / 4:g} for this size, or a larger map"
        )
        raise ValueError(msg)
    return value


def validate_output_size(output_size: int | Sequence[int]) -> tuple[int, int]:
    """Check an output size and return it as ``(H, W)``.

    Args:
        output_size: ``(H, W)``, or one int for square maps.

    Returns:
        ``(H, W)`` as Python ints.

    Raises:
        TypeError: If it is not an int or a pair of ints.
        ValueError: If a side is not positive, or a map has more than :data:`MAX_MAP_PIXELS` pixels.
    """
    if _is_int(output_size):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, Sequence)
        and not isinstance(output_size, (str, bytes))
        and len(output_size) == 2
        and all(_is_int(v) for v in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        msg = f"output_size must be an int or a pair of ints (H, W), got {output_size!r}"
        raise TypeError(msg)
    if size[0] <= 0 or size[1] <= 0:
        msg = f"output_size must be positive, got {size}"
        raise ValueError(msg)
    if size[0] * size[1] > MAX_MAP_PIXELS:
        msg = (
            f"output_size {size} has {size[0] * size[1]} pixels per map; the kernels (every backend) take at most "
            f"{MAX_MAP_PIXELS} (2**30 - 1, 4 GiB of float32 per map); use a smaller output_size"
        )
        raise ValueError(msg)
    return size


def validate_weights(fusion: str, weights: Sequence[float] | None, num_scales: int) -> list[float] | None:
    """Check the per-scale fusion weights and return them as floats.

    Weights make the fusion a weighted sum: they are required for ``fusion="weighted"``, allowed
    with ``"sum"`` and refused otherwise. There is one finite weight per scale, not all zero (an
    all-zero weighting would make every map zero).

    Args:
        fusion: Fusion name (already checked to be one of the known fusions).
        weights: The weights, or ``None``.
        num_scales: Number of feature scales.

    Returns:
        The weights as a list of floats, or ``None`` when there are none.

    Raises:
        TypeError: If the weights are not a sequence of real numbers.
        ValueError: If they are missing, not allowed with ``fusion``, of the wrong length, not
            finite or all zero.
    """
    if weights is None:
        if fusion == "weighted":
            msg = f"fusion='weighted' needs weights, one per scale ({num_scales})"
            raise ValueError(msg)
        return None
    if fusion not in {"sum", "weighted"}:
        msg = f"weights are only used with fusion='weighted' (or 'sum'), got fusion={fusion!r}; drop the weights"
        raise ValueError(msg)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        msg = f"weights must be a sequence of numbers, one per scale, got {type(weights).__name__}"
        raise TypeError(msg)
    values = []
    for weight in weights:
        if isinstance(weight, (bool, str, bytes)):
            msg = f"weights must be numbers, got {weight!r}"
            raise TypeError(msg)
        try:
            values.append(float(weight))
        except (TypeError, ValueError) as error:
            msg = f"weights must be numbers, got {weight!r}"
            raise TypeError(msg) from error
    if len(values) != num_scales:
        msg = f"weights must have one entry per scale ({num_scales}), got {len(values)}"
        raise ValueError(msg)
    if not all(math.isfinite(v) for v in values):
        msg = f"weights must be finite, got {values}; replace NaN/inf weights with finite numbers"
        raise ValueError(msg)
    if all(v == 0 for v in values):
        msg = f"weights are all zero, which makes every anomaly map zero; give at least one scale a weight: {values}"
        raise ValueError(msg)
    return values
