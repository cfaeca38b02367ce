"""The multi-task edge student: one shared trunk, one small anomaly head per task.

Two trunks (:class:`TrunkKind`):

* ``small`` (default): a narrow EfficientNet-Lite0-style net (width 0.5, up to ``blocks.4``; under half of the
  Lite0 teacher backbone's parameters and FLOPs at the same input size, see
  :func:`kd_ext.backbones.build_small_lite_trunk`), *trained* jointly on all tasks by distillation. Each task has a
  :class:`DistilledHead`: a small conv stack over the trunk's levels that outputs the map logit directly (no
  fitted statistics).
* ``frozen`` (the earlier student, kept as a baseline): EfficientNet-Lite0's own first stages with their ImageNet
  weights, frozen and shared; each task has a :class:`TaskHead` (fitted per-location normal statistics + a
  learned residual). With a frozen trunk the tasks never interact.

At inference the logit map is upsampled to the image size, smoothed (Gaussian, the teachers' sigma) and passed
through a sigmoid: maps and scores are probabilities whose 0.5 threshold is the teachers' calibrated one.
"""

import re
from collections.abc import Sequence
from enum import StrEnum

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from kd_ext.backbones import build_small_lite_trunk, get_backbone_spec
from kd_ext.backbones.registry import resolve_layers
from kd_ext.backbones.small_lite import SMALL_TRUNK_WIDTH
from kd_ext.kernels.reference import gaussian_blur
from kd_ext.models.components import build_teacher

TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class TrunkKind(StrEnum):
    """The student's shared trunk (member names equal values, as jsonargparse parses enums by name)."""

    small = "small"
    """Narrow EfficientNet-Lite0-style trunk, trained by distillation; :class:`DistilledHead` per task."""
    frozen = "frozen"
    """The frozen ImageNet backbone itself; :class:`TaskHead` (fitted normal statistics) per task."""


def trunk_kind(value: str) -> TrunkKind:
    """Parse a trunk name.

    Raises:
        ValueError: Naming the choices, if unknown.
    """
    try:
        return TrunkKind(value)
    except ValueError:
        msg = f"Unknown trunk '{value}'; choose one of {[kind.value for kind in TrunkKind]}."
        raise ValueError(msg) from None


def stack_levels(features: Sequence[torch.Tensor], aggregate: nn.Module) -> torch.Tensor:
    """Locally averaged trunk levels resized to the finest level's resolution, concatenated over channels."""
    size = features[0].shape[-2:]
    return torch.cat(
        [F.interpolate(aggregate(feature), size=size, mode="bilinear", align_corners=False) for feature in features],
        dim=1,
    )


def top_k_mean(map_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mean of the ``top_k`` highest logits of each map ``[N, 1, h, w]`` -> ``[N]``."""
    k = min(top_k, map_logits.shape[-2] * map_logits.shape[-1])
    return torch.topk(map_logits.flatten(1), k, dim=1).values.mean(dim=1)


def check_task_names(tasks: Sequence[str]) -> tuple[str, ...]:
    """Validate task names: at least one, unique, letters/digits/``_``/``-`` only.

    Args:
        tasks: Task names.

    Returns:
        tuple[str, ...]: The names.

    Raises:
        ValueError: If the list is empty, a name is invalid or repeated.
    """
    names = tuple(tasks)
    if not names:
        msg = "At least one task is needed."
        raise ValueError(msg)
    invalid = [name for name in names if not isinstance(name, str) or not TASK_NAME.match(name)]
    if invalid:
        msg = f"Invalid task names {invalid}: use letters, digits, '_' and '-' only (they name heads and IR outputs)."
        raise ValueError(msg)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        msg = f"Duplicate task names {duplicates}: every task needs its own name."
        raise ValueError(msg)
    return names


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


class DistilledHead(nn.Module):
    """Anomaly head of one task over the trainable trunk, trained by distillation only (no fitted statistics).

    The trunk levels are locally averaged (3x3), resized to the finest level and stacked; a 1x1 /
    depthwise-3x3 + 1x1 / 1x1 conv stack turns them into the map logit. The image-score logit is an affine
    function of the mean of the ``top_k`` highest map logits.

    Args:
        channels: Channels of each trunk level, shallow to deep.
        hidden_channels: Width of the conv stack.
        top_k: Number of highest map logits averaged into the image score.
        initial_logit: Starting map logit (the teachers' calibrated logit of a typical normal pixel).
    """

    def __init__(
        self,
        channels: Sequence[int],
        hidden_channels: int = 32,
        top_k: int = 10,
        initial_logit: float = -4.0,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.aggregate = nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)
        self.layers = nn.Sequential(
            nn.Conv2d(sum(channels), hidden_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1, groups=hidden_channels, bias=False),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 1, kernel_size=1),
        )
        nn.init.constant_(self.layers[-1].bias, initial_logit)
        self.score_scale = nn.Parameter(torch.ones(()))
        self.score_bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map logits ``[N, 1, h, w]`` (finest level's resolution) and score logits ``[N]``."""
        map_logits = self.layers(stack_levels(features, self.aggregate))
        return map_logits, self.score_scale * top_k_mean(map_logits, self.top_k) + self.score_bias


class CrossTaskStudentModel(nn.Module):
    """Shared trunk + one head per task.

    In training mode ``forward`` returns every task's logits; in eval mode it returns anomalib's
    ``InferenceBatch`` for the selected :attr:`task` (probability maps and scores).

    Args:
        tasks: Task names (one head each).
        trunk: ``"small"`` (trainable narrow trunk, :class:`DistilledHead`) or ``"frozen"`` (the frozen
            ``backbone`` itself, :class:`TaskHead`).
        backbone: The frozen trunk's backbone (``"efficientnet_lite0"``: offline ImageNet weights); the small trunk
            is always Lite0-style and uses Lite0's normalisation.
        layers: Trunk feature levels; ``None`` for the defaults (``blocks.1/2/4``).
        pre_trained: Load the trunk's ImageNet weights (sliced for the small trunk).
        width: Channel multiplier of the small trunk against Lite0.
        hidden_channels: Width of each head.
        image_size: Input ``(H, W)`` (fixes the frozen heads' normal-statistics resolution).
        sigma: Gaussian smoothing of the full-size map (the teachers').
        top_k: Map logits averaged into the score.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        trunk: str = TrunkKind.small,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        width: float = SMALL_TRUNK_WIDTH,
        hidden_channels: int = 32,
        image_size: tuple[int, int] = (256, 256),
        sigma: float = 4.0,
        top_k: int = 10,
    ) -> None:
        super().__init__()
        self.tasks = check_task_names(tasks)
        self.sigma = sigma
        self.trunk_kind = trunk_kind(trunk)
        levels_names = resolve_layers(get_backbone_spec(backbone), layers)
        if self.trunk_kind == TrunkKind.small:
            self.trunk = build_small_lite_trunk(width, levels_names, pre_trained)
        else:
            self.trunk = build_teacher(backbone, levels_names, pre_trained)
        was_training = self.trunk.training
        self.trunk.eval()
        with torch.no_grad():
            levels = self.trunk(torch.zeros(1, 3, *image_size))
        self.trunk.train(was_training and self.trunk_is_trainable)
        channels = [level.shape[1] for level in levels]
        if self.trunk_kind == TrunkKind.small:
            heads = {task: DistilledHead(channels, hidden_channels, top_k) for task in self.tasks}
        else:
            feature_size = tuple(levels[0].shape[-2:])
            heads = {task: TaskHead(channels, feature_size, hidden_channels, top_k) for task in self.tasks}
        self.heads = nn.ModuleDict(heads)
        self.task = self.tasks[0]

    @property
    def trunk_is_trainable(self) -> bool:
        """Whether distillation trains the shared trunk (the small trunk) or only the heads (the frozen one)."""
        return self.trunk_kind == TrunkKind.small

    def trunk_channels(self) -> list[int]:
        """Channels of each trunk level."""
        return self.trunk.channels()

    def select_task(self, task: str) -> None:
        """Choose the head used in eval mode.

        Args:
            task: One of :attr:`tasks`.

        Raises:
            ValueError: If the task is unknown.
        """
        if task not in self.heads:
            msg = f"Unknown task '{task}'; this student has heads for {list(self.tasks)}."
            raise ValueError(msg)
        self.task = task

    def train(self, mode: bool = True) -> "CrossTaskStudentModel":
        """Set training mode; a frozen trunk stays in eval mode (its BatchNorm statistics are ImageNet's)."""
        super().train(mode)
        if not self.trunk_is_trainable:
            self.trunk.eval()
        return self

    def trunk_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Shared trunk features of normalised images (without gradients for the frozen trunk)."""
        if self.trunk_is_trainable:
            return self.trunk(images)
        with torch.no_grad():
            return self.trunk(images)

    def head_logits(self, features: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Map and score logits of every task's head."""
        return {task: self.heads[task](features) for task in self.tasks}

    def predictions(self, map_logits: torch.Tensor, score_logits: torch.Tensor, size: Sequence[int]) -> InferenceBatch:
        """Probability map at image size (upsampled, smoothed) and probability score.

        Args:
            map_logits: Head map logits ``[N, 1, h, w]``.
            score_logits: Head score logits ``[N]``.
            size: Image ``(H, W)``.

        Returns:
            InferenceBatch: ``pred_score`` ``[N]`` and ``anomaly_map`` ``[N, 1, H, W]`` in ``[0, 1]``.
        """
        full = F.interpolate(map_logits, size=tuple(size), mode="bilinear", align_corners=False)
        anomaly_map = torch.sigmoid(gaussian_blur(full, self.sigma))
        return InferenceBatch(pred_score=torch.sigmoid(score_logits), anomaly_map=anomaly_map)

    def forward_all(self, images: torch.Tensor) -> dict[str, InferenceBatch]:
        """Every task's predictions from one trunk pass (what the multi-task IR computes)."""
        features = self.trunk(images)
        return {
            task: self.predictions(*logits, images.shape[-2:]) for task, logits in self.head_logits(features).items()
        }

    def forward(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | InferenceBatch:
        """Training: every head's ``(map_logits, score_logits)``; eval: the selected task's predictions."""
        if self.training:
            return self.head_logits(self.trunk_features(images))
        features = self.trunk(images)
        return self.predictions(*self.heads[self.task](features), images.shape[-2:])
