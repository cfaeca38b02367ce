"""Reading images for an IR: listing a folder, converting to 8-bit RGB by value range, resizing, size limits."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EdgeInputError, text_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_SCALE = 257
"""``65535 / 255``: 16-bit values divided by this are on the 8-bit scale (white stays white)."""
NO_RANGE_MODES = {"F": "32-bit floating point"}
"""Pillow modes without a defined value range: such images are skipped, not guessed."""


@dataclass
class Source:
    """An image file to score and where its outputs go.

    Attributes:
        path: The file.
        name: Path relative to the scored folder (POSIX style), as :func:`text_name` writes it.
        out_name: Relative ``.png`` path of its mask and overlay.
        name_bytes: The exact bytes of ``name``, percent-encoded (``name`` escapes bytes that are not valid UTF-8,
            and can then equal another file's valid name).
    """

    path: Path
    name: str
    out_name: str
    name_bytes: str = ""


@dataclass
class LoadedImage:
    """An image read for scoring.

    Attributes:
        source: The file and its names.
        original: The RGB image at its original size (for overlays and masks).
        notes: What was done to fit the model (mode conversion, resizing).
    """

    source: Source
    original: Image.Image
    notes: list[str] = field(default_factory=list)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted.

    Args:
        folder: Folder to list.
        recursive: Include sub-folders.

    Returns:
        list[Path]: Files with a known image suffix (case-insensitive).

    Raises:
        EdgeInputError: If the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"Image folder not found: {text_name(folder)}"
        raise EdgeInputError(msg)
    pattern = "**/*" if recursive else "*"
    return sorted(path for path in folder.glob(pattern) if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Convert a decoded image to 8-bit RGB by its format's value range.

    8-bit modes (grayscale, palette, RGBA, CMYK, ...) are converted by Pillow (alpha dropped). 16-bit images
    (``I;16*``, and ``I`` with all values in ``0..65535``) are divided by 257, so a 16-bit copy of an 8-bit
    picture gives the same pixels. Modes without a defined range (``F``; ``I`` with values outside 16 bits)
    are refused rather than rescaled.

    Args:
        image: A loaded image.

    Returns:
        tuple: ``(RGB image, notes)``; the notes say what conversion was made.

    Raises:
        EdgeInputError: If the mode has no defined value range.
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy(), []
    if mode in NO_RANGE_MODES:
        msg = (
            f"mode {mode} ({NO_RANGE_MODES[mode]}) has no defined value range, so it cannot be scaled to 8 bits "
            "without guessing; save the image as 8- or 16-bit"
        )
        raise EdgeInputError(msg)
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)
        if mode == "I" and values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            msg = (
                f"mode I (32-bit integer) with values {int(values.min())}..{int(values.max())} outside the 16-bit "
                "range has no defined scale; save the image as 8- or 16-bit"
            )
            raise EdgeInputError(msg)
        eight_bit = np.rint(values.astype(np.float64) / SIXTEEN_BIT_SCALE).astype(np.uint8)
        note = f"converted from {mode} to RGB (16-bit values divided by {SIXTEEN_BIT_SCALE})"
        return Image.fromarray(eight_bit, mode="L").convert("RGB"), [note]
    return image.convert("RGB"), [f"converted from {mode} to RGB"]


def load_image(
    path: str | Path,
    size: tuple[int, int],
    max_pixels: int | None = None,
) -> tuple[np.ndarray, Image.Image, list[str]]:
    """Read an image as the IR expects it: RGB, ``(H, W) = size``, ``float32`` CHW in ``[0, 1]``.

    Images are converted to RGB by their value range (:func:`to_rgb`) and images of another size are resized
    (bilinear); each such step is noted. The size is checked from the file's header, before decoding: an image
    over ``max_pixels``, or over Pillow's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``), is
    refused. Between ``PIL.Image.MAX_IMAGE_PIXELS`` and that limit Pillow only warns; the image is read and the
    warning becomes a note.

    Args:
        path: Image file.
        size: Model input ``(H, W)``.
        max_pixels: Refuse images with more pixels (``None``: Pillow's limit only; Pillow's limit applies
            as well, the CLI's ``--max-pixels`` replaces it).

    Returns:
        tuple: ``(array [3, H, W], RGB image at its original size, notes)``.

    Raises:
        EdgeInputError: If the file is not a readable image, too large, or has no defined value range.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                pixels = image.width * image.height
                if max_pixels is not None and pixels > max_pixels:
                    msg = (
                        f"image too large: {image.width}x{image.height} = {pixels} pixels, over the limit of "
                        f"{max_pixels} (--max-pixels / max_pixels); raise the limit or downscale the image"
                    )
                    raise EdgeInputError(msg)
                image.load()
                original, notes = to_rgb(image)
    except Image.DecompressionBombError as error:
        msg = (
            f"image too large for Pillow's decompression-bomb check ({error}); raise the limit with --max-pixels "
            "(kd-ext infer) or PIL.Image.MAX_IMAGE_PIXELS, or downscale the image"
        )
        raise EdgeInputError(msg) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        msg = f"cannot read image ({type(error).__name__}: {error})"
        raise EdgeInputError(msg) from error
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            notes.append(f"large image, read although Pillow warned: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    height, width = size
    resized = original
    if original.size != (width, height):
        notes.append(f"resized from {original.size[0]}x{original.size[1]} to {width}x{height}")
        resized = original.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return array, original, notes


__all__ = ["IMAGE_SUFFIXES", "LoadedImage", "Source", "list_images", "load_image", "to_rgb"]
