"""The series of one UCR file as anomalib samples (:class:`UCRSeriesDataset`), and the cache of their images.

In image mode each sample's ``image_path`` is a real 8-bit PNG of the series' image, written once into a cache folder
(:func:`default_image_dir` unless ``image_dir`` is given; one sub-folder per file content, transform and
preprocessing) because anomalib's visualiser reads the pictures it draws from ``image_path``.
"""

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import Split
from PIL import Image as PILImage
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Image

from kd_ext.edge.series_preprocessing import check_band_pass
from kd_ext.options import check_choice

from .batch import SeriesBatch, SeriesItem
from .encoders import SeriesImage, series_to_image
from .reader import preprocess, read_ucr

SAMPLE_COLUMNS = ("image_path", "label", "label_index", "mask_path", "split", "line", "ucr_label", "series")


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
        self.as_image = None if as_image is None else check_choice(as_image, SeriesImage, "as_image")
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
