"""BiDirMSKD and MTHF on anomalib's own clip-based video datamodule (UCSDped), on a tiny set in its layout.

The set is written in tmp_path as the official UCSD Ped2 release lays it out (``UCSDped2/Train/Train001/001.tif``,
``UCSDped2/Test/Test001/...`` with masks in ``Test001_gt/001.bmp``); frames are tiny and the models untrained
(``pre_trained=False``, one epoch), so the tests check the plumbing, not accuracy.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import UCSDped
from anomalib.data.datasets.base.video import VideoTargetFrame
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from PIL import Image

from kd_ext.models import MTHF, BiDirMSKD
from kd_ext.models.components.clips import loaders_target_frame, target_frames

pytest.importorskip("av", reason="anomalib's video datamodules need PyAV (pip install av)")

FRAMES = 6
SIZE = (32, 48)


def frame_value(video: int, frame: int) -> int:
    """A grey level that tells the frame apart (every pixel of the frame has it, save the anomaly)."""
    return 40 + 30 * video + 5 * frame


def write_ucsd(root: Path, category: str = "UCSDped2") -> Path:
    """Two normal training videos and two test videos; the second test video has an anomaly from frame 3 on."""
    base = root / category
    for split in ("Train", "Test"):
        for video in (1, 2):
            folder = base / split / f"{split}{video:03d}"
            folder.mkdir(parents=True)
            if split == "Test":
                (base / split / f"{split}{video:03d}_gt").mkdir()
            for frame in range(FRAMES):
                pixels = np.full(SIZE, frame_value(video, frame), dtype=np.uint8)
                mask = np.zeros(SIZE, dtype=np.uint8)
                if split == "Test" and video == 2 and frame >= 3:
                    pixels[8:20, 10:26] = 255
                    mask[8:20, 10:26] = 255
                Image.fromarray(pixels).save(folder / f"{frame + 1:03d}.tif")
                if split == "Test":
                    Image.fromarray(mask).save(base / split / f"{split}{video:03d}_gt" / f"{frame + 1:03d}.bmp")
    return root


def datamodule(root: Path, clip_length: int, target_frame: str = "last") -> UCSDped:
    return UCSDped(
        root=root,
        category="UCSDped2",
        clip_length_in_frames=clip_length,
        frames_between_clips=1,
        target_frame=VideoTargetFrame(target_frame),
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )


@pytest.mark.parametrize("target_frame", ["first", "mid", "last"])
def test_target_frame_is_the_frame_anomalib_labels(tmp_path: Path, target_frame: str) -> None:
    """The frame that scores a clip is the one whose index (and so label and mask) the dataset returned."""
    data = datamodule(write_ucsd(tmp_path), clip_length=3, target_frame=target_frame)
    data.setup("test")
    loader = data.test_dataloader()
    index = loaders_target_frame(loader)
    checked = 0
    for batch in loader:
        assert batch.image.shape[1:3] == (3, 3)  # clips [B, T, C, H, W]
        frames = target_frames(batch.image, index)
        assert frames.shape == (batch.image.shape[0], 3, *SIZE)
        for image, video_path, frame, label in zip(frames, batch.video_path, batch.frames, batch.gt_label, strict=True):
            video = int(Path(video_path).name[-3:])
            background = round(float(image[:, 0, 0].mean()) * 255)
            assert background == frame_value(video, int(frame))
            assert bool(label) == (video == 2 and int(frame) >= 3)
            checked += 1
    assert checked == 2 * (FRAMES - 2)


def test_all_frames_target_is_refused_naming_video_frames(tmp_path: Path) -> None:
    data = datamodule(write_ucsd(tmp_path), clip_length=2, target_frame="all")
    data.setup("test")
    with pytest.raises(ValueError, match=r"kd_ext\.data\.VideoFrames"):
        loaders_target_frame(data.test_dataloader())


def test_clips_outside_a_video_dataset_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of anomalib's video datasets"):
        target_frames(torch.zeros(2, 3, 3, 8, 8), None)


@pytest.mark.parametrize(("model_class", "clip_length"), [(BiDirMSKD, 2), (MTHF, 1)])
def test_train_test_predict_on_ucsdped(tmp_path: Path, model_class: type, clip_length: int) -> None:
    """anomalib's Engine trains (frames flattened into the batch), tests and predicts (a score per clip)."""
    seed_everything(0)
    root = write_ucsd(tmp_path / "data")
    model = model_class(
        pre_trained=False, epochs=1, pre_processor=model_class.configure_pre_processor(image_size=(64, 64))
    )
    engine = Engine(max_epochs=1, logger=False, accelerator="cpu", devices=1, default_root_dir=tmp_path / "run")
    engine.fit(model, datamodule=datamodule(root, clip_length))
    (results,) = engine.test(model, datamodule=datamodule(root, clip_length))
    assert {"image_AUROC", "pixel_AUROC"} <= set(results)
    assert all(np.isfinite(value) for value in results.values())
    predictions = engine.predict(model, datamodule=datamodule(root, clip_length))
    clips = sum(len(batch.video_path) for batch in predictions)
    assert clips == 2 * (FRAMES - clip_length + 1)
    for batch in predictions:
        count = len(batch.video_path)
        assert batch.pred_score.shape == (count,)
        assert batch.pred_label.shape == (count,)
        assert batch.anomaly_map.shape[0] == count
        assert batch.anomaly_map.shape[-2:] == (64, 64)
    drawn = sorted(path.relative_to(path.parents[1]) for path in (tmp_path / "run").rglob("*.png"))
    assert Path("Test002") / f"{FRAMES - 1:06d}.png" in drawn  # the last clip of video 2, drawn as its last frame
