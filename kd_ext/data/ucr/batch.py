"""Series samples and batches with anomalib's field names (:class:`SeriesItem`, :class:`SeriesBatch`).

``image`` holds the series, ``anomaly_map`` a per-time-step map and ``image_path`` the series' name; anomalib's image
checks apply with the image fields taking series shapes.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from anomalib.data.dataclasses.generic import BatchIterateMixin, _ImageInputFields
from anomalib.data.dataclasses.torch.base import Batch, DatasetItem
from anomalib.data.validators.torch.image import ImageBatchValidator, ImageValidator


def _float_series(value: torch.Tensor, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    """``value`` if it is a floating-point tensor with one of ``dims`` dimensions, else a message with ``shape``."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        msg = f"Series must be a floating-point torch.Tensor {shape}, got {type(value).__name__}."
        raise TypeError(msg)
    if value.ndim not in dims:
        msg = f"Series must have shape {shape}, got {tuple(value.shape)}."
        raise ValueError(msg)
    return value


class SeriesValidator(ImageValidator):
    """Checks of one series sample: anomalib's image checks with the image fields taking series shapes."""

    @staticmethod
    def validate_image(image: torch.Tensor) -> torch.Tensor:
        """A floating-point series ``[C, L]``.

        Raises:
            TypeError: If it is not a floating-point tensor.
            ValueError: If it is not 2-dimensional.
        """
        return _float_series(image, (2,), "[C, L] (channels, time steps)")

    @staticmethod
    def validate_anomaly_map(anomaly_map: torch.Tensor | None) -> torch.Tensor | None:
        """A per-time-step map ``[L]`` (``[1, L]`` is squeezed)."""
        return None if anomaly_map is None else torch.as_tensor(anomaly_map, dtype=torch.float32).reshape(-1)

    @staticmethod
    def validate_gt_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        """A per-time-step mask ``[L]``."""
        return None if mask is None else torch.as_tensor(mask).reshape(-1).bool()

    @staticmethod
    def validate_pred_mask(pred_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A per-time-step mask ``[L]``."""
        return SeriesValidator.validate_gt_mask(pred_mask)

    @staticmethod
    def validate_image_path(image_path: str | None) -> str | None:
        """The series' name (not a file: see the module documentation)."""
        return None if image_path is None else str(image_path)


class SeriesBatchValidator(ImageBatchValidator):
    """Checks of a batch of series: anomalib's image-batch checks with the image fields taking series shapes."""

    @staticmethod
    def validate_image(image: torch.Tensor) -> torch.Tensor:
        """A floating-point batch of series ``[B, C, L]`` (a single ``[C, L]`` series gets a batch dimension).

        Raises:
            TypeError: If it is not a floating-point tensor.
            ValueError: If it is not 2- or 3-dimensional.
        """
        image = _float_series(image, (2, 3), "[B, C, L] (batch, channels, time steps)")
        return image if image.ndim == 3 else image.unsqueeze(0)

    @staticmethod
    def validate_anomaly_map(anomaly_map: torch.Tensor | None) -> torch.Tensor | None:
        """Per-time-step maps ``[B, L]`` (``[B, 1, L]`` is squeezed).

        Raises:
            ValueError: If the map is not 2- or 3-dimensional.
        """
        if anomaly_map is None:
            return None
        anomaly_map = torch.as_tensor(anomaly_map, dtype=torch.float32)
        if anomaly_map.ndim == 3 and anomaly_map.shape[1] == 1:
            anomaly_map = anomaly_map.squeeze(1)
        if anomaly_map.ndim != 2:
            msg = f"Series anomaly maps must have shape [B, L] or [B, 1, L], got {tuple(anomaly_map.shape)}."
            raise ValueError(msg)
        return anomaly_map

    @staticmethod
    def validate_gt_mask(gt_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-time-step masks ``[B, L]`` (``[B, 1, L]`` is squeezed)."""
        if gt_mask is None:
            return None
        return SeriesBatchValidator.validate_anomaly_map(gt_mask).bool()  # type: ignore[union-attr]

    @staticmethod
    def validate_pred_mask(pred_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-time-step masks ``[B, L]``."""
        return SeriesBatchValidator.validate_gt_mask(pred_mask)


@dataclass
class SeriesItem(SeriesValidator, _ImageInputFields[str], DatasetItem[torch.Tensor]):
    """One series sample with anomalib's item fields: ``image`` is the series ``[C, L]``, ``image_path`` its name."""


@dataclass
class SeriesBatch(
    BatchIterateMixin[SeriesItem], SeriesBatchValidator, _ImageInputFields[list[str]], Batch[torch.Tensor]
):
    """A batch of series with anomalib's batch fields.

    ``image`` is ``[B, C, L]`` (also available as :attr:`series`), ``gt_label`` ``[B]``, ``anomaly_map`` ``[B, L]``,
    ``pred_score`` ``[B]``; ``gt_mask`` is absent (series carry no per-time-step labels).
    """

    item_class: ClassVar[Callable] = SeriesItem

    @property
    def series(self) -> torch.Tensor:
        """The series ``[B, C, L]`` (the ``image`` field)."""
        return self.image
