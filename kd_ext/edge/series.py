"""Score a file of series with a 1-D model's IR (kd_ext's SignalKD): scores, labels and per-time-step maps.

The file is in UCR format (one series per line, numbers separated by whitespace, commas or tabs); the class label
in the first column is optional. It is recognised from the IR's series length ``L``: lines of ``L + 1`` numbers
start with a label (kept in the output, never used for scoring), lines of ``L`` numbers are series only
(``label_column`` decides instead when given).

Each series gets exactly the preprocessing its model was trained with: the settings (band-pass, z-normalisation) are
read from the IR (see :mod:`kd_ext.edge.series_preprocessing`) and applied by the same code as in training.

Everything is checked before any series is scored: the IR's kind and its recorded preprocessing, then the file
(not numbers, ragged lines, a length other than the IR's: the message names the line, column and lengths), then the
output location. A series with a NaN or infinite sample is skipped and listed in ``skipped.csv`` with the reason, as
unreadable images are. A file with one series is scored like any other.

Outputs (written atomically like an image folder's, see :func:`kd_ext.edge.folder.write_results`):

* ``scores.csv``: ``index`` (0-based position of the series in the file), ``line``, ``ucr_label`` (the file's label,
  empty without a label column), ``score``, ``label`` (predicted: 1 = anomalous, by the IR's threshold or
  ``threshold=``) and ``label_name``;
* ``maps.npy``: ``float32`` ``[scored series, L]``, the per-time-step anomaly maps, row ``i`` for row ``i`` of
  ``scores.csv`` (normalised like the scores: 0.5 is the threshold);
* ``results.json``: the rows, the skipped series, the model and the preprocessing applied;
* ``skipped.csv``: ``index``, ``line``, ``reason``, when series were skipped.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import EdgeInputError, EdgeModelError, text_name
from .folder import Progress, write_results
from .runtime import IMAGE, SERIES, EdgeModel, _rt_info
from .series_preprocessing import (
    METADATA_KEY,
    METADATA_SECTION,
    SeriesPreprocessing,
    not_finite_rows,
    read_series_table,
)

MAPS_FILE = "maps.npy"
DEFAULT_BATCH_SIZE = 64
"""Series per inference request when none is given (series are small)."""


@dataclass
class SeriesFile:
    """The series of a file, as read (before preprocessing).

    Attributes:
        path: The file.
        values: ``float64`` ``[N, L]`` (NaN and infinite samples kept).
        labels: The label column ``[N]``, or ``None`` when the file has none.
        lines: Line number (1-based) of each series.
    """

    path: Path
    values: np.ndarray
    labels: np.ndarray | None
    lines: list[int]


@dataclass
class SeriesReport:
    """Summary of a series file run.

    Attributes:
        out_dir: Folder with the results.
        rows: One dict per scored series (``index``, ``line``, ``ucr_label``, ``score``, ``label``, ``label_name``).
        skipped: ``{"index", "line", "reason"}`` for each series not scored.
        maps: ``[scored series, L]`` anomaly maps (as in ``maps.npy``).
        model: :meth:`EdgeModel.describe` of the model used.
        seconds: Wall time of reading, inference and writing.
    """

    out_dir: Path
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    maps: np.ndarray
    model: dict[str, Any]
    seconds: float

    @property
    def series_per_second(self) -> float:
        """Scored series per second, end to end."""
        return len(self.rows) / self.seconds if self.seconds > 0 else 0.0


def check_series_model(model: EdgeModel, source: Path) -> None:
    """Refuse an image IR or a folder, and a multi-channel series IR (a UCR file holds one channel).

    Args:
        model: The compiled IR.
        source: The series file.

    Raises:
        EdgeInputError: If the IR does not take single-channel series or ``source`` is a folder.
    """
    model.check_source(source, IMAGE if source.is_dir() else SERIES)
    if model.channels != 1:
        msg = (
            f"{model.xml_path.name} takes series with {model.channels} channels; a UCR-format file holds one channel "
            "per series. Score it with a single-channel model's IR."
        )
        raise EdgeInputError(msg)


def series_preprocessing(model: EdgeModel) -> SeriesPreprocessing:
    """The preprocessing recorded in a series IR at export.

    Args:
        model: The compiled IR.

    Returns:
        SeriesPreprocessing: The training preprocessing.

    Raises:
        EdgeModelError: If the IR records none, or an unreadable one.
    """
    text = _rt_info(model.model, METADATA_KEY, METADATA_SECTION)
    if text is None:
        msg = (
            f"{model.xml_path.name} does not record how its series were preprocessed in training (rt_info "
            f"{METADATA_SECTION}/{METADATA_KEY}), so its scores on a series file could not be trusted. Re-export the "
            "model with this kd_ext (anomalib export or kd_ext.export.export_openvino) from a checkpoint trained with "
            "kd_ext.data.UCRSeries, or set model.series_preprocessing before exporting."
        )
        raise EdgeModelError(msg)
    try:
        return SeriesPreprocessing.from_json(text)
    except ValueError as error:
        msg = f"{model.xml_path.name} has an unreadable series preprocessing record: {error}. Re-export the model."
        raise EdgeModelError(msg) from error


def load_series(path: str | Path, length: int, label_column: bool | None = None) -> SeriesFile:
    """Read a series file for an IR that takes series of ``length`` time steps.

    Args:
        path: The file (UCR format; the label column optional).
        length: The IR's series length.
        label_column: Whether lines start with a class label; ``None``: lines of ``length + 1`` numbers do, lines of
            ``length`` numbers do not.

    Returns:
        SeriesFile: Raw values, labels (if any) and line numbers.

    Raises:
        EdgeInputError: If the file is missing, not text, empty, has a cell that is not a number or lines of
            different lengths (naming the lines), or its series are not ``length`` long (naming both lengths).
    """
    try:
        read = read_series_table(path, label_column=bool(label_column))
    except (FileNotFoundError, ValueError) as error:
        raise EdgeInputError(str(error)) from error
    width = read.table.shape[1]
    with_label = width == length + 1 if label_column is None else label_column
    if width - int(with_label) != length:
        if label_column is None:
            found = f"{width} numbers per line (expected {length}, or {length + 1} with a class label first)"
        elif label_column:
            found = f"{width - 1} values after the label"
        else:
            found = f"{width} values per line"
        msg = (
            f"{text_name(read.path)}: the series have {found}, but the model takes series of {length} time steps. "
            f"Resample the series to {length} samples (the model's training length)."
        )
        raise EdgeInputError(msg)
    labels = read.table[:, 0] if with_label else None
    values = read.table[:, 1:] if with_label else read.table
    return SeriesFile(path=read.path, values=values, labels=labels, lines=read.lines)


def _write_tables(work: Path, rows: list[dict[str, Any]], skipped: list[dict[str, Any]], info: dict) -> None:
    columns = ["index", "line", "ucr_label", "score", "label", "label_name"]
    with (work / "scores.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            label = "" if row["ucr_label"] is None else f"{row['ucr_label']:g}"
            writer.writerow({**row, "ucr_label": label, "score": f"{row['score']:.6f}"})
    if skipped:
        with (work / "skipped.csv").open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=["index", "line", "reason"])
            writer.writeheader()
            writer.writerows(skipped)
    payload = {**info, "series": rows, "skipped": skipped, "maps": MAPS_FILE, "complete": True}
    (work / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def score_series(
    model: EdgeModel,
    series_file: str | Path,
    out_dir: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    label_column: bool | None = None,
    progress: IO[str] | None = sys.stderr,
) -> SeriesReport:
    """Score every series of a file and write the results (module docstring).

    Args:
        model: A series IR (``model.input_kind == "series"``) with its preprocessing recorded.
        series_file: The series file.
        out_dir: Output folder (created; must not exist or be empty unless ``overwrite``).
        batch_size: Series per inference request (an IR with a static batch uses its own).
        overwrite: Replace an existing ``out_dir`` (only once the new results are complete).
        label_column: Whether lines start with a class label (``None``: recognised from the line length).
        progress: Stream for the progress bar, skip notices and stale-folder clean-up (``None``: silent).

    Returns:
        SeriesReport: What was scored and skipped.

    Raises:
        EdgeModelError: If the IR records no series preprocessing.
        EdgeInputError: If the IR takes images, the file is malformed or of another length, no series can be scored,
            or ``out_dir`` cannot be used; all before any series is scored.
        EdgeInterruptedError: On Ctrl-C or SIGTERM, after cleaning up (see :func:`kd_ext.edge.folder.write_results`).
    """
    series_file, out_dir = Path(series_file), Path(out_dir)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}."
        raise EdgeInputError(msg)
    check_series_model(model, series_file)
    preprocessing = series_preprocessing(model)
    start = time.perf_counter()
    read = load_series(series_file, model.input_size[0], label_column)
    bad = dict(zip(*_not_finite(read), strict=True))
    skipped = [{"index": index, "line": read.lines[index], "reason": reason} for index, reason in bad.items()]
    keep = [index for index in range(len(read.lines)) if index not in bad]
    if not keep:
        msg = f"None of the {len(read.lines)} series in {text_name(series_file)} can be scored: {skipped[0]['reason']}"
        raise EdgeInputError(msg)
    try:
        series = preprocessing.apply(read.values[keep])[:, None, :]
    except ValueError as error:
        msg = f"{text_name(series_file)}: {error}"
        raise EdgeInputError(msg) from error
    if model.batch_size is not None:
        batch_size = model.batch_size
    for entry in skipped:
        if progress is not None:
            progress.write(f"skipped line {entry['line']}: {entry['reason']}\n")

    def write(work: Path) -> tuple[list[dict[str, Any]], np.ndarray, float]:
        bar = Progress(len(keep), progress, unit="series")
        batches = ((first, series[first : first + batch_size]) for first in range(0, len(keep), batch_size))
        rows: list[dict[str, Any]] = []
        maps = []
        for first, prediction in model.iter_predict(batches):
            for offset, score in enumerate(prediction.pred_score):
                index = keep[first + offset]
                anomalous = bool(prediction.pred_label[offset])
                rows.append(
                    {
                        "index": index,
                        "line": read.lines[index],
                        "ucr_label": None if read.labels is None else float(read.labels[index]),
                        "score": float(score),
                        "label": int(anomalous),
                        "label_name": "anomalous" if anomalous else "normal",
                    }
                )
            maps.append(prediction.anomaly_map)
            bar.update(len(rows))
        anomaly_maps = np.concatenate(maps).astype(np.float32)
        np.save(work / MAPS_FILE, anomaly_maps)
        seconds = time.perf_counter() - start
        info = {
            "model": model.describe(),
            "series_file": text_name(series_file),
            "label_column": read.labels is not None,
            "preprocessing": json.loads(preprocessing.to_json()),
            "seconds": round(seconds, 3),
        }
        _write_tables(work, rows, skipped, info)
        return rows, anomaly_maps, seconds

    rows, maps, seconds = write_results(out_dir, series_file, write, overwrite, progress, source_name="series file")
    return SeriesReport(out_dir=out_dir, rows=rows, skipped=skipped, maps=maps, model=model.describe(), seconds=seconds)


def _not_finite(read: SeriesFile) -> tuple[list[int], list[str]]:
    """Indices of the series with NaN or infinite samples, and why each is skipped."""
    indices = [index for index, row in enumerate(read.values) if not np.isfinite(row).all()]
    reasons = not_finite_rows(read.values[indices], [read.lines[index] for index in indices])
    fix = "; interpolate or trim the series (the UCR archive pads variable-length series with NaN)"
    return indices, [reason.split(": ", 1)[1] + fix for reason in reasons]
