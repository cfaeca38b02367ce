"""What every kd_ext model with a frozen multi-scale teacher shares: eval-mode teacher, level probing."""

import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from kd_ext.options import check_fraction, check_name

from .finetune import (
    DEFAULT_SCHEDULE,
    FinetuneReport,
    FinetuneSchedule,
    TeacherFinetune,
    finetune_teacher,
    resolve_teacher_finetune,
)
from .prior import PriorFusion

PROBE_SIZE = 256
"""Side of the blank image the teacher's feature levels are probed with."""


def check_score_options(score_mode: str, top_k_ratio: float, modes: Sequence[str]) -> None:
    """Refuse an image-score mode a model does not offer, or a top-k fraction outside ``(0, 1]``.

    Args:
        score_mode: Requested mode.
        top_k_ratio: Fraction of map values averaged by ``"topk"``.
        modes: The model's modes.

    Raises:
        ValueError: Naming the bad value and the allowed ones.
    """
    check_name(score_mode, modes, "score_mode")
    check_fraction(top_k_ratio, "top_k_ratio")


class FrozenTeacherModel(nn.Module):
    """Base of torch models whose ``teacher`` attribute stays in eval mode whatever mode the model is in.

    Subclasses assign ``self.teacher`` (see :func:`kd_ext.models.components.build_teacher`). Those with a
    normal-feature prior assign ``self.prior_fusion`` and implement ``_outputs`` (teacher features and the
    distillation map of images); :meth:`calibrate` then fits both on normal training images. Those that offer
    teacher fine-tuning call :meth:`setup_teacher_finetune`; :meth:`finetune_teachers` then adapts the teachers
    (:mod:`kd_ext.models.components.finetune`) once, before distillation.
    """

    teacher: nn.Module
    prior_fusion: PriorFusion | None  # assigned by subclasses (a submodule: no class-level default may shadow it)
    needs_calibration: bool = False
    teacher_finetune: TeacherFinetune = TeacherFinetune.NONE

    def setup_teacher_finetune(self, mode: TeacherFinetune | str | bool) -> None:
        """Choose how the teachers are prepared before distillation.

        With a mode other than ``"none"`` the model gets a ``teacher_finetuned`` buffer (saved in checkpoints) that
        records whether the adaptation has run, so a restored or resumed model is never adapted twice.

        Args:
            mode: A :class:`TeacherFinetune` mode, its value, or a boolean (``True`` = ``"synthetic"``).

        Raises:
            ValueError: If ``mode`` names no mode.
        """
        self.teacher_finetune = resolve_teacher_finetune(mode)
        if self.teacher_finetune is not TeacherFinetune.NONE:
            self.register_buffer("teacher_finetuned", torch.zeros((), dtype=torch.bool))

    @property
    def teacher_finetune_pending(self) -> bool:
        """Whether the teachers are to be adapted and have not been yet."""
        return self.teacher_finetune is not TeacherFinetune.NONE and not bool(self.teacher_finetuned)

    def finetuned_teachers(self) -> list[nn.Module]:
        """The teachers that fine-tuning adapts (models with several teachers return them all)."""
        return [self.teacher]

    def finetune_teachers(
        self,
        batches: Callable[[], Iterable[torch.Tensor]],
        normalise: Callable[[torch.Tensor], torch.Tensor],
        schedule: FinetuneSchedule = DEFAULT_SCHEDULE,
    ) -> list[FinetuneReport]:
        """Adapt every teacher to the normal training images once, then freeze it again (no-op when not pending).

        Args:
            batches: Returns a fresh iterable of normal training images in ``[0, 1]`` at the model's input size.
            normalise: The teachers' input normalisation.
            schedule: The adaptation's settings.

        Returns:
            list[FinetuneReport]: One report per adapted teacher (empty when nothing ran).
        """
        if not self.teacher_finetune_pending:
            return []
        reports = [finetune_teacher(teacher, batches, normalise, schedule) for teacher in self.finetuned_teachers()]
        self.teacher_finetuned.fill_(True)
        self.train(self.training)  # every teacher back in eval mode, whatever mode the model is in
        return reports

    def _outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def _teacher_features(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        """The teacher features the prior is fitted on (the teacher's output; models of other inputs adapt it)."""
        return self.teacher(images)

    @property
    def calibration_pending(self) -> bool:
        """Whether :meth:`calibrate` must run before scoring: training changed the model, or the prior is not fitted.

        A checkpoint written at the end of training, before the first validation or test, holds an unfitted prior;
        a model restored from it must be calibrated again rather than silently score without its prior.
        """
        fusion = getattr(self, "prior_fusion", None)
        return self.needs_calibration or (fusion is not None and not fusion.ready)

    @torch.no_grad()
    def calibrate(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        """Fit the prior (once: the teacher is frozen) and the maps' normal statistics on normal training images.

        Does nothing for a model without a prior. Runs in eval mode and restores the previous mode.

        Args:
            batches: Returns a fresh iterable of normalised normal training images ``[B, 3, H, W]`` each call
                (it is iterated once or twice).
        """
        fusion = getattr(self, "prior_fusion", None)
        if fusion is None:
            return
        was_training = self.training
        self.eval()
        try:
            fusion.calibrate(batches, self._teacher_features, self._outputs)
        finally:
            self.train(was_training)
        self.needs_calibration = False

    def train(self, mode: bool = True) -> "FrozenTeacherModel":
        """Set train/eval mode; the frozen teacher always stays in eval mode (its batch-norm statistics fixed).

        Args:
            mode: Train mode if ``True``, eval mode otherwise.

        Returns:
            FrozenTeacherModel: ``self``.
        """
        super().train(mode)
        self.teacher.eval()
        return self


def level_strides(features: Sequence[torch.Tensor], image_size: int) -> list[int]:
    """Strides of features computed from a square image of side ``image_size``.

    Args:
        features: Feature maps, one per level.
        image_size: Side of the image they were computed from.

    Returns:
        list[int]: Stride of each level (a power of two).
    """
    return [2 ** round(math.log2(image_size / feature.shape[-1])) for feature in features]


@torch.no_grad()
def probe_levels(teacher: nn.Module) -> tuple[list[int], list[int]]:
    """Channels and strides of the teacher's feature levels, from one blank ``PROBE_SIZE`` image.

    Args:
        teacher: Module returning a list of feature maps, shallow to deep.

    Returns:
        tuple[list[int], list[int]]: Channels and stride of each level.
    """
    features = teacher(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    return [feature.shape[1] for feature in features], level_strides(features, PROBE_SIZE)


def require_halving_strides(strides: Sequence[int], what: str) -> None:
    """Check that each feature level has half the resolution of the one before.

    Args:
        strides: Stride of each level, shallow to deep.
        what: The levels, as the error message should name them (e.g. ``"Feature levels ['blocks.1', ...]"``).

    Raises:
        ValueError: If two consecutive levels do not differ by a factor of two in stride.
    """
    if any(later != 2 * earlier for earlier, later in itertools.pairwise(strides)):
        msg = f"{what} have strides {list(strides)}; consecutive levels must halve the resolution."
        raise ValueError(msg)
