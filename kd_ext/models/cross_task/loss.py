"""Cross-task distillation losses: soft labels, features, adaptive temperature and dynamic task weights.

* :func:`soft_label_loss`: binary KL divergence between the teacher's and the student's per-pixel (or per-image)
  anomaly probabilities, both softened by a temperature ``tau`` and scaled by ``tau**2`` (Hinton et al.), with
  class-balanced weights so that the few anomalous pixels count as much as the many normal ones.
* :class:`AdaptiveTemperature`: one learnable temperature per task, ``tau = tau_min + (tau_max - tau_min) *
  sigmoid(theta)``, trained *adversarially* through a gradient-reversal layer whose strength follows a cosine
  curriculum (CTKD, Li et al. 2023): the temperature moves to where distillation is hardest for the student.
* :class:`DynamicWeightAverage`: task weights ``lambda_k = K * softmax(r_k / T)``, ``r_k = L_k(t-1) / L_k(t-2)``
  from the last two epochs' mean losses (Liu et al. 2019): a task whose loss falls slowly gets more weight.
* :class:`UncertaintyWeighting`: ``sum_k exp(-s_k) L_k + s_k`` with a learnable log-variance ``s_k`` per task
  (Kendall et al. 2018): a task whose loss stays high is down-weighted, at a cost that stops ``s_k`` running off.
* :func:`feature_distillation_loss`: ``1 - cosine`` over channels between the student trunk's adapted features
  and a teacher's intermediate features, per location and level (the discrepancy the teachers themselves score).
"""

import math
from collections.abc import Sequence
from enum import StrEnum

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from kd_ext.models.distributed import reduce_sum


class TaskWeighting(StrEnum):
    """How the tasks' losses are weighted in the shared trunk's loss (member names equal values)."""

    fixed = "fixed"
    dwa = "dwa"
    uncertainty = "uncertainty"


class TemperatureMode(StrEnum):
    """Distillation temperature: fixed, or learnable per task with the CTKD curriculum."""

    fixed = "fixed"
    adaptive = "adaptive"


class Imbalance(StrEnum):
    """Class imbalance handling of the soft-label loss."""

    balanced = "balanced"
    none = "none"


IMBALANCE_MODES = tuple(mode.value for mode in Imbalance)


def class_balance_weights(teacher_logits: torch.Tensor, max_weight: float = 50.0) -> torch.Tensor:
    """Weights that give the anomalous and the normal elements half of the loss each.

    An element is anomalous when the teacher's probability is above 0.5 (``teacher_logits > 0``). Without any
    anomalous (or any normal) element every weight is 1. Under torch.distributed the fraction of anomalous elements
    is the global batch's (the counts of every process summed), so every process calls this in step.

    Args:
        teacher_logits: Teacher logits of any shape.
        max_weight: Cap on a weight, so that one anomalous pixel in a batch cannot dominate.

    Returns:
        torch.Tensor: Weights of the same shape, mean 1 before capping.
    """
    positive = teacher_logits > 0
    counts = reduce_sum(torch.stack([positive.sum(), torch.tensor(positive.numel(), device=positive.device)]))
    fraction = counts[0].float() / counts[1].float()
    if fraction.item() in (0.0, 1.0):
        return torch.ones_like(teacher_logits)
    weights = torch.where(positive, 0.5 / fraction, 0.5 / (1 - fraction))
    return weights.clamp(max=max_weight)


def soft_label_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: torch.Tensor | float,
    imbalance: str = "balanced",
) -> torch.Tensor:
    """Temperature-scaled binary KL divergence between teacher and student anomaly probabilities.

    Args:
        student_logits: Student logits (any shape).
        teacher_logits: Teacher logits of the same shape (see
            :class:`~kd_ext.distill.teachers.TeacherCalibration`).
        temperature: ``tau >= 1`` (a scalar tensor when learnt).
        imbalance: ``"balanced"`` (class-balanced weights, :func:`class_balance_weights`) or ``"none"``.

    Returns:
        torch.Tensor: Scalar loss, ``tau**2 * mean(weight * KL)``; zero when the student matches the teacher.

    Raises:
        ValueError: If the shapes differ or ``imbalance`` is unknown.
    """
    if student_logits.shape != teacher_logits.shape:
        msg = f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ."
        raise ValueError(msg)
    if imbalance not in IMBALANCE_MODES:
        msg = f"Unknown imbalance mode '{imbalance}'; choose one of {IMBALANCE_MODES}."
        raise ValueError(msg)
    teacher_soft = teacher_logits / temperature
    student_soft = student_logits / temperature
    target = torch.sigmoid(teacher_soft)
    # KL(p_t || p_s) for Bernoulli distributions = BCE(p_s, p_t) - H(p_t).
    cross_entropy = F.binary_cross_entropy_with_logits(student_soft, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_soft, target, reduction="none")
    divergence = cross_entropy - entropy
    if imbalance == "balanced":
        divergence = divergence * class_balance_weights(teacher_logits.detach())
    return divergence.mean() * temperature**2


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, value: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return value.view_as(value)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None  # type: ignore[attr-defined]


def gradient_reversal(value: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward.

    Args:
        value: Input tensor.
        scale: Strength of the reversal (0 stops the gradient).

    Returns:
        torch.Tensor: ``value``.
    """
    return _GradientReversal.apply(value, scale)


def cosine_curriculum(epoch: int, epochs: int, start: float = 0.0, end: float = 1.0) -> float:
    """Reversal strength rising from ``start`` to ``end`` along half a cosine over training (CTKD's curriculum).

    Args:
        epoch: Current epoch (0-based).
        epochs: Total epochs.
        start: Strength at the first epoch.
        end: Strength at the last epoch.

    Returns:
        float: The strength for ``epoch``.
    """
    progress = min(max(epoch / max(epochs - 1, 1), 0.0), 1.0)
    return start + (end - start) * (1 - math.cos(math.pi * progress)) / 2


class AdaptiveTemperature(nn.Module):
    """One learnable distillation temperature per task, trained against the student (CTKD).

    Args:
        num_tasks: Number of tasks.
        initial: Starting temperature.
        minimum: Smallest temperature.
        maximum: Largest temperature.
    """

    def __init__(self, num_tasks: int, initial: float = 4.0, minimum: float = 1.0, maximum: float = 21.0) -> None:
        super().__init__()
        if not minimum < initial < maximum:
            msg = f"The initial temperature {initial} must lie strictly between {minimum} and {maximum}."
            raise ValueError(msg)
        self.minimum = minimum
        self.maximum = maximum
        fraction = (initial - minimum) / (maximum - minimum)
        self.theta = nn.Parameter(torch.full((num_tasks,), math.log(fraction / (1 - fraction))))

    def forward(self, task_index: int, reversal_scale: float) -> torch.Tensor:
        """The temperature of one task; its gradient is reversed (scaled by ``reversal_scale``).

        Args:
            task_index: Index of the task.
            reversal_scale: Current curriculum strength (:func:`cosine_curriculum`).

        Returns:
            torch.Tensor: Scalar temperature.
        """
        theta = gradient_reversal(self.theta[task_index], reversal_scale)
        return self.minimum + (self.maximum - self.minimum) * torch.sigmoid(theta)

    def values(self) -> list[float]:
        """Current temperatures of all tasks."""
        with torch.no_grad():
            return (self.minimum + (self.maximum - self.minimum) * torch.sigmoid(self.theta)).tolist()


class DynamicWeightAverage:
    """Dynamic Weight Average task weighting (Liu et al., "End-to-End Multi-Task Learning with Attention").

    ``lambda_k = K * softmax_k(r_k / T)`` with ``r_k = L_k(t-1) / L_k(t-2)``, the ratio of the task's mean loss
    in the last two epochs. Weights are 1 for the first two epochs.

    Args:
        num_tasks: Number of tasks ``K``.
        temperature: Softmax temperature ``T`` (larger: closer to equal weights).
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        if temperature <= 0:
            msg = f"The DWA temperature must be positive, got {temperature}."
            raise ValueError(msg)
        self.num_tasks = num_tasks
        self.temperature = temperature
        self.history: list[list[float]] = []

    def weights(self) -> list[float]:
        """The task weights for the coming epoch (they sum to ``K``)."""
        if len(self.history) < 2:
            return [1.0] * self.num_tasks
        ratios = torch.tensor(self.history[-1]) / torch.tensor(self.history[-2]).clamp_min(1e-12)
        return (self.num_tasks * torch.softmax(ratios / self.temperature, dim=0)).tolist()

    def update(self, epoch_losses: list[float]) -> None:
        """Record one epoch's mean loss of every task.

        Args:
            epoch_losses: Mean (unweighted) loss per task.
        """
        if len(epoch_losses) != self.num_tasks:
            msg = f"Expected {self.num_tasks} task losses, got {len(epoch_losses)}."
            raise ValueError(msg)
        self.history.append([float(loss) for loss in epoch_losses])


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty task weighting (Kendall, Gal and Cipolla, CVPR 2018).

    ``total = sum_k exp(-s_k) * L_k + s_k`` with one learnable ``s_k = log sigma_k^2`` per task, starting at 0
    (weight 1). Minimising it sets ``exp(-s_k)`` near ``1 / L_k``.

    Args:
        num_tasks: Number of tasks.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.log_variance = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """The weighted total of the task losses ``[K]``."""
        return (torch.exp(-self.log_variance) * losses + self.log_variance).sum()

    def weights(self) -> list[float]:
        """Current task weights ``exp(-s_k)``."""
        with torch.no_grad():
            return torch.exp(-self.log_variance).tolist()


def feature_distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean ``1 - cosine`` over channels between adapted student features and teacher features, over levels.

    Each student level is resized (bilinear) to its teacher level's resolution first.

    Args:
        student: Adapted student features per level ``[N, C_l, h, w]``.
        teacher: Teacher features per level ``[N, C_l, H_l, W_l]`` (same channels).

    Returns:
        torch.Tensor: Scalar loss in ``[0, 2]``; zero when every adapted feature points along the teacher's.

    Raises:
        ValueError: If the number of levels or the channels differ.
    """
    if len(student) != len(teacher) or not student:
        msg = f"Got {len(student)} student and {len(teacher)} teacher feature levels; they must pair up (>= 1)."
        raise ValueError(msg)
    losses = []
    for level, target in zip(student, teacher, strict=True):
        if level.shape[1] != target.shape[1]:
            msg = f"Adapted student features have {level.shape[1]} channels, the teacher's {target.shape[1]}."
            raise ValueError(msg)
        adapted = level
        if adapted.shape[-2:] != target.shape[-2:]:
            adapted = F.interpolate(level, size=target.shape[-2:], mode="bilinear", align_corners=False)
        losses.append((1 - F.cosine_similarity(adapted, target, dim=1)).mean())
    return torch.stack(losses).mean()
