r"""Time series in the UCR archive's text format (ECG200 and the rest of the archive) as anomalib data.

A UCR file holds one series per line: the class label, then the values, separated by whitespace, commas or
tabs (the archive has used all three)::

    1.0000000e+00  5.0205548e-01  5.4216265e-01 ...
    -1.0000000e+00 1.4288852e+00  2.1365158e+00 ...

Which label is normal is a parameter (``normal_label``, 1 by default as in ECG200); every other label is
abnormal. Training uses the normal series of the training file only. The validation set is a random share
of those normal training series (held out from training), so anomalib's post-processor sets its score
normalisation and threshold without reading a test label; with normal series only, anomalib's adaptive
threshold is the highest score of the held-out normal series.

Preprocessing, in this order, with the same settings for every split:

1. optional zero-phase Butterworth filter (``band_pass``, cut-offs as fractions of the Nyquist frequency, since
   UCR files record no sampling rate): a band-pass, or a low-pass (``(0, high)``) to denoise, or a high-pass
   (``(low, 1)``) to remove baseline wander;
2. per-series z-normalisation (``normalize``, on by default): each series minus its mean, divided by its
   standard deviation (a constant series becomes zeros).

The rule lives in :mod:`kd_ext.edge.series_preprocessing` (numpy only), which the edge runtime applies too; SignalKD
records the datamodule's settings (:attr:`UCRSeries.preprocessing`) and exports them with its IR.

Two ways to feed a model (``as_image``):

* ``None``: series. Batches are :class:`SeriesBatch`: anomalib's generic batch with anomalib's field names,
  where ``image`` holds the series ``[B, 1, L]``, ``anomaly_map`` a per-time-step map ``[B, L]``, ``pred_score``
  one score per series, and ``gt_mask`` is absent. Models for 1-D signals (``kd_ext.models.signal_kd``) read
  them; image models do not.
* ``"gaf"``, ``"recurrence"`` or ``"scalogram"``: each series becomes a 3-channel ``L x L`` image in ``[0, 1]``
  (see :func:`series_to_image`) in an anomalib ``ImageBatch`` with ``gt_label`` and no masks, so anomalib's image
  models, BiDirMSKD and MTHF, with their ImageNet teachers and pre-processors (which resize), run unchanged.

``k``-fold cross-validation over the training file (``num_folds``, ``fold``): the series of the training file are
split into ``num_folds`` folds stratified by class; fold ``fold`` (normal and abnormal series) is the test set and
the normal series of the other folds are the training (and validation) series. The test file is not read.

Each sample's ``image_path`` names its series after its file and line, ``.../<file stem>/<line>.png``. In image mode
it is a real file: an 8-bit PNG of the series' image, written once into ``image_dir`` (by default a folder in the
system's temporary directory, one per file content, transform and preprocessing), because anomalib's visualiser
reads the pictures it draws from ``image_path``. Models get the floating-point image computed from the series, not
the PNG. In series mode it is a name only (no such file exists).

Example:
    >>> from kd_ext.data import UCRSeries
    >>> datamodule = UCRSeries(
    ...     train_file="ECG200_TRAIN.txt", test_file="ECG200_TEST.txt", as_image="gaf"
    ... )  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP

    From anomalib's command line (a negative normal label is written ``--data.normal_label=-1``)::

        anomalib train --model Padim --data kd_ext.data.UCRSeries --data.train_file ECG200_TRAIN.txt \
            --data.test_file ECG200_TEST.txt --data.as_image gaf
"""

import hashlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.dataclasses.generic import BatchIterateMixin, _ImageInputFields
from anomalib.data.dataclasses.torch.base import Batch, DatasetItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from anomalib.data.validators.torch.image import ImageBatchValidator, ImageValidator
from PIL import Image as PILImage
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Image

from kd_ext.edge.series_preprocessing import (
    SeriesPreprocessing,
    check_band_pass,
    listed,
    not_finite_rows,
    read_series_table,
)

MTF_BINS = 8  # quantile bins of the Markov transition field
MORLET_W0 = 6.0  # centre frequency of the scalogram's Morlet wavelet (radians per sample at scale 1)
SAMPLE_COLUMNS = ("image_path", "label", "label_index", "mask_path", "split", "line", "ucr_label", "series")


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


def _choice(value: str | Enum, options: type[Enum], what: str) -> Enum:
    try:
        return options(value)
    except ValueError:
        choices = ", ".join(repr(option.value) for option in options)
        msg = f"Unknown {what} {value!r}; choose one of {choices}."
        raise ValueError(msg) from None


# --------------------------------------------------------------------------------------------- reading files


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


# --------------------------------------------------------------------------------------------- preprocessing


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


# --------------------------------------------------------------------------------------------- series to images


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
    mode = _choice(mode, SeriesImage, "as_image")
    series = np.asarray(series, dtype=np.float64)
    if mode == SeriesImage.GAF:
        summation, difference = gramian_angular_fields(series)
        channels = [(summation + 1) / 2, (difference + 1) / 2, markov_transition_field(series)]
    else:
        field = recurrence_plot(series) if mode == SeriesImage.RECURRENCE else scalogram(series)
        channels = [field, field, field]
    return np.clip(np.stack(channels), 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------- batch types


def _float_series(value: torch.Tensor, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    """``value`` if it is a floating-point tensor with one of ``dims`` dimensions, else a message with ``shape``."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        msg = f"Series must be a floating-point torch.Tensor {shape}, got {type(value).__name__}."
        raise TypeError(msg)
    if value.ndim not in dims:
        msg = f"Series must have shape {shape}, got {tuple(value.shape)}."
        raise ValueError(msg)
    return value


class SeriesValidator(ImageValidator):
    """Checks of one series sample: anomalib's image checks with the image fields taking series shapes."""

    @staticmethod
    def validate_image(image: torch.Tensor) -> torch.Tensor:
        """A floating-point series ``[C, L]``.

        Raises:
            TypeError: If it is not a floating-point tensor.
            ValueError: If it is not 2-dimensional.
        """
        return _float_series(image, (2,), "[C, L] (channels, time steps)")

    @staticmethod
    def validate_anomaly_map(anomaly_map: torch.Tensor | None) -> torch.Tensor | None:
        """A per-time-step map ``[L]`` (``[1, L]`` is squeezed)."""
        return None if anomaly_map is None else torch.as_tensor(anomaly_map, dtype=torch.float32).reshape(-1)

    @staticmethod
    def validate_gt_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        """A per-time-step mask ``[L]``."""
        return None if mask is None else torch.as_tensor(mask).reshape(-1).bool()

    @staticmethod
    def validate_pred_mask(pred_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A per-time-step mask ``[L]``."""
        return SeriesValidator.validate_gt_mask(pred_mask)

    @staticmethod
    def validate_image_path(image_path: str | None) -> str | None:
        """The series' name (not a file: see the module documentation)."""
        return None if image_path is None else str(image_path)


class SeriesBatchValidator(ImageBatchValidator):
    """Checks of a batch of series: anomalib's image-batch checks with the image fields taking series shapes."""

    @staticmethod
    def validate_image(image: torch.Tensor) -> torch.Tensor:
        """A floating-point batch of series ``[B, C, L]`` (a single ``[C, L]`` series gets a batch dimension).

        Raises:
            TypeError: If it is not a floating-point tensor.
            ValueError: If it is not 2- or 3-dimensional.
        """
        image = _float_series(image, (2, 3), "[B, C, L] (batch, channels, time steps)")
        return image if image.ndim == 3 else image.unsqueeze(0)

    @staticmethod
    def validate_anomaly_map(anomaly_map: torch.Tensor | None) -> torch.Tensor | None:
        """Per-time-step maps ``[B, L]`` (``[B, 1, L]`` is squeezed).

        Raises:
            ValueError: If the map is not 2- or 3-dimensional.
        """
        if anomaly_map is None:
            return None
        anomaly_map = torch.as_tensor(anomaly_map, dtype=torch.float32)
        if anomaly_map.ndim == 3 and anomaly_map.shape[1] == 1:
            anomaly_map = anomaly_map.squeeze(1)
        if anomaly_map.ndim != 2:
            msg = f"Series anomaly maps must have shape [B, L] or [B, 1, L], got {tuple(anomaly_map.shape)}."
            raise ValueError(msg)
        return anomaly_map

    @staticmethod
    def validate_gt_mask(gt_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-time-step masks ``[B, L]`` (``[B, 1, L]`` is squeezed)."""
        if gt_mask is None:
            return None
        return SeriesBatchValidator.validate_anomaly_map(gt_mask).bool()  # type: ignore[union-attr]

    @staticmethod
    def validate_pred_mask(pred_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-time-step masks ``[B, L]``."""
        return SeriesBatchValidator.validate_gt_mask(pred_mask)


@dataclass
class SeriesItem(SeriesValidator, _ImageInputFields[str], DatasetItem[torch.Tensor]):
    """One series sample with anomalib's item fields: ``image`` is the series ``[C, L]``, ``image_path`` its name."""


@dataclass
class SeriesBatch(
    BatchIterateMixin[SeriesItem], SeriesBatchValidator, _ImageInputFields[list[str]], Batch[torch.Tensor]
):
    """A batch of series with anomalib's batch fields.

    ``image`` is ``[B, C, L]`` (also available as :attr:`series`), ``gt_label`` ``[B]``, ``anomaly_map`` ``[B, L]``,
    ``pred_score`` ``[B]``; ``gt_mask`` is absent (series carry no per-time-step labels).
    """

    item_class: ClassVar[Callable] = SeriesItem

    @property
    def series(self) -> torch.Tensor:
        """The series ``[B, C, L]`` (the ``image`` field)."""
        return self.image


# --------------------------------------------------------------------------------------------- dataset


def series_name(path: Path, line: int) -> str:
    """The ``image_path`` of the series on ``line`` of ``path``: ``<path without suffix>/<line, 6 digits>.png``."""
    return str(path.with_suffix("") / f"{line:06d}.png")


def make_ucr_dataset(
    path: str | Path,
    split: str | Split,
    normal_label: float = 1,
    normalize: bool = True,
    band_pass: Sequence[float] | None = None,
) -> pd.DataFrame:
    """One row per series: anomalib's sample table for a UCR file, the preprocessed series in column ``series``.

    Args:
        path: The UCR file.
        split: ``"train"`` or ``"test"`` (recorded in the ``split`` column).
        normal_label: The label of normal series; every other label is abnormal.
        normalize: Z-normalise each series.
        band_pass: Filter cut-offs (see :func:`check_band_pass`), or ``None``.

    Returns:
        pd.DataFrame: Columns ``image_path`` (the series' name, see :func:`series_name`), ``label``, ``label_index``,
        ``mask_path`` (empty), ``split``, ``line``, ``ucr_label`` (as in the file) and ``series`` (``float32 [L]``);
        task ``classification``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is malformed (see :func:`read_ucr`) or too short for the filter.
    """
    ucr = read_ucr(path)
    path = ucr.path.resolve()
    values = preprocess(ucr.values, normalize=normalize, band_pass=band_pass)
    abnormal = ucr.labels != float(normal_label)
    samples = pd.DataFrame(
        {
            "image_path": [series_name(path, line) for line in ucr.lines],
            "label": np.where(abnormal, "abnormal", "normal"),
            "label_index": abnormal.astype(int),
            "mask_path": "",
            "split": Split(split).value,
            "line": ucr.lines,
            "ucr_label": ucr.labels,
            "series": list(values),
        },
    )
    samples.attrs["task"] = "classification"
    return samples


def default_image_dir() -> Path:
    """Where series images are written when no ``image_dir`` is given: ``<temporary directory>/kd_ext_ucr_images``."""
    return Path(tempfile.gettempdir()) / "kd_ext_ucr_images"


def write_series_images(samples: pd.DataFrame, path: Path, mode: SeriesImage, folder: Path, settings: str) -> list[str]:
    """Write the image of every series as an 8-bit PNG (skipping those already written) and return their paths.

    Args:
        samples: Sample table of ``path`` (see :func:`make_ucr_dataset`).
        path: The UCR file the samples come from.
        mode: The transform.
        folder: Root folder; files go to ``<folder>/<digest>/<file stem>/<line>.png``, where the digest identifies the
            file's content, the transform and ``settings``.
        settings: The preprocessing, as text.

    Returns:
        list[str]: The PNG of each sample, in sample order.
    """
    digest = hashlib.sha256(path.read_bytes() + f"{mode.value}|{settings}".encode()).hexdigest()[:16]
    target = folder.expanduser() / digest / path.stem
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for line, series in zip(samples.line, samples.series, strict=True):
        png = target / f"{line:06d}.png"
        if not png.is_file():
            pixels = np.round(series_to_image(series, mode).transpose(1, 2, 0) * 255).astype(np.uint8)
            partial = png.with_name(f".{png.stem}.{os.getpid()}.partial.png")
            PILImage.fromarray(pixels).save(partial)
            partial.replace(png)
        written.append(str(png))
    return written


def _label_list(labels: np.ndarray) -> str:
    return ", ".join(f"{label:g}" for label in sorted(set(labels.tolist())))


class UCRSeriesDataset(AnomalibDataset):
    """The series of one UCR file as anomalib samples: series or 3-channel images (see :func:`make_ucr_dataset`).

    Args:
        path: The UCR file.
        split: ``"train"`` or ``"test"``.
        normal_label: The label of normal series.
        normalize: Z-normalise each series.
        band_pass: Filter cut-offs, or ``None``.
        as_image: ``None`` for :class:`SeriesItem` samples, else the :class:`SeriesImage` transform for image samples.
        image_dir: Where image mode writes the PNGs its ``image_path`` values point at (see
            :func:`write_series_images`); ``None`` for :func:`default_image_dir`.
        augmentations: Applied to each image (image mode) or to each ``[1, L]`` series tensor (series mode).
    """

    def __init__(
        self,
        path: str | Path,
        split: str | Split,
        normal_label: float = 1,
        normalize: bool = True,
        band_pass: Sequence[float] | None = None,
        as_image: SeriesImage | str | None = None,
        image_dir: str | Path | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.path = Path(path)
        self.split = Split(split)
        self.as_image = None if as_image is None else _choice(as_image, SeriesImage, "as_image")
        samples = make_ucr_dataset(path, split, normal_label, normalize, band_pass)
        if self.as_image is not None:
            settings = f"normalize={normalize}|band_pass={check_band_pass(band_pass)}"
            folder = default_image_dir() if image_dir is None else Path(image_dir)
            samples["image_path"] = write_series_images(samples, self.path, self.as_image, folder, settings)
        self.samples = samples

    @property
    def samples(self) -> pd.DataFrame:
        """The sample table (see :func:`make_ucr_dataset`)."""
        return AnomalibDataset.samples.fget(self)  # type: ignore[attr-defined]

    @samples.setter
    def samples(self, samples: pd.DataFrame) -> None:
        """Set the sample table, kept in file and line order (series-mode ``image_path`` values are names, not files).

        Raises:
            TypeError: If ``samples`` is not a DataFrame.
            ValueError: If it lacks a column of :data:`SAMPLE_COLUMNS`.
        """
        if not isinstance(samples, pd.DataFrame):
            msg = f"samples must be a pandas.DataFrame, found {type(samples).__name__}."
            raise TypeError(msg)
        missing = [column for column in SAMPLE_COLUMNS if column not in samples.columns]
        if missing:
            msg = f"UCR samples lack the column(s) {missing}; build them with make_ucr_dataset."
            raise ValueError(msg)
        self._samples = samples.sort_values(by="image_path", ignore_index=True)

    @property
    def series_length(self) -> int:
        """Time steps per series."""
        return int(self.samples.series.iloc[0].shape[0])

    def series(self) -> torch.Tensor:
        """All series of this dataset, ``[N, 1, L]`` ``float32``, in sample order."""
        return torch.from_numpy(np.stack(self.samples.series.to_list())).unsqueeze(1)

    def __getitem__(self, index: int) -> SeriesItem | ImageItem:
        """The series (or its image) with its label and name."""
        row = self.samples.iloc[index]
        label = torch.tensor(int(row.label_index))
        if self.as_image is None:
            series = torch.from_numpy(np.array(row.series, dtype=np.float32)).unsqueeze(0)
            series = self.augmentations(series) if self.augmentations else series
            return SeriesItem(image=series, gt_label=label, image_path=row.image_path)
        image = Image(torch.from_numpy(series_to_image(row.series, self.as_image)))
        image = self.augmentations(image) if self.augmentations else image
        return ImageItem(image=image, gt_label=label, image_path=row.image_path)

    @property
    def collate_fn(self) -> Callable:
        """:class:`SeriesBatch` or anomalib ``ImageBatch`` collation."""
        return SeriesBatch.collate if self.as_image is None else ImageBatch.collate


# --------------------------------------------------------------------------------------------- datamodule


def _splits_into_two(count: int, ratio: float) -> bool:
    """Whether anomalib's ``random_split`` leaves both parts non-empty (it floors ``count * ratio``)."""
    held_out = math.floor(count * ratio)
    return held_out >= 1 and count - held_out >= 1


def stratified_folds(labels: Sequence[int], num_folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of each sample: each class is shuffled (seeded) and dealt round-robin over the folds.

    Args:
        labels: Class of each sample.
        num_folds: Number of folds.
        seed: Shuffling seed.

    Returns:
        np.ndarray: Fold of each sample, in ``[0, num_folds)``.
    """
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype=int)
    rng = np.random.default_rng(seed)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (np.arange(len(members)) + offset) % num_folds
        offset += len(members)
    return folds


class UCRSeries(AnomalibDataModule):
    """UCR-format series files: train on the normal training series, test on every test series.

    Args:
        train_file: The training file (UCR format).
        test_file: The test file; required unless ``num_folds`` is set (then it must be left out).
        normal_label: Label of the normal class (every other label is abnormal).
        normalize: Z-normalise each series (after filtering).
        band_pass: Zero-phase Butterworth filter ``(low, high)``, cut-offs as fractions of the Nyquist frequency:
            ``(0, high)`` low-passes (denoising), ``(low, 1)`` high-passes (baseline wander), both band-pass. ``None``
            (default) leaves the series as they are.
        as_image: ``None`` (default) yields series (:class:`SeriesBatch`); ``"gaf"``, ``"recurrence"`` or
            ``"scalogram"`` yields 3-channel images (:class:`SeriesImage`) in anomalib ``ImageBatch`` es for image
            models.
        image_dir: Where image mode writes a PNG of each series' image for anomalib's visualiser (the model gets the
            floating-point image); ``None`` (default): ``kd_ext_ucr_images`` in the system's temporary directory.
        num_folds: Cross-validate over the training file: the number of class-stratified folds (at least 2).
        fold: The fold used as test set (``0 <= fold < num_folds``).
        fold_seed: Seed of the fold assignment (the same seed gives the same folds for every ``fold``).
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Data loader workers. 0 (default): the series are in memory and the transforms cost less than a
            worker process.
        train_augmentations: Augmentations for training samples.
        val_augmentations: Augmentations for validation samples.
        test_augmentations: Augmentations for test samples.
        augmentations: Augmentations for every split without its own.
        val_split_mode: The default ``from_train`` holds a random ``val_split_ratio`` of the normal training series
            out of training for validation (anomalib's post-processor sets normalisation and threshold there, without
            test labels). ``from_test`` and ``same_as_test`` use test labels; ``from_dir`` and ``none`` are refused.
        val_split_ratio: Share of the normal training series held out for validation.
        seed: Seed of the validation split (``None``: a different split each run).

    Raises:
        ValueError: If an option is invalid (named with the fix).
    """

    def __init__(
        self,
        train_file: str | Path,
        test_file: str | Path | None = None,
        normal_label: float = 1,
        normalize: bool = True,
        band_pass: tuple[float, float] | None = None,
        as_image: SeriesImage | str | None = None,
        image_dir: str | Path | None = None,
        num_folds: int | None = None,
        fold: int = 0,
        fold_seed: int = 0,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TRAIN,
        val_split_ratio: float = 0.2,
        seed: int | None = None,
    ) -> None:
        val_split_mode = ValSplitMode(val_split_mode)
        if val_split_mode in {ValSplitMode.FROM_DIR, ValSplitMode.NONE}:
            msg = (
                f"val_split_mode {val_split_mode.value!r} leaves UCRSeries without a validation set; use 'from_train' "
                "(the default: held-out normal training series)."
            )
            raise ValueError(msg)
        if num_folds is None and test_file is None:
            msg = "UCRSeries needs test_file, or num_folds to cross-validate over the training file."
            raise ValueError(msg)
        if num_folds is not None:
            if test_file is not None:
                msg = "With num_folds the test set is a fold of the training file: leave test_file out."
                raise ValueError(msg)
            if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
                msg = f"num_folds must be an integer of at least 2, got {num_folds!r}."
                raise ValueError(msg)
            if not isinstance(fold, int) or not 0 <= fold < num_folds:
                msg = f"fold must be an integer in [0, {num_folds}) for num_folds={num_folds}, got {fold!r}."
                raise ValueError(msg)
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            test_split_mode=TestSplitMode.FROM_DIR,
            seed=seed,
        )
        self.train_file = Path(train_file)
        self.test_file = None if test_file is None else Path(test_file)
        self.normal_label = normal_label
        self.normalize = normalize
        self.band_pass = check_band_pass(band_pass)
        self.as_image = None if as_image is None else _choice(as_image, SeriesImage, "as_image")
        self.image_dir = image_dir
        self.num_folds = num_folds
        self.fold = fold
        self.fold_seed = fold_seed
        self.category = re.sub(r"_TRAIN$", "", self.train_file.stem, flags=re.IGNORECASE)
        self.all_train_data: UCRSeriesDataset

    def _dataset(self, path: Path, split: Split) -> UCRSeriesDataset:
        return UCRSeriesDataset(
            path, split, self.normal_label, self.normalize, self.band_pass, self.as_image, self.image_dir
        )

    def _setup(self, _stage: str | None = None) -> None:
        """Read the files (or make the folds); keep the normal training series for training."""
        train = self._dataset(self.train_file, Split.TRAIN)
        labels = train.samples.ucr_label.to_numpy()
        if not (labels == float(self.normal_label)).any():
            msg = (
                f"{self.train_file} has no series with the normal label {self.normal_label:g} (labels found: "
                f"{_label_list(labels)}); set normal_label (--data.normal_label=<label>) to the normal class's label."
            )
            raise ValueError(msg)
        if self.num_folds is None:
            test = self._dataset(self.test_file, Split.TEST)  # type: ignore[arg-type]
        else:
            folds = stratified_folds(train.samples.label_index, self.num_folds, self.fold_seed)
            test = train.subsample(np.flatnonzero(folds == self.fold).tolist())
            test.samples = test.samples.assign(split=Split.TEST.value)
            train = train.subsample(np.flatnonzero(folds != self.fold).tolist())
        if test.series_length != train.series_length:
            msg = (
                f"Test series have {test.series_length} time steps, training series {train.series_length} "
                f"({self.test_file} vs {self.train_file}); resample one file to the other's length."
            )
            raise ValueError(msg)
        normal = np.flatnonzero(train.samples.label_index.to_numpy() == LabelName.NORMAL)
        if self.val_split_mode == ValSplitMode.FROM_TRAIN and not _splits_into_two(len(normal), self.val_split_ratio):
            msg = (
                f"{self.train_file} has {len(normal)} normal training series: too few to hold "
                f"{self.val_split_ratio:g} of them out for validation and train on the rest. Add normal series or "
                "change val_split_ratio."
            )
            raise ValueError(msg)
        self.all_train_data = train
        self.train_data = train.subsample(normal.tolist())
        self.test_data = test

    def _create_test_split(self) -> None:
        """Keep the test file (or fold) as it is.

        anomalib's default moves half of the normal training series into a test set that has no normal series (a
        test file of abnormal series only, or of one abnormal series), which would silently halve training.
        """

    @property
    def series_length(self) -> int:
        """Time steps per series (after :meth:`setup`)."""
        return self.all_train_data.series_length

    @property
    def preprocessing(self) -> SeriesPreprocessing:
        """The preprocessing of every split; SignalKD records it and exports it with the model for the edge runtime."""
        return SeriesPreprocessing(normalize=self.normalize, band_pass=self.band_pass)

    def unlabelled_training_series(self) -> torch.Tensor:
        """Every series of the training partition, normal and abnormal, labels dropped: ``[N, 1, L]``.

        The training file (or, with folds, the training folds), validation series included, test series never.
        A self-supervised teacher may pretrain on these.

        Returns:
            torch.Tensor: The series, preprocessed like every split.
        """
        if not hasattr(self, "all_train_data"):
            self.setup()
        return self.all_train_data.series()
