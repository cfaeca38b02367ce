"""The anomaly-map tail of a features IR, run outside OpenVINO: :mod:`kd_ext.kernels` plus numpy, torch-free.

:func:`run_tail` turns the per-scale teacher/student features a features IR outputs into anomalib's fields
``pred_score``, ``anomaly_map``, ``pred_label``, ``pred_mask``, as the standard IR's in-graph tail and
post-processor would (see :class:`~kd_ext.edge.contract.AnomalyTail` for the steps). The per-scale distances,
upsampling, fusion, blur and score run in one call of the fused native kernel (``backend="native"``: the compiled
``kd_ext._native``, never torch). MTHF's two-stage fusion runs one unsmoothed kernel call per group, then a
numpy step: standardise each group map with its training statistics and combine the groups (mean or maximum) by
:func:`fuse_standardised` (the one rule, which MTHF's torch fusion and the prior's run too), blur with
:func:`gaussian_blur` (the kernels' taps) and score. Folding the mean of standardised groups into one weighted
kernel call is faster but subtracts a large constant afterwards, which loses float32 precision beyond the tail's
parity budget (``benchmarks/results/edge.md``), so it is not used. A normal-feature prior
(:class:`~kd_ext.edge.contract.TailPrior`) is a numpy step after that map: the IR's prior distances are upsampled
(:func:`bilinear_resize`), both maps are standardised and fused (:func:`fuse_prior`, by :func:`fuse_standardised`),
and the image score is taken from the fused map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kd_ext import kernels
from kd_ext.kernels._options import gaussian_radius

from .contract import AnomalyTail, Normalization, TailGroup, TailPrior

Features = dict[str, np.ndarray]
Array = Any
"""A ``numpy.ndarray`` or a ``torch.Tensor``: :func:`fuse_standardised` serves both."""


def _maximum(first: Array, second: Array) -> Array:
    return np.maximum(first, second) if isinstance(first, np.ndarray) else first.maximum(second)


def fuse_standardised(maps: Sequence[Array], means: Sequence[Any], stds: Sequence[Any], rule: str) -> Array:
    """Standardise maps with their normal-image statistics and combine them: the one rule of every such fusion.

    ``z_i = (maps[i] - means[i]) / stds[i]``, then the mean (``rule`` ``"mean"``) or the pixel-wise maximum
    (``"max"``) of the ``z_i``. MTHF's stage 2 (the group maps) and the normal-feature prior's fusion (the
    distillation and the prior map) use it, in torch (the model's forward, with its statistics buffers, so that they
    stay constants of a traced graph) and in numpy (the edge tail, with the tail's statistics as ``float32``). Only
    elementwise arithmetic, so either array type works.

    Args:
        maps: Maps ``[B, 1, H, W]``, all numpy arrays or all torch tensors.
        means: One mean per map (numbers or 0-d arrays/tensors).
        stds: One standard deviation per map.
        rule: ``"mean"`` or ``"max"``.

    Returns:
        The fused maps ``[B, 1, H, W]``, of the inputs' type.

    Raises:
        ValueError: If ``rule`` is unknown or no map is given.
    """
    if rule not in {"mean", "max"}:
        msg = f"Unknown fusion rule '{rule}'; choose 'mean' or 'max'."
        raise ValueError(msg)
    standardised = [(values - mean) / std for values, mean, std in zip(maps, means, stds, strict=True)]
    if not standardised:
        msg = "fuse_standardised needs at least one map."
        raise ValueError(msg)
    fused = standardised[0]
    for values in standardised[1:]:
        fused = _maximum(fused, values) if rule == "max" else fused + values
    return fused if rule == "max" else fused / len(standardised)


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[B, 1, H, W]`` maps with reflect padding (the kernels' blur), in numpy.

    The taps are :func:`kd_ext.kernels.gaussian_taps`, the native kernels' own.

    Args:
        maps: ``float32`` maps; ``H`` and ``W`` must exceed the radius.
        sigma: Standard deviation; ``0`` returns ``maps``.

    Returns:
        np.ndarray: Blurred maps of the same shape.
    """
    if sigma <= 0:
        return maps
    radius = gaussian_radius(sigma)
    taps = kernels.gaussian_taps(sigma)
    padded = np.pad(maps, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
    height, width = maps.shape[-2:]
    rows = np.zeros((*maps.shape[:2], height + 2 * radius, width), dtype=np.float32)
    for index, tap in enumerate(taps):
        rows += tap * padded[..., index : index + width]
    out = np.zeros_like(maps, dtype=np.float32)
    for index, tap in enumerate(taps):
        out += tap * rows[..., index : index + height, :]
    return out


def _resize_matrix(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
    """``[size_out, size_in]`` linear-interpolation weights along one axis, as ``F.interpolate`` computes them."""
    out = np.arange(size_out, dtype=np.float64)
    if align_corners:
        source = out * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros_like(out)
    else:
        source = np.maximum((out + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weight = (source - low).astype(np.float32)
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    np.add.at(matrix, (np.arange(size_out), low), np.float32(1) - weight)
    np.add.at(matrix, (np.arange(size_out), high), weight)
    return matrix


def bilinear_resize(maps: np.ndarray, size: tuple[int, int], align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of ``[B, 1, h, w]`` maps to ``size``, as ``F.interpolate(mode="bilinear")``, in numpy.

    Args:
        maps: ``float32`` maps.
        size: Output ``(H, W)``.
        align_corners: ``F.interpolate``'s ``align_corners``.

    Returns:
        np.ndarray: ``float32`` maps ``[B, 1, H, W]``.
    """
    rows = _resize_matrix(maps.shape[-2], size[0], align_corners)
    columns = _resize_matrix(maps.shape[-1], size[1], align_corners)
    return np.ascontiguousarray(rows @ maps.astype(np.float32) @ columns.T, dtype=np.float32)


def fuse_prior(prior: TailPrior, distillation: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """The distillation map fused with the upsampled prior distances (kd_ext's ``PriorFusion``), in numpy.

    Args:
        prior: The tail's prior.
        distillation: Distillation maps ``[B, 1, H, W]``.
        distances: The IR's prior output ``[B, 1, h, w]``, upsampled bilinearly (``align_corners=False``, as the
            prior's ``forward``).

    Returns:
        np.ndarray: Fused ``float32`` maps ``[B, 1, H, W]``: the mean or maximum of the standardised maps.
    """
    prior_map = bilinear_resize(distances, distillation.shape[-2:])
    means = [np.float32(value) for value in prior.map_mean]
    stds = [np.float32(value) for value in prior.map_std]
    fused = fuse_standardised([distillation, prior_map], means, stds, prior.rule)
    return np.ascontiguousarray(fused, dtype=np.float32)


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
    group_maps = []
    for group in tail.groups:
        teachers, students = group_features(group, features)
        group_maps.append(
            kernels.anomaly_map(
                teachers,
                students,
                tail.output_size,
                distance=tail.distance,
                fusion=group.fusion,
                align_corners=tail.align_corners,
                sigma=0.0,
                backend="native",
            )
        )
    means = [np.float32(value) for value in tail.group_mean]
    stds = [np.float32(value) for value in tail.group_std]
    fused = fuse_standardised(group_maps, means, stds, tail.group_fusion)
    maps = np.ascontiguousarray(gaussian_blur(fused.astype(np.float32), tail.sigma))
    return maps, kernels.image_score(maps, tail.score, tail.top_k, backend="native")


def distillation_map_and_score(tail: AnomalyTail, features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised distillation maps ``[B, 1, H, W]`` and their scores ``[B]`` (the tail without its prior).

    Args:
        tail: The IR's tail.
        features: The IR's outputs by name.

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


def raw_maps_and_score(tail: AnomalyTail, features: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalised anomaly maps, scores, and the maps the scores are taken from, of a features IR's outputs.

    Without a prior the third item is the anomaly map itself. With one it is the fused map, which is also the
    anomaly map when the prior's scope is ``"map"`` (for ``"score"`` the anomaly map is the distillation map).

    Args:
        tail: The IR's tail.
        features: The IR's outputs by name (every name of :attr:`AnomalyTail.feature_names`).

    Returns:
        tuple: Anomaly maps ``[B, 1, H, W]``, scores ``[B]`` and score maps ``[B, 1, H, W]``, ``float32``.
    """
    maps, scores = distillation_map_and_score(tail, features)
    if tail.prior is None:
        return maps, scores, maps
    fused = fuse_prior(tail.prior, maps, features[tail.prior.output])
    scores = kernels.image_score(fused, tail.score, tail.top_k, backend="native")
    return (fused if tail.prior.scope == "map" else maps), scores, fused


def raw_map_and_score(tail: AnomalyTail, features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised anomaly maps ``[B, 1, H, W]`` and scores ``[B]`` of a features IR's outputs.

    Args:
        tail: The IR's tail.
        features: The IR's outputs by name (every name of :attr:`AnomalyTail.feature_names`).

    Returns:
        tuple: Maps and scores, ``float32``.
    """
    maps, scores, _ = raw_maps_and_score(tail, features)
    return maps, scores


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
    "bilinear_resize",
    "distillation_map_and_score",
    "fuse_prior",
    "fuse_standardised",
    "gaussian_blur",
    "group_features",
    "normalize",
    "post_process",
    "raw_map_and_score",
    "raw_maps_and_score",
    "run_tail",
    "two_stage_numpy",
]
