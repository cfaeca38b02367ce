"""anomalib export hooks of kd_ext models: INT8 calibrated on normal training images."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openvino as ov
    from anomalib import TaskType
    from anomalib.data import AnomalibDataModule
    from torchmetrics import Metric


class KDExtExportMixin:
    """Make ``anomalib export ... --compression_type INT8_PTQ|INT8_ACQ`` calibrate on training images.

    anomalib's :class:`~anomalib.models.components.base.export_mixin.ExportMixin` calibrates on
    ``datamodule.val_dataloader()`` and quantises the anomaly-map tail too. Placed before
    ``AnomalibModule`` in a model's bases, this mixin swaps both quantisation steps for
    :func:`kd_ext.export.quantize_on_training_images` and
    :func:`kd_ext.export.quantize_with_accuracy_control`; everything else (ONNX tracing, FP16, weights-only
    INT8, file layout) stays anomalib's.
    """

    @staticmethod
    def _post_training_quantization_ov(
        model: ov.Model,
        datamodule: AnomalibDataModule | None = None,
    ) -> ov.Model:
        """INT8_PTQ on normal training images, tail kept in float, maps checked on held-out training images.

        Raises:
            ValueError: If no datamodule is given.
        """
        from .quantization import quantize_on_training_images  # noqa: PLC0415

        if datamodule is None:
            msg = "INT8_PTQ needs a datamodule whose training images calibrate the quantisation (--data ...)."
            raise ValueError(msg)
        return quantize_on_training_images(model, datamodule)

    @staticmethod
    def _accuracy_control_quantization_ov(
        model: ov.Model,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> ov.Model:
        """INT8_ACQ: calibration on training images, accuracy on the test images, tail kept in float.

        Raises:
            ValueError: If no datamodule is given.
        """
        from .quantization import quantize_with_accuracy_control  # noqa: PLC0415

        del task
        if datamodule is None:
            msg = "INT8_ACQ needs a datamodule (training images calibrate, test images check accuracy; --data ...)."
            raise ValueError(msg)
        return quantize_with_accuracy_control(model, datamodule, metric=metric, max_drop=max_drop)
