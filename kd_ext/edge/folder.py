r"""Score a folder of images: scores and labels (CSV, JSON), binary masks and heat-map overlays (PNG).

This module orchestrates the jobs of the other modules: reading images (:mod:`kd_ext.edge.images`), inference
(:mod:`kd_ext.edge.runtime`), heat-maps (:mod:`kd_ext.edge.heatmap`) and the atomic writer
(:mod:`kd_ext.edge.results`).

The results appear in ``out_dir`` only once complete (a staging folder renamed into place, see
:mod:`kd_ext.edge.results`), and an interruption leaves either the previous or the new results there. Without
``overwrite``, an ``out_dir`` that someone else created or filled during the run is left as it is and the
results go to a folder next to it, named in the error.

Everything that can be checked without inference is checked first: the output location (a path under a file,
an unwritable or read-only folder, a mount point, the image folder itself) and output-name collisions (with
``recursive``, an output that would be both a file and a folder, or names that differ only in case on a
case-insensitive output file system). Unreadable images are reported and skipped; the others are still
scored. File names that are not valid UTF-8 are written with backslash escapes (``bad\xff.png``) in the
tables' ``image`` column, and with ``_`` for the backslash in output file names; the ``image_bytes`` column
holds every name's exact bytes, percent-encoded (``bad%FF.png``; see :func:`kd_ext.edge.results.name_bytes`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

from .errors import EdgeInputError, TerminationSignal, text_name
from .heatmap import jet, overlay
from .images import IMAGE_SUFFIXES, LoadedImage, Source, list_images, load_image, to_rgb
from .results import (
    STAGING_MARKER,
    _case_insensitive,
    check_output_names,
    plan_sources,
    remove_stale_staging,
    write_image_outputs,
    write_results,
    write_tables,
)
from .runtime import EdgeModel


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
            skipped.append({"image": source.name, "reason": str(error), "image_bytes": source.name_bytes})
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


def _images_to_score(images_dir: Path, recursive: bool) -> list[Path]:
    files = list_images(images_dir, recursive)
    if not files:
        where = f"{text_name(images_dir)} or its sub-folders" if recursive else text_name(images_dir)
        msg = f"No images found in {where} (looked for {', '.join(IMAGE_SUFFIXES)})."
        if not recursive and any(path.is_dir() for path in images_dir.iterdir()):
            msg += " It has sub-folders: pass --recursive to include them."
        raise EdgeInputError(msg)
    return files


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

    Writes ``scores.csv`` and ``results.json`` (per image: name, score, label, notes, the name's exact bytes;
    plus the model, the precision used and the skipped files), ``masks/<name>.png`` (binary, 0/255, at the
    image's size), ``overlays/<name>.png`` (heat map over the image) and ``skipped.csv`` (image, reason, the
    name's bytes) when files could not be read. The output location and the output names are checked before
    any inference (module docstring).

    Args:
        model: The compiled IR.
        images_dir: Folder of images.
        out_dir: Output folder (created; must not exist or be empty unless ``overwrite``, at the start and when
            the results are complete; never a file). A symbolic link is kept and the folder it points to
            receives the results.
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
            written, output names collide, or (without ``overwrite``) ``out_dir`` was created or filled by
            someone else during the run (the message names the folder holding this run's results).
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
            rows += write_image_outputs(images, prediction, work, masks, overlays)
            bar.update(len(rows) + len(skipped))
        if not rows:
            msg = f"None of the {len(files)} images in {text_name(images_dir)} could be read: {skipped[0]['reason']}"
            raise EdgeInputError(msg)
        bar.update(len(files))
        seconds = time.perf_counter() - start
        info = {"model": model.describe(), "images_dir": text_name(images_dir), "seconds": round(seconds, 3)}
        write_tables(work, rows, skipped, info)
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


__all__ = [
    "IMAGE_SUFFIXES",
    "STAGING_MARKER",
    "FolderReport",
    "LoadedImage",
    "Progress",
    "Source",
    "check_output_names",
    "jet",
    "list_images",
    "load_image",
    "overlay",
    "plan_sources",
    "remove_stale_staging",
    "score_folder",
    "terminate_as_interrupt",
    "text_name",
    "to_rgb",
    "write_results",
]
