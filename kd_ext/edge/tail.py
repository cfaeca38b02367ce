"""The anomaly-map tail of a features IR, run outside OpenVINO: :mod:`kd_ext.kernels` plus numpy, torch-free.

:func:`run_tail` turns the per-scale teacher/student features a features IR outputs into anomalib's fields
``pred_score``, ``anomaly_map``, ``pred_label``, ``pred_mask``, as the standard IR's in-graph tail and
post-processor would (see :class:`~kd_ext.edge.contract.AnomalyTail` for the steps). The per-scale distances,
upsampling, fusion, blur and score run in one call of the fused native kernel (``backend="native"``: the compiled
``kd_ext._native``, never torch). MTHF's two-stage fusion runs one unsmoothed kernel call per group, then a
numpy step: standardise each group map with its training statistics, combine the groups (mean or maximum), blur
with :func:`gaussian_blur` and score. Folding the mean of standardised groups into one weighted kernel call is
faster but subtracts a large constant afterwards, which loses float32 precision beyond the tail's parity budget
(``benchmarks/results/edge.md``), so it is not used.
"""

from __future__ import annotations

import numpy as np

from kd_ext import kernels
from kd_ext.kernels._options import gaussian_radius

from .contract import AnomalyTail, Normalization, TailGroup

Features = dict[str, np.ndarray]


def gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps (float32, computed in float64), the kernels' rule."""
    radius = gaussian_radius(sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * offsets * offsets / (sigma * sigma))
    return (taps / taps.sum()).astype(np.float32)


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[B, 1, H, W]`` maps with reflect padding (the kernels' blur), in numpy.

    Args:
        maps: ``float32`` maps; ``H`` and ``W`` must exceed the radius.
        sigma: Standard deviation; ``0`` returns ``maps``.

    Returns:
        np.ndarray: Blurred maps of the same shape.
    """
    if sigma <= 0:
        return maps
    radius = gaussian_radius(sigma)
    taps = gaussian_taps(sigma)
    padded = np.pad(maps, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
    height, width = maps.shape[-2:]
    rows = np.zeros((*maps.shape[:2], height + 2 * radius, width), dtype=np.float32)
    for index, tap in enumerate(taps):
        rows += tap * padded[..., index : index + width]
    out = np.zeros_like(maps, dtype=np.float32)
    for index, tap in enumerate(taps):
        out += tap * rows[..., index : index + height, :]
    return out


def group_features(group: TailGroup, features: Features) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A group's teacher and student feature arrays, in the order of its pairs."""
    return [features[teacher] for teacher, _ in group.pairs], [features[student] for _, student in group.pairs]


def two_stage_numpy(tail: AnomalyTail, features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 as a numpy step after one unsmoothed kernel call per group (any ``group_fusion``).

    Args:
        tail: The IR's tail (``group_fusion`` ``"mean"`` or ``"max"``).
        features: The IR's outputs by name.

    Returns:
        tuple: Raw maps ``[B, 1, H, W]`` and scores ``[B]``.
    """
    standardised = []
    for group, mean, std in zip(tail.groups, tail.group_mean, tail.group_std, strict=True):
        teachers, students = group_features(group, features)
        group_map = kernels.anomaly_map(
            teachers,
            students,
            tail.output_size,
            distance=tail.distance,
            fusion=group.fusion,
            align_corners=tail.align_corners,
            sigma=0.0,
            backend="native",
        )
        standardised.append((group_map - np.float32(mean)) / np.float32(std))
    stacked = np.concatenate(standardised, axis=1)
    fused = stacked.mean(axis=1, keepdims=True) if tail.group_fusion == "mean" else stacked.max(axis=1, keepdims=True)
    maps = np.ascontiguousarray(gaussian_blur(fused.astype(np.float32), tail.sigma))
    return maps, kernels.image_score(maps, tail.score, tail.top_k, backend="native")


def raw_map_and_score(tail: AnomalyTail, features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised anomaly maps ``[B, 1, H, W]`` and scores ``[B]`` of a features IR's outputs.

    Args:
        tail: The IR's tail.
        features: The IR's outputs by name (every name of :attr:`AnomalyTail.feature_names`).

    Returns:
        tuple: Maps and scores, ``float32``.
    """
    if tail.group_fusion == "none":
        teachers, students = group_features(tail.groups[0], features)
        return kernels.anomaly_map_and_score(
            teachers,
            students,
            tail.output_size,
            distance=tail.distance,
            fusion=tail.groups[0].fusion,
            align_corners=tail.align_corners,
            sigma=tail.sigma,
            score=tail.score,
            top_k=tail.top_k,
            backend="native",
        )
    return two_stage_numpy(tail, features)


def normalize(values: np.ndarray, low: float, high: float, threshold: float) -> np.ndarray:
    """Normalise as anomalib's ``PostProcessor._normalize``, in numpy.

    The result is ``clip((v - threshold) / (high - low) + 0.5, 0, 1)``. A NaN threshold is the middle of the
    range; a zero range gives 1 / 0 / 0.5 above / below / at the threshold; NaN statistics leave the values raw.

    Args:
        values: Raw scores or maps.
        low: Minimum on the validation images.
        high: Maximum on the validation images.
        threshold: Raw threshold.

    Returns:
        np.ndarray: Normalised ``float32`` values.
    """
    if np.isnan(low) or np.isnan(high):
        return values
    low32, high32 = np.float32(low), np.float32(high)
    threshold32 = (high32 + low32) / np.float32(2) if np.isnan(threshold) else np.float32(threshold)
    value_range = high32 - low32
    if value_range == 0:
        return np.where(values > threshold32, 1.0, np.where(values < threshold32, 0.0, 0.5)).astype(np.float32)
    return np.clip(((values - threshold32) / value_range) + np.float32(0.5), 0, 1).astype(np.float32)


def post_process(tail: AnomalyTail, maps: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Apply anomalib's post-processor to raw maps and scores: normalisation, then labels and masks.

    Args:
        tail: The IR's tail (its normalisation statistics and thresholds).
        maps: Raw maps ``[B, 1, H, W]``.
        scores: Raw scores ``[B]``.

    Returns:
        dict: ``pred_score``, ``anomaly_map`` and, with thresholds, ``pred_label``, ``pred_mask``.
    """
    stats: Normalization | None = tail.normalization
    if stats is not None:
        scores = normalize(scores, stats.image_min, stats.image_max, stats.image_threshold)
        maps = normalize(maps, stats.pixel_min, stats.pixel_max, stats.pixel_threshold)
    outputs = {"pred_score": scores, "anomaly_map": maps}
    if tail.image_threshold is not None and tail.pixel_threshold is not None:
        outputs["pred_label"] = scores > np.float32(tail.image_threshold)
        outputs["pred_mask"] = maps > np.float32(tail.pixel_threshold)
    return outputs


def run_tail(tail: AnomalyTail, features: Features) -> dict[str, np.ndarray]:
    """Compute anomalib's output fields from a features IR's outputs (the tail the standard IR runs in-graph).

    Args:
        tail: The IR's tail.
        features: The IR's outputs by name.

    Returns:
        dict: ``pred_score`` ``[B]``, ``anomaly_map`` ``[B, 1, H, W]`` and, with thresholds, ``pred_label``,
        ``pred_mask``.
    """
    maps, scores = raw_map_and_score(tail, features)
    return post_process(tail, maps, scores)


__all__ = [
    "gaussian_blur",
    "group_features",
    "normalize",
    "post_process",
    "raw_map_and_score",
    "run_tail",
    "two_stage_numpy",
]
