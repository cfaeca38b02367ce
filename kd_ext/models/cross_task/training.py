"""Distillation data (teacher soft targets and features on normal and synthetic images) and the training loop.

Each step takes one batch of every task. With the small trunk the batches go through the shared trunk together
(one forward pass), so every task's loss reaches the shared weights: task ``k``'s loss is

``L_k = KL_tau(map) + w_s * KL_tau(score) + w_f * (1 - cos)(adapter_k(trunk), teacher_k features)``

and the trunk's multi-task loss is ``sum_k lambda_k L_k`` (fixed, DWA) or the uncertainty-weighted sum. With the
frozen trunk (the earlier student) the trunk's features are cached and only the heads train: the tasks never
interact and the weighting is inert.

Under ``torchrun`` (several processes) the training equals one process's: ``batch_size`` is each task's *global*
batch and every process takes an equal contiguous share of it (:func:`process_share`), from the same seeded
permutation and crop on every process; the trunk's and heads' batch-norm layers use the global batch's statistics,
the class-balance fractions are the global batch's, the gradients of the student and of the training-only modules
(adapters, temperatures, uncertainty weights) are averaged by ``DistributedDataParallel``, and the per-task losses
behind DWA and the history are averaged over the processes. The teachers' targets and the frozen trunk's features
are computed in chunks shared among the processes and gathered (every process holds every sample), so the fitted
calibrations and normal statistics are one process's exactly.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd_ext.models.distributed import (
    gather_chunks,
    global_rank,
    process_device,
    reduce_sum,
    restore_batch_norm,
    use_global_batch_norm,
    world_size,
)

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
from .torch_model import CrossTaskStudentModel, TaskHead

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


def check_process_shares(batch_size: int, processes: int, samples: dict[str, int] | None = None) -> None:
    """Check that every task's global batch splits into equal shares, one per process.

    A task's global batch is ``min(batch_size, samples)`` (a task with fewer samples than ``batch_size`` takes all of
    them at each step); each of the ``processes`` takes ``1 / processes`` of it (:func:`process_share`).

    Args:
        batch_size: ``training.batch_size``, each task's global batch.
        processes: Number of processes (torchrun's world size).
        samples: Training samples per task (clean and synthetic); ``None`` checks ``batch_size`` alone.

    Raises:
        ValueError: Naming the fix, if ``processes`` does not divide ``batch_size`` or a task's batch, or a task has
            fewer samples than processes.
    """
    if batch_size % processes:
        msg = (
            f"training.batch_size {batch_size} is each task's global batch, shared equally by the {processes} "
            f"processes: set it to a multiple of {processes}, or start a number of processes that divides it."
        )
        raise ValueError(msg)
    problems = []
    for task, count in (samples or {}).items():
        if count < processes:
            problems.append(
                f"task '{task}' has {count} training samples for {processes} processes: start {count} or fewer"
            )
        elif min(batch_size, count) % processes:
            problems.append(
                f"task '{task}' has {count} training samples, fewer than training.batch_size {batch_size}, so its "
                f"batch is all {count}, which {processes} processes cannot share equally: set training.batch_size to "
                f"at most {count - count % processes}"
            )
    if problems:
        msg = "Cannot share the batches among the processes:\n  - " + "\n  - ".join(problems)
        raise ValueError(msg)


def process_share(batch: torch.Tensor, rank: int, processes: int) -> torch.Tensor:
    """Process ``rank``'s share of a global batch: its ``rank``-th contiguous slice of ``len(batch) / processes``.

    The shares of all processes, in rank order, are the global batch (see :func:`check_process_shares`).
    """
    share = batch.shape[0] // processes
    return batch[rank * share : (rank + 1) * share]


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

    Under ``torchrun`` every process reads the images and draws the same synthetic anomalies (from the same seed, as
    one process draws them: cheap next to the teacher), while the teacher runs on the device of each process, on its
    share of the chunks only (:func:`~kd_ext.models.distributed.gather_chunks`); every process receives all outputs.

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
        device = process_device()
        model = task.teacher.to(device)

        def on_device(function: Callable) -> Callable[[torch.Tensor], list[torch.Tensor]]:
            return lambda chunk: [tensor.cpu() for tensor in function(model, chunk.to(device))]

        # Under torchrun the chunks are shared among the processes and gathered: every process gets all targets.
        targets.maps, targets.scores = gather_chunks(on_device(raw_predictions), images, batch_size)
        if features:
            targets.features = gather_chunks(on_device(teacher_features), images, batch_size)
        model.cpu()
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
    inputs = gather_chunks(model.trunk_features, normalised, batch_size)  # shared among torchrun's processes
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
    model: CrossTaskStudentModel,
    samples: dict[str, TaskSamples],
    batches: dict[str, torch.Tensor],
    window: Window | None,
) -> dict[str, list[torch.Tensor]]:
    """Every task's trunk features for its batch: one shared trunk pass (trainable, on the crop) or the cache."""
    device = next(model.heads.parameters()).device
    if not model.trunk_is_trainable:
        return {task: [level[batches[task]].to(device) for level in samples[task].inputs] for task in batches}
    images = torch.cat([samples[task].images[batches[task]] for task in batches]).to(device)
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
    model: CrossTaskStudentModel,
    task_samples: TaskSamples,
    batch: torch.Tensor,
    features: list[torch.Tensor],
    task: str,
    tau: torch.Tensor,
    step: "DistillationStep",
    window: Window | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One task's loss on its batch (and crop) and its parts: ``(total, map, score, feature)``.

    On a crop the score target stays the whole image's: the crop's top-k map logits stand in for the image's.
    """
    crop = window if window is not None else (lambda tensor: tensor)
    adapters, config = step.adapters, step.config
    map_logits, score_logits = model.heads[task](features)
    device = map_logits.device
    map_loss = soft_label_loss(map_logits, crop(task_samples.map_targets[batch].to(device)), tau, config.imbalance)
    score_loss = soft_label_loss(score_logits, task_samples.score_targets[batch].to(device), tau, config.imbalance)
    feature_loss = map_loss.new_zeros(())
    if task in adapters.adapters:
        adapted = adapters(task, features)
        targets = [crop(level[batch].to(device)) for level in task_samples.teacher_features[: len(adapted)]]
        feature_loss = feature_distillation_loss(adapted, targets)
    total = map_loss + config.score_weight * score_loss + config.feature_weight * feature_loss
    return total, map_loss, score_loss, feature_loss


class DistillationStep(nn.Module):
    """One training step's loss: the student's model and the training-only modules (what DDP wraps).

    Args:
        model: The student's model.
        adapters: Per-task feature adapters.
        temperature: Adaptive temperatures, or ``None`` for the fixed one.
        uncertainty: Uncertainty weighting, or ``None`` for fixed or DWA weights.
        samples: Cached samples per task (plain data, not module state).
        config: Training settings.
    """

    def __init__(
        self,
        model: CrossTaskStudentModel,
        adapters: FeatureAdapters,
        temperature: AdaptiveTemperature | None,
        uncertainty: UncertaintyWeighting | None,
        samples: dict[str, TaskSamples],
        config: TrainingConfig,
    ) -> None:
        super().__init__()
        self.model = model
        self.adapters = adapters
        self.temperature = temperature
        self.uncertainty = uncertainty
        self.samples = samples
        self.config = config
        self.fixed_temperature = torch.tensor(config.initial_temperature)

    def forward(
        self, batches: dict[str, torch.Tensor], window: Window | None, reversal: float, weights: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total of the tasks' losses on their batches, and every task's detached parts ``[K, 4]``.

        Args:
            batches: Sample indices per task (this process's share).
            window: The step's crop (``None``: whole images).
            reversal: The temperatures' gradient-reversal strength.
            weights: Fixed or DWA task weights (unused with uncertainty weighting).
        """
        tasks = list(batches)
        features = _trunk_features(self.model, self.samples, batches, window)
        taus = _temperatures(self.temperature, self.fixed_temperature, len(tasks), reversal)
        parts = [
            _task_loss(self.model, self.samples[task], batches[task], features[task], task, tau, self, window)
            for task, tau in zip(tasks, taus, strict=True)
        ]
        stacked = torch.stack([part[0] for part in parts])
        if self.uncertainty is not None:
            total = self.uncertainty(stacked)
        else:
            total = (torch.tensor(weights, device=stacked.device) * stacked).sum()
        return total, torch.stack([torch.stack(part) for part in parts]).detach()


def _record(
    epoch: int,
    tasks: list[str],
    means: torch.Tensor,
    weights: list[float],
    temperatures: list[float],
    reversal: float,
    steps: list[float],
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
        "steps": steps,
    }


def _global_means(
    sums: torch.Tensor, totals: list[torch.Tensor], processes: int, steps: int
) -> tuple[torch.Tensor, list[float]]:
    """The epoch's mean loss parts per task ``[K, 4]`` and every step's total, of the global batches.

    Every process's shares are equal, so the mean of the processes' losses is the global batch's.
    """
    if processes == 1:
        return sums / steps, torch.stack(totals).tolist()
    return (reduce_sum(sums) / processes / steps).cpu(), (reduce_sum(torch.stack(totals)) / processes).tolist()


def _step_modules(
    model: CrossTaskStudentModel, samples: dict[str, TaskSamples], config: TrainingConfig
) -> DistillationStep:
    """The training step with freshly initialised (seeded) adapters, temperatures and uncertainty weights."""
    tasks = list(samples)
    torch.manual_seed(config.seed)
    temperature = (
        AdaptiveTemperature(len(tasks), initial=config.initial_temperature)
        if config.temperature == TemperatureMode.adaptive
        else None
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
    return DistillationStep(model, adapters, temperature, uncertainty, samples, config)


def train_student(
    student: CrossTaskStudent,
    samples: dict[str, TaskSamples],
    config: TrainingConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train the student (trunk when trainable, heads, adapters) on every task's cached samples.

    Under torch.distributed (``torchrun``) every process trains on its share of each global batch on its device (see
    the module's description) and the history is the global batches'; the student ends on the CPU.

    Args:
        student: The student (train mode is set here, eval mode on return).
        samples: Cached samples per task name (same order as the student's tasks), the same on every process.
        config: Training settings: task weighting (fixed / DWA / uncertainty), temperature (fixed / adaptive),
            feature distillation, imbalance handling.
        log: Progress sink (one line per epoch).

    Returns:
        list[dict]: Per epoch: each task's mean unweighted loss and its parts, weight and temperature, and the
        weighted total loss of every step.

    Raises:
        ValueError: If the processes cannot share the batches equally (:func:`check_process_shares`).
    """
    model = student.model
    tasks = list(samples)
    processes, rank = world_size(), global_rank()
    check_process_shares(config.batch_size, processes, {task: len(samples[task]) for task in tasks})
    device = process_device()
    step = _step_modules(model, samples, config).to(device)
    dwa = (
        DynamicWeightAverage(len(tasks), config.dwa_temperature) if config.task_weighting == TaskWeighting.dwa else None
    )
    optimizer = torch.optim.Adam(
        [parameter for parameter in step.parameters() if parameter.requires_grad], lr=config.learning_rate
    )
    generator = torch.Generator().manual_seed(config.seed)
    cyclers = {task: _Cycler(len(samples[task]), config.batch_size, generator) for task in tasks}
    steps = math.ceil(max(len(task_samples) for task_samples in samples.values()) / config.batch_size)
    first = samples[tasks[0]]
    image_size = tuple((first.images if first.images is not None else first.map_targets).shape[-2:])
    history = []
    model.to(memory_format=torch.channels_last)
    model.train()
    runner: nn.Module = step
    if processes > 1:  # wrapped after the channels-last switch, so that DDP's gradient buckets match the layout
        use_global_batch_norm(model)
        device_ids = [device.index] if device.type == "cuda" else None
        runner = DistributedDataParallel(step, device_ids=device_ids, broadcast_buffers=False)
    try:
        for epoch in range(config.epochs):
            weights = dwa.weights() if dwa is not None else [1.0] * len(tasks)
            reversal = cosine_curriculum(epoch, config.epochs)
            sums = torch.zeros(len(tasks), 4, device=device)  # total, map, score, feature
            totals = []
            for _ in range(steps):
                batches = {task: process_share(cyclers[task].next(), rank, processes) for task in tasks}
                window = Window.random(image_size, config.crop_size, generator) if model.trunk_is_trainable else None
                total, parts = runner(batches, window, reversal, weights)
                sums += parts
                totals.append(total.detach())
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
            means, step_losses = _global_means(sums, totals, processes, steps)
            epoch_losses = means[:, 0].tolist()
            if dwa is not None:
                dwa.update(epoch_losses)
            if step.uncertainty is not None:
                weights = step.uncertainty.weights()
            temperatures = (
                step.temperature.values() if step.temperature is not None else [config.initial_temperature] * len(tasks)
            )
            history.append(_record(epoch, tasks, means, weights, temperatures, reversal, step_losses))
            log(
                f"epoch {epoch + 1}/{config.epochs} "
                + " ".join(
                    f"{task}: loss {loss:.4f} w {weight:.2f} tau {tau:.2f}"
                    for task, loss, weight, tau in zip(tasks, epoch_losses, weights, temperatures, strict=True)
                )
            )
    finally:
        del runner
        restore_batch_norm(model)
        model.to(device="cpu", memory_format=torch.contiguous_format)
        model.eval()
    return history


def adapter_parameters(student: CrossTaskStudent, samples: dict[str, TaskSamples]) -> int:
    """Parameters of the training-only feature adapters (reported, not deployed)."""
    adapters = FeatureAdapters(
        student.model.trunk_channels(),
        {task: [level.shape[1] for level in task_samples.teacher_features] for task, task_samples in samples.items()},
    )
    return sum(parameter.numel() for parameter in adapters.parameters())
