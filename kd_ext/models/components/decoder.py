"""Decoder of the reverse-distillation student: embedding back to multi-scale teacher features."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .layers import conv_bn_relu


class ReverseDecoder(nn.Module):
    """Reconstruct teacher features deep to shallow from a one-class embedding.

    Each level upsamples the previous hidden state to the level's size, refines it with two 3x3
    convolutions and projects it with a 1x1 convolution (no activation, so teachers whose features
    are signed, such as EfficientNet's linear bottlenecks, can be matched).

    Args:
        embedding_channels: Channels of the embedding.
        channels: Teacher channels of each level, shallow to deep.
        width_multiplier: Hidden channels per level as a multiple of the teacher channels.
    """

    def __init__(self, embedding_channels: int, channels: Sequence[int], width_multiplier: int = 2) -> None:
        super().__init__()
        widths = [max(channel * width_multiplier, 32) for channel in channels]
        inputs = [*widths[1:], embedding_channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(in_width, width), conv_bn_relu(width, width))
            for in_width, width in zip(inputs, widths, strict=True)
        )
        self.heads = nn.ModuleList(
            nn.Conv2d(width, channel, kernel_size=1) for width, channel in zip(widths, channels, strict=True)
        )

    def forward(self, embedding: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Reconstruct the features.

        Args:
            embedding: One-class embedding.
            sizes: Spatial size of each level, shallow to deep.

        Returns:
            list[torch.Tensor]: Reconstructed features, shallow to deep.
        """
        hidden = embedding
        outputs: list[torch.Tensor] = []
        for level in reversed(range(len(self.blocks))):
            hidden = F.interpolate(hidden, size=sizes[level], mode="bilinear", align_corners=False)
            hidden = self.blocks[level](hidden)
            outputs.insert(0, self.heads[level](hidden))
        return outputs
