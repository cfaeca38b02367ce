"""The cross-task student as an anomalib model (test, predict and export one task at a time).

The student is trained by distillation from task teachers (``kd-ext distill --config CONFIG``, or
:func:`kd_ext.models.cross_task.distill.distill`), not by ``Engine.fit``; once trained it is an ordinary anomalib model
with a task selector:

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from kd_ext.models import CrossTaskStudent
    >>> student = CrossTaskStudent.load_from_checkpoint("runs/cross_task/student.ckpt")  # doctest: +SKIP
    >>> student.select_task("bottle")  # doctest: +SKIP
    >>> Engine().test(student, datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))  # doctest: +SKIP
"""

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from kd_ext.models.base import KDExtModelMixin
from kd_ext.models.checkpoint import teacher_pre_processor

from .torch_model import CrossTaskStudentModel, TrunkKind

ARCHITECTURE_KEYS = ("tasks", "trunk", "backbone", "layers", "width", "hidden_channels", "image_size", "top_k")
CALIBRATED_THRESHOLD = 0.5
"""Threshold of the student's probabilities: the teachers' calibrated threshold maps to 0.5."""


class CalibratedPostProcessor(PostProcessor):
    """Post-processor for outputs that are already calibrated probabilities (threshold 0.5, no normalisation).

    The student's heads are trained against teacher targets whose 0.5 point is the teacher's calibrated
    threshold, so the same threshold holds for every task and no validation statistics are needed.
    """

    def __init__(self) -> None:
        super().__init__(enable_normalization=False, enable_thresholding=True)
        self._image_threshold.fill_(CALIBRATED_THRESHOLD)
        self._pixel_threshold.fill_(CALIBRATED_THRESHOLD)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Keep the calibrated threshold (validation statistics are not used)."""
        del args, kwargs

    def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        """Keep the calibrated threshold."""
        del args, kwargs


class CrossTaskStudent(KDExtModelMixin, AnomalibModule):
    """One lightweight student for several anomaly tasks: shared trunk, one head per task.

    Args:
        tasks: Task names, one head each.
        task: Task served by ``forward`` / test / predict / single-task export (the first by default); change it
            with :meth:`select_task`.
        trunk: ``"small"`` (narrow trainable trunk, distilled) or ``"frozen"`` (the earlier student: the frozen
            ImageNet backbone with fitted-statistics heads), see :class:`CrossTaskStudentModel`.
        backbone: The frozen trunk's backbone, and the normalisation of both trunks (``"efficientnet_lite0"``).
        layers: Trunk feature levels; ``None`` for the backbone's defaults.
        pre_trained: Load the trunk's ImageNet weights (``False`` when a checkpoint provides them).
        width: Channel multiplier of the small trunk against Lite0.
        hidden_channels: Width of each task head.
        image_size: Input ``(H, W)`` (the teachers').
        sigma: Gaussian smoothing of the maps.
        top_k: Map logits averaged into the image score.
        pre_processor: Pre-processor; ``True`` resizes to ``image_size`` and normalises for the trunk.
        post_processor: Post-processor; ``True`` for :class:`CalibratedPostProcessor`.
        evaluator: Evaluator, or ``True`` for anomalib's default.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    architecture_keys = ARCHITECTURE_KEYS

    def __init__(
        self,
        tasks: Sequence[str] = ("default",),
        task: str | None = None,
        trunk: str = TrunkKind.small.value,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        width: float = 0.5,
        hidden_channels: int = 32,
        image_size: Sequence[int] = (256, 256),
        sigma: float = 4.0,
        top_k: int = 10,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        image_size = (int(image_size[0]), int(image_size[1]))
        trunk = str(trunk)  # a plain string in the hyper-parameters: checkpoints load with weights_only=True
        if pre_processor is True:
            pre_processor = teacher_pre_processor(backbone, image_size)
        if post_processor is True:
            post_processor = CalibratedPostProcessor()
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.learning_rate = 1e-3
        self.model = CrossTaskStudentModel(
            tasks=list(tasks),
            trunk=trunk,
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            width=width,
            hidden_channels=hidden_channels,
            image_size=image_size,
            sigma=sigma,
            top_k=top_k,
        )
        if task is not None:
            self.select_task(task)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names."""
        return self.model.tasks

    @property
    def task(self) -> str:
        """The task ``forward``, test and predict serve."""
        return self.model.task

    def select_task(self, task: str) -> None:
        """Serve ``task`` from now on (test, predict, single-task export).

        Raises:
            ValueError: If the student has no head for ``task``.
        """
        self.model.select_task(task)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Not trained by ``Engine.fit``.

        Raises:
            RuntimeError: Always: the student learns from task teachers.
        """
        del batch, args, kwargs
        msg = (
            "CrossTaskStudent is trained by distillation from trained task teachers, not by Engine.fit: run "
            "`kd-ext distill --config CONFIG.yaml` (see README) or kd_ext.models.cross_task.distill.distill(config)."
        )
        raise RuntimeError(msg)

    @torch.no_grad()
    def predict_all_tasks(self, images: torch.Tensor) -> dict[str, InferenceBatch]:
        """Every task's predictions for normalised images from one trunk pass."""
        return self.model.forward_all(images)
