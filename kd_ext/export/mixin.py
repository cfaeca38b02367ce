"""anomalib export hooks of kd_ext models: the features IR by default, INT8 calibrated on normal training images."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_ext.edge.contract import EXPORT_MODE_KEY, ExportMode

if TYPE_CHECKING:
    import openvino as ov
    from anomalib import TaskType
    from anomalib.data import AnomalibDataModule
    from anomalib.deploy import CompressionType
    from torchmetrics import Metric


class KDExtExportMixin:
    """anomalib's OpenVINO export of kd_ext models: the *features* IR where it applies, INT8 on training images.

    Placed before ``AnomalibModule`` in a model's bases, this mixin changes two things in anomalib's
    :class:`~anomalib.models.components.base.export_mixin.ExportMixin`, which ``anomalib export`` and
    ``Engine.export`` call:

    - :meth:`to_openvino` writes kd_ext's features IR (:mod:`kd_ext.export.features`: the IR ends at the per-scale
      features and kd_ext's edge runtime runs the anomaly-map tail in its C++ kernel) wherever it applies, and
      anomalib's whole-forward IR on request (``onnx_kwargs={"export_mode": "standard"}``) or where it does not;
    - INT8: anomalib calibrates on ``datamodule.val_dataloader()`` and quantises the anomaly-map tail too; here
      ``INT8_PTQ`` / ``INT8_ACQ`` go through :func:`kd_ext.export.quantize_on_training_images` (normal training
      images, tail kept in float, maps checked against FP32 on held-out training images) and
      :func:`kd_ext.export.quantize_with_accuracy_control`.

    Everything else (ONNX tracing of the standard IR, FP16, weights-only INT8, file layout) stays anomalib's.
    """

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
        ov_kwargs: dict[str, Any] | None = None,
        onnx_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """Export to OpenVINO IR as ``anomalib export --export_type openvino`` asks, the features IR by default.

        The features IR (:func:`kd_ext.export.export_openvino` with ``mode="features"``) is written for BiDirMSKD and
        MTHF (a fitted normal-feature prior included: the IR outputs its distances and the edge tail fuses them),
        except with ``INT8_ACQ`` (which checks the scores a features IR does not output). It has a static input
        size: ``input_size``, or the model's image size (its pre-processor's ``Resize``) when none is given.
        ``INT8_PTQ`` calibrates on the normal training images and keeps the maps within
        :data:`kd_ext.export.MAX_MAP_ERROR` of FP32 on held-out training images. Only kd_ext's edge runtime
        (``kd-ext infer``, :class:`kd_ext.edge.EdgeModel`) reads a features IR.

        ``onnx_kwargs={"export_mode": "standard"}`` (command line: ``--onnx_kwargs '{"export_mode": "standard"}'``)
        writes anomalib's whole-forward IR instead, which anomalib's ``OpenVINOInferencer`` reads too;
        ``"features"`` insists on the features IR, ``"auto"`` is the default. The other ``onnx_kwargs`` go to the
        standard IR's ONNX export, ``ov_kwargs`` to ``openvino.convert_model`` in both.

        Args:
            export_root: Output root; the IR goes to ``<export_root>/weights/openvino/<name>.xml``.
            model_file_name: File name without suffix.
            input_size: Static ``(H, W)``; ``None``: the model's image size (features IR) or dynamic (standard IR).
            compression_type: anomalib's ``CompressionType`` (``None``: FP32).
            datamodule: Datamodule whose training images calibrate ``INT8_PTQ`` / ``INT8_ACQ``.
            metric: Metric of ``INT8_ACQ``.
            task: Unused (anomalib's signature).
            max_drop: Largest metric drop of ``INT8_ACQ``.
            ov_kwargs: Arguments of ``openvino.convert_model``.
            onnx_kwargs: ``"export_mode"`` (see above); the rest go to the standard IR's ``torch.onnx.export``.

        Returns:
            Path: The ``.xml`` file.

        Raises:
            ValueError: If the export mode is unknown, ``"features"`` does not apply, or other ``onnx_kwargs`` come
                with the features IR.
        """
        from kd_ext.models.checkpoint import pre_processor_image_size  # noqa: PLC0415

        from .openvino import _export_mode, export_openvino, resolve_precision  # noqa: PLC0415

        onnx_kwargs = dict(onnx_kwargs or {})
        requested = onnx_kwargs.pop(EXPORT_MODE_KEY, ExportMode.AUTO)
        size = input_size if input_size is not None else pre_processor_image_size(getattr(self, "pre_processor", None))
        precision = resolve_precision(compression_type)
        if _export_mode(requested, precision, size, self) is ExportMode.STANDARD:  # type: ignore[arg-type]
            return super().to_openvino(  # type: ignore[misc]
                export_root,
                model_file_name,
                input_size,
                compression_type,
                datamodule,
                metric,
                task,
                max_drop,
                ov_kwargs,
                onnx_kwargs,
            )
        if onnx_kwargs:
            msg = (
                f"onnx_kwargs {sorted(onnx_kwargs)} are for anomalib's whole-forward ONNX export, but this export "
                'writes kd_ext\'s features IR; drop them, or add "export_mode": "standard" for the standard IR.'
            )
            raise ValueError(msg)
        import openvino as ov  # noqa: PLC0415

        return export_openvino(
            self,  # type: ignore[arg-type]
            export_root,
            precision,
            calibration=datamodule,
            input_size=size,
            model_file_name=model_file_name,
            metric=metric,
            max_drop=max_drop,
            convert=partial(ov.convert_model, **ov_kwargs) if ov_kwargs else None,
            mode=ExportMode.FEATURES,
        )

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
