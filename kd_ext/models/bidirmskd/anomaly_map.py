"""Multi-scale, bidirectional anomaly-map fusion of BiDirMSKD."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

MAP_FUSIONS = ("mean", "sum", "product")


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel size ``2*floor(4*sigma+0.5)+1``, reflect padding."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, taps.view(1, 1, 1, -1))
    return F.conv2d(blurred, taps.view(1, 1, -1, 1))


class AnomalyMapGenerator(nn.Module):
    """Fuse per-level ``1 - cos`` teacher-student discrepancies of one or both students.

    Args:
        fusion: How the upsampled maps of all levels and directions are combined.
        sigma: Gaussian smoothing (0 disables it).
    """

    def __init__(self, fusion: str = "mean", sigma: float = 4.0) -> None:
        super().__init__()
        if fusion not in MAP_FUSIONS:
            msg = f"Unknown map fusion '{fusion}'; choose one of {MAP_FUSIONS}."
            raise ValueError(msg)
        if sigma < 0:
            msg = f"sigma must be >= 0 (0 disables smoothing), got {sigma}."
            raise ValueError(msg)
        self.fusion = fusion
        self.sigma = sigma

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        students: Sequence[Sequence[torch.Tensor]],
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """Return fused anomaly maps of shape ``[B, 1, H, W]``."""
        maps = [
            F.interpolate(
                (1 - F.cosine_similarity(t, s, dim=1)).unsqueeze(1),
                size=image_size,
                mode="bilinear",
                align_corners=False,
            )
            for student in students
            for t, s in zip(teacher, student, strict=True)
        ]
        stacked = torch.stack(maps, dim=0)
        if self.fusion == "sum":
            fused = stacked.sum(dim=0)
        elif self.fusion == "mean":
            fused = stacked.mean(dim=0)
        else:
            fused = stacked.prod(dim=0)
        return gaussian_blur(fused, self.sigma) if self.sigma > 0 else fused
