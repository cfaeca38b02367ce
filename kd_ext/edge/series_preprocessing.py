"""Series files and their preprocessing, in numpy only: the one rule shared by training and the edge runtime.

:class:`kd_ext.data.UCRSeries` (training) and :func:`kd_ext.edge.series.score_series` (edge) read series files and
preprocess series with these functions, so an IR scores exactly what its model was trained on. Nothing here imports
torch, anomalib or scipy.

Preprocessing (:class:`SeriesPreprocessing`), in this order:

1. optional zero-phase Butterworth filter (``band_pass``, cut-offs as fractions of the Nyquist frequency): the
   series are filtered forwards and backwards with odd extension at both ends and steady-state initial conditions,
   as ``scipy.signal.sosfiltfilt`` does with ``scipy.signal.butter``'s second-order sections (the tests compare
   them);
2. per-series z-normalisation (``normalize``): each series minus its mean, divided by its standard deviation (a
   constant series becomes zeros).

The settings travel with an exported model: SignalKD's ONNX export writes :meth:`SeriesPreprocessing.to_json` into
the ONNX file's metadata under :data:`METADATA_KEY`; OpenVINO's ONNX reader keeps it in the IR's ``rt_info`` section
:data:`METADATA_SECTION`, where the edge runtime reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEPARATORS = re.compile(r"[\s,]+")
SHOWN = 5
"""Offending lines named in an error message."""
FILTER_ORDER = 2
"""Butterworth order of the band-pass (applied forwards and backwards: effective order 4)."""
METADATA_KEY = "kd_ext_series_preprocessing"
"""ONNX metadata key (and IR ``rt_info`` key) of a series model's preprocessing settings (JSON)."""
METADATA_SECTION = "framework"
"""``rt_info`` section where OpenVINO's ONNX reader puts ONNX metadata."""
BILINEAR_FS2 = 4.0
"""``2 * fs`` of the bilinear transform with frequencies as fractions of the Nyquist frequency (``fs = 2``)."""


def listed(items: Sequence[str], count: int) -> str:
    """The first :data:`SHOWN` items, one per indented line, and how many more there are."""
    lines = "".join(f"\n  {item}" for item in list(items)[:SHOWN])
    return lines + (f"\n  ... and {count - SHOWN} more" if count > SHOWN else "")


# --------------------------------------------------------------------------------------------- reading files


@dataclass
class SeriesTable:
    """The numbers of a series file, one row per non-blank line.

    Attributes:
        path: The file.
        table: ``float64`` ``[N, M]``: every number of each line (the label first, when the file has one). NaN and
            infinite values are kept.
        lines: Line number (1-based) of each row.
    """

    path: Path
    table: np.ndarray
    lines: list[int]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_series_table(path: str | Path, label_column: bool = True) -> SeriesTable:
    """Read a series file: one series per line, numbers separated by whitespace, commas or tabs.

    Blank lines are skipped. ``nan`` and ``inf`` are read as numbers (callers decide what to do with them).

    Args:
        path: The file.
        label_column: Whether each line starts with a class label (then a line must hold a label and at least one
            value, and lengths are counted without the label). ``False``: the label column is optional or absent
            and lengths count every number of a line.

    Returns:
        SeriesTable: The numbers and their line numbers.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not text, has no series, has a cell that is not a number, a line with only a label, or
            lines of different lengths; the message names the file, the offending lines and the fix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = (
            f"Series file not found: {path}. Pass a text file with one series per line, the class label first "
            "(UCR format, e.g. ../shared/data/ecg/ECG200_TRAIN.txt)."
        )
        raise FileNotFoundError(msg)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        msg = f"{path} is not a text file ({error}); a series file is plain text, one series per line."
        raise ValueError(msg) from error
    rows: list[list[float]] = []
    lines: list[int] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        cells = [cell for cell in SEPARATORS.split(line.strip()) if cell]
        if not cells:
            continue
        values = [_number(cell) for cell in cells]
        bad = [
            (column, cell) for column, (cell, value) in enumerate(zip(cells, values, strict=True), 1) if value is None
        ]
        if bad:
            column, cell = bad[0]
            problems.append(f"line {number}, column {column}: {cell[:20]!r} is not a number")
        elif label_column and len(cells) < 2:
            problems.append(f"line {number}: a label without values")
        else:
            rows.append(values)  # type: ignore[arg-type]
            lines.append(number)
    if problems:
        layout = "the class label followed by the series' values" if label_column else "the series' values"
        msg = (
            f"{path} has {len(problems)} malformed line(s):{listed(problems, len(problems))}\n"
            f"Each line must be {layout}, all numbers."
        )
        raise ValueError(msg)
    if not rows:
        msg = f"{path} has no series; write one series per line, the class label first."
        raise ValueError(msg)
    skip = 1 if label_column else 0
    after = " after the label" if label_column else ""
    length = len(rows[0]) - skip
    ragged = [
        f"line {line}: {len(row) - skip} values"
        for row, line in zip(rows, lines, strict=True)
        if len(row) != len(rows[0])
    ]
    if ragged:
        msg = (
            f"{path}: series have different lengths; line {lines[0]} has {length} values{after}, but"
            f"{listed(ragged, len(ragged))}\nEvery series of a file must have the same length: resample, pad or trim "
            "them first."
        )
        raise ValueError(msg)
    return SeriesTable(path=path, table=np.asarray(rows, dtype=np.float64), lines=lines)


def not_finite_rows(values: np.ndarray, lines: Sequence[int]) -> list[str]:
    """``"line <n>: NaN or infinite value at position <p>"`` for each series with a NaN or infinite sample.

    Args:
        values: Series ``[N, L]`` (labels removed).
        lines: Line number of each series.

    Returns:
        list[str]: One description per such series, in file order.
    """
    return [
        f"line {line}: NaN or infinite value at position {int(np.flatnonzero(~np.isfinite(row))[0]) + 1}"
        for row, line in zip(values, lines, strict=True)
        if not np.isfinite(row).all()
    ]


# --------------------------------------------------------------------------------------------- filtering


def check_band_pass(band_pass: Sequence[float] | None) -> tuple[float, float] | None:
    """Refuse cut-offs that do not describe a filter.

    Args:
        band_pass: ``(low, high)`` as fractions of the Nyquist frequency, ``0 <= low < high <= 1`` and not ``(0, 1)``.

    Returns:
        tuple[float, float] | None: The cut-offs as floats.

    Raises:
        ValueError: If they are not two numbers in that range.
    """
    if band_pass is None:
        return None
    try:
        low, high = (float(value) for value in band_pass)
    except (TypeError, ValueError):
        msg = f"band_pass must be two cut-offs (low, high) as fractions of the Nyquist frequency, got {band_pass!r}."
        raise ValueError(msg) from None
    if not 0 <= low < high <= 1 or (low, high) == (0, 1):
        msg = (
            f"band_pass {band_pass!r} is not a filter: give 0 <= low < high <= 1 (fractions of the Nyquist frequency); "
            "(0, high) low-passes, (low, 1) high-passes, and None switches filtering off."
        )
        raise ValueError(msg)
    return low, high


def _quadratics(roots: np.ndarray) -> list[np.ndarray]:
    """Real second-order factors ``[1, c1, c2]`` of a polynomial with these roots (conjugate pairs kept together)."""
    roots = np.asarray(roots, dtype=complex)
    upper = roots[roots.imag > 1e-12]
    real = np.sort(roots[np.abs(roots.imag) <= 1e-12].real)
    factors = [np.real(np.poly([root, np.conj(root)])) for root in upper]
    factors += [np.poly(real[start : start + 2]) for start in range(0, len(real), 2)]
    return [np.pad(factor, (0, 3 - len(factor))) for factor in factors]


def butterworth_sos(band_pass: tuple[float, float], order: int = FILTER_ORDER) -> np.ndarray:
    """Digital Butterworth filter as second-order sections (the design of ``scipy.signal.butter``).

    Analog prototype, frequency transform (low-pass, high-pass or band-pass, pre-warped cut-offs) and bilinear
    transform; poles and zeros are grouped into real second-order sections, the gain in the first.

    Args:
        band_pass: ``(low, high)`` (see :func:`check_band_pass`): ``(0, high)`` low-passes, ``(low, 1)`` high-passes.
        order: Order of the prototype (even).

    Returns:
        np.ndarray: ``[sections, 6]`` rows ``b0, b1, b2, 1, a1, a2``.

    Raises:
        ValueError: If the order is not a positive even number.
    """
    if order < 2 or order % 2:
        msg = f"The Butterworth order must be a positive even number, got {order}."
        raise ValueError(msg)
    low, high = band_pass
    prototype = -np.exp(1j * np.pi * np.arange(-order + 1, order, 2) / (2 * order))
    warped_low, warped_high = (BILINEAR_FS2 * np.tan(np.pi * cut / 2) for cut in (low, high))
    if low == 0:
        poles, zeros, gain = prototype * warped_high, np.empty(0), warped_high**order
    elif high == 1:
        poles, zeros, gain = warped_low / prototype, np.zeros(order), np.real(1 / np.prod(-prototype))
    else:
        width, centre = warped_high - warped_low, np.sqrt(warped_low * warped_high)
        scaled = prototype * width / 2
        root = np.sqrt(scaled**2 - centre**2)
        poles, zeros, gain = np.concatenate([scaled + root, scaled - root]), np.zeros(order), width**order
    gain = gain * np.real(np.prod(BILINEAR_FS2 - zeros) / np.prod(BILINEAR_FS2 - poles))
    digital_zeros = np.concatenate([(BILINEAR_FS2 + zeros) / (BILINEAR_FS2 - zeros), -np.ones(len(poles) - len(zeros))])
    digital_poles = (BILINEAR_FS2 + poles) / (BILINEAR_FS2 - poles)
    numerators, denominators = _quadratics(digital_zeros), _quadratics(digital_poles)
    sos = np.array([np.concatenate([b, a]) for b, a in zip(numerators, denominators, strict=True)])
    sos[0, :3] *= gain
    return sos


def _steady_state(sos: np.ndarray) -> np.ndarray:
    """Initial states ``[sections, 2]`` of the cascade in steady state for a constant input of 1."""
    states = np.empty((len(sos), 2))
    scale = 1.0
    for index, (b0, b1, b2, _, a1, a2) in enumerate(sos):
        output = (b0 + b1 + b2) / (1 + a1 + a2)
        second = b2 - a2 * output
        states[index] = scale * (b1 - a1 * output + second), scale * second
        scale *= output
    return states


def _cascade(sos: np.ndarray, values: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Filter rows ``[N, T]`` through the sections (transposed direct form II), initial states ``[sections, N, 2]``."""
    signal = values
    for (b0, b1, b2, _, a1, a2), initial in zip(sos, states, strict=True):
        first, second = initial[:, 0], initial[:, 1]
        output = np.empty_like(signal)
        for step in range(signal.shape[1]):
            sample = signal[:, step]
            result = b0 * sample + first
            first = b1 * sample - a1 * result + second
            second = b2 * sample - a2 * result
            output[:, step] = result
        signal = output
    return signal


def filter_series(values: np.ndarray, band_pass: tuple[float, float], order: int = FILTER_ORDER) -> np.ndarray:
    """Zero-phase Butterworth filtering of every series (forwards and backwards, so no delay).

    Args:
        values: Series ``[N, L]``.
        band_pass: ``(low, high)`` cut-offs as fractions of the Nyquist frequency (see :func:`check_band_pass`).
        order: Butterworth order.

    Returns:
        np.ndarray: Filtered series ``[N, L]`` (``float64``).

    Raises:
        ValueError: If the series are too short for the filter's edge padding.
    """
    sos = butterworth_sos(band_pass, order)
    taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    padding = 3 * taps
    values = np.asarray(values, dtype=np.float64)
    if values.shape[1] <= padding:
        msg = (
            f"Series of {values.shape[1]} samples are too short for band_pass {band_pass} (needs more than {padding})."
        )
        raise ValueError(msg)
    extended = np.concatenate(
        [
            2 * values[:, :1] - values[:, padding:0:-1],
            values,
            2 * values[:, -1:] - values[:, -2 : -(padding + 2) : -1],
        ],
        axis=1,
    )
    steady = _steady_state(sos)[:, None, :]
    forwards = _cascade(sos, extended, steady * extended[None, :, :1])
    backwards = _cascade(sos, forwards[:, ::-1], steady * forwards[None, :, -1:])[:, ::-1]
    return backwards[:, padding:-padding]


def z_normalize(values: np.ndarray) -> np.ndarray:
    """Each series minus its mean, divided by its standard deviation; a constant series becomes zeros.

    Args:
        values: Series ``[N, L]``.

    Returns:
        np.ndarray: Normalised series ``[N, L]``.
    """
    centred = values - values.mean(axis=1, keepdims=True)
    scale = values.std(axis=1, keepdims=True)
    return np.divide(centred, scale, out=np.zeros_like(centred), where=scale > 0)


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SeriesPreprocessing:
    """How series are preprocessed before a model sees them (the datamodule's settings, recorded with the model).

    Args:
        normalize: Z-normalise each series (after filtering).
        band_pass: Filter cut-offs (see :func:`check_band_pass`), or ``None``.
        filter_order: Butterworth order of the filter.

    Raises:
        ValueError: If ``band_pass`` is not a filter.
    """

    normalize: bool = True
    band_pass: tuple[float, float] | None = None
    filter_order: int = FILTER_ORDER

    def __post_init__(self) -> None:
        """Check and normalise the cut-offs."""
        object.__setattr__(self, "band_pass", check_band_pass(self.band_pass))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Preprocess series: optional band-pass, then optional per-series z-normalisation.

        Args:
            values: Series ``[N, L]``.

        Returns:
            np.ndarray: ``float32`` series ``[N, L]``.

        Raises:
            ValueError: If the series are too short for the filter.
        """
        values = np.asarray(values, dtype=np.float64)
        if self.band_pass is not None:
            values = filter_series(values, self.band_pass, self.filter_order)
        if self.normalize:
            values = z_normalize(values)
        return values.astype(np.float32)

    def to_json(self) -> str:
        """The settings as a JSON object (the form recorded in an exported model)."""
        band_pass = None if self.band_pass is None else list(self.band_pass)
        payload: dict[str, Any] = {
            "normalize": self.normalize,
            "band_pass": band_pass,
            "filter_order": self.filter_order,
        }
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SeriesPreprocessing:
        """Settings from :meth:`to_json`'s text.

        Args:
            text: The JSON object.

        Returns:
            SeriesPreprocessing: The settings.

        Raises:
            ValueError: If the text is not such an object.
        """
        try:
            payload = json.loads(text)
            settings = cls(
                normalize=payload["normalize"],
                band_pass=payload["band_pass"],
                filter_order=payload["filter_order"],
            )
        except (TypeError, KeyError, ValueError) as error:
            msg = f"Not a series preprocessing record ({error}): {text[:200]!r}"
            raise ValueError(msg) from error
        if not isinstance(settings.normalize, bool) or not isinstance(settings.filter_order, int):
            msg = f"Not a series preprocessing record: {text[:200]!r}"
            raise ValueError(msg)
        return settings
