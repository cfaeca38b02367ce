"""How an image file becomes a model's input: the one rule for training, ``anomalib test`` and the edge.

Two steps, each written once here with numpy and Pillow only (no torch, so the edge runtime imports it):

1. **Values** (:func:`rgb_values`): a decoded image becomes ``float32`` RGB in ``[0, 1]`` by its format's value
   range. 8-bit modes (RGB, grayscale, palette, RGBA, CMYK, ...) are converted to RGB by Pillow and scaled by
   ``1/255`` exactly as anomalib's ``read_image`` does (the same bits). 16-bit images (``I;16*``, and ``I``
   with every value in ``0..65535``) are scaled by ``1/65535``, where anomalib's reader would saturate them
   (``4112`` would become ``255``, white). Modes without a defined range (``F``; ``I`` outside 16 bits) are
   refused rather than guessed.
2. **Size** (:func:`resize_values`): resized to the model's input size as kd_ext models' pre-processor does it
   (torchvision ``Resize(antialias=True)``, bilinear): Pillow's bilinear filter on each ``float32`` channel is
   the same antialiased filter, equal to float rounding.

In training and ``anomalib test`` the first step runs in the dataset (:mod:`kd_ext.data.reading` puts
:func:`read_rgb` in place of anomalib's reader) and the second in the model's pre-processor; on the edge
(:func:`kd_ext.edge.load_image`) both run here, and the IR's own resize then sees an image of its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EIGHT_BIT_STEP = np.float32(1 / 255)
"""8-bit value -> ``[0, 1]``: multiplied in ``float32`` as torchvision's ``to_dtype(scale=True)`` does."""
SIXTEEN_BIT_STEP = np.float32(1 / 65535)
"""16-bit value -> ``[0, 1]``: the full 16-bit range, as torchvision scales ``uint16``."""
NO_RANGE_MODES = {"F": "32-bit floating point"}
"""Pillow modes without a defined value range: refused, not guessed."""


class ImageValueRangeError(ValueError):
    """An image whose values have no defined range (floating point, or integers beyond 16 bits)."""


def is_sixteen_bit(image: Image.Image) -> bool:
    """Whether an image is read as 16-bit (``I;16*``, or ``I``, whose values :func:`rgb_values` checks)."""
    return image.mode == "I" or image.mode.startswith("I;16")


def check_value_range(image: Image.Image) -> None:
    """Refuse an image whose values cannot be scaled to ``[0, 1]`` without guessing.

    Args:
        image: A decoded image (its pixels are read for mode ``I``).

    Raises:
        ImageValueRangeError: For mode ``F``, and for mode ``I`` with values outside ``0..65535``.
    """
    mode = image.mode
    if mode in NO_RANGE_MODES:
        msg = (
            f"mode {mode} ({NO_RANGE_MODES[mode]}) has no defined value range, so it cannot be scaled to [0, 1] "
            "without guessing; save the image as 8- or 16-bit"
        )
        raise ImageValueRangeError(msg)
    if mode == "I":
        values = np.asarray(image)
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            msg = (
                f"mode I (32-bit integer) with values {int(values.min())}..{int(values.max())} outside the 16-bit "
                "range has no defined scale; save the image as 8- or 16-bit"
            )
            raise ImageValueRangeError(msg)


def rgb_values(image: Image.Image) -> tuple[np.ndarray, list[str]]:
    """A decoded image as ``float32`` RGB in ``[0, 1]``, scaled by its format's value range (see the module).

    Args:
        image: A decoded image.

    Returns:
        tuple: ``(array [H, W, 3], notes)``; the notes say what conversion was made (none for RGB).

    Raises:
        ImageValueRangeError: If the mode has no defined value range (:func:`check_value_range`).
    """
    check_value_range(image)
    mode = image.mode
    if is_sixteen_bit(image):
        gray = np.asarray(image).astype(np.float32) * SIXTEEN_BIT_STEP
        note = f"converted from {mode} to RGB (16-bit values scaled by 1/65535)"
        return np.repeat(gray[..., None], 3, axis=2), [note]
    rgb = image if mode == "RGB" else image.convert("RGB")
    notes = [] if mode == "RGB" else [f"converted from {mode} to RGB"]
    return np.asarray(rgb).astype(np.float32) * EIGHT_BIT_STEP, notes


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as :func:`rgb_values` converts it.

    Args:
        path: Image file.

    Returns:
        np.ndarray: ``float32`` RGB ``[H, W, 3]`` in ``[0, 1]``.

    Raises:
        ImageValueRangeError: If the mode has no defined value range.
        OSError: If the file cannot be opened or decoded (Pillow's errors).
    """
    with Image.open(path) as image:
        image.load()
        return rgb_values(image)[0]


def resize_values(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``float32`` ``[H, W, C]`` values to ``size`` as the models' pre-processor does.

    Bilinear with antialiasing, as torchvision's ``Resize(size, antialias=True)`` on a float tensor (the two
    agree to float rounding); an image already of that size is returned unchanged, as torchvision does.

    Args:
        values: Image values, channels last.
        size: Target ``(H, W)``.

    Returns:
        np.ndarray: ``float32`` ``[H, W, C]`` at ``size``.
    """
    height, width = size
    if values.shape[:2] == (height, width):
        return values
    channels = [
        Image.fromarray(np.ascontiguousarray(values[..., channel], dtype=np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        for channel in range(values.shape[2])
    ]
    return np.stack([np.asarray(channel) for channel in channels], axis=-1)


def eight_bit_rgb(values: np.ndarray) -> Image.Image:
    """``[0, 1]`` RGB values as an 8-bit RGB image (for display: overlays); 8-bit files get their own pixels back."""
    return Image.fromarray(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))


__all__ = [
    "EIGHT_BIT_STEP",
    "NO_RANGE_MODES",
    "SIXTEEN_BIT_STEP",
    "ImageValueRangeError",
    "check_value_range",
    "eight_bit_rgb",
    "is_sixteen_bit",
    "read_rgb",
    "resize_values",
    "rgb_values",
]
