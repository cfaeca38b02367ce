"""The cross-task student as an anomalib model, and the Lightning module that distils it.

:class:`CrossTaskStudent` is the deployed model: an anomalib model with a task selector (test, predict and export
one task at a time, or every task at once). It is trained by distillation from task teachers, not by
``Engine.fit``: :class:`CrossTaskDistillation` is the LightningModule that trains it on one batch of every task per
step (``kd-ext distill --config CONFIG``, or :func:`kd_ext.distill.distill`, which prepares the teachers' targets
and the tasks' loaders). Once trained the student is an ordinary anomalib model:

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from kd_ext.models import CrossTaskStudent
    >>> student = CrossTaskStudent.load_from_checkpoint("runs/cross_task/student.ckpt")  # doctest: +SKIP
    >>> student.select_task("bottle")  # doctest: +SKIP
    >>> Engine().test(student, datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))  # doctest: +SKIP
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from kd_ext.models.base import EVAL_MODE_WARNING, KDExtModelMixin
from kd_ext.models.checkpoint import teacher_pre_processor
from kd_ext.models.distributed import restore_batch_norm, setup_distributed
from kd_ext.options import check_choice, check_learning_rate, literal_of

from .loss import (
    AdaptiveTemperature,
    DynamicWeightAverage,
    Imbalance,
    TaskWeighting,
    TemperatureMode,
    UncertaintyWeighting,
    cosine_curriculum,
    feature_distillation_loss,
    soft_label_loss,
)
from .torch_model import CrossTaskStudentModel, FeatureAdapters

ARCHITECTURE_KEYS = ("tasks", "backbone", "layers", "width", "hidden_channels", "image_size", "top_k")
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
        backbone: Whose normalisation and level names the trunk follows (``"efficientnet_lite0"``).
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
    model_class: type[CrossTaskStudentModel] = CrossTaskStudentModel
    """The torch model (a subclass brings another trunk or other heads)."""

    def __init__(
        self,
        tasks: Sequence[str] = ("default",),
        task: str | None = None,
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
        self.model = self.model_class(
            tasks=list(tasks),
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
            "`kd-ext distill --config CONFIG.yaml` (see docs/cross_task.md) or kd_ext.distill.distill(config)."
        )
        raise RuntimeError(msg)

    @torch.no_grad()
    def predict_all_tasks(self, images: torch.Tensor) -> dict[str, InferenceBatch]:
        """Every task's predictions for normalised images from one trunk pass."""
        return self.model.forward_all(images)


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


TaskBatch = dict[str, Any]
"""One task's batch: ``image`` (normalised ``[B, 3, H, W]``), ``map_target`` (map logits at the head's resolution
``[B, 1, h, w]``), ``score_target`` (score logits ``[B]``) and ``teacher_features`` (the teacher's levels, possibly
none)."""


class CrossTaskDistillation(LightningModule):
    """Distils task teachers into a :class:`CrossTaskStudent`: every step takes one batch of every task.

    The batches go through the shared trunk together (one forward pass, on one random aligned crop per step when the
    trunk trains), so every task's loss reaches the shared weights. Task ``k``'s loss is

    ``L_k = KL_tau(map) + w_s * KL_tau(score) + w_f * (1 - cos)(adapter_k(trunk), teacher_k features)``

    (class-balanced KL, :func:`~.loss.soft_label_loss`) and the trunk's multi-task loss is ``sum_k lambda_k L_k``
    with fixed or DWA weights, or the uncertainty-weighted sum. ``tau`` is fixed or learnt per task (adversarial,
    cosine curriculum over the epochs). The feature adapters, temperatures and uncertainty weights train with the
    student but are not part of it (its checkpoint and IR hold the student alone).

    A training batch maps every task name to a :data:`TaskBatch` (a ``CombinedLoader`` of per-task loaders, see
    :class:`kd_ext.distill.data.DistillationData`). Under Lightning's DDP each process gets an equal share of every
    task's global batch; the student's batch-norm layers and the class-balance fractions use the global batch's
    statistics (:mod:`kd_ext.models.distributed`), the gradients are averaged, and the per-task losses behind DWA and
    :attr:`history` are averaged over the processes, so any number of processes trains the same student.

    Args:
        student: The student to train (its torch model trains; its pre- and post-processor do not change).
        teacher_channels: Per task, the teacher's channels per feature level to distil into the trunk through 1x1
            adapters (a task without an entry, or an empty list, has no feature term). Ignored when the student's
            trunk does not train.
        learning_rate: Adam learning rate of the student, adapters, temperatures and uncertainty weights.
        task_weighting: ``fixed`` (all 1), ``dwa`` (Dynamic Weight Average) or ``uncertainty`` (learned).
        dwa_temperature: Softmax temperature of DWA.
        temperature: ``fixed`` or ``adaptive``.
        initial_temperature: The fixed temperature, or the adaptive one's start.
        imbalance: ``balanced`` (class-balanced loss weights) or ``none``.
        score_weight: Weight of the image-score loss against the map loss.
        feature_weight: Weight of the feature loss.
        crop_size: Side of the random square crop the trainable trunk trains on (0: whole images).
        seed: Seed of the training-only modules' initialisation and of the crops.
    """

    def __init__(
        self,
        student: CrossTaskStudent,
        teacher_channels: dict[str, list[int]] | None = None,
        learning_rate: float = 1e-3,
        task_weighting: literal_of(TaskWeighting) = TaskWeighting.dwa.value,
        dwa_temperature: float = 2.0,
        temperature: literal_of(TemperatureMode) = TemperatureMode.adaptive.value,
        initial_temperature: float = 4.0,
        imbalance: literal_of(Imbalance) = Imbalance.balanced.value,
        score_weight: float = 1.0,
        feature_weight: float = 1.0,
        crop_size: int = 128,
        seed: int = 0,
    ) -> None:
        # Checked, and plain strs in the saved hparams
        task_weighting = check_choice(task_weighting, TaskWeighting, "task_weighting").value
        temperature = check_choice(temperature, TemperatureMode, "temperature").value
        imbalance = check_choice(imbalance, Imbalance, "imbalance").value
        learning_rate = check_learning_rate(learning_rate)
        super().__init__()
        self.save_hyperparameters(ignore=["student"])
        self.student = student
        self.tasks = tuple(student.tasks)
        self.task_weighting = TaskWeighting(task_weighting)
        self.imbalance = Imbalance(imbalance)
        self.learning_rate = learning_rate
        self.score_weight = score_weight
        self.feature_weight = feature_weight
        self.crop_size = crop_size
        self.seed = seed
        count = len(self.tasks)
        torch.manual_seed(seed)
        self.temperature = (
            AdaptiveTemperature(count, initial=initial_temperature) if temperature == TemperatureMode.adaptive else None
        )
        self.initial_temperature = float(initial_temperature)
        self.register_buffer("fixed_temperature", torch.tensor(self.initial_temperature), persistent=False)
        self.uncertainty = UncertaintyWeighting(count) if self.task_weighting == TaskWeighting.uncertainty else None
        channels = teacher_channels or {}
        distilled = {
            task: list(channels.get(task, [])) if student.model.trunk_is_trainable else [] for task in self.tasks
        }
        self.adapters = FeatureAdapters(student.model.trunk_channels(), distilled)
        self.dwa = DynamicWeightAverage(count, dwa_temperature) if self.task_weighting == TaskWeighting.dwa else None
        self.history: list[dict] = []
        """Per epoch: each task's mean unweighted loss and its parts, weight and temperature, the reversal strength
        and every step's weighted total loss (all of the global batches)."""
        self._windows = torch.Generator()
        self._weights: list[float] = [1.0] * count
        self._reversal = 0.0
        self._sums: torch.Tensor | None = None
        self._totals: list[torch.Tensor] = []

    def training_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser trains: the student's model and the training-only modules (their trainable parts)."""
        modules = [self.student.model, self.adapters, self.temperature, self.uncertainty]
        return [
            parameter
            for module in modules
            if module is not None
            for parameter in module.parameters()
            if parameter.requires_grad
        ]

    def adapter_parameter_count(self) -> int:
        """Parameters of the training-only feature adapters (reported, not deployed)."""
        return sum(parameter.numel() for parameter in self.adapters.parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over :meth:`training_parameters`."""
        return torch.optim.Adam(self.training_parameters(), lr=self.learning_rate)

    def setup(self, stage: str) -> None:
        """Before Lightning wraps the module for DDP: channels-last student, global batch norm with several processes.

        The student's depthwise convolutions train about 3x faster on CPU in channels-last layout (oneDNN); DDP's
        gradient buckets keep the layout they were made with, so the switch comes first.
        """
        if stage == "fit":
            self.student.model.to(memory_format=torch.channels_last)
            setup_distributed(self.trainer, self.student.model, stage)

    def on_fit_start(self) -> None:
        """Train mode (a frozen trunk of a subclass stays in eval mode, silently) and the seeded crop generator."""
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)
        self.train()
        self._windows = torch.Generator().manual_seed(self.seed)

    def teardown(self, stage: str) -> None:
        """After fitting: the student's own batch-norm classes, default memory layout, eval mode."""
        if stage == "fit":
            restore_batch_norm(self.student.model)
            self.student.model.to(memory_format=torch.contiguous_format)
            self.student.eval()

    def on_train_epoch_start(self) -> None:
        """This epoch's task weights (fixed or DWA) and gradient-reversal strength; fresh loss sums."""
        self._weights = self.dwa.weights() if self.dwa is not None else [1.0] * len(self.tasks)
        self._reversal = cosine_curriculum(self.current_epoch, int(self.trainer.max_epochs or 1))
        self._sums = torch.zeros(len(self.tasks), 4, device=self.device)  # total, map, score, feature
        self._totals = []

    def training_step(self, batch: dict[str, TaskBatch], batch_idx: int) -> STEP_OUTPUT:
        """The weighted total of every task's loss on its batch (see the class description).

        Args:
            batch: Every task's batch (this process's share of it), by task name.
            batch_idx: Step within the epoch.

        Returns:
            STEP_OUTPUT: The loss.

        Raises:
            ValueError: If the batch does not hold exactly the student's tasks.
        """
        del batch_idx
        if set(batch) != set(self.tasks):
            msg = f"A training batch must hold every task of the student {list(self.tasks)}, got {list(batch)}."
            raise ValueError(msg)
        model = self.student.model
        image_size = tuple(batch[self.tasks[0]]["image"].shape[-2:])
        window = Window.random(image_size, self.crop_size, self._windows) if model.trunk_is_trainable else None
        features = self._trunk_features(batch, window)
        parts = [
            self._task_loss(task, batch[task], features[task], tau, window)
            for task, tau in zip(self.tasks, self._temperatures(), strict=True)
        ]
        stacked = torch.stack([part[0] for part in parts])
        if self.uncertainty is not None:
            total = self.uncertainty(stacked)
        else:
            total = (torch.tensor(self._weights, device=stacked.device) * stacked).sum()
        if self._sums is None:  # a step without on_train_epoch_start (called directly)
            self._sums = torch.zeros(len(self.tasks), 4, device=stacked.device)
        self._sums += torch.stack([torch.stack(part) for part in parts]).detach()
        self._totals.append(total.detach())
        self.log("loss", total, prog_bar=True, sync_dist=True)
        return total

    def on_train_epoch_end(self) -> None:
        """Average the epoch's losses over the processes, update DWA and record the epoch in :attr:`history`.

        Every process's shares are equal, so the mean of the processes' losses is the global batch's.
        """
        if self._sums is None or not self._totals:
            return
        strategy = self.trainer.strategy
        steps = len(self._totals)
        means = (strategy.reduce(self._sums.clone(), reduce_op="mean") / steps).cpu()
        step_losses = strategy.reduce(torch.stack(self._totals), reduce_op="mean").tolist()
        epoch_losses = means[:, 0].tolist()
        if self.dwa is not None:
            self.dwa.update(epoch_losses)
        weights = self.uncertainty.weights() if self.uncertainty is not None else self._weights
        temperatures = (
            self.temperature.values() if self.temperature is not None else [self.initial_temperature] * len(self.tasks)
        )
        record = {
            "epoch": self.current_epoch + 1,
            "loss": dict(zip(self.tasks, epoch_losses, strict=True)),
            "parts": {
                task: dict(zip(("map", "score", "feature"), means[index, 1:].tolist(), strict=True))
                for index, task in enumerate(self.tasks)
            },
            "weight": dict(zip(self.tasks, weights, strict=True)),
            "temperature": dict(zip(self.tasks, temperatures, strict=True)),
            "reversal": self._reversal,
            "steps": step_losses,
        }
        self.history.append(record)
        metrics = {f"loss/{task}": value for task, value in record["loss"].items()}
        metrics |= {f"weight/{task}": value for task, value in record["weight"].items()}
        metrics |= {f"temperature/{task}": value for task, value in record["temperature"].items()}
        self.log_dict(metrics, rank_zero_only=True)  # already the global batches' values on every process

    def _temperatures(self) -> list[torch.Tensor]:
        """Every task's distillation temperature for this step (adaptive ones with the reversed gradient)."""
        if self.temperature is None:
            return [self.fixed_temperature] * len(self.tasks)
        return [self.temperature(index, self._reversal) for index in range(len(self.tasks))]

    def _trunk_features(self, batch: dict[str, TaskBatch], window: Window | None) -> dict[str, list[torch.Tensor]]:
        """Every task's trunk features for its batch, from one shared trunk pass (on the crop)."""
        images = torch.cat([batch[task]["image"] for task in self.tasks])
        if window is not None:
            images = window(images)
        levels = self.student.model.trunk_features(images.contiguous(memory_format=torch.channels_last))
        sizes = [batch[task]["image"].shape[0] for task in self.tasks]
        split = [torch.split(level, sizes) for level in levels]
        return {task: [level[index] for level in split] for index, task in enumerate(self.tasks)}

    def _task_loss(
        self,
        task: str,
        batch: TaskBatch,
        features: list[torch.Tensor],
        tau: torch.Tensor,
        window: Window | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One task's loss on its batch (and crop) and its parts: ``(total, map, score, feature)``.

        On a crop the score target stays the whole image's: the crop's top-k map logits stand in for the image's.
        """
        crop = window if window is not None else (lambda tensor: tensor)
        map_logits, score_logits = self.student.model.heads[task](features)
        map_loss = soft_label_loss(map_logits, crop(batch["map_target"]), tau, self.imbalance)
        score_loss = soft_label_loss(score_logits, batch["score_target"], tau, self.imbalance)
        feature_loss = map_loss.new_zeros(())
        if task in self.adapters.adapters:
            adapted = self.adapters(task, features)
            targets = [crop(level) for level in batch["teacher_features"][: len(adapted)]]
            feature_loss = feature_distillation_loss(adapted, targets)
        total = map_loss + self.score_weight * score_loss + self.feature_weight * feature_loss
        return total, map_loss, score_loss, feature_loss
