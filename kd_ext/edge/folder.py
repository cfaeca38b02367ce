"""Score a folder of images: scores and labels (CSV, JSON), binary masks and heat-map overlays (PNG).

Outputs are written into a hidden temporary folder next to ``out_dir`` and renamed to ``out_dir`` only when
everything was written, so a folder named ``out_dir`` is always complete (its ``results.json`` also says
``"complete": true``). Unreadable images are reported and skipped; the others are still scored.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EdgeInputError
from .runtime import EdgeModel, Prediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class LoadedImage:
    """An image read for scoring.

    Attributes:
        path: Source file.
        name: Path relative to the scored folder (POSIX style).
        original: The RGB image at its original size (for overlays and masks).
        notes: What was done to fit the model (mode conversion, resizing).
    """

    path: Path
    name: str
    original: Image.Image
    notes: list[str] = field(default_factory=list)


@dataclass
class FolderReport:
    """Summary of a folder run.

    Attributes:
        out_dir: Folder with the results.
        rows: One dict per scored image (``image``, ``score``, ``label``, ``notes``, output files).
        skipped: ``{"image", "reason"}`` for every file that could not be read.
        model: :meth:`EdgeModel.describe` of the model used.
        seconds: Wall time of reading, inference and writing.
    """

    out_dir: Path
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    model: dict[str, Any]
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Scored images per second, end to end."""
        return len(self.rows) / self.seconds if self.seconds > 0 else 0.0


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
        msg = f"Image folder not found: {folder}"
        raise EdgeInputError(msg)
    pattern = "**/*" if recursive else "*"
    return sorted(path for path in folder.glob(pattern) if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, Image.Image, list[str]]:
    """Read an image as the IR expects it: RGB, ``(H, W) = size``, ``float32`` CHW in ``[0, 1]``.

    Grayscale, palette, 16-bit and RGBA images are converted to RGB (alpha dropped) and images of another
    size are resized (bilinear); each such step is noted.

    Args:
        path: Image file.
        size: Model input ``(H, W)``.

    Returns:
        tuple: ``(array [3, H, W], RGB image at its original size, notes)``.

    Raises:
        EdgeInputError: If the file is not a readable image.
    """
    path = Path(path)
    notes: list[str] = []
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "RGB":
                notes.append(f"converted from {image.mode} to RGB")
                if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
                    array = np.asarray(image, dtype=np.float64)
                    scale = 255.0 / max(float(array.max()), 1.0)
                    image = Image.fromarray((array * scale).astype(np.uint8))  # noqa: PLW2901
                original = image.convert("RGB")
            else:
                original = image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        msg = f"cannot read image ({type(error).__name__}: {error})"
        raise EdgeInputError(msg) from error
    height, width = size
    resized = original
    if original.size != (width, height):
        notes.append(f"resized from {original.size[0]}x{original.size[1]} to {width}x{height}")
        resized = original.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return array, original, notes


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


class Progress:
    """Plain-text progress bar on a stream (redrawn in place on a terminal, every ~10 % otherwise)."""

    def __init__(self, total: int, stream: IO[str] | None, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.start = time.perf_counter()
        self.tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        self._last_decile = -1
        self._finished = False

    def update(self, done: int) -> None:
        """Show ``done`` of ``total``."""
        if self.stream is None or self._finished:
            return
        self._finished = done >= self.total
        decile = 10 * done // max(self.total, 1)
        if not self.tty and decile == self._last_decile and done != self.total:
            return
        self._last_decile = decile
        elapsed = time.perf_counter() - self.start
        filled = self.width * done // max(self.total, 1)
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} images, {rate:.1f} img/s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _output_name(name: str, used: set[str]) -> str:
    stem = str(Path(name).with_suffix(""))
    candidate = f"{stem}.png"
    if candidate in used:
        candidate = f"{stem}{Path(name).suffix.replace('.', '_')}.png"
    used.add(candidate)
    return candidate


def _batches(
    files: list[Path],
    root: Path,
    size: tuple[int, int],
    batch_size: int,
    skipped: list[dict[str, str]],
    log: IO[str] | None,
) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
    loaded: list[LoadedImage] = []
    arrays: list[np.ndarray] = []
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            array, original, notes = load_image(path, size)
        except EdgeInputError as error:
            skipped.append({"image": name, "reason": str(error)})
            if log is not None:
                log.write(f"skipped {name}: {error}\n")
            continue
        loaded.append(LoadedImage(path=path, name=name, original=original, notes=notes))
        arrays.append(array)
        if len(loaded) == batch_size:
            yield loaded, np.stack(arrays)
            loaded, arrays = [], []
    if loaded:
        yield loaded, np.stack(arrays)


def _write_outputs(
    images: list[LoadedImage],
    prediction: Prediction,
    work: Path,
    masks: bool,
    overlays: bool,
    used: set[str],
) -> list[dict[str, Any]]:
    rows = []
    for index, image in enumerate(images):
        out_name = _output_name(image.name, used)
        row: dict[str, Any] = {
            "image": image.name,
            "score": float(prediction.pred_score[index]),
            "label": int(prediction.pred_label[index]),
            "label_name": "anomalous" if prediction.pred_label[index] else "normal",
            "notes": "; ".join(image.notes),
        }
        if masks:
            mask = Image.fromarray(prediction.pred_mask[index].astype(np.uint8) * 255)
            mask = mask.resize(image.original.size, Image.Resampling.NEAREST)
            path = work / "masks" / out_name
            path.parent.mkdir(parents=True, exist_ok=True)
            mask.save(path)
            row["mask"] = f"masks/{out_name}"
        if overlays:
            path = work / "overlays" / out_name
            path.parent.mkdir(parents=True, exist_ok=True)
            overlay(image.original, prediction.anomaly_map[index]).save(path)
            row["overlay"] = f"overlays/{out_name}"
        rows.append(row)
    return rows


def _write_tables(work: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]], info: dict) -> None:
    columns = ["image", "score", "label", "label_name", "notes", "mask", "overlay"]
    with (work / "scores.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "score": f"{row['score']:.6f}"})
    if skipped:
        with (work / "skipped.csv").open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["image", "reason"])
            writer.writeheader()
            writer.writerows(skipped)
    payload = {**info, "images": rows, "skipped": skipped, "complete": True}
    (work / "results.json").write_text(json.dumps(payload, indent=2) + "\n")


def score_folder(
    model: EdgeModel,
    images_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 1,
    recursive: bool = False,
    masks: bool = True,
    overlays: bool = True,
    overwrite: bool = False,
    progress: IO[str] | None = sys.stderr,
) -> FolderReport:
    """Score every image of a folder and write the results.

    Writes ``scores.csv`` and ``results.json`` (per image: score, label, notes; plus the model, the
    precision used and the skipped files), ``masks/<name>.png`` (binary, 0/255, at the image's size),
    ``overlays/<name>.png`` (heat map over the image) and ``skipped.csv`` when files could not be read.

    Args:
        model: The compiled IR.
        images_dir: Folder of images.
        out_dir: Output folder (created; must not exist unless ``overwrite``).
        batch_size: Images per inference request (1 when the IR has a static batch of 1).
        recursive: Include sub-folders (output names keep the relative paths).
        masks: Write binary masks.
        overlays: Write heat-map overlays.
        overwrite: Replace an existing ``out_dir`` (only once the new results are complete).
        progress: Stream for the progress bar and skip notices (``None``: silent).

    Returns:
        FolderReport: What was scored and skipped.

    Raises:
        EdgeInputError: If the folder is missing or has no (readable) images, or ``out_dir`` exists.
    """
    images_dir = Path(images_dir)
    out_dir = Path(out_dir)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}."
        raise EdgeInputError(msg)
    if model.batch_size is not None:
        batch_size = model.batch_size
    files = list_images(images_dir, recursive)
    if not files:
        where = f"{images_dir} or its sub-folders" if recursive else str(images_dir)
        msg = f"No images found in {where} (looked for {', '.join(IMAGE_SUFFIXES)})."
        if not recursive and any(path.is_dir() for path in images_dir.iterdir()):
            msg += " It has sub-folders: pass --recursive to include them."
        raise EdgeInputError(msg)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        msg = f"Output folder {out_dir} already exists; choose another or pass --overwrite."
        raise EdgeInputError(msg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    used: set[str] = set()
    bar = Progress(len(files), progress)
    try:
        batches = _batches(files, images_dir, model.input_size, batch_size, skipped, progress)
        for images, prediction in model.iter_predict(batches):
            rows += _write_outputs(images, prediction, work, masks, overlays, used)
            bar.update(len(rows) + len(skipped))
        if not rows:
            msg = f"None of the {len(files)} images in {images_dir} could be read: {skipped[0]['reason']}"
            raise EdgeInputError(msg)
        bar.update(len(files))
        seconds = time.perf_counter() - start
        info = {"model": model.describe(), "images_dir": str(images_dir), "seconds": round(seconds, 3)}
        _write_tables(work, rows, skipped, info)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FolderReport(out_dir=out_dir, rows=rows, skipped=skipped, model=model.describe(), seconds=seconds)
