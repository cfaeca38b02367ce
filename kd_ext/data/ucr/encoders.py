"""Series to 3-channel images (:class:`SeriesImage`), for anomalib's image models."""

from enum import Enum

import numpy as np

from kd_ext.options import check_choice

MTF_BINS = 8  # quantile bins of the Markov transition field
MORLET_W0 = 6.0  # centre frequency of the scalogram's Morlet wavelet (radians per sample at scale 1)


class SeriesImage(str, Enum):
    """How a series becomes a 3-channel image (``L x L`` for a series of length ``L``, values in ``[0, 1]``).

    * ``GAF``: Gramian angular summation field, Gramian angular difference field and Markov transition field as
      the three channels (the composite of Wang and Oates, 2015). The series is min-max scaled to ``[-1, 1]``
      first; the Markov field uses 8 quantile bins.
    * ``RECURRENCE``: unthresholded recurrence plot ``|x_i - x_j|`` divided by its maximum, in all three channels.
    * ``SCALOGRAM``: magnitude of a complex Morlet continuous wavelet transform at ``L`` log-spaced scales
      (periods from 2 samples to the series length, finest at the top row) divided by its maximum, in all three
      channels.
    """

    GAF = "gaf"
    RECURRENCE = "recurrence"
    SCALOGRAM = "scalogram"


def gramian_angular_fields(series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gramian angular summation and difference fields of one series, both in ``[-1, 1]``.

    Args:
        series: One series ``[L]``.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``cos(phi_i + phi_j)`` and ``sin(phi_i - phi_j)``, each ``[L, L]``, where
        ``phi = arccos`` of the series min-max scaled to ``[-1, 1]``.
    """
    low, high = float(series.min()), float(series.max())
    scaled = np.zeros_like(series, dtype=np.float64) if high == low else 2 * (series - low) / (high - low) - 1
    cosine = np.clip(scaled, -1, 1)
    sine = np.sqrt(1 - cosine**2)
    summation = np.outer(cosine, cosine) - np.outer(sine, sine)
    difference = np.outer(sine, cosine) - np.outer(cosine, sine)
    return summation, difference


def markov_transition_field(series: np.ndarray, bins: int = MTF_BINS) -> np.ndarray:
    """Markov transition field: the probability of moving from ``x_i``'s quantile bin to ``x_j``'s in one step.

    Args:
        series: One series ``[L]``.
        bins: Number of quantile bins.

    Returns:
        np.ndarray: ``[L, L]`` in ``[0, 1]``.
    """
    edges = np.quantile(series, np.linspace(0, 1, bins + 1)[1:-1])
    states = np.searchsorted(edges, series, side="right")
    counts = np.zeros((bins, bins))
    np.add.at(counts, (states[:-1], states[1:]), 1)
    totals = counts.sum(axis=1, keepdims=True)
    transitions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return transitions[states[:, None], states[None, :]]


def recurrence_plot(series: np.ndarray) -> np.ndarray:
    """Unthresholded recurrence plot ``|x_i - x_j|`` divided by its maximum.

    Args:
        series: One series ``[L]``.

    Returns:
        np.ndarray: ``[L, L]`` in ``[0, 1]`` (zeros for a constant series).
    """
    distances = np.abs(series[:, None] - series[None, :]).astype(np.float64)
    peak = distances.max()
    return distances / peak if peak > 0 else distances


def scalogram(series: np.ndarray, scales: int | None = None) -> np.ndarray:
    """Magnitude of a complex Morlet continuous wavelet transform divided by its maximum.

    Args:
        series: One series ``[L]``.
        scales: Number of log-spaced scales (periods from 2 samples to ``L``); ``L`` by default (a square image).

    Returns:
        np.ndarray: ``[scales, L]`` in ``[0, 1]``, finest scale in the first row (zeros for a zero series).
    """
    length = series.shape[0]
    count = scales or length
    periods = np.geomspace(2, length, count)
    widths = periods * MORLET_W0 / (2 * np.pi)  # Morlet scale whose centre frequency has this period
    rows = []
    for width in widths:
        half = min(int(np.ceil(4 * width)), length - 1)
        t = np.arange(-half, half + 1) / width
        wavelet = np.exp(1j * MORLET_W0 * t - t**2 / 2) / np.sqrt(width)
        rows.append(np.abs(np.convolve(series, np.conj(wavelet[::-1]), mode="same"))[:length])
    image = np.asarray(rows)
    peak = image.max()
    return image / peak if peak > 0 else image


def series_to_image(series: np.ndarray, mode: SeriesImage | str) -> np.ndarray:
    """A 3-channel image of one series, as described for each :class:`SeriesImage`.

    Args:
        series: One series ``[L]``.
        mode: The transform.

    Returns:
        np.ndarray: ``float32`` ``[3, L, L]`` in ``[0, 1]``.
    """
    mode = check_choice(mode, SeriesImage, "as_image")
    series = np.asarray(series, dtype=np.float64)
    if mode == SeriesImage.GAF:
        summation, difference = gramian_angular_fields(series)
        channels = [(summation + 1) / 2, (difference + 1) / 2, markov_transition_field(series)]
    else:
        field = recurrence_plot(series) if mode == SeriesImage.RECURRENCE else scalogram(series)
        channels = [field, field, field]
    return np.clip(np.stack(channels), 0, 1).astype(np.float32)
