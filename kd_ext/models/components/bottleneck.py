"""One-class bottleneck embedding (OCBE) of reverse distillation (Deng & Li, CVPR 2022)."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from .layers import conv_bn_relu, downsampler


class MultiScaleFeatureFusion(nn.Module):
    """Bring every feature level to the deepest level's resolution and fuse them.

    Args:
        channels: Channels of each level, shallow to deep.
        strides: Stride of each level relative to the image (powers of two, increasing).
        out_channels: Channels of the fused map.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], out_channels: int) -> None:
        super().__init__()
        deepest = strides[-1]
        self.branches = nn.ModuleList(
            downsampler(channel, out_channels, round(math.log2(deepest // stride)))
            for channel, stride in zip(channels, strides, strict=True)
        )
        self.merge = conv_bn_relu(out_channels * len(channels), out_channels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse the levels at the deepest resolution."""
        return self.merge(torch.cat([branch(f) for branch, f in zip(self.branches, features, strict=True)], dim=1))


class OneClassBottleneck(nn.Module):
    """Compress multi-scale teacher features into a compact one-class embedding.

    Multi-scale fusion at the deepest level's resolution, then a strided residual block that halves the
    resolution once more: anomalous detail does not survive the compression, so the decoder restores
    normal features.

    Args:
        channels: Teacher channels of each level, shallow to deep.
        strides: Stride of each level.
        embedding_channels: Channels of the embedding.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], embedding_channels: int) -> None:
        super().__init__()
        self.fusion = MultiScaleFeatureFusion(channels, strides, embedding_channels)
        self.residual = nn.Sequential(
            conv_bn_relu(embedding_channels, embedding_channels, stride=2),
            nn.Conv2d(embedding_channels, embedding_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(embedding_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(embedding_channels, embedding_channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(embedding_channels),
        )
        self.activation = nn.ReLU(inplace=True)

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Multi-scale fusion at the deepest level's resolution."""
        return self.fusion(features)

    def embed(self, fused: torch.Tensor) -> torch.Tensor:
        """Compress a fused map into the one-class embedding."""
        return self.activation(self.residual(fused) + self.shortcut(fused))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed the teacher features."""
        return self.embed(self.fuse(features))
