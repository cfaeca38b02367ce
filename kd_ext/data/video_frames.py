"""Video anomaly data stored as frames, scored frame by frame.

Video anomaly sets (UCSD Ped1/Ped2, CUHK Avenue, ShanghaiTech) are commonly distributed as one folder of
frames per clip, with frame-level ground truth for the test clips::

    root/
    ├── training/frames/<clip>/000.jpg ...   normal clips only
    └── testing/
        ├── frames/<clip>/000.jpg ...
        └── frame_labels.csv                 columns clip,frame,label (1 = abnormal, 0 = normal)

Every frame is one image sample with an image label and no mask, so an image model trains on the
normal training frames and anomalib reports frame-level AUROC as ``image_AUROC`` over all test frames
pooled, the standard metric of these sets. Pixel metrics are skipped as for anomalib's ``Folder``
without masks.

Clips and frames in the CSV are matched to folder and file names by value: a purely numeric
identifier is compared as a number (clip ``1`` finds folder ``01``, frame ``0`` or ``000`` finds
``000.jpg``), any other identifier must equal the name exactly, and an image extension written in
the CSV is ignored. A CSV row without a frame file, a test frame without a row, or a malformed CSV
stops the run at setup with the offending rows named.

The test frames must include normal and abnormal ones: frame AUROC ranks the one against the other. A
CSV that labels every test frame alike is refused at setup, before any training (anomalib would
otherwise move normal *training* frames into the test set, pool them into the reported AUROC and leave
no normal frames to calibrate the threshold on).

Temporal smoothing of frame scores is not done here: it is part of evaluation, not of the data.

Example:
    >>> from kd_ext.data import VideoFrames
    >>> datamodule = VideoFrames(root="../shared/data/ucsd_ped2")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP

    From anomalib's command line::

        anomalib train --model BiDirMSKD --data kd_ext.data.VideoFrames --data.root ../shared/data/ucsd_ped2
"""

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from anomalib.data.dataclasses import DatasetItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import Transform

from .reading import kd_ext_image_reading

TRAIN_FRAMES = Path("training") / "frames"
TEST_FRAMES = Path("testing") / "frames"
FRAME_LABELS = Path("testing") / "frame_labels.csv"
LABEL_COLUMNS = ("clip", "frame", "label")
LAYOUT = "root/training/frames/<clip>/*.jpg, root/testing/frames/<clip>/*.jpg and root/testing/frame_labels.csv"
SHOWN = 5  # offending rows or files named in an error message


def frame_identifier(text: str) -> str:
    """The value by which a clip or frame is matched between the CSV and file names.

    Args:
        text: A clip or frame as written in the CSV, a clip folder name or a frame file name.

    Returns:
        str: Digits without leading zeros for a numeric identifier (``"007"`` -> ``"7"``), else the
        text itself; an image extension is dropped first (``"000.jpg"`` -> ``"0"``).
    """
    text = text.strip()
    if Path(text).suffix.lower() in IMG_EXTENSIONS:
        text = Path(text).stem
    return str(int(text)) if _numeric(text) else text


def _numeric(text: str) -> bool:
    """Whether an identifier is a number (ASCII digits only)."""
    return text.isascii() and text.isdigit()


def _order(path: Path) -> tuple[int, int | str]:
    """Sort key: numeric names by value, before any other names in text order."""
    stem = path.stem
    return (0, int(stem)) if _numeric(stem) else (1, stem)


def _entries(folder: Path) -> list[Path]:
    """The entries of a folder in name order, hidden ones (``.DS_Store``, ``.ipynb_checkpoints``) left out."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def check_frame_stride(frame_stride: int) -> None:
    """Refuse a frame stride that is not a positive integer.

    Args:
        frame_stride: Keep every ``frame_stride``-th training frame.

    Raises:
        ValueError: If it is not a positive integer.
    """
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
        msg = f"frame_stride must be a positive integer (1 trains on every frame), got {frame_stride!r}."
        raise ValueError(msg)


def _listed(items: Iterable[str], count: int) -> str:
    """The first few items, one per line, and how many more there are."""
    lines = "".join(f"\n  {item}" for item in list(items)[:SHOWN])
    return lines + (f"\n  ... and {count - SHOWN} more" if count > SHOWN else "")


def _unique_by_identifier(paths: list[Path], what: str, where: Path) -> dict[str, Path]:
    """Map identifier -> path, refusing two names with the same identifier (``1.jpg`` and ``01.jpg``)."""
    by_identifier: dict[str, Path] = {}
    for path in paths:
        identifier = frame_identifier(path.name)
        if identifier in by_identifier:
            msg = (
                f"{what} {by_identifier[identifier].name!r} and {path.name!r} in {where} stand for the same "
                f"{what} ({identifier}); rename or remove one of them."
            )
            raise ValueError(msg)
        by_identifier[identifier] = path
    return by_identifier


def clip_frames(frames_dir: Path) -> dict[str, list[Path]]:
    """The frames of every clip under ``frames_dir``, in frame order.

    Args:
        frames_dir: ``training/frames`` or ``testing/frames``: one folder per clip, holding its frames.

    Returns:
        dict[str, list[Path]]: Clip folder name -> frame files, numeric names in numeric order.

    Raises:
        FileNotFoundError: If ``frames_dir`` does not exist.
        ValueError: If it has no clip folders, a clip folder has no images, or two clip folders or two
            frames of a clip have the same identifier.
    """
    if not frames_dir.is_dir():
        msg = f"{frames_dir} does not exist. VideoFrames reads {LAYOUT}: point root at the folder that holds them."
        raise FileNotFoundError(msg)
    clips = _unique_by_identifier([p for p in _entries(frames_dir) if p.is_dir()], "clip", frames_dir)
    if not clips:
        msg = f"{frames_dir} has no clip folders; put the frames of each clip in a folder of its own ({LAYOUT})."
        raise ValueError(msg)
    frames = {}
    for clip_dir in clips.values():
        files = [p for p in _entries(clip_dir) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        if not files:
            msg = f"Clip folder {clip_dir} has no images ({', '.join(IMG_EXTENSIONS)}); add its frames or remove it."
            raise ValueError(msg)
        _unique_by_identifier(files, "frame", clip_dir)
        frames[clip_dir.name] = sorted(files, key=_order)
    return frames


def read_frame_labels(csv_path: Path) -> dict[tuple[str, str], int]:
    """Frame-level labels from a ``clip,frame,label`` CSV.

    Args:
        csv_path: The CSV (a header row, then one row per test frame; label 1 = abnormal, 0 = normal).

    Returns:
        dict[tuple[str, str], int]: ``(clip, frame)`` identifiers (see :func:`frame_identifier`) -> label.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a CSV with the three columns, or has empty cells, labels other than 0/1,
            or the same frame twice.
    """
    if not csv_path.is_file():
        msg = (
            f"Frame labels not found: {csv_path}. VideoFrames reads {LAYOUT}; write the test labels there with the "
            "header clip,frame,label (1 = abnormal, 0 = normal), one row per test frame."
        )
        raise FileNotFoundError(msg)
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False).fillna("")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        msg = (
            f"{csv_path} cannot be read as CSV ({error}); write comma-separated text with the header clip,frame,label."
        )
        raise ValueError(msg) from error
    table.columns = [str(column).strip().lower() for column in table.columns]
    missing = [column for column in LABEL_COLUMNS if column not in table.columns]
    if missing:
        msg = (
            f"{csv_path} lacks the column(s) {', '.join(missing)} (found: {', '.join(table.columns)}); its first line "
            "must be the header clip,frame,label."
        )
        raise ValueError(msg)
    labels: dict[tuple[str, str], int] = {}
    first_line: dict[tuple[str, str], int] = {}
    malformed = []
    for line, row in enumerate(table[list(LABEL_COLUMNS)].itertuples(index=False), start=2):
        clip, frame, label = (cell.strip() for cell in row)
        key = (frame_identifier(clip), frame_identifier(frame))
        if not clip or not frame or label not in {"0", "1"}:
            malformed.append(f"line {line}: {clip},{frame},{label} (needs a clip, a frame and the label 0 or 1)")
        elif key in labels:
            malformed.append(f"line {line}: {clip},{frame},{label} (the frame of line {first_line[key]} again)")
        else:
            labels[key], first_line[key] = int(label), line
    if malformed:
        msg = (
            f"{csv_path} has {len(malformed)} malformed row(s):{_listed(malformed, len(malformed))}\n"
            "Give each test frame exactly one row clip,frame,label with label 1 (abnormal) or 0 (normal)."
        )
        raise ValueError(msg)
    return labels


def _labelled_test_frames(root: Path) -> list[tuple[str, int, Path, int]]:
    """``(clip, frame index, path, label)`` for every test frame, labels matched from the CSV."""
    frames_dir, csv_path = root / TEST_FRAMES, root / FRAME_LABELS
    frames = clip_frames(frames_dir)
    labels = read_frame_labels(csv_path)
    by_key = {
        (frame_identifier(clip), frame_identifier(path.name)): (clip, index, path)
        for clip, paths in frames.items()
        for index, path in enumerate(paths)
    }
    without_file = [key for key in labels if key not in by_key]
    if without_file:
        shown = [f"clip {clip}, frame {frame}" for clip, frame in without_file]
        msg = (
            f"{len(without_file)} of {len(labels)} rows of {csv_path} name frames that are not in {frames_dir}:"
            f"{_listed(shown, len(without_file))}\nClips and frames are matched to folder and file names by number "
            "(leading zeros and the extension do not matter); correct these rows or add the frames."
        )
        raise ValueError(msg)
    without_label = [path for key, (_, _, path) in by_key.items() if key not in labels]
    if without_label:
        shown = [str(path) for path in without_label]
        msg = (
            f"{len(without_label)} of {len(by_key)} test frames have no row in {csv_path}:"
            f"{_listed(shown, len(without_label))}\nAdd a row clip,frame,label for each, or remove the frames."
        )
        raise ValueError(msg)
    return [(clip, index, path, labels[key]) for key, (clip, index, path) in by_key.items()]


def check_test_labels(samples: pd.DataFrame, csv_path: Path) -> None:
    """Refuse test frames that are all normal or all abnormal.

    Frame-level AUROC needs both classes among the test frames. Without a normal test frame anomalib
    would sample normal frames from the training set into the test set, so the reported metric would
    no longer be over the test frames, and no threshold could be calibrated.

    Args:
        samples: The test split's sample table (see :func:`make_video_frames_dataset`).
        csv_path: The frame labels it was read from (named in the message).

    Raises:
        ValueError: If the test frames have only one label.
    """
    abnormal = int((samples.label_index == LabelName.ABNORMAL).sum())
    normal = len(samples) - abnormal
    if normal and abnormal:
        return
    label, missing = ("1 (abnormal)", "normal (label 0)") if abnormal else ("0 (normal)", "abnormal (label 1)")
    msg = (
        f"{csv_path} labels all {len(samples)} test frames {label}, but frame AUROC needs normal and abnormal test "
        f"frames. Give a frame_labels.csv with both labels, or add clips with {missing} frames to testing/frames "
        "(VideoFrames never takes test frames from the training set)."
    )
    raise ValueError(msg)


def make_video_frames_dataset(
    root: str | Path,
    split: str | Split | None = None,
    frame_stride: int = 1,
) -> pd.DataFrame:
    """One row per frame: anomalib's sample table for the video-frames layout.

    Args:
        root: Folder holding ``training/frames``, ``testing/frames`` and ``testing/frame_labels.csv``.
        split: ``"train"``, ``"test"`` or ``None`` for both.
        frame_stride: Keep every ``frame_stride``-th frame of each training clip, starting with its first
            frame. Test frames are all kept.

    Returns:
        pd.DataFrame: Columns ``image_path``, ``label``, ``label_index``, ``mask_path`` (empty: no masks),
        ``split``, ``clip`` (folder name) and ``frame`` (position in the clip); task ``classification``.

    Raises:
        FileNotFoundError: If ``root``, a frames folder or the CSV is missing.
        ValueError: If the layout or the CSV is malformed, or CSV rows and test frames do not match.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        msg = f"VideoFrames root {root} does not exist; pass the folder that holds {LAYOUT}."
        raise FileNotFoundError(msg)
    check_frame_stride(frame_stride)
    split = Split(split) if split is not None else None
    rows = []
    if split in {None, Split.TRAIN}:
        for clip, paths in clip_frames(root / TRAIN_FRAMES).items():
            kept = [(index, path) for index, path in enumerate(paths) if index % frame_stride == 0]
            rows += [(clip, index, path, LabelName.NORMAL, Split.TRAIN) for index, path in kept]
    if split in {None, Split.TEST}:
        rows += [(*frame, LabelName(label), Split.TEST) for *frame, label in _labelled_test_frames(root)]
    samples = pd.DataFrame(
        {
            "image_path": [str(row[2]) for row in rows],
            "label": ["abnormal" if row[3] == LabelName.ABNORMAL else "normal" for row in rows],
            "label_index": [int(row[3]) for row in rows],
            "mask_path": "",
            "split": [row[4].value for row in rows],
            "clip": [row[0] for row in rows],
            "frame": [row[1] for row in rows],
        },
    )
    samples.attrs["task"] = "classification"
    return samples


class VideoFramesDataset(AnomalibDataset):
    """The frames of one split as anomalib image samples (see :func:`make_video_frames_dataset`).

    Args:
        root: Folder holding ``training/frames``, ``testing/frames`` and ``testing/frame_labels.csv``.
        split: ``"train"``, ``"test"`` or ``None`` for both.
        frame_stride: Keep every ``frame_stride``-th training frame of each clip.
        augmentations: Augmentations applied to each image.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | Split | None = None,
        frame_stride: int = 1,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.root = Path(root)
        self.split = split
        self.samples = make_video_frames_dataset(root, split=split, frame_stride=frame_stride)

    def __getitem__(self, index: int) -> DatasetItem:
        """A frame as anomalib's ``AnomalibDataset`` returns it, read by kd_ext's rule whatever the model.

        The rule (:mod:`kd_ext.image_input`, through :func:`kd_ext.data.reading.kd_ext_image_reading`) is the
        edge runtime's: 16-bit frames are scaled to ``[0, 1]``, not saturated as anomalib's reader would.
        """
        with kd_ext_image_reading():
            return super().__getitem__(index)


class VideoFrames(AnomalibDataModule):
    """Video anomaly sets stored as frames: train on normal frames, score every test frame as an image.

    Args:
        root: Folder holding ``training/frames/<clip>/``, ``testing/frames/<clip>/`` and
            ``testing/frame_labels.csv`` (columns ``clip,frame,label``, 1 = abnormal). The test frames must
            include normal and abnormal ones; :meth:`setup` refuses them otherwise (see
            :func:`check_test_labels`), so the test set is always the test frames alone.
        frame_stride: Train on every ``frame_stride``-th frame of each training clip (1 = all frames).
            Consecutive frames of a fixed-camera video differ by a few pixels of motion, so neighbouring
            frames add almost no appearance a one-class model has not seen, while each one costs a full
            training step. The default of 5 keeps frames a fraction of a second apart at surveillance
            frame rates: every clip and every part of each clip is still covered, for a fifth of the cost
            of an epoch over all frames. Test frames are never subsampled.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Data loader workers.
        train_augmentations: Augmentations for training images.
        val_augmentations: Augmentations for validation images.
        test_augmentations: Augmentations for test images.
        augmentations: Augmentations for every split without its own.
        val_split_mode: Where validation images come from. The default ``from_train`` holds out a random
            ``val_split_ratio`` of the (strided) normal training frames: anomalib's post-processor sets its
            score normalisation and threshold on them without reading any test label, and the test set
            stays all test frames pooled, as the standard frame-level metric requires. ``from_test`` and
            ``same_as_test`` choose the threshold with test labels (and ``from_test`` also removes frames
            from the test set); ``from_dir`` and ``none`` are refused: the layout has no validation folder,
            and anomalib's data loaders need a validation set.
        val_split_ratio: Share of the normal training frames held out for validation.
        seed: Seed of the validation split.

    Example:
        >>> datamodule = VideoFrames(root="../shared/data/ucsd_ped2", frame_stride=10)  # doctest: +SKIP
        >>> datamodule.setup()  # doctest: +SKIP
        >>> batch = next(iter(datamodule.test_dataloader()))  # doctest: +SKIP
        >>> batch.gt_label.shape, batch.gt_mask  # doctest: +SKIP
        (torch.Size([32]), None)
    """

    def __init__(
        self,
        root: str | Path,
        frame_stride: int = 5,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TRAIN,
        val_split_ratio: float = 0.1,
        seed: int | None = None,
    ) -> None:
        check_frame_stride(frame_stride)
        val_split_mode = ValSplitMode(val_split_mode)
        if val_split_mode in {ValSplitMode.FROM_DIR, ValSplitMode.NONE}:
            msg = (
                f"val_split_mode {val_split_mode.value!r} leaves VideoFrames without a validation set (the layout has "
                "no validation folder); use 'from_train' (the default: held-out normal training frames)."
            )
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
        self.root = Path(root)
        self.frame_stride = frame_stride
        self.category = self.root.name

    def _setup(self, _stage: str | None = None) -> None:
        """Index the training frames (strided) and the labelled test frames.

        Raises:
            ValueError: If the test frames are all normal or all abnormal (see :func:`check_test_labels`).
        """
        self.train_data = VideoFramesDataset(self.root, split=Split.TRAIN, frame_stride=self.frame_stride)
        self.test_data = VideoFramesDataset(self.root, split=Split.TEST)
        check_test_labels(self.test_data.samples, self.root / FRAME_LABELS)
