"""What the student learns from: each task's training images and its teacher's soft targets and features.

Every normal training image of a task and ``synthetic_per_image`` Perlin synthetic anomalies of it (anomalib's
generator) are shown to the task's teacher once (:func:`teacher_targets`); its raw maps and scores become
calibrated logits and, for feature distillation, its intermediate features are kept (:func:`build_task_samples`).
With ``targets: synthetic`` the synthetic anomalies' own masks and labels are the targets (no teacher).

Under several processes (Lightning's DDP) every process draws the same synthetic anomalies from the same seed
(cheap next to the teacher), while the teacher runs on each process's share of the chunks only and every process
receives all outputs (:func:`kd_ext.models.distributed.gather_chunks`): the fitted calibrations are one process's
exactly.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

from kd_ext.models.cross_task import CrossTaskStudent
from kd_ext.models.distributed import gather_chunks

from .config import TargetKind, TrainingConfig
from .tasks import PreparedTask, training_images
from .teachers import TeacherCalibration, raw_predictions, teacher_features

SYNTHETIC_SHARPNESS = 4.0
"""Logit magnitude of the synthetic targets (``targets: synthetic``): the teachers' calibrated scale."""


@dataclass
class TaskSamples:
    """One task's training samples.

    Attributes:
        images: Normalised student inputs ``[M, 3, H, W]``.
        map_targets: Target map logits at the head's resolution ``[M, 1, h, w]``.
        score_targets: Target score logits ``[M]``.
        teacher_features: The teacher's intermediate features per level (empty when not distilled).
    """

    images: torch.Tensor
    map_targets: torch.Tensor
    score_targets: torch.Tensor
    teacher_features: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return self.score_targets.shape[0]

    def teacher_channels(self) -> list[int]:
        """Channels of the kept teacher feature levels (empty when not distilled)."""
        return [level.shape[1] for level in self.teacher_features]


def synthetic_images(clean: torch.Tensor, per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean images followed by ``per_image`` Perlin anomalies of each (anomalib's generator), with masks.

    Returns:
        tuple: Images ``[N * (1 + per_image), 3, H, W]`` in ``[0, 1]`` and masks ``[.., 1, H, W]`` (0 for clean).
    """
    generator = PerlinAnomalyGenerator(probability=1.0)
    images, masks = [clean], [torch.zeros(clean.shape[0], 1, *clean.shape[-2:])]
    for _ in range(per_image):
        augmented, mask = generator(clean)
        images.append(augmented.clamp(0, 1))
        masks.append(mask.reshape(clean.shape[0], 1, *clean.shape[-2:]).float())
    return torch.cat(images), torch.cat(masks)


@dataclass
class TeacherTargets:
    """One task's training images (clean + synthetic) and what its teacher says about them (computed once).

    Attributes:
        images: RGB ``[M, 3, H, W]`` in ``[0, 1]``: the clean images first.
        masks: Synthetic-anomaly masks ``[M, 1, H, W]`` (0 for the clean images).
        clean_count: Number of clean images.
        maps: The teacher's raw maps ``[M, H, W]`` (``None`` without a teacher).
        scores: The teacher's raw scores ``[M]`` (``None`` without a teacher).
        features: The teacher's intermediate features per level (empty when not asked for).
    """

    images: torch.Tensor
    masks: torch.Tensor
    clean_count: int
    maps: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    features: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def teacher_targets(
    task: PreparedTask,
    synthetic_per_image: int,
    teacher: bool = True,
    features: bool = True,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> TeacherTargets:
    """Run the teacher once on every normal training image and its Perlin synthetic anomalies.

    With several processes the teacher runs on each process's share of the chunks and every process receives all
    outputs (see the module's description).

    Args:
        task: The task and its teacher.
        synthetic_per_image: Synthetic anomalies per normal image (anomalib's ``PerlinAnomalyGenerator``).
        teacher: Run the teacher (maps and scores); ``False`` keeps only images and masks.
        features: Also keep the teacher's intermediate features (for feature distillation).
        batch_size: Inference batch size.
        device: Where the teacher runs (the outputs come back to the CPU).

    Returns:
        TeacherTargets: Images, masks and the teacher's outputs.
    """
    clean = training_images(task)
    images, masks = synthetic_images(clean, synthetic_per_image)
    targets = TeacherTargets(images, masks, clean.shape[0])
    if teacher:
        model = task.teacher.to(device)

        def on_device(function: Callable) -> Callable[[torch.Tensor], list[torch.Tensor]]:
            return lambda chunk: [tensor.cpu() for tensor in function(model, chunk.to(device))]

        targets.maps, targets.scores = gather_chunks(on_device(raw_predictions), images, batch_size)
        if features:
            targets.features = gather_chunks(on_device(teacher_features), images, batch_size)
        model.cpu()
    return targets


@torch.no_grad()
def build_task_samples(
    task: str, targets: TeacherTargets, student: CrossTaskStudent, config: TrainingConfig
) -> TaskSamples:
    """A task's training samples for one student and one setting.

    With ``targets: teacher`` the teacher's maps and scores become calibrated logits (:class:`TeacherCalibration`,
    fitted on the clean images only) and, for feature distillation of a trainable trunk, its features are kept.
    With ``targets: synthetic`` the synthetic masks and labels are the targets.

    Args:
        task: Task name (the student's head).
        targets: The task's images and teacher outputs (:func:`teacher_targets`).
        student: The student (its pre-processor and trunk).
        config: Training settings (targets, feature distillation).

    Returns:
        TaskSamples: The samples.

    Raises:
        ValueError: If teacher targets are asked for but the teacher was not run.
    """
    model = student.model
    normalised = student.pre_processor.transform(targets.images)
    model.trunk.eval()
    head_size = model.trunk(normalised[:1])[0].shape[-2:]
    features: list[torch.Tensor] = []
    if config.targets == TargetKind.teacher:
        if targets.maps is None or targets.scores is None:
            msg = f"Task '{task}': teacher targets were asked for, but its teacher was not run."
            raise ValueError(msg)
        count = targets.clean_count
        calibration = TeacherCalibration.fit(targets.maps[:count], targets.scores[:count])
        map_targets = F.adaptive_avg_pool2d(calibration.pixel_logits(targets.maps).unsqueeze(1), head_size)
        score_targets = calibration.score_logits(targets.scores)
        if config.feature_distillation and model.trunk_is_trainable:
            features = targets.features
    else:
        fraction = F.adaptive_avg_pool2d(targets.masks, head_size)
        map_targets = SYNTHETIC_SHARPNESS * (2 * fraction - 1)
        score_targets = SYNTHETIC_SHARPNESS * (2 * (targets.masks.flatten(1).amax(dim=1) > 0).float() - 1)
    return TaskSamples(normalised, map_targets, score_targets, features)
