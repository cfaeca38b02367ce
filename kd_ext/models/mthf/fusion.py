"""Hierarchical feature fusion placed after a student's distillation layers (MTHF)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from kd_ext.models.components import CBAM


class HierarchicalAttentionFusion(nn.Module):
    """Fuse a student's multi-scale features into each level through CBAM attention.

    For every level ``l``, all levels are brought to ``l``'s resolution (average pooling for finer
    levels, bilinear upsampling for coarser ones), concatenated, projected to ``l``'s channels with
    a 1x1 convolution and re-weighted by CBAM (channel then spatial attention). The result is added
    to the level's own features with a learnable gate that starts at zero, so training starts from
    the plain student and learns how much cross-level context each level needs::

        out_l = f_l + gamma_l * CBAM(conv1x1(concat_j align_l(f_j)))

    Args:
        channels: Channels of each level, shallow to deep.
        strides: Stride of each level relative to the image (powers of two, increasing).
        reduction: Channel reduction of CBAM's channel-attention MLP.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], reduction: int = 8) -> None:
        super().__init__()
        if len(channels) != len(strides):
            msg = f"Got {len(channels)} channel counts for {len(strides)} strides."
            raise ValueError(msg)
        self.strides = tuple(int(stride) for stride in strides)
        total = sum(channels)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(total, channel, kernel_size=1, bias=False), nn.BatchNorm2d(channel))
            for channel in channels
        )
        self.attention = nn.ModuleList(CBAM(channel, reduction) for channel in channels)
        self.gates = nn.Parameter(torch.zeros(len(channels)))

    def _align(self, feature: torch.Tensor, source: int, target: int, size: tuple[int, int]) -> torch.Tensor:
        if self.strides[source] < self.strides[target]:
            factor = self.strides[target] // self.strides[source]
            return F.avg_pool2d(feature, kernel_size=factor, stride=factor)
        if self.strides[source] > self.strides[target]:
            return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
        return feature

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return the fused features, one tensor per level with the input's shape."""
        fused: list[torch.Tensor] = []
        for target, feature in enumerate(features):
            size = (feature.shape[-2], feature.shape[-1])
            aligned = torch.cat(
                [self._align(other, source, target, size) for source, other in enumerate(features)], dim=1
            )
            context = self.attention[target](self.projections[target](aligned))
            fused.append(feature + self.gates[target] * context)
        return fused
