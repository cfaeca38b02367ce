"""Rendering heat-maps: a jet colour map of normalised anomaly maps blended over the image."""

from __future__ import annotations

import numpy as np
from PIL import Image


def jet(values: np.ndarray) -> np.ndarray:
    """Jet colour map of values in ``[0, 1]``.

    Args:
        values: ``[H, W]`` array.

    Returns:
        np.ndarray: ``uint8`` ``[H, W, 3]`` RGB.
    """
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (255 * rgb).astype(np.uint8)


def overlay(original: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a heat map of a normalised anomaly map (0.5 = threshold) over the image.

    Args:
        original: RGB image.
        anomaly_map: ``[H, W]`` normalised map (any size; resized to the image).
        alpha: Heat-map opacity.

    Returns:
        Image.Image: The overlay, at the image's size.
    """
    heat = Image.fromarray(jet(anomaly_map)).resize(original.size, Image.Resampling.BILINEAR)
    return Image.blend(original, heat, alpha)


__all__ = ["jet", "overlay"]
