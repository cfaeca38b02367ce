"""kd_ext.data.VideoFrames: video frames with frame-level labels as anomalib image samples."""

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from anomalib.data import AnomalibDataModule
from jsonargparse import ArgumentParser
from PIL import Image

from kd_ext.data import VideoFrames, make_video_frames_dataset
from kd_ext.models.image_checks import check_dataloader_images

DATA = Path(os.environ.get("KD_EXT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TRAIN_CLIPS = {"01": 7, "02": 5}
TEST_LABELS = {"01": [0, 0, 1, 1], "02": [1, 0, 0]}


def write_frames(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (16, 12), (20 * index, 0, 0)).save(folder / f"{index:03d}.jpg")


def write_labels(root: Path, rows: list[str], header: str = "clip,frame,label") -> None:
    (root / "testing" / "frame_labels.csv").write_text("\n".join([header, *rows]) + "\n")


def csv_rows(clip: Callable[[str], str] = lambda c: str(int(c)), frame: Callable[[int], str] = str) -> list[str]:
    """One row per test frame; by default clips and frames are written unpadded (``1,0``) unlike the files."""
    return [f"{clip(c)},{frame(i)},{label}" for c, labels in TEST_LABELS.items() for i, label in enumerate(labels)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "video"
    for clip, count in TRAIN_CLIPS.items():
        write_frames(root / "training" / "frames" / clip, count)
    for clip, labels in TEST_LABELS.items():
        write_frames(root / "testing" / "frames" / clip, len(labels))
    write_labels(root, csv_rows())
    return root


def expected_test_labels(root: Path) -> dict[str, int]:
    return {
        str(root.resolve() / "testing" / "frames" / clip / f"{index:03d}.jpg"): label
        for clip, labels in TEST_LABELS.items()
        for index, label in enumerate(labels)
    }


@pytest.mark.parametrize(
    "rows",
    [
        csv_rows(),  # 1,0 for folder 01, file 000.jpg
        csv_rows(clip=str, frame=lambda i: f"{i:03d}"),  # 01,000
        csv_rows(clip=lambda c: f" {c} ", frame=lambda i: f"{i:03d}.jpg"),  # spaces and file names
    ],
    ids=["unpadded", "padded", "file-names"],
)
def test_test_frames_take_their_labels_from_the_csv(root: Path, rows: list[str]) -> None:
    write_labels(root, rows)
    samples = make_video_frames_dataset(root, split="test")
    assert dict(zip(samples.image_path, samples.label_index, strict=True)) == expected_test_labels(root)
    assert set(samples.split) == {"test"}
    assert (samples.mask_path == "").all()
    assert samples.attrs["task"] == "classification"


def test_frame_stride_keeps_every_nth_training_frame_of_each_clip(root: Path) -> None:
    (root / "training" / "frames" / ".ipynb_checkpoints").mkdir()  # hidden entries are not clips or frames
    (root / "training" / "frames" / "01" / "._000.jpg").write_bytes(b"macOS metadata")
    every = make_video_frames_dataset(root, split="train", frame_stride=1)
    assert len(every) == sum(TRAIN_CLIPS.values())
    assert (every.label_index == 0).all()
    strided = make_video_frames_dataset(root, split="train", frame_stride=3)
    assert sorted(
        zip(strided["clip"], strided["frame"], strided["image_path"].map(lambda p: Path(p).name), strict=True)
    ) == [
        ("01", 0, "000.jpg"),
        ("01", 3, "003.jpg"),
        ("01", 6, "006.jpg"),
        ("02", 0, "000.jpg"),
        ("02", 3, "003.jpg"),
    ]


def test_datamodule_validates_on_held_out_training_frames_and_tests_on_all_frames(root: Path) -> None:
    datamodule = VideoFrames(root, frame_stride=1, val_split_ratio=0.25, seed=0, num_workers=0, eval_batch_size=16)
    datamodule.setup()
    train = set(make_video_frames_dataset(root, split="train").image_path)
    assert set(datamodule.val_data.samples.image_path) | set(datamodule.train_data.samples.image_path) == train
    assert len(datamodule.val_data) == 3
    assert not set(datamodule.val_data.samples.image_path) & set(datamodule.train_data.samples.image_path)
    assert datamodule.category == "video"
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_mask is None  # image labels only: pixel metrics are skipped, as for Folder without masks
    assert dict(zip(batch.image_path, batch.gt_label.int().tolist(), strict=True)) == expected_test_labels(root)
    # kd_ext models check every image of these loaders before training
    check_dataloader_images([datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()])


def test_image_checks_name_a_corrupt_frame(root: Path) -> None:
    broken = root / "testing" / "frames" / "02" / "001.jpg"
    broken.write_bytes(broken.read_bytes()[:40])
    datamodule = VideoFrames(root, num_workers=0)
    datamodule.setup()
    with pytest.raises(ValueError, match=r"1 of 7 images cannot be read") as error:
        check_dataloader_images(datamodule.test_dataloader())
    assert str(broken.resolve()) in str(error.value)


def _remove(path: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        target = root / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    return change


BROKEN_LAYOUTS = {
    "no-root": (_remove(""), FileNotFoundError, r"root .* does not exist; pass the folder that holds"),
    "no-training-frames": (_remove("training/frames"), FileNotFoundError, r"training/frames does not exist"),
    "no-clip-folders": (
        lambda r: (_remove("testing/frames")(r), (r / "testing" / "frames").mkdir()),
        ValueError,
        r"no clip folders; put the frames of each clip in a folder",
    ),
    "empty-clip": (
        lambda r: (r / "training" / "frames" / "03").mkdir(),
        ValueError,
        r"03 has no images .* add its frames or remove it",
    ),
    "same-frame-twice": (
        lambda r: Image.new("RGB", (4, 4)).save(r / "testing" / "frames" / "01" / "1.jpg"),
        ValueError,
        r"frame '001.jpg' and '1.jpg' in .*01 stand for the same frame \(1\); rename or remove one",
    ),
    "no-csv": (_remove("testing/frame_labels.csv"), FileNotFoundError, r"Frame labels not found: .*header clip,frame"),
    "empty-csv": (
        lambda r: (r / "testing" / "frame_labels.csv").write_text(""),
        ValueError,
        r"cannot be read as CSV .* with the header clip,frame,label",
    ),
    "missing-column": (
        lambda r: write_labels(r, csv_rows(), header="clip,frame,anomaly"),
        ValueError,
        r"lacks the column\(s\) label \(found: clip, frame, anomaly\); its first line must be the header",
    ),
    "bad-label": (
        lambda r: write_labels(r, [*csv_rows()[:-1], "2,2,abnormal"]),
        ValueError,
        r"1 malformed row\(s\):\n  line 8: 2,2,abnormal \(needs a clip, a frame and the label 0 or 1\)",
    ),
    "empty-cell": (
        lambda r: write_labels(r, [*csv_rows()[:-1], "2,,0"]),
        ValueError,
        r"line 8: 2,,0 \(needs a clip, a frame",
    ),
    "duplicate-row": (
        lambda r: write_labels(r, [*csv_rows(), "02,002,1"]),
        ValueError,
        r"line 9: 02,002,1 \(the frame of line 8 again\)",
    ),
    "row-without-frame": (
        lambda r: write_labels(r, [*csv_rows(), "2,9,1", "7,0,0"]),
        ValueError,
        r"(?s)2 of 9 rows of .* name frames that are not in .*:\n  clip 2, frame 9\n  clip 7, frame 0\n.*add the",
    ),
    "frame-without-row": (
        lambda r: write_labels(r, csv_rows()[1:]),
        ValueError,
        r"(?s)1 of 7 test frames have no row in .*01/000.jpg\nAdd a row clip,frame,label for each",
    ),
    "no-normal-test-frame": (  # anomalib would move normal training frames into the test set
        lambda r: write_labels(r, [row[:-1] + "1" for row in csv_rows()]),
        ValueError,
        r"frame_labels.csv labels all 7 test frames 1 \(abnormal\), but frame AUROC needs normal and abnormal test "
        r"frames\. Give a frame_labels.csv with both labels, or add clips with normal \(label 0\) frames",
    ),
    "no-abnormal-test-frame": (
        lambda r: write_labels(r, [row[:-1] + "0" for row in csv_rows()]),
        ValueError,
        r"labels all 7 test frames 0 \(normal\), but frame AUROC needs .* clips with abnormal \(label 1\) frames",
    ),
}


@pytest.mark.parametrize("case", BROKEN_LAYOUTS.keys())
def test_broken_layouts_fail_at_setup_naming_problem_and_fix(root: Path, case: str) -> None:
    change, error, message = BROKEN_LAYOUTS[case]
    change(root)
    datamodule = VideoFrames(root, num_workers=0)
    with pytest.raises(error, match=message):
        datamodule.setup()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"frame_stride": 0}, r"frame_stride must be a positive integer \(1 trains on every frame\), got 0"),
        ({"frame_stride": 2.5}, r"frame_stride must be a positive integer"),
        ({"val_split_mode": "from_dir"}, r"'from_dir' leaves VideoFrames without a validation set.* use 'from_train'"),
        ({"val_split_mode": "none"}, r"'none' leaves VideoFrames without a validation set"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(root: Path, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VideoFrames(root, **arguments)


def test_anomalib_cli_parser_resolves_the_dotted_path(root: Path) -> None:
    """``--data kd_ext.data.VideoFrames`` as anomalib's CLI declares ``--data`` (no registration needed)."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    config = parser.parse_args(
        ["--data", "kd_ext.data.VideoFrames", "--data.root", str(root), "--data.frame_stride", "2"]
    )
    datamodule = parser.instantiate_classes(config).data
    assert isinstance(datamodule, VideoFrames)
    assert datamodule.frame_stride == 2
    assert datamodule.val_split_mode == "from_train"


def test_real_ucsd_ped2_counts() -> None:
    root = DATA / "ucsd_ped2"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set KD_EXT_DATA to the folder described in shared/data/README.md)")
    datamodule = VideoFrames(root, num_workers=0)
    datamodule.setup()
    assert len(datamodule.test_data) == 960
    assert int(datamodule.test_data.samples.label_index.sum()) == 830
    clips = [clip for clip in (root / "training" / "frames").iterdir() if clip.is_dir()]
    frames = [len(list(clip.glob("*.jpg"))) for clip in clips]
    assert sum(frames) == 2550
    assert len(datamodule.train_data) + len(datamodule.val_data) == sum(math.ceil(n / 5) for n in frames)
    assert set(datamodule.val_data.samples.label_index) == {0}
