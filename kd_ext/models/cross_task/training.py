"""Distillation data (teacher soft targets and features on normal and synthetic images) and the training loop.

Each step takes one batch of every task. With the small trunk the batches go through the shared trunk together
(one forward pass), so every task's loss reaches the shared weights: task ``k``'s loss is

``L_k = KL_tau(map) + w_s * KL_tau(score) + w_f * (1 - cos)(adapter_k(trunk), teacher_k features)``

and the trunk's multi-task loss is ``sum_k lambda_k L_k`` (fixed, DWA) or the uncertainty-weighted sum. With the
frozen trunk (the earlier student) the trunk's features are cached and only the heads train: the tasks never
interact and the weighting is inert.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn

from .config import TargetKind, TrainingConfig
from .lightning_model import CrossTaskStudent
from .loss import (
    AdaptiveTemperature,
    DynamicWeightAverage,
    TaskWeighting,
    TemperatureMode,
    UncertaintyWeighting,
    cosine_curriculum,
    feature_distillation_loss,
    soft_label_loss,
)
from .tasks import PreparedTask, training_images
from .teachers import TeacherCalibration, raw_predictions, teacher_features
from .torch_model import TaskHead

SYNTHETIC_SHARPNESS = 4.0
"""Logit magnitude of the synthetic targets (``targets: synthetic``): the teachers' calibrated scale."""
CROP_ALIGNMENT = 32
"""Crops start on multiples of the deepest stride, so that every feature level and target crops exactly."""


@dataclass(frozen=True)
class Window:
    """A square training crop of the images, and the matching crop of any map or feature level.

    Attributes:
        top: First image row.
        left: First image column.
        size: Side in pixels.
        image_size: ``(H, W)`` of the full images.
    """

    top: int
    left: int
    size: int
    image_size: tuple[int, int]

    @classmethod
    def random(cls, image_size: tuple[int, int], size: int, generator: torch.Generator) -> "Window | None":
        """A random aligned crop of side ``size``; ``None`` (the full image) when ``size`` is 0 or too large."""
        if size <= 0 or size >= min(image_size):
            return None
        rows, columns = ((extent - size) // CROP_ALIGNMENT + 1 for extent in image_size)
        top = int(torch.randint(rows, (1,), generator=generator)) * CROP_ALIGNMENT
        left = int(torch.randint(columns, (1,), generator=generator)) * CROP_ALIGNMENT
        return cls(top, left, size, image_size)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The crop of ``tensor`` ``[..., h, w]`` (any resolution of the full image)."""
        height, width = tensor.shape[-2:]
        rows = slice(self.top * height // self.image_size[0], (self.top + self.size) * height // self.image_size[0])
        columns = slice(self.left * width // self.image_size[1], (self.left + self.size) * width // self.image_size[1])
        return tensor[..., rows, columns]


@dataclass
class TaskSamples:
    """One task's cached training samples.

    Attributes:
        images: Normalised student inputs ``[M, 3, H, W]`` (trainable trunk), or ``None``.
        inputs: Frozen-trunk features per level ``[M, C_l, h_l, w_l]`` (frozen trunk), or ``None``.
        map_targets: Target map logits at the head's resolution ``[M, 1, h, w]``.
        score_targets: Target score logits ``[M]``.
        teacher_features: The teacher's intermediate features per level (empty when not distilled).
    """

    images: torch.Tensor | None
    inputs: list[torch.Tensor] | None
    map_targets: torch.Tensor
    score_targets: torch.Tensor
    teacher_features: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return self.score_targets.shape[0]


def _in_batches(function: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int) -> list:
    return [function(images[start : start + batch_size]) for start in range(0, images.shape[0], batch_size)]


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
    task: PreparedTask, synthetic_per_image: int, teacher: bool = True, features: bool = True, batch_size: int = 8
) -> TeacherTargets:
    """Run the teacher once on every normal training image and its Perlin synthetic anomalies.

    Args:
        task: The task and its teacher.
        synthetic_per_image: Synthetic anomalies per normal image (anomalib's ``PerlinAnomalyGenerator``).
        teacher: Run the teacher (maps and scores); ``False`` keeps only images and masks.
        features: Also keep the teacher's intermediate features (for feature distillation).
        batch_size: Inference batch size.

    Returns:
        TeacherTargets: Images, masks and the teacher's outputs.
    """
    clean = training_images(task)
    images, masks = synthetic_images(clean, synthetic_per_image)
    targets = TeacherTargets(images, masks, clean.shape[0])
    if teacher:
        predictions = _in_batches(lambda chunk: raw_predictions(task.teacher, chunk), images, batch_size)
        targets.maps = torch.cat([anomaly_map for anomaly_map, _ in predictions])
        targets.scores = torch.cat([score for _, score in predictions])
        if features:
            chunks = _in_batches(lambda chunk: teacher_features(task.teacher, chunk), images, batch_size)
            targets.features = [torch.cat([chunk[level] for chunk in chunks]) for level in range(len(chunks[0]))]
    return targets


@torch.no_grad()
def build_task_samples(
    task: str,
    targets: TeacherTargets,
    student: CrossTaskStudent,
    config: TrainingConfig,
    batch_size: int = 8,
) -> TaskSamples:
    """A task's training samples for one student and one setting.

    With ``targets: teacher`` the teacher's maps and scores become calibrated logits (:class:`TeacherCalibration`,
    fitted on the clean images only) and, for feature distillation of a trainable trunk, its features are kept.
    With ``targets: synthetic`` the synthetic masks and labels are the targets. A frozen trunk's features are
    cached, and the frozen head's normal statistics and calibration fitted.

    Args:
        task: Task name (the student's head).
        targets: The task's images and teacher outputs (:func:`teacher_targets`).
        student: The student (its pre-processor and trunk).
        config: Training settings (targets, feature distillation).
        batch_size: Inference batch size.

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
    if model.trunk_is_trainable:
        return TaskSamples(normalised, None, map_targets, score_targets, features)
    levels = _in_batches(model.trunk_features, normalised, batch_size)
    inputs = [torch.cat([chunk[level] for chunk in levels]) for level in range(len(levels[0]))]
    head = model.heads[task]
    if isinstance(head, TaskHead):
        head.fit_normal_statistics([level[: targets.clean_count] for level in inputs])
        head.fit_calibration(inputs, map_targets, score_targets)
    return TaskSamples(None, inputs, map_targets, score_targets)


class FeatureAdapters(nn.Module):
    """Per-task 1x1 convolutions from the trunk's levels to the teacher's (training only, not exported).

    Student level ``i`` is paired with teacher level ``i`` for as many levels as both have.

    Args:
        student_channels: Trunk channels per level.
        teacher_channels: Per task: the teacher's channels per level (empty: no adapter).
    """

    def __init__(self, student_channels: list[int], teacher_channels: dict[str, list[int]]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict(
            {
                task: nn.ModuleList(
                    nn.Conv2d(source, target, kernel_size=1)
                    for source, target in zip(student_channels, channels, strict=False)
                )
                for task, channels in teacher_channels.items()
                if channels
            }
        )

    def forward(self, task: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adapted trunk features of one task (as many levels as it has adapters)."""
        return [adapter(level) for adapter, level in zip(self.adapters[task], features, strict=False)]


class _Cycler:
    """Endless shuffled batches of indices over one task's samples."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        self.size = size
        self.batch_size = min(batch_size, size)
        self.generator = generator
        self.order = torch.randperm(size, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch


def _trunk_features(
    student: CrossTaskStudent,
    samples: dict[str, TaskSamples],
    batches: dict[str, torch.Tensor],
    window: Window | None,
) -> dict[str, list[torch.Tensor]]:
    """Every task's trunk features for its batch: one shared trunk pass (trainable, on the crop) or the cache."""
    model = student.model
    if not model.trunk_is_trainable:
        return {task: [level[batches[task]] for level in samples[task].inputs] for task in batches}
    images = torch.cat([samples[task].images[batches[task]] for task in batches])
    if window is not None:
        images = window(images)
    levels = model.trunk(images.contiguous(memory_format=torch.channels_last))
    sizes = [len(batches[task]) for task in batches]
    split = [torch.split(level, sizes) for level in levels]
    return {task: [level[index] for level in split] for index, task in enumerate(batches)}


def _temperatures(
    temperature: AdaptiveTemperature | None, fixed: torch.Tensor, count: int, reversal: float
) -> list[torch.Tensor]:
    """Every task's distillation temperature for this step (adaptive ones with the reversed gradient)."""
    if temperature is None:
        return [fixed] * count
    return [temperature(index, reversal) for index in range(count)]


def _task_loss(
    student: CrossTaskStudent,
    task_samples: TaskSamples,
    batch: torch.Tensor,
    features: list[torch.Tensor],
    task: str,
    tau: torch.Tensor,
    adapters: "FeatureAdapters",
    config: TrainingConfig,
    window: Window | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One task's loss on its batch (and crop) and its parts: ``(total, map, score, feature)``.

    On a crop the score target stays the whole image's: the crop's top-k map logits stand in for the image's.
    """
    crop = window if window is not None else (lambda tensor: tensor)
    map_logits, score_logits = student.model.heads[task](features)
    map_loss = soft_label_loss(map_logits, crop(task_samples.map_targets[batch]), tau, config.imbalance)
    score_loss = soft_label_loss(score_logits, task_samples.score_targets[batch], tau, config.imbalance)
    feature_loss = torch.zeros(())
    if task in adapters.adapters:
        adapted = adapters(task, features)
        targets = [crop(level[batch]) for level in task_samples.teacher_features[: len(adapted)]]
        feature_loss = feature_distillation_loss(adapted, targets)
    total = map_loss + config.score_weight * score_loss + config.feature_weight * feature_loss
    return total, map_loss, score_loss, feature_loss


def _record(
    epoch: int,
    tasks: list[str],
    means: torch.Tensor,
    weights: list[float],
    temperatures: list[float],
    reversal: float,
) -> dict:
    """One epoch of the training history."""
    return {
        "epoch": epoch + 1,
        "loss": dict(zip(tasks, means[:, 0].tolist(), strict=True)),
        "parts": {
            task: dict(zip(("map", "score", "feature"), means[index, 1:].tolist(), strict=True))
            for index, task in enumerate(tasks)
        },
        "weight": dict(zip(tasks, weights, strict=True)),
        "temperature": dict(zip(tasks, temperatures, strict=True)),
        "reversal": reversal,
    }


def train_student(
    student: CrossTaskStudent,
    samples: dict[str, TaskSamples],
    config: TrainingConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train the student (trunk when trainable, heads, adapters) on every task's cached samples.

    Args:
        student: The student (train mode is set here, eval mode on return).
        samples: Cached samples per task name (same order as the student's tasks).
        config: Training settings: task weighting (fixed / DWA / uncertainty), temperature (fixed / adaptive),
            feature distillation, imbalance handling.
        log: Progress sink (one line per epoch).

    Returns:
        list[dict]: Per epoch: each task's mean unweighted loss and its parts, weight and temperature.
    """
    model = student.model
    tasks = list(samples)
    torch.manual_seed(config.seed)
    temperature = (
        AdaptiveTemperature(len(tasks), initial=config.initial_temperature)
        if config.temperature == TemperatureMode.adaptive
        else None
    )
    fixed_temperature = torch.tensor(config.initial_temperature)
    dwa = (
        DynamicWeightAverage(len(tasks), config.dwa_temperature) if config.task_weighting == TaskWeighting.dwa else None
    )
    uncertainty = UncertaintyWeighting(len(tasks)) if config.task_weighting == TaskWeighting.uncertainty else None
    distil_features = config.feature_distillation and config.targets == TargetKind.teacher and model.trunk_is_trainable
    adapters = FeatureAdapters(
        model.trunk_channels(),
        {
            task: [level.shape[1] for level in samples[task].teacher_features] if distil_features else []
            for task in tasks
        },
    )
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for module in (temperature, uncertainty, adapters):
        if module is not None:
            parameters += list(module.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    cyclers = {task: _Cycler(len(samples[task]), config.batch_size, generator) for task in tasks}
    steps = math.ceil(max(len(task_samples) for task_samples in samples.values()) / config.batch_size)
    first = samples[tasks[0]]
    image_size = tuple((first.images if first.images is not None else first.map_targets).shape[-2:])
    history = []
    model.to(memory_format=torch.channels_last)
    model.train()
    for epoch in range(config.epochs):
        weights = dwa.weights() if dwa is not None else [1.0] * len(tasks)
        reversal = cosine_curriculum(epoch, config.epochs)
        sums = torch.zeros(len(tasks), 4)  # total, map, score, feature
        for _ in range(steps):
            batches = {task: cyclers[task].next() for task in tasks}
            window = Window.random(image_size, config.crop_size, generator) if model.trunk_is_trainable else None
            features = _trunk_features(student, samples, batches, window)
            taus = _temperatures(temperature, fixed_temperature, len(tasks), reversal)
            parts = [
                _task_loss(student, samples[task], batches[task], features[task], task, tau, adapters, config, window)
                for task, tau in zip(tasks, taus, strict=True)
            ]
            losses = [part[0] for part in parts]
            sums += torch.stack([torch.stack(part) for part in parts]).detach()
            stacked = torch.stack(losses)
            total = uncertainty(stacked) if uncertainty is not None else (torch.tensor(weights) * stacked).sum()
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        means = sums / steps
        epoch_losses = means[:, 0].tolist()
        if dwa is not None:
            dwa.update(epoch_losses)
        if uncertainty is not None:
            weights = uncertainty.weights()
        temperatures = temperature.values() if temperature is not None else [config.initial_temperature] * len(tasks)
        history.append(_record(epoch, tasks, means, weights, temperatures, reversal))
        log(
            f"epoch {epoch + 1}/{config.epochs} "
            + " ".join(
                f"{task}: loss {loss:.4f} w {weight:.2f} tau {tau:.2f}"
                for task, loss, weight, tau in zip(tasks, epoch_losses, weights, temperatures, strict=True)
            )
        )
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


def adapter_parameters(student: CrossTaskStudent, samples: dict[str, TaskSamples]) -> int:
    """Parameters of the training-only feature adapters (reported, not deployed)."""
    adapters = FeatureAdapters(
        student.model.trunk_channels(),
        {task: [level.shape[1] for level in task_samples.teacher_features] for task, task_samples in samples.items()},
    )
    return sum(parameter.numel() for parameter in adapters.parameters())
