"""Reading UCR-format files and the datamodule's preprocessing of their series.

The parsing rule and the preprocessing live in :mod:`kd_ext.edge.series_preprocessing` (numpy only), which the edge
runtime applies too; this module gives them the datamodule's names.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_ext.edge.series_preprocessing import SeriesPreprocessing, listed, not_finite_rows, read_series_table


@dataclass
class UCRFile:
    """The series of one UCR file, as read.

    Attributes:
        path: The file.
        labels: Class label of each series ``[N]`` (as written: ``1.0`` and ``1`` are the same label).
        values: The series ``[N, L]``.
        lines: Line number (1-based) of each series in the file.
    """

    path: Path
    labels: np.ndarray
    values: np.ndarray
    lines: list[int]


def read_ucr(path: str | Path) -> UCRFile:
    """Read a UCR-format file: one series per line, the label first, then the values.

    Values may be separated by whitespace, commas or tabs; blank lines are skipped (see
    :func:`kd_ext.edge.series_preprocessing.read_series_table`, the reader the edge runtime uses too).

    Args:
        path: The file.

    Returns:
        UCRFile: Labels, values and line numbers.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it has no series, a cell that is not a number, a line with only a label, series of different
            lengths, or NaN or infinite values; the message names the file and the offending lines.
    """
    read = read_series_table(path, label_column=True)
    table, lines = read.table, read.lines
    not_finite = not_finite_rows(table[:, 1:], lines)
    if not_finite or not np.isfinite(table[:, 0]).all():
        shown = not_finite or ["a label is NaN or infinite"]
        msg = (
            f"{read.path} has missing or infinite samples:{listed(shown, len(shown))}\nThe UCR archive pads "
            "variable-length series with NaN; interpolate or trim those series to one length before using the file."
        )
        raise ValueError(msg)
    return UCRFile(path=read.path, labels=table[:, 0], values=table[:, 1:], lines=lines)


def preprocess(values: np.ndarray, normalize: bool = True, band_pass: Sequence[float] | None = None) -> np.ndarray:
    """The datamodule's preprocessing: optional band-pass, then optional per-series z-normalisation.

    The rule itself is :meth:`kd_ext.edge.series_preprocessing.SeriesPreprocessing.apply`, which the edge runtime
    applies to series files too.

    Args:
        values: Series ``[N, L]``.
        normalize: Z-normalise each series.
        band_pass: Filter cut-offs (see :func:`check_band_pass`), or ``None``.

    Returns:
        np.ndarray: ``float32`` series ``[N, L]``.
    """
    return SeriesPreprocessing(normalize=normalize, band_pass=band_pass).apply(values)
