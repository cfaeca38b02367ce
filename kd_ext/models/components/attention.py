"""Convolutional block attention (CBAM): channel attention followed by spatial attention."""

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Squeeze channels with average and max pooling, excite through a shared MLP.

    Args:
        channels: Number of input channels.
        reduction: Channel reduction of the hidden layer.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reweight channels."""
        average = self.mlp(features.mean(dim=(2, 3), keepdim=True))
        maximum = self.mlp(features.amax(dim=(2, 3), keepdim=True))
        return features * torch.sigmoid(average + maximum)


class SpatialAttention(nn.Module):
    """Weight positions from the channel-wise mean and max maps.

    Args:
        kernel_size: Size of the convolution over the two pooled maps.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reweight positions."""
        pooled = torch.cat([features.mean(dim=1, keepdim=True), features.amax(dim=1, keepdim=True)], dim=1)
        return features * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel then spatial attention (Woo et al., ECCV 2018).

    Args:
        channels: Number of input channels.
        reduction: Channel reduction of the channel-attention MLP.
        kernel_size: Kernel size of the spatial attention.
    """

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply channel then spatial attention."""
        return self.spatial(self.channel(features))
