"""Two-stage anomaly-map fusion of MTHF: across scales within a group, then across groups.

Stage 1 (within a group): each level's ``1 - cos`` teacher-student discrepancy is upsampled to the
output size and the levels are averaged (BiDirMSKD's :class:`AnomalyMapGenerator`, unsmoothed).

Stage 2 (across groups): the groups' maps live on different scales (a reverse-distillation
student's distances are larger and more spread than a forward student's), so a plain average lets
one group dominate. Each group map ``M_g`` is standardised with statistics of that group's maps on
normal *training* images, ``Z_g = (M_g - mu_g) / sigma_g`` (exponential moving averages updated
during training, stored as buffers, so they are saved in checkpoints and become constants in
exported models). The standardised maps are combined by their mean (default: a region found by any
group raises the fused map, which covers anomalies that only one group sees, while the agreement of
groups keeps the map low elsewhere) or by their pixel-wise maximum (strict union). The fused map is
smoothed once, at the end, with a Gaussian (sigma = 4 by default), so the stride-4 detail of the
shallow groups is not blurred twice and boundaries stay sharp.

One-stage fusion (ablation) averages all per-level maps of all groups at once, unnormalised, then
smooths.

The standardise-and-combine step is :func:`kd_ext.edge.tail.fuse_standardised`, the rule the edge tail runs in
numpy on a features IR's outputs; the model reports these settings and statistics in its
:class:`~kd_ext.edge.contract.MapTail` (``MTHFModel.tail``).
"""

from collections.abc import Sequence

import torch
from torch import nn

from kd_ext import kernels
from kd_ext.edge.tail import fuse_standardised
from kd_ext.models.components.multiscale_map import AnomalyMapGenerator, gaussian_blur

GROUP_FUSIONS = ("mean", "max")
FUSION_STAGES = (1, 2)

FeaturePairs = Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]


class MTHFAnomalyMap(nn.Module):
    """Per-group maps (stage 1) and their normalised combination (stage 2).

    Args:
        num_groups: Number of teacher-student groups.
        fusion_stages: ``2`` (within groups, then across groups) or ``1`` (all maps at once).
        group_fusion: Stage-2 combination of the standardised group maps: ``"mean"`` or ``"max"``.
        sigma: Gaussian smoothing of the fused map (0 disables it).
        momentum: Weight of the newest batch in the moving averages of the group-map statistics.
        backend: ``kd_ext.kernels`` backend of the per-level maps: ``"auto"`` (fused native kernel when no
            gradient is needed and the extension is available, torch reference while tracing/exporting),
            ``"native"`` or ``"reference"`` (pure torch).

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_groups: int,
        fusion_stages: int = 2,
        group_fusion: str = "mean",
        sigma: float = 4.0,
        momentum: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_groups < 1:
            msg = f"num_groups must be >= 1, got {num_groups}."
            raise ValueError(msg)
        if fusion_stages not in FUSION_STAGES:
            msg = (
                f"fusion_stages must be 1 (all maps at once) or 2 (within groups, then across), got {fusion_stages!r}."
            )
            raise ValueError(msg)
        if group_fusion not in GROUP_FUSIONS:
            msg = f"Unknown group_fusion '{group_fusion}'; choose one of {GROUP_FUSIONS}."
            raise ValueError(msg)
        kernels.validate_sigma(sigma)
        if not 0 < momentum <= 1:
            msg = f"momentum must be in (0, 1], got {momentum}."
            raise ValueError(msg)
        self.num_groups = num_groups
        self.fusion_stages = fusion_stages
        self.group_fusion = group_fusion
        self.sigma = sigma
        self.momentum = momentum
        self.level_maps = AnomalyMapGenerator(fusion="sum", sigma=0, backend=backend)
        self.group_map = AnomalyMapGenerator(fusion="mean", sigma=0, backend=backend)
        self.register_buffer("map_mean", torch.zeros(num_groups))
        self.register_buffer("map_std", torch.ones(num_groups))
        self.register_buffer("statistics_updates", torch.zeros((), dtype=torch.long))

    def group_maps(self, pairs: FeaturePairs, size: tuple[int, int]) -> list[torch.Tensor]:
        """Stage-1 maps of every group, unnormalised.

        Args:
            pairs: ``(teacher features, student features)`` of each group.
            size: Output size.

        Returns:
            list[torch.Tensor]: One ``[B, 1, H, W]`` map per group.
        """
        return [self.group_map(teacher, [student], size) for teacher, student in pairs]

    @torch.no_grad()
    def update_statistics(self, pairs: FeaturePairs, size: tuple[int, int]) -> None:
        """Update the moving mean and standard deviation of each group's map on normal images.

        Args:
            pairs: ``(teacher features, student features)`` of each group (from training images).
            size: Size at which the statistics are computed (a quarter of the image side is enough).
        """
        maps = torch.stack([self.group_map(t, [s], size).flatten() for t, s in pairs])
        mean = maps.mean(dim=1)
        std = maps.std(dim=1).clamp_min(1e-6)
        if int(self.statistics_updates) == 0:
            self.map_mean.copy_(mean)
            self.map_std.copy_(std)
        else:
            self.map_mean.lerp_(mean, self.momentum)
            self.map_std.lerp_(std, self.momentum)
        self.statistics_updates += 1

    @property
    def backend(self) -> str:
        """Kernel backend of the per-level maps."""
        return self.group_map.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.group_map.backend = value
        self.level_maps.backend = value

    def forward(self, pairs: FeaturePairs, size: tuple[int, int]) -> torch.Tensor:
        """Fused, smoothed anomaly maps ``[B, 1, H, W]``.

        Args:
            pairs: ``(teacher features, student features)`` of each group.
            size: Output size (Python ints; constants in an exported graph).

        Returns:
            torch.Tensor: Anomaly maps.
        """
        if self.fusion_stages == 1:
            total = sum(self.level_maps(teacher, [student], size) for teacher, student in pairs)
            fused = total / sum(len(teacher) for teacher, _ in pairs)
        else:
            maps = self.group_maps(pairs, size)
            fused = fuse_standardised(maps, self.map_mean.unbind(), self.map_std.unbind(), self.group_fusion)
        return gaussian_blur(fused, self.sigma) if self.sigma > 0 else fused


def downsampled_size(size: tuple[int, int], factor: int = 4) -> tuple[int, int]:
    """``size`` divided by ``factor`` (at least 1 pixel per side)."""
    return max(1, size[0] // factor), max(1, size[1] // factor)


__all__ = ["FUSION_STAGES", "GROUP_FUSIONS", "MTHFAnomalyMap", "downsampled_size"]
