"""Distillation data (teacher soft targets on normal and synthetic images) and the training loop."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

from kd_ext.models.cross_task import CrossTaskStudent

from .config import TrainingConfig
from .losses import AdaptiveTemperature, DynamicWeightAverage, cosine_curriculum, soft_label_loss
from .tasks import PreparedTask, training_images
from .teachers import TeacherCalibration, raw_predictions


@dataclass
class TaskSamples:
    """One task's cached distillation samples.

    Attributes:
        inputs: Frozen-trunk features per level ``[M, C_l, h_l, w_l]``.
        map_targets: Teacher map logits at the head's resolution ``[M, 1, h, w]``.
        score_targets: Teacher score logits ``[M]``.
    """

    inputs: list[torch.Tensor]
    map_targets: torch.Tensor
    score_targets: torch.Tensor

    def __len__(self) -> int:
        return self.score_targets.shape[0]


def _in_batches(function: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int) -> list:
    return [function(images[start : start + batch_size]) for start in range(0, images.shape[0], batch_size)]


@torch.no_grad()
def build_task_samples(
    task: PreparedTask,
    student: CrossTaskStudent,
    synthetic_per_image: int,
    batch_size: int = 8,
) -> TaskSamples:
    """Run the teacher once on every normal training image and its Perlin synthetic anomalies.

    The teacher and the student's trunk are frozen, so the teacher's targets and the trunk's features are
    computed once here and reused every epoch; the task head's normal statistics are fitted on the clean images
    and its deviation calibration on all samples.

    Args:
        task: The task and its teacher.
        student: The student (its pre-processor and trunk).
        synthetic_per_image: Synthetic anomalies per normal image (anomalib's ``PerlinAnomalyGenerator``).
        batch_size: Inference batch size.

    Returns:
        TaskSamples: The cached samples.
    """
    clean = training_images(task)
    generator = PerlinAnomalyGenerator(probability=1.0)
    variants = [clean] + [generator(clean)[0].clamp(0, 1) for _ in range(synthetic_per_image)]
    images = torch.cat(variants)
    predictions = _in_batches(lambda chunk: raw_predictions(task.teacher, chunk), images, batch_size)
    maps = torch.cat([anomaly_map for anomaly_map, _ in predictions])
    scores = torch.cat([score for _, score in predictions])
    calibration = TeacherCalibration.fit(maps[: clean.shape[0]], scores[: clean.shape[0]])
    normalised = student.pre_processor.transform(images)
    model = student.model
    levels = _in_batches(model.trunk_features, normalised, batch_size)
    inputs = [torch.cat([chunk[level] for chunk in levels]) for level in range(len(levels[0]))]
    model.heads[task.name].fit_normal_statistics([level[: clean.shape[0]] for level in inputs])
    map_targets = F.adaptive_avg_pool2d(calibration.pixel_logits(maps).unsqueeze(1), inputs[0].shape[-2:])
    score_targets = calibration.score_logits(scores)
    model.heads[task.name].fit_calibration(inputs, map_targets, score_targets)
    return TaskSamples(inputs=inputs, map_targets=map_targets, score_targets=score_targets)


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


def train_student(
    student: CrossTaskStudent,
    samples: dict[str, TaskSamples],
    config: TrainingConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train the student's task heads on every task's cached samples.

    Each step takes one batch of every task; the loss is ``sum_k lambda_k * (L_map,k + w * L_score,k)`` with
    soft-label KL losses at temperature ``tau_k`` (fixed, or adaptive and adversarial) and task weights
    ``lambda_k`` (fixed 1, or DWA).

    Args:
        student: The student (train mode is set here).
        samples: Cached samples per task name (same order as the student's tasks).
        config: Training settings.
        log: Progress sink (one line per epoch).

    Returns:
        list[dict]: Per epoch: mean unweighted loss, weight and temperature of every task.
    """
    model = student.model
    tasks = list(samples)
    temperature = (
        AdaptiveTemperature(len(tasks), initial=config.initial_temperature)
        if config.temperature == "adaptive"
        else None
    )
    fixed_temperature = torch.tensor(config.initial_temperature)
    weighting = DynamicWeightAverage(len(tasks), config.dwa_temperature) if config.task_weighting == "dwa" else None
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if temperature is not None:
        parameters += list(temperature.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    cyclers = {task: _Cycler(len(samples[task]), config.batch_size, generator) for task in tasks}
    steps = math.ceil(max(len(task_samples) for task_samples in samples.values()) / config.batch_size)
    history = []
    model.train()
    for epoch in range(config.epochs):
        weights = weighting.weights() if weighting is not None else [1.0] * len(tasks)
        reversal = cosine_curriculum(epoch, config.epochs)
        sums = torch.zeros(len(tasks))
        for _ in range(steps):
            total = torch.zeros(())
            for index, task in enumerate(tasks):
                task_samples = samples[task]
                batch = cyclers[task].next()
                features = [level[batch] for level in task_samples.inputs]
                map_logits, score_logits = model.heads[task](features)
                tau = temperature(index, reversal) if temperature is not None else fixed_temperature
                loss = soft_label_loss(map_logits, task_samples.map_targets[batch], tau, config.imbalance)
                loss = loss + config.score_weight * soft_label_loss(
                    score_logits, task_samples.score_targets[batch], tau, config.imbalance
                )
                total = total + weights[index] * loss
                sums[index] += loss.item()
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        epoch_losses = (sums / steps).tolist()
        if weighting is not None:
            weighting.update(epoch_losses)
        temperatures = temperature.values() if temperature is not None else [config.initial_temperature] * len(tasks)
        record = {
            "epoch": epoch + 1,
            "loss": dict(zip(tasks, epoch_losses, strict=True)),
            "weight": dict(zip(tasks, weights, strict=True)),
            "temperature": dict(zip(tasks, temperatures, strict=True)),
        }
        history.append(record)
        log(
            f"epoch {epoch + 1}/{config.epochs} "
            + " ".join(
                f"{task}: loss {loss:.4f} w {weight:.2f} tau {tau:.2f}"
                for task, loss, weight, tau in zip(tasks, epoch_losses, weights, temperatures, strict=True)
            )
        )
    model.eval()
    return history
