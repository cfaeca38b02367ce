"""Cross-task distillation on video frames: strided test frames, and a teacher restored with an unfitted prior.

The accuracy benchmark's BiDirMSKD checkpoints are written at the end of training, before the first test fits the
normal-feature prior; ``prepare_tasks`` must fit it on the task's training frames, as the teacher's trainer would,
so that the teacher scores and gives targets with its prior.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from PIL import Image

from kd_ext.data import VideoFrames
from kd_ext.distill.config import TaskConfig, TrainingConfig
from kd_ext.distill.pipeline import build_student
from kd_ext.distill.pipeline import test_metrics as auroc_metrics  # not collected as a test
from kd_ext.distill.targets import build_task_samples, teacher_targets
from kd_ext.distill.tasks import prepare_tasks, task_datamodule, training_images
from kd_ext.distill.teachers import calibrate_teacher, calibration_pending, load_anomaly_model, raw_predictions
from kd_ext.models import BiDirMSKD
from kd_ext.models.checkpoint import teacher_pre_processor

SIZE = 64
TEST_LABELS = {"01": [0, 0, 0, 0, 1, 1, 1, 1], "02": [1, 1, 0, 0, 0, 0]}


def _frame(path: Path, rng: np.random.Generator, bright: bool = False) -> None:
    """A noisy grey frame; an abnormal one carries a bright square."""
    frame = rng.uniform(0.3, 0.5, (SIZE, SIZE))
    if bright:
        frame[20:40, 20:40] = 0.95
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((frame * 255).astype(np.uint8)).convert("RGB").save(path)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training clips of 8 frames, two labelled test clips (abnormal frames carry a bright square)."""
    root = tmp_path_factory.mktemp("video") / "clips"
    rng = np.random.default_rng(0)
    for clip in ("01", "02"):
        for index in range(8):
            _frame(root / "training" / "frames" / clip / f"{index:03d}.jpg", rng)
    rows = ["clip,frame,label"]
    for clip, labels in TEST_LABELS.items():
        for index, label in enumerate(labels):
            _frame(root / "testing" / "frames" / clip / f"{index:03d}.jpg", rng, bright=bool(label))
            rows.append(f"{clip},{index},{label}")
    (root / "testing" / "frame_labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def unfitted_checkpoint(video_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BiDirMSKD (prior on) trained one epoch on the frames, saved with its prior unfitted (empty buffers)."""
    workdir = tmp_path_factory.mktemp("teacher")
    model = BiDirMSKD(pre_processor=teacher_pre_processor("efficientnet_lite0", (SIZE, SIZE)), prior=True, epochs=1)
    datamodule = VideoFrames(
        video_root, frame_stride=1, train_batch_size=8, eval_batch_size=8, num_workers=0, val_split_mode="same_as_test"
    )
    engine = Engine(max_epochs=1, default_root_dir=workdir, logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    trained = Path(engine.trainer.checkpoint_callback.best_model_path or next(workdir.rglob("*.ckpt")))
    content = torch.load(trained, map_location="cpu", weights_only=True)
    for key in [key for key in content["state_dict"] if key.startswith("model.prior_fusion.prior.")]:
        content["state_dict"][key] = content["state_dict"][key].new_zeros(0)  # as written before the first test
    path = workdir / "unfitted.ckpt"
    torch.save(content, path)
    return path


def _task(root: Path, checkpoint: Path, **strides: int) -> TaskConfig:
    return TaskConfig("clips", checkpoint, root.parent, root.name, layout="video", **{"frame_stride": 1, **strides})


def test_test_frame_stride_keeps_every_nth_frame_of_each_test_clip(video_root: Path, tmp_path: Path) -> None:
    datamodule = task_datamodule(_task(video_root, tmp_path / "unused.ckpt", frame_stride=2, test_frame_stride=4))
    datamodule.setup()
    test = datamodule.test_data.samples
    assert sorted(zip(test["clip"], test["frame"], strict=True)) == [("01", 0), ("01", 4), ("02", 0), ("02", 4)]
    expected = [TEST_LABELS[clip][frame] for clip, frame in zip(test["clip"], test["frame"], strict=True)]
    assert list(test["label_index"]) == expected
    assert len(datamodule.train_data) == 8  # the training stride alone decides the training frames
    every = task_datamodule(_task(video_root, tmp_path / "unused.ckpt"))
    every.setup()
    assert len(every.test_data) == sum(len(labels) for labels in TEST_LABELS.values())


@pytest.mark.parametrize("strides", [{"test_frame_stride": 0}, {"test_frame_stride": 1.5}, {"frame_stride": 0}])
def test_bad_frame_strides_are_refused_before_any_checkpoint_opens(
    video_root: Path, tmp_path: Path, strides: dict
) -> None:
    key = next(iter(strides))
    with pytest.raises(ValueError, match=rf"{key} must be a positive integer"):
        prepare_tasks([_task(video_root, tmp_path / "missing.ckpt", **strides)])


def test_teacher_with_an_unfitted_prior_is_fitted_on_the_training_frames(
    video_root: Path, unfitted_checkpoint: Path
) -> None:
    restored = load_anomaly_model(unfitted_checkpoint)
    assert calibration_pending(restored)
    (task,) = prepare_tasks([_task(video_root, unfitted_checkpoint, test_frame_stride=2)])
    assert not calibration_pending(task.teacher)
    assert task.teacher.model.prior_fusion.ready
    calibrate_teacher(restored, training_images(task))  # the same fit, by hand
    images = training_images(task)[:4]
    for expected, got in zip(raw_predictions(restored, images), raw_predictions(task.teacher, images), strict=True):
        torch.testing.assert_close(got, expected)
    assert not calibrate_teacher(task.teacher, images)  # nothing pending: nothing done
    assert 0.0 <= auroc_metrics(task.teacher, task)["image_AUROC"] <= 1.0


def test_teacher_targets_of_video_frames_come_from_the_fitted_teacher(
    video_root: Path, unfitted_checkpoint: Path
) -> None:
    (task,) = prepare_tasks([_task(video_root, unfitted_checkpoint, frame_stride=2)])
    targets = teacher_targets(task, synthetic_per_image=1)
    assert targets.clean_count == 8
    assert targets.maps.shape == (16, SIZE, SIZE)
    assert torch.isfinite(targets.maps).all() and torch.isfinite(targets.scores).all()
    assert [level.shape[0] for level in targets.features] == [16, 16, 16]
    maps, scores = raw_predictions(task.teacher, targets.images[:8])
    torch.testing.assert_close(targets.scores[:8], scores)
    torch.testing.assert_close(targets.maps[:8], maps)
    student = build_student([task.name], task.image_size)
    samples = build_task_samples(task.name, targets, student, TrainingConfig(epochs=1, batch_size=8))
    assert len(samples) == 16
    assert samples.teacher_channels() == [level.shape[1] for level in targets.features]
