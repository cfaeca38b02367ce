r"""Score a folder of images: scores and labels (CSV, JSON), binary masks and heat-map overlays (PNG).

Outputs are written into a hidden staging folder ``.<out>.partial-<pid>`` next to ``out_dir`` (it holds a
marker file with the writing process's id and host) and renamed to ``out_dir`` only when everything was
written, so a folder named ``out_dir`` is always complete (its ``results.json`` also says ``"complete": true``).
With ``overwrite``, the previous ``out_dir`` is first moved into the staging folder, the new results are
renamed in, and only then is the previous folder deleted: an interruption at any point leaves either the
previous or the new results in ``out_dir``, and the :class:`EdgeInterruptedError` message says which, and where
anything else was left. A later run into the same ``out_dir`` removes staging folders whose process is gone
(restoring previous results that a killed run had moved aside). A symbolic link as ``out_dir`` stays a link:
the results replace the folder it points to.

Everything that can be checked without inference is checked first: the output location (a path under a file,
an unwritable or read-only folder, a mount point, the image folder itself) and output-name collisions (with
``recursive``, an output that would be both a file and a folder, or names that differ only in case on a
case-insensitive output file system). Unreadable images are reported and skipped; the others are still
scored. File names that are not valid UTF-8 are written with backslash escapes (``bad\xff.png``) in the
tables, and with ``_`` for the backslash in output file names.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EdgeInputError, EdgeInterruptedError, TerminationSignal, text_name
from .runtime import EdgeModel, Prediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
STAGING_MARKER = "kd_ext-run.json"
"""File in a staging folder naming the process (``pid``) and host that write it."""
SIXTEEN_BIT_SCALE = 257
"""``65535 / 255``: 16-bit values divided by this are on the 8-bit scale (white stays white)."""
NO_RANGE_MODES = {"F": "32-bit floating point"}
"""Pillow modes without a defined value range: such images are skipped, not guessed."""
Result = TypeVar("Result")


@dataclass
class Source:
    """An image file to score and where its outputs go.

    Attributes:
        path: The file.
        name: Path relative to the scored folder (POSIX style), as :func:`text_name` writes it.
        out_name: Relative ``.png`` path of its mask and overlay.
    """

    path: Path
    name: str
    out_name: str


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


@dataclass
class FolderReport:
    """Summary of a folder run.

    Attributes:
        out_dir: Folder with the results (as given; a symbolic link stays one).
        rows: One dict per scored image (``image``, ``score``, ``label``, ``notes``, output files).
        skipped: ``{"image", "reason"}`` for every file that could not be read or has no defined value range.
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

    def __init__(self, total: int, stream: IO[str] | None, width: int = 30, unit: str = "images") -> None:
        self.unit = unit
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
        rate_unit = "img" if self.unit == "images" else self.unit
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}]"
        line = f"{bar} {done}/{self.total} {self.unit}, {rate:.1f} {rate_unit}/s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _output_name(name: str, used: set[str]) -> str:
    """Output ``.png`` path for an image's text name.

    The suffix becomes ``.png`` (``x.jpg`` -> ``x.png``, or ``x_jpg.png`` when ``x.png`` is taken); backslashes
    (escapes of undecodable bytes) become ``_``.
    """
    safe = name.replace("\\", "_")
    stem = str(Path(safe).with_suffix("").as_posix())
    candidate = f"{stem}.png"
    if candidate in used:
        candidate = f"{stem}{Path(safe).suffix.replace('.', '_')}.png"
    used.add(candidate)
    return candidate


def plan_sources(files: list[Path], root: Path) -> list[Source]:
    """Text and output names of the files to score.

    Args:
        files: Image files under ``root``.
        root: The scored folder.

    Returns:
        list[Source]: One per file, in order.
    """
    used: set[str] = set()
    sources = []
    for path in files:
        name = text_name(path.relative_to(root).as_posix())
        sources.append(Source(path=path, name=name, out_name=_output_name(name, used)))
    return sources


def check_output_names(sources: list[Source], case_insensitive: bool = False) -> None:
    """Refuse output names that would overwrite each other, before any inference.

    Two images collide when their output names are equal (compared case-insensitively on a case-insensitive
    output file system), or when one image's output file is a folder another image's output needs
    (``x.png`` and ``x.png/y.png`` with ``recursive``).

    Args:
        sources: The planned names (:func:`plan_sources`).
        case_insensitive: Whether the output file system ignores case.

    Raises:
        EdgeInputError: Naming the colliding images and how to resolve it.
    """
    key = str.casefold if case_insensitive else str
    files: dict[str, Source] = {}
    collisions: list[str] = []
    for source in sources:
        other = files.setdefault(key(source.out_name), source)
        if other is not source:
            why = " (the output file system ignores case)" if case_insensitive else ""
            collisions.append(f"'{other.name}' and '{source.name}' both map to '{source.out_name}'{why}")
    for source in sources:
        parts = source.out_name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            other = files.get(key(folder))
            if other is not None:
                collisions.append(
                    f"'{source.name}' needs an output folder '{folder}', which is the output file of '{other.name}'"
                )
    if collisions:
        shown = "; ".join(collisions[:3]) + (f"; and {len(collisions) - 3} more" if len(collisions) > 3 else "")
        msg = (
            f"Output names of masks/ and overlays/ collide: {shown}. Rename or move one image of each pair, score "
            "the sub-folders separately, or pass --no-masks --no-overlays."
        )
        raise EdgeInputError(msg)


def _case_insensitive(folder: Path) -> bool:
    """Whether the file system of ``folder`` (which must be writable) ignores the case of names."""
    probe = folder / "kd_ext-Case-Probe"
    probe.touch()
    try:
        return (folder / "kd_ext-case-probe").exists()
    finally:
        probe.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether a process runs (``True`` where that cannot be told safely: a folder is then kept)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _stale_pid(entry: Path, prefix: str) -> int | None:
    """The process id of a staging folder of ours whose process is gone (``None``: not ours, or still running)."""
    pid_text = entry.name[len(prefix) :]
    if not entry.name.startswith(prefix) or not pid_text.isdigit() or not entry.is_dir():
        return None
    try:
        owner = json.loads((entry / STAGING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    if not isinstance(owner, dict) or owner.get("pid") != pid or owner.get("host") != socket.gethostname():
        return None
    if pid != os.getpid() and _pid_alive(pid):
        return None
    return pid


def remove_stale_staging(out_dir: str | Path, log: IO[str] | None = None) -> list[Path]:
    """Remove staging folders of earlier runs into ``out_dir`` whose process is no longer running.

    Only folders named ``.<out>.partial-<pid>`` that hold kd_ext's marker written on this host are touched.
    When a killed run had already moved the previous ``out_dir`` into its staging folder and ``out_dir`` is
    missing, the previous results are moved back first. A folder that cannot be removed is reported and kept.

    Args:
        out_dir: The output folder (a symbolic link is followed to the folder it points to).
        log: Stream for a line per removed, restored or kept folder.

    Returns:
        list[Path]: The staging folders removed.
    """
    target = _output_target(Path(out_dir))
    prefix = _staging_prefix(target)
    try:
        entries = sorted(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid = _stale_pid(entry, prefix)
        if pid is None:
            continue
        try:
            previous = entry / "old"
            if previous.exists() and not target.exists() and not target.is_symlink():
                os.rename(previous, target)
                if log is not None:
                    log.write(f"restored {text_name(target)} from {text_name(entry)}, left by stopped process {pid}\n")
            shutil.rmtree(entry)
        except OSError as error:
            if log is not None:
                log.write(f"could not remove {text_name(entry)} of stopped process {pid} ({error}); delete it\n")
            continue
        removed.append(entry)
        if log is not None:
            log.write(f"removed {text_name(entry)}, partial output of stopped process {pid}\n")
    return removed


def _output_target(out_dir: Path) -> Path:
    """The path results are renamed to: ``out_dir``, or the folder a symbolic link ``out_dir`` points to."""
    if not out_dir.is_symlink():
        return out_dir
    target = Path(os.path.realpath(out_dir))
    if target.is_symlink():
        msg = f"--out {text_name(out_dir)} is a symbolic link that cannot be resolved (a loop?); remove the link."
        raise EdgeInputError(msg)
    return target


def _check_out(out_dir: Path, target: Path, source: Path, overwrite: bool, source_name: str) -> None:
    """Refuse an output location that cannot work, before anything is written."""
    shown = text_name(out_dir)
    scored = source.resolve()
    real = target.resolve()
    if real == scored or real in scored.parents:
        msg = f"--out {shown} is, or contains, the {source_name} {text_name(source)}; choose a folder outside it."
        raise EdgeInputError(msg)
    for ancestor in target.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                msg = (
                    f"--out {shown} cannot be created: {text_name(ancestor)} is a file, not a folder. Choose an "
                    "--out outside it."
                )
                raise EdgeInputError(msg)
            break
    if not target.exists():
        return
    if not target.is_dir():
        msg = f"--out {shown} exists and is a file, not a folder; remove it or choose another --out."
        raise EdgeInputError(msg)
    if not overwrite and any(target.iterdir()):
        msg = f"Output folder {shown} already exists; choose another or pass --overwrite."
        raise EdgeInputError(msg)
    if os.path.ismount(target):
        msg = f"--out {shown} is a mount point, which cannot be replaced by renaming; choose a folder inside it."
        raise EdgeInputError(msg)
    if not os.access(target, os.W_OK | os.X_OK):
        msg = (
            f"Cannot replace {shown}: no permission to write in it (needed to move and delete the previous "
            "results). Fix its permissions or choose another --out."
        )
        raise EdgeInputError(msg)


def _staging_path(target: Path) -> Path:
    return target.parent / f"{_staging_prefix(target)}{os.getpid()}"


def _make_staging(out_dir: Path, target: Path) -> Path:
    """Create the staging folder ``.<out>.partial-<pid>`` next to ``target``, with ``new/`` and then its marker.

    Returns:
        Path: The folder the results are written to (``new/``).
    """
    staging = _staging_path(target)
    created = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by an earlier call in this process
            shutil.rmtree(staging)
        staging.mkdir()
        created = True
        (staging / "new").mkdir()
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        (staging / STAGING_MARKER).write_text(json.dumps(owner) + "\n", encoding="utf-8")
    except OSError as error:
        if created:
            shutil.rmtree(staging, ignore_errors=True)
        reason = "read-only file system" if error.errno == errno.EROFS else (error.strerror or str(error))
        msg = (
            f"Cannot write the output folder {text_name(out_dir)}: creating {text_name(staging)} failed "
            f"({reason}). Choose a writable --out."
        )
        raise EdgeInputError(msg) from error
    return staging / "new"


def _abandon(staging: Path, target: Path, shown: str, existed: bool) -> str:
    """Undo an unfinished run after an error or interruption.

    Returns:
        str: What is left on disk, in words that are true in every outcome.
    """
    new, previous = staging / "new", staging / "old"
    if not staging.exists():
        return f"{shown} was not changed" if existed else f"nothing was written ({shown} was not created)"
    if (staging / STAGING_MARKER).exists() and not new.exists():  # the new results were renamed to target
        what = "deleting the previous results was interrupted and the rest of them is in" if existed else "left"
        return (
            f"the new results are complete in {shown}; {what} {text_name(staging)} (delete it; the next run into "
            f"{shown} also removes it)"
        )
    try:
        if previous.exists():
            os.rename(previous, target)
        shutil.rmtree(staging)
    except (KeyboardInterrupt, OSError):
        if previous.exists():
            return (
                f"the previous results are in {text_name(previous)}: move them back to {shown} (the next run into "
                f"{shown} also does)"
            )
        return (
            f"{shown} was not changed, but the partial new results in {text_name(staging)} were not all removed "
            f"(delete it; the next run into {shown} also removes it)"
        )
    if existed:
        return f"{shown} was not changed and the partial new results were removed"
    return f"nothing was written ({shown} was not created)"


def _swap_in(staging: Path, target: Path, log: IO[str] | None) -> None:
    """Move the previous results into the staging folder, rename the new ones to ``target``, delete the previous."""
    if target.exists() or target.is_symlink():
        os.rename(target, staging / "old")
    os.rename(staging / "new", target)
    try:
        shutil.rmtree(staging)
    except OSError as error:
        if log is not None:
            log.write(
                f"the new results are complete in {text_name(target)}, but {text_name(staging)} (the previous "
                f"results) could not be deleted: {error}; delete it\n"
            )


def _batches(
    sources: list[Source],
    size: tuple[int, int],
    batch_size: int,
    max_pixels: int | None,
    skipped: list[dict[str, str]],
    log: IO[str] | None,
) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
    loaded: list[LoadedImage] = []
    arrays: list[np.ndarray] = []
    for source in sources:
        try:
            array, original, notes = load_image(source.path, size, max_pixels)
        except EdgeInputError as error:
            skipped.append({"image": source.name, "reason": str(error)})
            if log is not None:
                log.write(f"skipped {source.name}: {error}\n")
            continue
        loaded.append(LoadedImage(source=source, original=original, notes=notes))
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
) -> list[dict[str, Any]]:
    rows = []
    for index, image in enumerate(images):
        out_name = image.source.out_name
        row: dict[str, Any] = {
            "image": image.source.name,
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
    with (work / "scores.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "score": f"{row['score']:.6f}"})
    if skipped:
        with (work / "skipped.csv").open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=["image", "reason"])
            writer.writeheader()
            writer.writerows(skipped)
    payload = {**info, "images": rows, "skipped": skipped, "complete": True}
    (work / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _images_to_score(images_dir: Path, recursive: bool) -> list[Path]:
    files = list_images(images_dir, recursive)
    if not files:
        where = f"{text_name(images_dir)} or its sub-folders" if recursive else text_name(images_dir)
        msg = f"No images found in {where} (looked for {', '.join(IMAGE_SUFFIXES)})."
        if not recursive and any(path.is_dir() for path in images_dir.iterdir()):
            msg += " It has sub-folders: pass --recursive to include them."
        raise EdgeInputError(msg)
    return files


def _prepare_out(out_dir: Path, source: Path, overwrite: bool, log: IO[str] | None, source_name: str) -> Path:
    """Remove stale staging folders and check the output location.

    Returns:
        Path: Where the results will be renamed to (:func:`_output_target`).
    """
    target = _output_target(out_dir)
    remove_stale_staging(out_dir, log)
    try:
        _check_out(out_dir, target, source, overwrite, source_name)
    except OSError as error:
        msg = f"Cannot use --out {text_name(out_dir)} ({error}); choose another --out."
        raise EdgeInputError(msg) from error
    return target


def write_results(
    out_dir: Path,
    source: Path,
    write: Callable[[Path], Result],
    overwrite: bool = False,
    log: IO[str] | None = None,
    source_name: str = "image folder",
) -> Result:
    """Run ``write`` into a staging folder and make its output ``out_dir`` only when it returns (module docstring).

    Stale staging folders are removed and the output location is checked first; then ``write(folder)`` fills a new
    staging folder, which replaces ``out_dir`` (the previous results are deleted only after that). If ``write``
    raises, nothing it wrote is left and ``out_dir`` is as before.

    Args:
        out_dir: Output folder (a symbolic link is kept; the folder it points to receives the results).
        source: What is scored (a folder or a file); ``out_dir`` must not be it or contain it.
        write: Writes every output into the folder it is given and returns what the caller needs.
        overwrite: Replace an existing non-empty ``out_dir``.
        log: Stream for stale-folder clean-up notices.
        source_name: What ``source`` is, for messages ("image folder", "series file").

    Returns:
        What ``write`` returned.

    Raises:
        EdgeInputError: If ``out_dir`` exists (without ``overwrite``) or cannot be written.
        EdgeInterruptedError: On ``KeyboardInterrupt`` (Ctrl-C) or :class:`TerminationSignal` (SIGTERM, see
            :func:`terminate_as_interrupt`), after cleaning up; its message says what was left where.
    """
    shown = text_name(out_dir)
    target = _prepare_out(out_dir, source, overwrite, log, source_name)
    existed = target.exists()
    staging = _staging_path(target)
    try:
        result = write(_make_staging(out_dir, target))
        _swap_in(staging, target, log)
    except BaseException as error:
        left = _abandon(staging, target, shown, existed)
        if isinstance(error, KeyboardInterrupt):
            number = getattr(error, "signal_number", signal.SIGINT)
            msg = f"interrupted by {signal.Signals(number).name}: {left}."
            raise EdgeInterruptedError(msg, number) from error
        raise
    return result


def score_folder(
    model: EdgeModel,
    images_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 1,
    recursive: bool = False,
    masks: bool = True,
    overlays: bool = True,
    overwrite: bool = False,
    max_pixels: int | None = None,
    progress: IO[str] | None = sys.stderr,
) -> FolderReport:
    """Score every image of a folder and write the results.

    Writes ``scores.csv`` and ``results.json`` (per image: score, label, notes; plus the model, the
    precision used and the skipped files), ``masks/<name>.png`` (binary, 0/255, at the image's size),
    ``overlays/<name>.png`` (heat map over the image) and ``skipped.csv`` (image, reason) when files could not
    be read. The output location and the output names are checked before any inference (module docstring).

    Args:
        model: The compiled IR.
        images_dir: Folder of images.
        out_dir: Output folder (created; must not exist or be empty unless ``overwrite``; never a file). A
            symbolic link is kept and the folder it points to receives the results.
        batch_size: Images per inference request (an IR with a static batch uses its own batch; a short last
            batch is padded).
        recursive: Include sub-folders (output names keep the relative paths).
        masks: Write binary masks.
        overlays: Write heat-map overlays.
        overwrite: Replace an existing ``out_dir`` (only once the new results are complete).
        max_pixels: Skip images with more pixels (see :func:`load_image`).
        progress: Stream for the progress bar, skip notices and stale-folder clean-up (``None``: silent).

    Returns:
        FolderReport: What was scored and skipped.

    Raises:
        EdgeInputError: If the folder is missing or has no (readable) images, ``out_dir`` exists or cannot be
            written, or output names collide.
        EdgeInterruptedError: On ``KeyboardInterrupt`` (Ctrl-C) or :class:`TerminationSignal` (SIGTERM, see
            :func:`terminate_as_interrupt`), after cleaning up; its message says what was left where.
    """
    images_dir = Path(images_dir)
    out_dir = Path(out_dir)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}."
        raise EdgeInputError(msg)
    if model.batch_size is not None:
        batch_size = model.batch_size
    model.check_source(images_dir)
    files = _images_to_score(images_dir, recursive)
    sources = plan_sources(files, images_dir)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    bar = Progress(len(files), progress)

    def write(work: Path) -> float:
        nonlocal rows
        if masks or overlays:
            check_output_names(sources, _case_insensitive(work))
        batches = _batches(sources, model.input_size, batch_size, max_pixels, skipped, progress)  # type: ignore[arg-type]
        for images, prediction in model.iter_predict(batches):
            rows += _write_outputs(images, prediction, work, masks, overlays)
            bar.update(len(rows) + len(skipped))
        if not rows:
            msg = f"None of the {len(files)} images in {text_name(images_dir)} could be read: {skipped[0]['reason']}"
            raise EdgeInputError(msg)
        bar.update(len(files))
        seconds = time.perf_counter() - start
        info = {"model": model.describe(), "images_dir": text_name(images_dir), "seconds": round(seconds, 3)}
        _write_tables(work, rows, skipped, info)
        return seconds

    seconds = write_results(out_dir, images_dir, write, overwrite, progress)
    return FolderReport(out_dir=out_dir, rows=rows, skipped=skipped, model=model.describe(), seconds=seconds)


def _raise_termination(number: int, frame: FrameType | None) -> None:
    del frame
    raise TerminationSignal(number)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Make SIGTERM clean up like Ctrl-C within the block.

    SIGTERM raises :class:`TerminationSignal` (a ``KeyboardInterrupt``); the previous handler is restored
    afterwards. Outside the main thread (where Python cannot set
    signal handlers) and on platforms without SIGTERM handling, this does nothing.

    Yields:
        None
    """
    try:
        previous = signal.signal(signal.SIGTERM, _raise_termination)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
