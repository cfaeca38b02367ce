"""Reading images for an IR: listing a folder, size limits, and kd_ext's image rule (:mod:`kd_ext.image_input`).

Values and resizing follow :mod:`kd_ext.image_input`, the rule that training and ``anomalib test`` read images by
as well, so a file scores the same here as in ``anomalib test`` from the same checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kd_ext.image_input import ImageValueRangeError, eight_bit_rgb, resize_values, rgb_values

from .errors import EdgeInputError, text_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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
    """A decoded image as 8-bit RGB for display (overlays), converted by kd_ext's rule.

    The values are :func:`kd_ext.image_input.rgb_values`' (16-bit images scaled, not saturated), rounded to
    8 bits; an 8-bit image keeps its pixels.

    Args:
        image: A loaded image.

    Returns:
        tuple: ``(RGB image, notes)``; the notes say what conversion was made.

    Raises:
        EdgeInputError: If the mode has no defined value range.
    """
    if image.mode == "RGB":
        return image.copy(), []
    try:
        values, notes = rgb_values(image)
    except ImageValueRangeError as error:
        raise EdgeInputError(str(error)) from error
    return eight_bit_rgb(values), notes


def load_image(
    path: str | Path,
    size: tuple[int, int],
    max_pixels: int | None = None,
) -> tuple[np.ndarray, Image.Image, list[str]]:
    """Read an image as the IR expects it: RGB, ``(H, W) = size``, ``float32`` CHW in ``[0, 1]``.

    Values and size follow kd_ext's image rule, as in training and ``anomalib test``: converted to RGB by the
    format's value range (:func:`kd_ext.image_input.rgb_values`) and resized as the models' pre-processor does
    (:func:`kd_ext.image_input.resize_values`); each such step is noted. The size is checked from the file's
    header, before decoding: an image over ``max_pixels``, or over Pillow's decompression-bomb limit
    (``2 * PIL.Image.MAX_IMAGE_PIXELS``), is refused. Between ``PIL.Image.MAX_IMAGE_PIXELS`` and that limit
    Pillow only warns; the image is read and the warning becomes a note.

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
                values, notes = rgb_values(image)
    except ImageValueRangeError as error:
        raise EdgeInputError(str(error)) from error
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
    if values.shape[:2] != (height, width):
        notes.append(f"resized from {values.shape[1]}x{values.shape[0]} to {width}x{height}")
    array = np.ascontiguousarray(resize_values(values, size).transpose(2, 0, 1))
    return array, eight_bit_rgb(values), notes


__all__ = ["IMAGE_SUFFIXES", "LoadedImage", "Source", "list_images", "load_image", "to_rgb"]
