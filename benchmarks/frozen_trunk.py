"""The frozen-trunk prior student: a baseline of the cross-task benchmark (``benchmarks/cross_task.py``).

The earlier cross-task student, kept to compare against: EfficientNet-Lite0's own first stages with their ImageNet
weights as the shared trunk, frozen, and per task a :class:`TaskHead` (per-location normal statistics fitted on
the task's normal training images + a learned residual). Only the heads train (the tasks never interact, so the
task weighting is inert), by the same distillation as the small trainable student
(:class:`kd_ext.models.cross_task.CrossTaskDistillation`; no crops, no feature distillation). It is a
:class:`kd_ext.models.cross_task.CrossTaskStudent` with another torch model, so evaluation, the compute report and
the multi-task IR work unchanged.

Usage (as ``benchmarks/cross_task.py`` does)::

    student = build_student(names, image_size, StudentConfig(), student_class=FrozenTrunkStudent)
    samples = {name: build_task_samples(name, targets[name], student, training) for name in names}
    fit_frozen_heads(student, samples, {name: targets[name].clean_count for name in names})
    history = train_student(student, samples, training)
"""

from collections.abc import Sequence

import torch
from torch import nn

from kd_ext.distill.targets import TaskSamples
from kd_ext.models.components import build_teacher
from kd_ext.models.cross_task import CrossTaskStudent, CrossTaskStudentModel
from kd_ext.models.cross_task.torch_model import stack_levels, top_k_mean


class TaskHead(nn.Module):
    """Anomaly head of one task over the shared trunk's multi-scale features.

    The trunk levels are locally averaged (3x3), resized to the finest level and stacked. This task's normal
    statistics (per location and channel, fitted on its normal training images by :meth:`fit_normal_statistics`,
    not trained) standardise them; the mean squared standardised feature is a diagonal-Gaussian deviation score
    that carries over to defects of any kind. The map logit is an affine function of the log deviation (fitted to
    the teacher's logits by :meth:`fit_calibration`, then trained) plus a learned residual: a 1x1 /
    depthwise-3x3 + 1x1 / 1x1 conv stack over the stacked features, their standardisation and the per-level
    deviations, which starts at zero and learns where the teacher departs from the plain deviation.

    Args:
        channels: Channels of each trunk level, shallow to deep.
        feature_size: ``(h, w)`` of the finest level (the map's resolution).
        hidden_channels: Width of the residual conv stack.
        top_k: Number of highest map logits averaged into the image score.
    """

    def __init__(
        self,
        channels: Sequence[int],
        feature_size: tuple[int, int],
        hidden_channels: int = 32,
        top_k: int = 10,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.level_channels = tuple(int(count) for count in channels)
        total = sum(channels)
        self.aggregate = nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)
        self.register_buffer("normal_mean", torch.zeros(1, total, *feature_size))
        self.register_buffer("normal_std", torch.ones(1, total, *feature_size))
        self.residual = nn.Sequential(
            nn.Conv2d(2 * total + len(channels), hidden_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1, groups=hidden_channels, bias=False),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden_channels, 1, kernel_size=1),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)
        self.deviation_scale = nn.Parameter(torch.ones(()))
        self.deviation_bias = nn.Parameter(torch.zeros(()))
        self.score_scale = nn.Parameter(torch.ones(()))
        self.score_bias = nn.Parameter(torch.zeros(()))

    def stack(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Locally averaged trunk levels at the finest resolution, concatenated over channels."""
        return stack_levels(features, self.aggregate)

    @torch.no_grad()
    def fit_normal_statistics(self, features: Sequence[torch.Tensor], batch_size: int = 32) -> None:
        """Fit the per-location mean and standard deviation of this task's normal images' features.

        Args:
            features: Trunk features of normal images, per level ``[N, C_l, h_l, w_l]``.
            batch_size: Images stacked at a time.
        """
        count = features[0].shape[0]
        total = torch.zeros_like(self.normal_mean, dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, count, batch_size):
            stacked = self.stack([level[start : start + batch_size] for level in features]).double()
            total += stacked.sum(dim=0, keepdim=True)
            squares += stacked.square().sum(dim=0, keepdim=True)
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0)
        # Few normal images, near-constant locations: add the channel's mean variance, so that no location's
        # standardisation divides by a tiny spread (it would amplify noise and rounding into large logits).
        floor = variance.mean(dim=(2, 3), keepdim=True) + 1e-6
        self.normal_mean.copy_(mean.float())
        self.normal_std.copy_((variance + floor).sqrt().float())

    def deviations(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Stacked features, their standardisation and the deviation scores.

        Args:
            features: Trunk features per level ``[N, C_l, h_l, w_l]``.

        Returns:
            tuple: ``(stacked, standardised)`` concatenated ``[N, 2C, h, w]``, the log total deviation
            ``[N, 1, h, w]`` and the per-level ``log(1 + deviation)`` maps.
        """
        stacked = self.stack(features)
        standardised = (stacked - self.normal_mean) / self.normal_std
        blocks = torch.split(standardised, self.level_channels, dim=1)
        per_level = [block.square().mean(dim=1, keepdim=True) for block in blocks]
        log_total = torch.log(torch.stack(per_level).sum(dim=0) + 1e-6)
        return torch.cat([stacked, standardised], dim=1), log_total, [torch.log1p(level) for level in per_level]

    @torch.no_grad()
    def fit_calibration(
        self,
        features: Sequence[torch.Tensor],
        map_targets: torch.Tensor,
        score_targets: torch.Tensor,
        batch_size: int = 32,
    ) -> None:
        """Least-squares start for the deviation and score affines against the teacher's logits.

        Args:
            features: Trunk features per level ``[M, C_l, h_l, w_l]``.
            map_targets: Teacher map logits at the head's resolution ``[M, 1, h, w]``.
            score_targets: Teacher score logits ``[M]``.
            batch_size: Samples at a time.
        """

        def line(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
            x, y = x.double().flatten(), y.double().flatten()
            variance = x.var(unbiased=False)
            slope = ((x - x.mean()) * (y - y.mean())).mean() / variance if variance > 0 else torch.tensor(1.0)
            slope = max(float(slope), 1e-3)  # keep the deviation's ranking (more deviation, more anomalous)
            return slope, float(y.mean() - slope * x.mean())

        log_totals = torch.cat(
            [
                self.deviations([level[start : start + batch_size] for level in features])[1]
                for start in range(0, features[0].shape[0], batch_size)
            ]
        )
        scale, bias = line(log_totals, map_targets)
        self.deviation_scale.fill_(scale)
        self.deviation_bias.fill_(bias)
        peaks = self._peak(scale * log_totals + bias)
        scale, bias = line(peaks, score_targets)
        self.score_scale.fill_(scale)
        self.score_bias.fill_(bias)

    def _peak(self, map_logits: torch.Tensor) -> torch.Tensor:
        return top_k_mean(map_logits, self.top_k)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map and score logits.

        Args:
            features: Trunk features, shallow (finest) to deep.

        Returns:
            tuple: Map logits ``[N, 1, h, w]`` at the finest level's resolution and score logits ``[N]``.
        """
        both, log_total, per_level = self.deviations(features)
        map_logits = (
            self.deviation_scale * log_total + self.deviation_bias + self.residual(torch.cat([both, *per_level], 1))
        )
        return map_logits, self.score_scale * self._peak(map_logits) + self.score_bias


class FrozenTrunkStudentModel(CrossTaskStudentModel):
    """:class:`CrossTaskStudentModel` on the frozen ImageNet ``backbone`` itself, with a :class:`TaskHead` per task.

    The trunk stays in eval mode (its batch-norm statistics are ImageNet's) and runs without gradients.
    """

    trunk_name = "frozen"

    def build_trunk(self, backbone: str, layers: Sequence[str], width: float, pre_trained: bool) -> nn.Module:
        """The frozen backbone's first stages (``width`` does not apply)."""
        del width
        return build_teacher(backbone, layers, pre_trained)

    def build_head(
        self, channels: Sequence[int], feature_size: tuple[int, int], hidden_channels: int, top_k: int
    ) -> nn.Module:
        """A :class:`TaskHead` (normal statistics at the finest level's ``feature_size``)."""
        return TaskHead(channels, feature_size, hidden_channels, top_k)

    @property
    def trunk_is_trainable(self) -> bool:
        """The trunk never trains."""
        return False

    def train(self, mode: bool = True) -> "FrozenTrunkStudentModel":
        """Set training mode; the frozen trunk stays in eval mode."""
        super().train(mode)
        self.trunk.eval()
        return self

    def trunk_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen trunk's features, without gradients."""
        with torch.no_grad():
            return self.trunk(images)


class FrozenTrunkStudent(CrossTaskStudent):
    """The frozen-trunk prior student as an anomalib model (see :class:`FrozenTrunkStudentModel`)."""

    model_class = FrozenTrunkStudentModel


@torch.no_grad()
def fit_frozen_heads(
    student: FrozenTrunkStudent, samples: dict[str, TaskSamples], clean_counts: dict[str, int], batch_size: int = 8
) -> None:
    """Fit every head's normal statistics (on the task's clean images) and calibration (on all its samples).

    Args:
        student: The frozen-trunk student.
        samples: Samples per task (clean images first, as :func:`kd_ext.distill.targets.build_task_samples` gives).
        clean_counts: Clean images per task.
        batch_size: Images through the trunk at a time.
    """
    model = student.model.eval()
    for task, task_samples in samples.items():
        images = task_samples.images
        chunks = [model.trunk(images[start : start + batch_size]) for start in range(0, images.shape[0], batch_size)]
        inputs = [torch.cat(levels) for levels in zip(*chunks, strict=True)]
        head = model.heads[task]
        head.fit_normal_statistics([level[: clean_counts[task]] for level in inputs])
        head.fit_calibration(inputs, task_samples.map_targets, task_samples.score_targets)
