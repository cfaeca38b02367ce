r"""SignalKD as an anomalib model: trains and tests through anomalib's ``Engine`` on series batches.

It reads :class:`kd_ext.data.ucr.SeriesBatch` es (``kd_ext.data.UCRSeries`` with ``as_image`` unset): ``batch.image``
is the series ``[B, 1, L]``; predictions fill ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, L]``.

Before the first training epoch the teacher is pretrained self-supervised (masked reconstruction) on the
datamodule's :meth:`~kd_ext.data.UCRSeries.unlabelled_training_series`: every series of the training partition,
normal and abnormal, labels unused, never a test series. A datamodule without that method (or plain data loaders)
pretrains it on the normal training series only. The students then learn the normal training series. With the
prior (``prior=True``, the default), the prior and the statistics of both maps are fitted on the normal training
series before validation, testing and prediction whenever training has changed the model.

Example:
    >>> from anomalib.engine import Engine
    >>> from kd_ext.data import UCRSeries
    >>> from kd_ext.models.signal_kd import SignalKD
    >>> datamodule = UCRSeries(train_file="ECG200_TRAIN.txt", test_file="ECG200_TEST.txt", seed=0)  # doctest: +SKIP
    >>> Engine().train(SignalKD(), datamodule=datamodule)  # doctest: +SKIP

    From anomalib's command line (``--model.epochs`` changes the students' epochs)::

        anomalib train --model kd_ext.models.signal_kd.SignalKD --data kd_ext.data.UCRSeries \
            --data.train_file ECG200_TRAIN.txt --data.test_file ECG200_TEST.txt
"""

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.deploy.export import ExportType
from anomalib.metrics import AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.models.components.base.export_mixin.utils import create_export_root
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from kd_ext.edge.series_preprocessing import METADATA_KEY, SeriesPreprocessing
from kd_ext.models.distributed import undistributed_loader
from kd_ext.options import check_epochs, check_fraction, check_learning_rate, check_name, literal_of

from .loss import SignalKDLoss
from .torch_model import DEFAULT_BOTTLENECK, SCORE_MODES, SignalKDModel

logger = logging.getLogger(__name__)
ONNX_OPSET = 17
DEFAULT_SIGNAL_EPOCHS = 60
"""Students' training epochs unless ``epochs`` says otherwise (the protocol of ``benchmarks/signals.py``)."""


class SignalKD(AnomalibModule):
    """Teacher-student anomaly detection for 1-D signals with a self-supervised conv + GRU teacher.

    Args:
        width: Channels of the encoders' first convolution stage.
        hidden: Channels of the encoders' recurrent level (even).
        forward_student: Use the forward (feature-regression) student.
        reverse_student: Use the reverse (one-class embedding) student.
        bottleneck: Size of the reverse student's code per series; ``None`` for the former embedding without a code
            (see :class:`~kd_ext.models.signal_kd.torch_model.ReverseStudent`).
        sigma: Gaussian smoothing of the map along time, in time steps (0 disables it).
        score_mode: Series score: ``"mean"`` of the map, its ``"max"``, or ``"topk"`` (mean of its largest
            ``top_k_ratio``).
        top_k_ratio: Share of time steps averaged by ``"topk"``.
        map_levels: Feature levels (0, 1, 2: shallow to deep) whose discrepancies make the map (see
            :class:`SignalKDModel`).
        learning_rate: Adam learning rate of the students.
        epochs: Training epochs of the students. They become the trainer's ``max_epochs`` through
            :attr:`trainer_arguments`, which anomalib applies over the trainer's own settings: change them with
            ``--model.epochs``.
        teacher_epochs: Epochs of the teacher's masked-reconstruction pretraining.
        teacher_learning_rate: Adam learning rate of the pretraining.
        mask_ratio: Share of time steps hidden in pretraining.
        in_channels: Channels of the series.
        prior: Fuse a normal-feature prior (a per-time-step Gaussian of the teacher's two deeper levels, fitted on the
            normal training series) into the map; see :class:`SignalKDModel`.
        pre_processor: ``False`` (default): series need no resizing; the model z-normalises each series itself.
        post_processor: Post-processor, or ``True`` for anomalib's default (score normalisation and threshold on the
            validation series).
        evaluator: Evaluator, or ``True`` for series-level AUROC and F1 (there are no per-time-step labels).
        visualizer: Visualizer; ``False`` (default): anomalib's visualisers draw images.
    """

    def __init__(
        self,
        width: int = 32,
        hidden: int = 64,
        forward_student: bool = True,
        reverse_student: bool = True,
        bottleneck: int | None = DEFAULT_BOTTLENECK,
        sigma: float = 2.0,
        score_mode: literal_of(SCORE_MODES) = "mean",
        top_k_ratio: float = 0.1,
        map_levels: Sequence[int] = (1, 2),
        learning_rate: float = 1e-3,
        epochs: int = DEFAULT_SIGNAL_EPOCHS,
        teacher_epochs: int = 60,
        teacher_learning_rate: float = 1e-3,
        mask_ratio: float = 0.25,
        in_channels: int = 1,
        prior: bool = True,
        pre_processor: nn.Module | bool = False,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = False,
    ) -> None:
        # Checked, and plain values in the hparams anomalib saves next
        score_mode = check_name(score_mode, SCORE_MODES, "score_mode")
        learning_rate = check_learning_rate(learning_rate)
        epochs = check_epochs(epochs)
        teacher_learning_rate = check_learning_rate(teacher_learning_rate, "teacher_learning_rate")
        teacher_epochs = check_epochs(teacher_epochs, "teacher_epochs")
        mask_ratio = check_fraction(mask_ratio, "mask_ratio", include_one=False)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.teacher_epochs = teacher_epochs
        self.teacher_learning_rate = teacher_learning_rate
        self.mask_ratio = mask_ratio
        self.model = SignalKDModel(
            in_channels=in_channels,
            width=width,
            hidden=hidden,
            forward_student=forward_student,
            reverse_student=reverse_student,
            bottleneck=bottleneck,
            sigma=sigma,
            score_mode=score_mode,
            top_k_ratio=top_k_ratio,
            map_levels=map_levels,
            prior=prior,
        )
        self.loss = SignalKDLoss()
        self.series_preprocessing: SeriesPreprocessing | None = None

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Series-level AUROC and F1 (``image_`` prefix, anomalib's name for sample-level metrics)."""
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            ],
        )

    def pretraining_series(self) -> tuple[torch.Tensor, str]:
        """The series the teacher pretrains on, and what they are.

        Returns:
            tuple[torch.Tensor, str]: ``[N, C, L]`` series and a description for the log.
        """
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "unlabelled_training_series"):
            series = datamodule.unlabelled_training_series()
            return series, f"all {len(series)} training series (normal and abnormal, labels unused)"
        series = torch.cat([batch.image for batch in trainer.train_dataloader])
        return series, f"the {len(series)} normal training series (the datamodule offers no unlabelled series)"

    def on_train_start(self) -> None:
        """Record the datamodule's preprocessing, then pretrain the teacher (once) before the students' first epoch."""
        super().on_train_start()
        preprocessing = getattr(getattr(self.trainer, "datamodule", None), "preprocessing", None)
        if isinstance(preprocessing, SeriesPreprocessing):
            self.series_preprocessing = preprocessing
        if self.model.teacher_pretrained:
            return
        series, description = self.pretraining_series()
        logger.info("Pretraining the SignalKD teacher by masked reconstruction on %s.", description)
        self.model.pretrain_teacher(
            series.to(self.device),
            epochs=self.teacher_epochs,
            learning_rate=self.teacher_learning_rate,
            mask_ratio=self.mask_ratio,
        )

    def on_validation_start(self) -> None:
        """Fit the prior and the maps' statistics on the normal training series if training changed the model."""
        self.calibrate_on_training_series()
        super().on_validation_start()

    def on_test_start(self) -> None:
        """Calibrate (see :meth:`on_validation_start`) before testing."""
        super().on_test_start()
        self.calibrate_on_training_series()

    def on_predict_start(self) -> None:
        """Calibrate (see :meth:`on_validation_start`) before predicting."""
        super().on_predict_start()
        self.calibrate_on_training_series()

    def calibrate_on_training_series(self) -> None:
        """Run the torch model's ``calibrate`` on the trainer's normal training series when it is pending.

        The series come from the trainer's datamodule, or from its training loader when it was given loaders.

        Raises:
            RuntimeError: If the model needs calibration and the trainer has no training series.
        """
        if not self.model.calibration_pending:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.train_dataloader() if datamodule is not None else self.trainer.train_dataloader
        loader = undistributed_loader(loader)  # all series, in the same order on every pass
        if loader is None:
            msg = (
                "SignalKD needs its normal training series to fit its prior, but the trainer has none: train and score "
                "it with a datamodule (or training loader) of normal series, or build it with prior=False."
            )
            raise RuntimeError(msg)

        def batches() -> Iterator[torch.Tensor]:
            for batch in loader:
                yield batch.image.to(self.device)

        with torch.inference_mode(False), torch.no_grad():
            self.model.calibrate(batches)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil the frozen teacher into the students on a batch of normal series."""
        del args, kwargs
        teacher, forward, reverse = self.model(batch.image)
        terms = self.loss(teacher, forward, reverse)
        for name, value in terms.items():
            self.log(f"train_{name}", value.item(), on_epoch=True, prog_bar=name == "loss", batch_size=len(batch.image))
        return {"loss": terms["loss"]}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores and maps of validation series."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the recorded preprocessing (as JSON text) with the weights."""
        super().on_save_checkpoint(checkpoint)
        if self.series_preprocessing is not None:
            checkpoint[METADATA_KEY] = self.series_preprocessing.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the recorded preprocessing."""
        super().on_load_checkpoint(checkpoint)
        if METADATA_KEY in checkpoint:
            self.series_preprocessing = SeriesPreprocessing.from_json(checkpoint[METADATA_KEY])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the students' parameters (the teacher is pretrained separately, then frozen)."""
        return torch.optim.Adam(self.model.student_parameters(), lr=self.learning_rate)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export the whole model (network and post-processor) to ONNX for series ``[N, C, L]``, ``N`` dynamic.

        The graph takes raw or z-normalised ``float32`` series of the training length (it z-normalises them itself)
        and outputs ``pred_score`` ``[N]``, ``pred_label`` ``[N]``, ``anomaly_map`` ``[N, L]`` and ``pred_mask``
        ``[N, L]`` (normalised so that 0.5 is the threshold, when the post-processor has statistics), or the raw
        score and map without a post-processor. The preprocessing the series were given in training
        (:attr:`series_preprocessing`, recorded from ``kd_ext.data.UCRSeries`` when training starts) is written into
        the file's metadata (key ``kd_ext_series_preprocessing``), which OpenVINO keeps in the IR's ``rt_info`` for
        the edge runtime (``kd-ext infer MODEL.xml SERIES_FILE``). anomalib's ``to_openvino`` and ``anomalib
        export``, and :func:`kd_ext.export.export_openvino` (with ``input_size=None``), go through this method. It
        uses torch's TorchScript-based exporter: the dynamo exporter converts the same graph (GRUs included) too, but
        takes minutes instead of seconds.

        Args:
            export_root: Output root; the file goes to ``<export_root>/weights/onnx/<name>.onnx``.
            model_file_name: File name without suffix.
            input_size: Must be ``None``: the series length is the training length.
            **kwargs: Passed to ``torch.onnx.export``.

        Returns:
            Path: The ``.onnx`` file.

        Raises:
            ValueError: If ``input_size`` is given.
            RuntimeError: If the model has not been trained, or its prior is not fitted to the trained students.
        """
        if input_size is not None:
            msg = (
                f"SignalKD takes series, not images of size {tuple(input_size)}: export with input_size=None (the "
                "series length is the one the model was trained on)."
            )
            raise ValueError(msg)
        if not self.model.teacher_pretrained:
            msg = "SignalKD has not been trained (its teacher is not pretrained): train it before exporting."
            raise RuntimeError(msg)
        if self.model.calibration_pending:
            msg = (
                "SignalKD's prior is not fitted to its trained students yet (no validation, test or prediction since "
                "training): test it (engine.test, or anomalib test) before exporting, or export a checkpoint written "
                "after validation."
            )
            raise RuntimeError(msg)
        onnx_path = create_export_root(export_root, ExportType.ONNX) / f"{model_file_name}.onnx"
        example = torch.zeros(2, self.model.in_channels, int(self.model.series_length), device=self.device)
        self.eval()
        with torch.no_grad():
            output_names = [name for name, value in self(example)._asdict().items() if value is not None]
        with warnings.catch_warnings():
            # Tracing records the post-processor's statistics as constants (intended: they are the trained values),
            # and the GRUs start from zero states, so the batch-size caveat of the GRU export does not apply.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*with a batch_size other than 1.*GRU")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                self,
                (example,),
                str(onnx_path),
                input_names=["input"],
                output_names=output_names,
                dynamic_axes={name: {0: "batch"} for name in ["input", *output_names]},
                opset_version=kwargs.pop("opset_version", ONNX_OPSET),
                dynamo=False,
                **kwargs,
            )
        self._write_preprocessing(onnx_path)
        return onnx_path

    def _write_preprocessing(self, onnx_path: Path) -> None:
        """Record :attr:`series_preprocessing` in the ONNX file's metadata (a warning when nothing was recorded)."""
        if self.series_preprocessing is None:
            logger.warning(
                "SignalKD has no recorded series preprocessing (it was not trained with kd_ext.data.UCRSeries): the "
                "export carries none, and kd-ext infer will refuse to score series files with it. Set "
                "model.series_preprocessing = kd_ext.edge.series_preprocessing.SeriesPreprocessing(...) to the "
                "training settings before exporting."
            )
            return
        import onnx  # noqa: PLC0415

        graph = onnx.load(str(onnx_path))
        entry = graph.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, self.series_preprocessing.to_json()
        onnx.save(graph, str(onnx_path))

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The training protocol: ``epochs`` epochs, no gradient clipping, no sanity validation."""
        return {"max_epochs": self.epochs, "gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: the students learn normal series only."""
        return LearningType.ONE_CLASS
