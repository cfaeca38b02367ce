"""Per-time-step anomaly maps of SignalKD from 1-D teacher and student features."""

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from kd_ext.kernels import validate_sigma
from kd_ext.kernels.reference import distance_map, gaussian_radius, gaussian_taps


def smooth_series(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """1-D Gaussian smoothing with reflect padding (the kernel rule of :mod:`kd_ext.kernels`, along time).

    Args:
        maps: Maps ``[B, 1, L]``; ``L`` must exceed the radius ``floor(4 * sigma + 0.5)``.
        sigma: Standard deviation in time steps; ``0`` returns ``maps`` unchanged.

    Returns:
        torch.Tensor: Smoothed maps ``[B, 1, L]``.
    """
    if sigma <= 0:
        return maps
    radius = gaussian_radius(sigma)
    taps = gaussian_taps(sigma, device=maps.device).to(maps.dtype)
    return F.conv1d(F.pad(maps, (radius, radius), mode="reflect"), taps.view(1, 1, -1))


class SeriesAnomalyMapGenerator(nn.Module):
    """Mean over levels and students of the per-time-step ``1 - cos(t, s)``, upsampled to the series length.

    Args:
        sigma: Gaussian smoothing along time, in time steps (0 disables it).
    """

    def __init__(self, sigma: float = 2.0) -> None:
        super().__init__()
        self.sigma = validate_sigma(sigma)

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        students: Sequence[Sequence[torch.Tensor]],
        length: int,
    ) -> torch.Tensor:
        """Return anomaly maps ``[B, L]``.

        Args:
            teacher: Teacher features ``[B, C_k, L_k]``, one tensor per level.
            students: Features of each student, matching the teacher's.
            length: Output length ``L``.
        """
        maps = [
            F.interpolate(distance_map(t, s), size=length, mode="linear", align_corners=False)
            for student in students
            for t, s in zip(teacher, student, strict=True)
        ]
        return smooth_series(torch.stack(maps).mean(dim=0), self.sigma).squeeze(1)
