"""Multi-scale teacher-student anomaly-map fusion shared by BiDirMSKD and MTHF, computed by :mod:`kd_ext.kernels`.

The fused native kernel runs at inference; the pure-torch reference runs while training (autograd),
while exporting (tracing) and when the extension is missing or ``backend="reference"`` is forced.
"""

from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from kd_ext import kernels
from kd_ext.kernels.reference import gaussian_blur
from kd_ext.options import check_choice, choice_values


class MapFusion(str, Enum):
    """How the upsampled per-level maps are combined (the kernels' :class:`~kd_ext.kernels.Fusion` without weights)."""

    MEAN = "mean"
    SUM = "sum"
    PRODUCT = "product"


MAP_FUSIONS = choice_values(MapFusion)
"""Values of :class:`MapFusion`."""

__all__ = ["MAP_FUSIONS", "AnomalyMapGenerator", "MapFusion", "gaussian_blur"]


class AnomalyMapGenerator(nn.Module):
    """Fuse per-level ``1 - cos`` teacher-student discrepancies of one or more students.

    Its settings (``distance``, ``fusion``, ``align_corners``, ``sigma``) are what a model's
    :class:`~kd_ext.edge.contract.MapTail` reports for its groups.

    Args:
        fusion: How the upsampled maps of all levels and students are combined.
        sigma: Gaussian smoothing (0 disables it).
        backend: ``"auto"`` (native kernel when possible), ``"native"`` or ``"reference"``.
    """

    def __init__(
        self, fusion: MapFusion | str = "mean", sigma: float = 4.0, backend: kernels.Backend | str = "auto"
    ) -> None:
        super().__init__()
        self.fusion = check_choice(fusion, MapFusion, "map fusion").value
        kernels.validate_sigma(sigma)
        self.sigma = sigma
        self.backend = check_choice(backend, kernels.Backend, "kernel backend").value
        self.distance = "cosine"
        self.align_corners = False

    @staticmethod
    def _pairs(
        teacher: Sequence[torch.Tensor],
        students: Sequence[Sequence[torch.Tensor]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(teacher) * len(students), [feature for student in students for feature in student]

    def _kernel_options(self) -> dict[str, object]:
        return {
            "distance": self.distance,
            "fusion": self.fusion,
            "align_corners": self.align_corners,
            "sigma": self.sigma,
            "backend": self.backend,
        }

    def map_and_score(
        self,
        teacher: Sequence[torch.Tensor],
        students: Sequence[Sequence[torch.Tensor]],
        image_size: tuple[int, int],
        score_mode: str = "max",
        top_k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused anomaly maps ``[B, 1, H, W]`` and image scores ``[B]`` in one kernel call.

        Args:
            teacher: Teacher features, one tensor per level.
            students: Features of each student, matching the teacher's.
            image_size: Output size.
            score_mode: ``"max"`` or ``"topk"`` (mean of the ``top_k`` largest map values).
            top_k: Values averaged by ``"topk"``.
        """
        teacher_features, student_features = self._pairs(teacher, students)
        return kernels.anomaly_map_and_score(
            teacher_features,
            student_features,
            tuple(image_size),
            score=score_mode,
            top_k=top_k,
            **self._kernel_options(),
        )

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        students: Sequence[Sequence[torch.Tensor]],
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """Return fused anomaly maps of shape ``[B, 1, H, W]``."""
        teacher_features, student_features = self._pairs(teacher, students)
        return kernels.anomaly_map(teacher_features, student_features, tuple(image_size), **self._kernel_options())
