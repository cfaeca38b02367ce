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

The package has one module per job: :mod:`.reader` (files and preprocessing), :mod:`.encoders` (series to images),
:mod:`.batch` (series samples and batches), :mod:`.dataset` (one file's samples and the image cache), :mod:`.folds`
(cross-validation folds) and :mod:`.datamodule` (:class:`UCRSeries`); every public name is importable from here.

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

from .batch import SeriesBatch, SeriesBatchValidator, SeriesItem, SeriesValidator
from .datamodule import UCRSeries
from .dataset import (
    SAMPLE_COLUMNS,
    UCRSeriesDataset,
    default_image_dir,
    make_ucr_dataset,
    series_name,
    write_series_images,
)
from .encoders import (
    MORLET_W0,
    MTF_BINS,
    SeriesImage,
    gramian_angular_fields,
    markov_transition_field,
    recurrence_plot,
    scalogram,
    series_to_image,
)
from .folds import stratified_folds
from .reader import UCRFile, preprocess, read_ucr

__all__ = [
    "MORLET_W0",
    "MTF_BINS",
    "SAMPLE_COLUMNS",
    "SeriesBatch",
    "SeriesBatchValidator",
    "SeriesImage",
    "SeriesItem",
    "SeriesValidator",
    "UCRFile",
    "UCRSeries",
    "UCRSeriesDataset",
    "default_image_dir",
    "gramian_angular_fields",
    "make_ucr_dataset",
    "markov_transition_field",
    "preprocess",
    "read_ucr",
    "recurrence_plot",
    "scalogram",
    "series_name",
    "series_to_image",
    "stratified_folds",
    "write_series_images",
]
