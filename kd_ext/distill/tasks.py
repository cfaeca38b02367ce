"""Check every task before any training: names, data, teacher checkpoints, image sizes."""

from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import Folder, MVTecAD
from anomalib.data.datamodules.base import AnomalibDataModule
from anomalib.models import AnomalibModule
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from kd_ext.models.cross_task.torch_model import check_task_names

from .config import DataLayout, TaskConfig
from .teachers import calibrate_teacher, calibration_pending, image_size_of, load_anomaly_model, model_class

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class PreparedTask:
    """A checked task with its loaded teacher.

    Attributes:
        config: The task's configuration.
        teacher: The trained teacher, in eval mode.
        image_size: ``(H, W)`` the teacher works at.
    """

    config: TaskConfig
    teacher: AnomalibModule
    image_size: tuple[int, int]

    @property
    def name(self) -> str:
        """Task name."""
        return self.config.name

    def datamodule(self, batch_size: int = 8) -> AnomalibDataModule:
        """The task's images as an anomalib datamodule (see :func:`task_datamodule`)."""
        return task_datamodule(self.config, batch_size)


def task_datamodule(task: TaskConfig, batch_size: int = 8) -> AnomalibDataModule:
    """A task's images as an anomalib datamodule: ``MVTecAD``, ``Folder`` or :class:`kd_ext.data.VideoFrames`.

    Validation reuses the test images (``same_as_test``), so that the whole test set is scored.
    """
    loading = {
        "train_batch_size": batch_size,
        "eval_batch_size": batch_size,
        "num_workers": 0,
        "val_split_mode": "same_as_test",
    }
    if task.layout == DataLayout.folder:
        test = task.data_dir / "test"
        abnormal = sorted(path.name for path in test.iterdir() if path.is_dir() and path.name != "good")
        return Folder(
            name=task.name,
            root=task.data_dir,
            normal_dir="train/good",
            normal_test_dir="test/good",
            abnormal_dir=[f"test/{name}" for name in abnormal],
            **loading,
        )
    if task.layout == DataLayout.video:
        return _video_frames(task, loading)
    return MVTecAD(root=task.root, category=task.category, **loading)


def _video_frames(task: TaskConfig, loading: dict) -> AnomalibDataModule:
    """``kd_ext.data.VideoFrames`` training on every ``frame_stride``-th frame, testing on ``test_frame_stride``.

    The test frames kept are those whose number in their clip (from 0) is a multiple of ``task.test_frame_stride``,
    as in the accuracy benchmark's ``screen`` protocol; 1 keeps every test frame.
    """
    from kd_ext.data import VideoFrames  # noqa: PLC0415
    from kd_ext.data.video_frames import check_frame_stride  # noqa: PLC0415

    stride = task.test_frame_stride
    check_frame_stride(stride)

    class StridedTestFrames(VideoFrames):
        """VideoFrames whose test set keeps every ``stride``-th frame of each test clip."""

        def _setup(self, _stage: str | None = None) -> None:
            super()._setup(_stage)
            samples = self.test_data.samples
            self.test_data.samples = samples[samples["frame"] % stride == 0].reset_index(drop=True)

    frames = StridedTestFrames if stride > 1 else VideoFrames
    return frames(root=task.data_dir, frame_stride=task.frame_stride, **loading)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)


def data_problems(task: TaskConfig) -> list[str]:
    """What is missing from a task's data folder (empty when usable).

    Args:
        task: The task.

    Returns:
        list[str]: One message per problem.
    """
    if not task.data_dir.is_dir():
        return [f"task '{task.name}': data folder {task.data_dir} does not exist"]
    if task.layout == DataLayout.video:
        problems = [
            f"task '{task.name}': {key} must be a positive integer (1 keeps every frame), got {value!r}"
            for key, value in (("frame_stride", task.frame_stride), ("test_frame_stride", task.test_frame_stride))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1
        ]
        if not _images_in(task.data_dir / "training" / "frames"):
            problems.append(f"task '{task.name}': no training frames in {task.data_dir / 'training' / 'frames'}")
        if not (task.data_dir / "testing" / "frame_labels.csv").is_file():
            labels = task.data_dir / "testing" / "frame_labels.csv"
            problems.append(f"task '{task.name}': no {labels} (needed for evaluation)")
        return problems
    problems = []
    if not _images_in(task.data_dir / "train" / "good"):
        problems.append(f"task '{task.name}': no normal training images in {task.data_dir / 'train' / 'good'}")
    if not _images_in(task.data_dir / "test"):
        problems.append(f"task '{task.name}': no test images in {task.data_dir / 'test'} (needed for evaluation)")
    return problems


def checkpoint_problems(task: TaskConfig) -> list[str]:
    """What can be said of a task's teacher without opening its checkpoint (empty when nothing is wrong).

    Args:
        task: The task.

    Returns:
        list[str]: One message per problem: a missing checkpoint file, an unknown or disallowed model name.
    """
    problems = []
    if not task.checkpoint.is_file():
        problems.append(f"task '{task.name}': teacher checkpoint not found: {task.checkpoint}")
    if task.model is not None:
        try:
            model_class(task.model)
        except ValueError as error:
            problems.append(f"task '{task.name}': {error}")
    return problems


def prepare_tasks(tasks: list[TaskConfig]) -> list[PreparedTask]:
    """Validate all tasks and load their teachers; fail before training, listing every problem.

    Args:
        tasks: Task configurations.

    Returns:
        list[PreparedTask]: The tasks with loaded teachers.

    Every check that needs no checkpoint (names, data folders, checkpoint files, model names) runs first; only
    when all pass are the checkpoints opened, each with ``weights_only=True``. A teacher whose checkpoint holds an
    unfitted normal-feature prior (written before its first test) then fits it on the task's normal training images
    (:func:`~.teachers.calibrate_teacher`).

    Raises:
        ValueError: Naming every problem found: duplicate or invalid task names, missing data, unreadable or
            non-anomaly checkpoints, teachers trained at different image sizes.
    """
    check_task_names([task.name for task in tasks])
    problems = [problem for task in tasks for problem in data_problems(task)]
    problems += [problem for task in tasks for problem in checkpoint_problems(task)]
    if problems:  # everything that needs no checkpoint is checked before any checkpoint is opened
        _refuse(problems)
    prepared = []
    for task in tasks:
        try:
            teacher = load_anomaly_model(task.checkpoint, task.model)
            prepared.append(PreparedTask(task, teacher, image_size_of(teacher)))
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"task '{task.name}': {error}")
    sizes = {task.image_size for task in prepared}
    if len(sizes) > 1:
        listing = ", ".join(f"'{task.name}' {task.image_size[0]}x{task.image_size[1]}" for task in prepared)
        problems.append(
            f"the teachers were trained at different image sizes ({listing}); one student serves one input size: "
            "retrain the teachers at a common size"
        )
    if problems:
        _refuse(problems)
    for task in prepared:  # a teacher restored with an unfitted prior fits it, as its trainer would before a test
        if calibration_pending(task.teacher):
            calibrate_teacher(task.teacher, training_images(task))
    return prepared


def _refuse(problems: list[str]) -> None:
    msg = "Cannot start distillation:\n  - " + "\n  - ".join(problems)
    raise ValueError(msg)


def training_image_count(task: PreparedTask) -> int:
    """Number of the task's normal training images (from the file list, without reading the images)."""
    datamodule = task.datamodule()
    datamodule.setup()
    return len(datamodule.train_data)


def training_images(task: PreparedTask) -> torch.Tensor:
    """The task's normal training images, RGB in ``[0, 1]``, resized to the teacher's size.

    Returns:
        torch.Tensor: ``[N, 3, H, W]``.
    """
    datamodule = task.datamodule()
    datamodule.setup()
    images = [TF.resize(item.image, list(task.image_size), antialias=True) for item in datamodule.train_data]
    return torch.stack(images).clamp(0, 1)
