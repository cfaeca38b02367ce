"""Small convolution helpers."""

from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3) -> nn.Sequential:
    """Convolution, batch norm and ReLU.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Convolution stride.
        kernel_size: Convolution kernel size.

    Returns:
        nn.Sequential: The block.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def downsampler(in_channels: int, out_channels: int, steps: int) -> nn.Sequential:
    """Halve the resolution ``steps`` times with strided 3x3 convolutions (1x1 conv when ``steps`` is 0).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        steps: Number of stride-2 convolutions.

    Returns:
        nn.Sequential: The block.
    """
    if steps == 0:
        return conv_bn_relu(in_channels, out_channels, kernel_size=1)
    blocks = [conv_bn_relu(in_channels if step == 0 else out_channels, out_channels, stride=2) for step in range(steps)]
    return nn.Sequential(*blocks)
