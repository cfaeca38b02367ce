"""Option rules of the fused anomaly-map kernels, one place for every backend.

:class:`KernelOptions` is built and checked once per call by :mod:`kd_ext.kernels`, then handed as is
to the native CPU, native CUDA or torch reference backend, so a call is accepted or refused the same
way whichever backend runs it. The option names are str Enums (:class:`Distance`, :class:`Fusion`,
:class:`ScoreMode`, :class:`Backend`), as anomalib's options are; the public functions also accept
their string values, and every choice is checked by :func:`kd_ext.options.check_choice`, kd_ext's one choice
rule. Models call :func:`validate_sigma` in their constructors. Nothing here imports torch.

The compiled binding re-checks only the bounds its own memory safety needs (the same pixel cap,
exported there as ``MAX_MAP_PIXELS``, the blur radius, ``top_k`` and the per-scale weight count),
so that a direct call cannot crash.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from enum import Enum

import numpy as np

from kd_ext.options import check_choice

__all__ = [
    "MAX_MAP_PIXELS",
    "Backend",
    "Distance",
    "Fusion",
    "KernelOptions",
    "ScoreMode",
    "gaussian_radius",
    "validate_output_size",
    "validate_sigma",
    "validate_top_k",
    "validate_weights",
]

MAX_MAP_PIXELS = 2**30 - 1
"""Most pixels ``H * W`` of one output map (4 GiB of float32), for every backend."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest finite float32: every backend computes the maps in float32."""
MAX_DISTANCE = 2.0
"""Largest per-pixel distance of either :class:`Distance` (``1 - cos`` and the half squared distance of unit
vectors both lie in ``[0, 2]``); bilinear upsampling and the Gaussian blur average, so they never exceed it."""
MAX_WEIGHT_SUM = FLOAT32_MAX / (2 * MAX_DISTANCE)
"""Largest ``sum(|w|)`` of the fusion weights: a weighted map is at most ``MAX_DISTANCE * sum(|w|)``, kept a
factor of two below :data:`FLOAT32_MAX` for float32 rounding, so a weighted map stays finite."""
COMPACT_DIGITS = 15
"""Integers of up to this many digits appear in full in messages; larger numbers in 3 significant digits."""


class Distance(str, Enum):
    """Per-position teacher/student distance over channels.

    Attributes:
        COSINE: ``1 - cos(t, s)`` (eps 1e-8 per norm, as ``F.cosine_similarity``).
        L2: ``0.5 * |t/|t| - s/|s||^2`` (``F.normalize``, eps 1e-12, as anomalib's STFPM).
    """

    COSINE = "cosine"
    L2 = "l2"


class Fusion(str, Enum):
    """How the upsampled per-scale maps are combined.

    Attributes:
        SUM: Sum of the scales (a weighted sum when weights are given).
        MEAN: Mean of the scales.
        PRODUCT: Product of the scales.
        WEIGHTED: Weighted sum; needs one weight per scale.
    """

    SUM = "sum"
    MEAN = "mean"
    PRODUCT = "product"
    WEIGHTED = "weighted"


class ScoreMode(str, Enum):
    """Image score of an anomaly map.

    Attributes:
        MAX: Largest map value.
        TOPK: Mean of the ``top_k`` largest map values.
    """

    MAX = "max"
    TOPK = "topk"


class Backend(str, Enum):
    """Which implementation runs a call.

    Attributes:
        AUTO: The native kernels when they can run (CPU, or CUDA when built with it), else the torch
            reference (while tracing/exporting/compiling, or when autograd is needed).
        NATIVE: The native kernels, or an error saying why they cannot run.
        REFERENCE: The pure-torch reference.
    """

    AUTO = "auto"
    NATIVE = "native"
    REFERENCE = "reference"


_choice = check_choice
"""The name :mod:`kd_ext.kernels._api` imports the choice rule by (see :func:`kd_ext.options.check_choice`)."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _compact(value: float) -> str:
    """A number for a message: whole numbers of up to :data:`COMPACT_DIGITS` digits in full, others short.

    ``sigma=1e300`` then reads ``radius of 4e+300``, not a 301-digit integer; other values keep 6 significant
    digits (``3.875``).
    """
    if isinstance(value, numbers.Integral) or (math.isfinite(value) and value == math.floor(value)):
        whole = int(value)
        if abs(whole) < 10**COMPACT_DIGITS:
            return str(whole)
        mantissa, exponent = f"{Decimal(whole):.3g}".split("e")  # any size of int, e.g. 4.00e+300
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{value:.6g}"


def gaussian_radius(sigma: float) -> int:
    """Return the blur radius ``floor(4 * sigma + 0.5)`` (kernel size ``2 * radius + 1``).

    This is the radius rule of every backend's Gaussian smoothing (anomalib's anomaly-map
    generators use the same one; the compiled kernels' copy is checked against it by the tests).

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
        msg = f"sigma must be >= 0 and finite (0 disables smoothing), got {_compact(value)}"
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
    smallest = min(height, width)
    reach = 4.0 * value + 0.5  # the radius is floor(reach); inf for sigma beyond float64's range / 4
    if reach >= smallest:  # floor(reach) >= smallest, for an integer smallest
        radius = gaussian_radius(value) if math.isfinite(reach) else _floor(4 * Decimal(value) + Decimal("0.5"))
        msg = (
            f"sigma={_compact(value)} gives a Gaussian blur radius of {_compact(radius)} (2*floor(4*sigma+0.5)+1 = "
            f"{_compact(2 * radius + 1)} taps), which must be smaller than the map height and width "
            f"{(height, width)} for reflect padding; use sigma < {(smallest - 0.5) / 4:g} for this size, or a "
            "larger map"
        )
        raise ValueError(msg)
    return value


def _floor(value: Decimal) -> int:
    """``floor(value)`` of an exact decimal (a radius too large for float64)."""
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


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
            f"output_size ({_compact(size[0])}, {_compact(size[1])}) has {_compact(size[0] * size[1])} pixels per "
            f"map; the kernels (every backend) take at most {MAX_MAP_PIXELS} (2**30 - 1, 4 GiB of float32 per map); "
            "use a smaller output_size"
        )
        raise ValueError(msg)
    return size


def validate_top_k(mode: ScoreMode | str, top_k: int | None, size: int) -> int | None:
    """Check the image-score options against the number of map pixels.

    Args:
        mode: Score mode (a :class:`ScoreMode` or its value).
        top_k: Values averaged by ``mode="topk"``, in ``[1, size]``; must be ``None`` for ``"max"``.
        size: Pixels per map (``H * W``).

    Returns:
        ``top_k`` as an int, or ``None`` for ``mode="max"``.

    Raises:
        TypeError: If ``mode="topk"`` and ``top_k`` is not an integer.
        ValueError: If the mode is unknown, ``top_k`` is out of range, or given with ``mode="max"``.
    """
    mode = check_choice(mode, ScoreMode, "score mode")
    if mode is ScoreMode.MAX:
        if top_k is not None:
            msg = f"top_k is only used with mode='topk', got mode='max' and top_k={top_k}; drop top_k"
            raise ValueError(msg)
        return None
    if not _is_int(top_k):
        msg = f"mode='topk' needs an integer top_k in [1, H*W={size}], got {top_k!r}"
        raise TypeError(msg)
    if not 1 <= int(top_k) <= size:
        msg = f"top_k must be in [1, H*W={size}], got {top_k}"
        raise ValueError(msg)
    return int(top_k)


def validate_weights(fusion: Fusion | str, weights: Sequence[float] | None, num_scales: int) -> list[float] | None:
    """Check the per-scale fusion weights and return them as floats.

    Weights make the fusion a weighted sum: they are required for ``fusion="weighted"``, allowed
    with ``"sum"`` and refused otherwise. There is one weight per scale, not all zero (an all-zero
    weighting would make every map zero). Every backend computes in float32, so the weights are
    rounded to float32 first and the rule applies to the rounded values, the ones every backend uses:
    finite, with ``sum(|w|) <=`` :data:`MAX_WEIGHT_SUM`, so that no weighted map can overflow to inf.

    Args:
        fusion: Fusion (a :class:`Fusion` or its value).
        weights: The weights, or ``None``.
        num_scales: Number of feature scales.

    Returns:
        The weights rounded to float32 (as Python floats), or ``None`` when there are none.

    Raises:
        TypeError: If the weights are not a sequence of real numbers.
        ValueError: If they are missing, not allowed with ``fusion``, of the wrong length, not
            finite in float32, too large together (see above) or all zero.
    """
    values = _weight_values(check_choice(fusion, Fusion, "fusion"), weights)
    if values is None:
        return None
    _check_weight_count(values, num_scales)
    return list(values)


def _weight_values(fusion: Fusion, weights: Sequence[float] | None) -> tuple[float, ...] | None:
    """The weights rounded to float32, under the rule of :func:`validate_weights`; the count is checked apart."""
    if weights is None:
        if fusion is Fusion.WEIGHTED:
            msg = "fusion='weighted' needs weights, one per scale"
            raise ValueError(msg)
        return None
    if fusion not in {Fusion.SUM, Fusion.WEIGHTED}:
        msg = f"weights are only used with fusion='weighted' (or 'sum'), got fusion={fusion.value!r}; drop the weights"
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
    with np.errstate(over="ignore"):  # beyond float32's range rounds to inf, refused below
        single = tuple(float(np.float32(v)) for v in values)
    shown = "[" + ", ".join(_compact(v) for v in values) + "]"
    if not all(math.isfinite(v) for v in single) or math.fsum(abs(v) for v in single) > MAX_WEIGHT_SUM:
        msg = (
            f"weights must be finite numbers whose absolute values sum to at most {MAX_WEIGHT_SUM:.3g}, got {shown}: "
            f"the maps are float32 and each scale's distance is up to {MAX_DISTANCE:g}, so larger weights make them "
            "inf; replace NaN/inf weights with finite numbers, or scale all weights down together (the maps and "
            "scores scale with them)"
        )
        raise ValueError(msg)
    if all(v == 0 for v in single):
        msg = (
            f"weights are all zero in float32, which makes every anomaly map zero; give at least one scale a weight "
            f"(float32 rounds magnitudes below about 7e-46 to zero): {shown}"
        )
        raise ValueError(msg)
    return single


def _check_weight_count(values: Sequence[float], num_scales: int) -> None:
    if len(values) != num_scales:
        msg = f"weights must have one entry per scale ({num_scales}), got {len(values)}"
        raise ValueError(msg)


@dataclass(frozen=True)
class KernelOptions:
    """The checked options of one anomaly-map call, shared by every backend.

    Constructing it applies every option rule (the constructor accepts the Enums' string values and
    stores the Enums), so a backend receives only valid options and re-checks nothing but its own
    memory safety. Weights given with ``fusion="sum"`` make it ``Fusion.WEIGHTED``. The number of
    scales comes with the features: :meth:`check_scales` checks the weights against it.

    Args:
        output_size: ``(H, W)`` of the maps, or one int (see :func:`validate_output_size`).
        distance: :class:`Distance`.
        fusion: :class:`Fusion`.
        weights: Per-scale weights of a weighted sum (see :func:`validate_weights`).
        align_corners: ``align_corners`` of the bilinear upsampling.
        sigma: Gaussian sigma, ``0`` disables smoothing (see :func:`validate_sigma`).
        score: :class:`ScoreMode` of the image score, or ``None`` for maps only.
        top_k: Values averaged by ``score="topk"`` (see :func:`validate_top_k`).

    Raises:
        TypeError: An option of the wrong type.
        ValueError: An option outside its rule.

    Example:
        >>> from kd_ext.kernels import KernelOptions
        >>> KernelOptions((64, 64), fusion="mean", sigma=2).fusion
        <Fusion.MEAN: 'mean'>
    """

    output_size: tuple[int, int]
    distance: Distance = Distance.COSINE
    fusion: Fusion = Fusion.SUM
    weights: tuple[float, ...] | None = None
    align_corners: bool = False
    sigma: float = 4.0
    score: ScoreMode | None = ScoreMode.MAX
    top_k: int | None = None

    def __post_init__(self) -> None:
        size = validate_output_size(self.output_size)
        sigma = validate_sigma(self.sigma, size)
        distance = check_choice(self.distance, Distance, "distance")
        fusion = check_choice(self.fusion, Fusion, "fusion")
        weights = _weight_values(fusion, self.weights)
        score = None if self.score is None else check_choice(self.score, ScoreMode, "score mode")
        top_k = None if score is None else validate_top_k(score, self.top_k, size[0] * size[1])
        if not isinstance(self.align_corners, (bool, np.bool_)):
            msg = f"align_corners must be a bool, got {type(self.align_corners).__name__}"
            raise TypeError(msg)
        for name, value in (
            ("output_size", size),
            ("distance", distance),
            ("fusion", Fusion.WEIGHTED if weights is not None else fusion),
            ("weights", weights),
            ("align_corners", bool(self.align_corners)),
            ("sigma", sigma),
            ("score", score),
            ("top_k", top_k),
        ):
            object.__setattr__(self, name, value)

    def check_scales(self, num_scales: int) -> None:
        """Check the weights against the number of feature scales of a call.

        Args:
            num_scales: Number of (teacher, student) feature pairs.

        Raises:
            ValueError: If there is not one weight per scale.
        """
        if self.weights is not None:
            _check_weight_count(self.weights, num_scales)
