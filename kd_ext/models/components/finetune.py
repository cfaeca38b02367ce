"""Adapting a pretrained teacher to the target domain before distillation, without letting it collapse.

A frozen ImageNet teacher describes a small, domain-specific set (greyscale brain MRI slices, say) with features
that were learnt for natural photographs. Fine-tuning it on the normal training images can make it describe the
domain better, but the obvious way — training it together with the students on the distillation loss — lets teacher
and student agree on a trivial answer (constant features give zero loss and detect nothing). The adaptation here
therefore never sees the distillation loss and runs *before* distillation, as a separate, short stage:

1. **A self-supervised task with negatives.** Every normal training image is paired with a synthetic anomaly made
   from it by anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator` (DRAEM-style Perlin
   masks blended with augmented noise textures). A 1x1-convolution head on each trained level predicts, at every
   location, the fraction of it covered by the synthetic anomaly (binary cross-entropy; normal images are all zero).
   Constant or input-independent features cannot solve it, so the objective has no collapsed optimum; it asks the
   features to separate normal tissue from locally irregular structure, which is what the students are later judged
   on.
2. **Last stages only.** The stem and early stages (generic edge and texture filters) stay frozen; only the last
   :attr:`FinetuneSchedule.stages` stages of the teacher are trained. Batch-norm layers keep their ImageNet
   statistics (the teacher stays in eval mode): batches of a few images would give noisy statistics.
3. **L2-SP.** The loss adds ``l2sp_weight / 2 * ||w - w_pretrained||^2`` over the trained weights (Li et al.,
   "Explicit inductive bias for transfer learning", ICML 2018): the starting point is the prior, so the teacher stays
   close to its ImageNet features and a small training set cannot drag it far.
4. **Frozen again.** Afterwards the head is discarded, every teacher parameter gets ``requires_grad=False`` and the
   teacher returns to eval mode; distillation then proceeds exactly as with the frozen ImageNet teacher. The adapted
   weights are part of the model's state, so checkpoints save and restore them; a flag buffer records that the stage
   ran, so resuming a fit never adapts twice.

The schedule (:data:`DEFAULT_SCHEDULE`) was fixed before any test image was scored; no label enters the stage.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn
from torch.nn import functional as F  # noqa: N812


class TeacherFinetune(str, Enum):
    """How the teacher is prepared before distillation.

    Attributes:
        NONE: The pretrained teacher is used frozen, as it is (default).
        SYNTHETIC: Its last stages are adapted to the normal training images by synthetic-anomaly segmentation with
            an L2-SP penalty, then frozen again (see :mod:`kd_ext.models.components.finetune`).
    """

    NONE = "none"
    SYNTHETIC = "synthetic"


def resolve_teacher_finetune(value: "TeacherFinetune | str | bool") -> TeacherFinetune:
    """The fine-tuning mode named by ``value`` (``True`` means ``"synthetic"``, ``False`` means ``"none"``).

    Args:
        value: A :class:`TeacherFinetune`, its value, or a boolean.

    Returns:
        TeacherFinetune: The mode.

    Raises:
        ValueError: If ``value`` names no mode.
    """
    if isinstance(value, bool):
        return TeacherFinetune.SYNTHETIC if value else TeacherFinetune.NONE
    if isinstance(value, str):
        try:
            return TeacherFinetune(value.lower())
        except ValueError:
            pass
    choices = ", ".join(repr(mode.value) for mode in TeacherFinetune)
    msg = f"Unknown teacher_finetune {value!r}; choose one of {choices} (or True / False)."
    raise ValueError(msg)


@dataclass(frozen=True)
class FinetuneSchedule:
    """Settings of the adaptation stage.

    Attributes:
        epochs: Passes over the normal training images.
        learning_rate: Adam learning rate of the trained stages and the head.
        l2sp_weight: Weight of the L2-SP penalty towards the pretrained weights.
        stages: Number of last teacher stages trained (the others stay frozen).
    """

    epochs: int = 5
    learning_rate: float = 1e-4
    l2sp_weight: float = 0.1
    stages: int = 2

    def __post_init__(self) -> None:
        """Refuse settings that cannot run.

        Raises:
            ValueError: Naming the bad setting.
        """
        if self.epochs < 1 or self.stages < 1:
            msg = f"The fine-tuning schedule needs epochs >= 1 and stages >= 1, got {self.epochs} and {self.stages}."
            raise ValueError(msg)
        if self.learning_rate <= 0 or self.l2sp_weight < 0:
            msg = (
                f"The fine-tuning schedule needs learning_rate > 0 and l2sp_weight >= 0, got {self.learning_rate} and "
                f"{self.l2sp_weight}."
            )
            raise ValueError(msg)


DEFAULT_SCHEDULE = FinetuneSchedule()


@dataclass(frozen=True)
class FinetuneReport:
    """What one teacher's adaptation did.

    Attributes:
        steps: Optimiser steps taken.
        first_loss: Segmentation loss of the first batch.
        last_loss: Mean segmentation loss of the last epoch.
        weight_shift: ``||w - w_pretrained|| / ||w_pretrained||`` over the trained weights at the end.
    """

    steps: int
    first_loss: float
    last_loss: float
    weight_shift: float


class SyntheticAnomalyHead(nn.Module):
    """One 1x1 convolution per trained level: the logit that a location belongs to a synthetic anomaly.

    Args:
        channels: Channels of each trained level.
    """

    def __init__(self, channels: Iterable[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(channel, 1, kernel_size=1) for channel in channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logit maps ``[B, 1, h, w]``, one per level."""
        return [head(feature) for head, feature in zip(self.heads, features, strict=True)]


def _staged_features(teacher: nn.Module, images: torch.Tensor, first_trained: int) -> list[torch.Tensor]:
    """Outputs of the trained stages; the frozen stages before them run without building a graph."""
    hidden = images
    outputs = []
    for index, (stage, adapter) in enumerate(zip(teacher.stages, teacher.adapters, strict=True)):
        if index < first_trained:
            with torch.no_grad():
                hidden = adapter(stage(hidden))
        else:
            hidden = adapter(stage(hidden))
            outputs.append(hidden)
    return outputs


def synthetic_pairs(
    images: torch.Tensor, generator: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal images followed by a synthetic anomaly of each, and the anomaly masks (zero for the normal ones).

    Args:
        images: Normal images in ``[0, 1]``, ``[B, 3, H, W]``.
        generator: Returns anomalous images and their masks ``[B, 1, H, W]`` (anomalib's Perlin generator).

    Returns:
        tuple: Images ``[2B, 3, H, W]`` in ``[0, 1]`` and masks ``[2B, 1, H, W]``.
    """
    anomalous, masks = generator(images)
    images = torch.cat([images, anomalous.clamp(0, 1)])
    masks = torch.cat([torch.zeros_like(masks), masks.float()])
    return images, masks


def finetune_teacher(
    teacher: nn.Module,
    batches: Callable[[], Iterable[torch.Tensor]],
    normalise: Callable[[torch.Tensor], torch.Tensor],
    schedule: FinetuneSchedule = DEFAULT_SCHEDULE,
) -> FinetuneReport:
    """Adapt the last stages of a staged teacher to normal images by synthetic-anomaly segmentation with L2-SP.

    The teacher is changed in place and left frozen (every parameter ``requires_grad=False``, eval mode).

    Args:
        teacher: A :class:`~kd_ext.backbones.StagedFeatureExtractor` (``stages`` and ``adapters``).
        batches: Returns a fresh iterable of normal training images in ``[0, 1]`` at the model's input size each call
            (iterated once per epoch).
        normalise: The teacher's input normalisation (applied after the synthetic anomalies are drawn).
        schedule: Epochs, learning rate, L2-SP weight and number of trained stages.

    Returns:
        FinetuneReport: Steps, losses and how far the trained weights moved.

    Raises:
        RuntimeError: If ``batches`` yields no images.
    """
    first_trained = max(0, len(teacher.stages) - schedule.stages)
    trained = [parameter for stage in teacher.stages[first_trained:] for parameter in stage.parameters()]
    pretrained = [parameter.detach().clone() for parameter in trained]
    device = trained[0].device if trained else torch.device("cpu")
    teacher.eval()
    head = SyntheticAnomalyHead(teacher.channels()[first_trained:]).to(device)
    optimizer = torch.optim.Adam([*trained, *head.parameters()], lr=schedule.learning_rate)
    generator = PerlinAnomalyGenerator(probability=1.0)
    steps, first_loss, epoch_losses = 0, float("nan"), [float("nan")]
    try:
        for parameter in trained:
            parameter.requires_grad_(True)
        for _ in range(schedule.epochs):
            epoch_losses = []
            for raw in batches():
                images, masks = synthetic_pairs(raw.to(device), generator)
                logits = head(_staged_features(teacher, normalise(images), first_trained))
                segmentation = torch.stack(
                    [
                        F.binary_cross_entropy_with_logits(logit, F.adaptive_avg_pool2d(masks, logit.shape[-2:]))
                        for logit in logits
                    ]
                ).mean()
                penalty = sum(((p - p0).square().sum() for p, p0 in zip(trained, pretrained, strict=True)), start=0.0)
                loss = segmentation + schedule.l2sp_weight / 2 * penalty
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                epoch_losses.append(float(segmentation.detach()))
                if steps == 1:
                    first_loss = float(segmentation.detach())
            if not epoch_losses:
                msg = "Teacher fine-tuning found no normal training images; give the trainer a training set."
                raise RuntimeError(msg)
    finally:
        freeze(teacher)
    with torch.no_grad():
        shift = torch.stack([(p - p0).square().sum() for p, p0 in zip(trained, pretrained, strict=True)]).sum().sqrt()
        norm = torch.stack([p0.square().sum() for p0 in pretrained]).sum().sqrt().clamp_min(1e-12)
    return FinetuneReport(
        steps=steps,
        first_loss=first_loss,
        last_loss=sum(epoch_losses) / len(epoch_losses),
        weight_shift=float(shift / norm),
    )


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter of ``module`` and put it in eval mode."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


def batches_at_size(
    batches: Callable[[], Iterable[torch.Tensor]], size: tuple[int, int] | None
) -> Callable[[], Iterator[torch.Tensor]]:
    """``batches`` resized to ``size`` (bilinear, antialiased), so synthetic anomalies are drawn at the model's size."""

    def resized() -> Iterator[torch.Tensor]:
        for images in batches():
            if size is None or tuple(images.shape[-2:]) == tuple(size):
                yield images
            else:
                yield F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)

    return resized
