"""The multi-task edge student: one shared trainable trunk, one small anomaly head per task.

The trunk is a narrow EfficientNet-Lite0-style net (width 0.5, up to ``blocks.4``; under half of the Lite0 teacher
backbone's parameters and FLOPs at the same input size, see :func:`kd_ext.backbones.build_small_lite_trunk`),
*trained* jointly on all tasks by distillation. Each task has a :class:`DistilledHead`: a small conv stack over the
trunk's levels that outputs the map logit directly (no fitted statistics). :class:`FeatureAdapters` (training
only, not part of the student) map the trunk's levels to each teacher's for feature distillation.

At inference the logit map is upsampled to the image size, smoothed (Gaussian, the teachers' sigma) and passed
through a sigmoid: maps and scores are probabilities whose 0.5 threshold is the teachers' calibrated one.

Other trunks and heads plug in by subclassing :class:`CrossTaskStudentModel` (``build_trunk``, ``build_head``,
``trunk_is_trainable``); the frozen-trunk baseline of ``benchmarks/frozen_trunk.py`` does so.
"""

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from kd_ext.backbones import build_small_lite_trunk, get_backbone_spec
from kd_ext.backbones.registry import resolve_layers
from kd_ext.backbones.small_lite import SMALL_TRUNK_WIDTH
from kd_ext.kernels.reference import gaussian_blur

TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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
        backbone: Whose normalisation and level names the trunk follows (``"efficientnet_lite0"``); the small trunk
            is always Lite0-style.
        layers: Trunk feature levels; ``None`` for the defaults (``blocks.1/2/4``).
        pre_trained: Initialise the trunk from Lite0's ImageNet weights (sliced to the small trunk's width).
        width: Channel multiplier of the small trunk against Lite0.
        hidden_channels: Width of each head.
        image_size: Input ``(H, W)`` (the resolution the heads are built for).
        sigma: Gaussian smoothing of the full-size map (the teachers').
        top_k: Map logits averaged into the score.
    """

    trunk_name = "small"
    """Which trunk the student has (reported in ``report.json``)."""

    def __init__(
        self,
        tasks: Sequence[str],
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
        levels_names = resolve_layers(get_backbone_spec(backbone), layers)
        self.trunk = self.build_trunk(backbone, levels_names, width, pre_trained)
        was_training = self.trunk.training
        self.trunk.eval()
        with torch.no_grad():
            levels = self.trunk(torch.zeros(1, 3, *image_size))
        self.trunk.train(was_training and self.trunk_is_trainable)
        channels = [level.shape[1] for level in levels]
        feature_size = (int(levels[0].shape[-2]), int(levels[0].shape[-1]))
        self.heads = nn.ModuleDict(
            {task: self.build_head(channels, feature_size, hidden_channels, top_k) for task in self.tasks}
        )
        self.task = self.tasks[0]

    def build_trunk(self, backbone: str, layers: Sequence[str], width: float, pre_trained: bool) -> nn.Module:
        """The shared trunk: the small Lite0-style one (``backbone`` only names its levels here)."""
        del backbone
        return build_small_lite_trunk(width, layers, pre_trained)

    def build_head(
        self, channels: Sequence[int], feature_size: tuple[int, int], hidden_channels: int, top_k: int
    ) -> nn.Module:
        """One task's head over the trunk's levels: a :class:`DistilledHead` (``feature_size`` is not needed)."""
        del feature_size
        return DistilledHead(channels, hidden_channels, top_k)

    @property
    def trunk_is_trainable(self) -> bool:
        """Whether distillation trains the shared trunk (it does here; a frozen trunk of a subclass does not)."""
        return True

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

    def trunk_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Shared trunk features of normalised images, shallow to deep."""
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


class FeatureAdapters(nn.Module):
    """Per-task 1x1 convolutions from the trunk's levels to the teacher's (training only, not exported).

    Student level ``i`` is paired with teacher level ``i`` for as many levels as both have.

    Args:
        student_channels: Trunk channels per level.
        teacher_channels: Per task: the teacher's channels per level (empty: no adapter).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: dict[str, list[int]]) -> None:
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

    def forward(self, task: str, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Adapted trunk features of one task (as many levels as it has adapters)."""
        return [adapter(level) for adapter, level in zip(self.adapters[task], features, strict=False)]
