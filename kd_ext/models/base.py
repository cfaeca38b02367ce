"""What every kd_ext anomalib model shares: training plumbing, checkpoint checks and export.

The mixin is combined with ``AnomalibModule`` in each model (``class BiDirMSKD(KDExtModelMixin,
AnomalibModule)``) rather than being an ``AnomalibModule`` subclass itself: anomalib's ``get_model``
and ``list_models`` only see *direct* subclasses of ``AnomalibModule``.
"""

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from kd_ext.data.reading import start_kd_ext_image_reading, stop_kd_ext_image_reading
from kd_ext.export.mixin import KDExtExportMixin
from kd_ext.models.checkpoint import KDExtCheckpointMixin, pre_processor_image_size, teacher_pre_processor
from kd_ext.models.components.clips import ClipVisualizer, clip_frames, loaders_target_frame, target_frames
from kd_ext.models.components.finetune import FinetuneReport, batches_at_size
from kd_ext.models.components.optimizer import Optimizer, build_optimizer
from kd_ext.models.distributed import (
    average_moving_statistics,
    broadcast_from_rank_zero,
    restore_batch_norm,
    setup_distributed,
    undistributed_loader,
)

logger = logging.getLogger(__name__)

EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"

DEFAULT_EPOCHS = 10
"""Training epochs of kd_ext's image models unless ``epochs`` says otherwise (the accuracy benchmark's protocol)."""


class ImageReadingScope(Callback):
    """Ends a kd_ext model's image-reading scope when its trainer run stops on an exception.

    Lightning calls a module's ``teardown`` only when a run ends normally; after an exception (bad input, out of
    memory, Ctrl+C) only callbacks hear of it, and without this one anomalib's datasets would go on reading
    images by kd_ext's rule in the rest of the process.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Put anomalib's reader back (see :meth:`KDExtModelMixin.end_image_reading`)."""
        del trainer, exception
        if isinstance(pl_module, KDExtModelMixin):
            pl_module.end_image_reading()


class KDExtModelMixin(KDExtCheckpointMixin, KDExtExportMixin):
    """One-class distillation models: Adam on the trainable parts, loss-term logging, eval on validation.

    Batches of anomalib's clip-based video datamodules (``UCSDped``, ``Avenue``, ``ShanghaiTech``) are taken
    frame-wise (:mod:`kd_ext.models.components.clips`): every frame of a training clip is one training image, and
    an evaluated clip is scored by its target frame, the frame whose ground truth the dataset returns.
    """

    learning_rate: float
    optimizer: str = Optimizer.ADAM.value
    clip_target: int | None = None
    """Index of the frame that scores each clip in the running evaluation (``None``: images, not clips)."""
    epochs: int | None = None
    image_reading_runs: int = 0
    """Trainer runs set up and not yet torn down, each reading images by kd_ext's rule (:mod:`kd_ext.data.reading`)."""
    model: torch.nn.Module
    teacher_finetune_reports: tuple[FinetuneReport, ...] | list[FinetuneReport] = ()
    """What the teacher fine-tuning of the last fit did (empty when it did not run)."""

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "efficientnet_lite0",
    ) -> PreProcessor:
        """Resize to ``image_size`` (256x256 by default) and normalise as the teacher was trained.

        Args:
            image_size: Target size.
            backbone: Teacher backbone, which decides the normalisation.

        Returns:
            PreProcessor: The pre-processor.
        """
        return teacher_pre_processor(backbone, image_size)

    @classmethod
    def configure_visualizer(cls) -> ClipVisualizer:
        """The image visualiser of anomalib, which here also draws the clips of its video datamodules."""
        return ClipVisualizer()

    def on_fit_start(self) -> None:
        """Silence Lightning's warning about modules in eval mode: the frozen teacher stays in eval mode on purpose.

        Its BatchNorm layers keep the statistics of its pretraining; every trainable module is in train mode.
        """
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)
        super().on_fit_start()  # type: ignore[misc]

    def on_train_start(self) -> None:
        """Check the training images, train in channels-last memory format, and adapt the teacher if asked to.

        The EfficientNet stages of teachers and students are depthwise convolutions, whose backward pass oneDNN
        runs about 3x faster on CPU in channels-last layout (measured here on the forward student, batch 8,
        256x256); results agree with the default layout to float rounding. Teacher fine-tuning
        (``teacher_finetune``) runs here, inside the trainer and before the first distillation step, once.
        """
        super().on_train_start()  # type: ignore[misc]
        self.model.to(memory_format=torch.channels_last)
        self.finetune_teacher_on_training_images()
        broadcast_from_rank_zero(self.model)  # several processes start from one model (an adapted teacher included)

    def setup(self, stage: str) -> None:
        """Read images by kd_ext's rule until teardown (see kd_ext.data.reading); distributed set-up as needed.

        With several processes: global batch statistics and each evaluation image scored once (see distributed).
        """
        start_kd_ext_image_reading()
        self.image_reading_runs += 1
        super().setup(stage)  # type: ignore[misc]
        if stage == "fit":  # before DDP wraps the model: its gradient buckets keep the layout they were made with
            self.model.to(memory_format=torch.channels_last)
        setup_distributed(self.trainer, self.model, stage)  # type: ignore[attr-defined]

    def teardown(self, stage: str) -> None:
        """Give the batch-norm layers back their own classes after a distributed fit; anomalib's reader back."""
        restore_batch_norm(self.model)
        super().teardown(stage)  # type: ignore[misc]
        self.end_image_reading()

    def end_image_reading(self) -> None:
        """End every image-reading scope this model's trainer runs started; anomalib's reader is back after the last."""
        while self.image_reading_runs:
            self.image_reading_runs -= 1
            stop_kd_ext_image_reading()

    def configure_callbacks(self) -> list[Callback]:
        """Return the callbacks of anomalib's components and an :class:`ImageReadingScope`."""
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        listed = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        return [*listed, ImageReadingScope()]

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """With several processes, average the moving statistics that each updated from its share of the batch."""
        average_moving_statistics(self.model)
        super().on_train_batch_end(*args, **kwargs)  # type: ignore[misc]

    def finetune_teacher_on_training_images(self) -> None:
        """Adapt the teacher to the normal training images when the model asks for it and has not done so yet.

        See :mod:`kd_ext.models.components.finetune`. Images are resized to the pre-processor's size, synthetic
        anomalies are drawn on them, and the pre-processor's transform normalises both.

        Raises:
            RuntimeError: If the trainer has no training images.
        """
        if not getattr(self.model, "teacher_finetune_pending", False):
            return
        transform = self.pre_processor.transform if self.pre_processor is not None else None  # type: ignore[attr-defined]
        size = pre_processor_image_size(self.pre_processor)  # type: ignore[attr-defined]
        raw = self.training_images("fine-tune its teacher on")
        batches = batches_at_size(lambda: (self.training_input(images) for images in raw()), size)
        with torch.inference_mode(False), torch.enable_grad():
            reports = self.model.finetune_teachers(batches, transform if transform is not None else (lambda x: x))
        self.teacher_finetune_reports = reports
        for report in reports:
            logger.info(
                "%s teacher fine-tuned: %d steps, synthetic-anomaly loss %.4f -> %.4f, weight shift %.4f",
                type(self).__name__,
                report.steps,
                report.first_loss,
                report.last_loss,
                report.weight_shift,
            )

    def on_train_end(self) -> None:
        """Return to the default memory layout (inference, export and the kernels read NCHW)."""
        self.model.to(memory_format=torch.contiguous_format)
        super().on_train_end()  # type: ignore[misc]

    def on_validation_start(self) -> None:
        """Fit what the model fits on normal training images (a prior, map statistics) before scoring."""
        self.clip_target = loaders_target_frame(self.trainer.val_dataloaders)  # type: ignore[attr-defined]
        self.calibrate_on_training_images()
        super().on_validation_start()  # type: ignore[misc]

    def on_test_start(self) -> None:
        """Check the test images, then calibrate on normal training images if training changed the model."""
        super().on_test_start()  # type: ignore[misc]
        self.clip_target = loaders_target_frame(self.trainer.test_dataloaders)  # type: ignore[attr-defined]
        self.calibrate_on_training_images()

    def on_predict_start(self) -> None:
        """Check the images to predict, then calibrate on normal training images if training changed the model."""
        super().on_predict_start()  # type: ignore[misc]
        self.clip_target = loaders_target_frame(self.trainer.predict_dataloaders)  # type: ignore[attr-defined]
        self.calibrate_on_training_images()

    def calibrate_on_training_images(self) -> None:
        """Run the torch model's ``calibrate`` on the normal training images when it is stale or was never fitted.

        The images come from the trainer's datamodule (or its training loader), pre-processed as in training.

        Raises:
            RuntimeError: If the model needs calibration and the trainer has no training images.
        """
        if not getattr(self.model, "calibration_pending", getattr(self.model, "needs_calibration", False)):
            return
        transform = self.pre_processor.transform if self.pre_processor is not None else None  # type: ignore[attr-defined]
        raw = self.training_images("fit its normal statistics on")

        def batches() -> Iterator[torch.Tensor]:
            for images in raw():
                yield transform(images) if transform is not None else images

        with torch.inference_mode(False), torch.no_grad():
            self.model.calibrate(batches)

    def training_images(self, purpose: str) -> Callable[[], Iterator[torch.Tensor]]:
        """The trainer's normal training images (``[0, 1]``, on the model's device), as a fresh iterator per call.

        They come from the trainer's datamodule, or from its training loader when it was given loaders; the frames
        of video clips are images of their own.

        Args:
            purpose: What the images are for, as the error message should say it (``"fit its normal statistics on"``).

        Returns:
            Callable: Returns an iterator over batches of images.

        Raises:
            RuntimeError: If the trainer has no training images.
        """
        trainer = self.trainer  # type: ignore[attr-defined]
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
        loader = undistributed_loader(loader)  # every process calibrates on all training images
        if loader is None:
            msg = (
                f"{type(self).__name__} needs normal training images to {purpose}, but the trainer has none: train "
                "and score it with a datamodule (or training loader) of normal images."
            )
            raise RuntimeError(msg)
        device = self.device  # type: ignore[attr-defined]

        def images() -> Iterator[torch.Tensor]:
            for batch in loader:
                yield clip_frames(batch.image).to(device)

        return images

    @staticmethod
    def training_input(images: torch.Tensor) -> torch.Tensor:
        """Images (clips' frames flattened into the batch) in the channels-last layout the model trains in."""
        return clip_frames(images).contiguous(memory_format=torch.channels_last)

    def log_loss_terms(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log every loss term per epoch (``loss`` also on the progress bar; to the logger when there is one)."""
        for name, value in terms.items():
            self.log(  # type: ignore[attr-defined]
                f"train_{name}",
                value.item(),
                on_epoch=True,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=True,  # the global batch's mean with several processes
            )

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores for validation images.

        A clip is scored by its target frame, which then stands for the clip's image in the returned batch (what
        the visualiser draws the map over).
        """
        del args, kwargs
        images = target_frames(batch.image, self.clip_target)
        predictions = self.model(images)
        if images is not batch.image:
            batch.update(image=images)
        return batch.update(**predictions._asdict())

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores for test images, as :meth:`validation_step`."""
        return self.validation_step(batch, *args, **kwargs)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores for images to predict, as :meth:`validation_step`."""
        return self.validation_step(batch, *args, **kwargs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The model's optimiser over the trainable parameters (the frozen teacher has none)."""
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return build_optimizer(self.optimizer, parameters, self.learning_rate)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The training protocol: ``epochs`` epochs (when the model sets them), no clipping, no sanity validation."""
        arguments: dict[str, Any] = {"gradient_clip_val": 0, "num_sanity_val_steps": 0}
        if self.epochs is not None:
            arguments["max_epochs"] = self.epochs
        return arguments

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
