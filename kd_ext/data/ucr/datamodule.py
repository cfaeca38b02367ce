"""UCR-format series files as an anomalib datamodule (:class:`UCRSeries`); see :mod:`kd_ext.data.ucr`."""

import math
import re
from pathlib import Path

import numpy as np
import torch
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from kd_ext.edge.series_preprocessing import SeriesPreprocessing, check_band_pass
from kd_ext.options import check_choice, check_whole

from .dataset import UCRSeriesDataset
from .encoders import SeriesImage
from .folds import stratified_folds


def _label_list(labels: np.ndarray) -> str:
    return ", ".join(f"{label:g}" for label in sorted(set(labels.tolist())))


def _splits_into_two(count: int, ratio: float) -> bool:
    """Whether anomalib's ``random_split`` leaves both parts non-empty (it floors ``count * ratio``)."""
    held_out = math.floor(count * ratio)
    return held_out >= 1 and count - held_out >= 1


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
            check_whole(num_folds, "num_folds", minimum=2)
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
        self.as_image = None if as_image is None else check_choice(as_image, SeriesImage, "as_image")
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
