"""Feature-fusion residual module between the forward and the reverse student."""

from collections.abc import Sequence

import torch
from torch import nn

from .bottleneck import MultiScaleFeatureFusion


class FeatureFusionResidual(nn.Module):
    """Fuse the forward student's multi-scale features into the reverse student's bottleneck.

    The forward student only ever learned to reproduce the teacher on normal images; its fused
    multi-scale features are added as a residual to the teacher's fused features before the
    one-class compression. This gives the reverse student a second, anomaly-insensitive view of the
    image and damps anomalous disturbance in the embedding. The forward features are detached by
    default so the reverse loss does not pull the forward student away from the teacher.

    Args:
        channels: Forward-student channels of each level, shallow to deep.
        strides: Stride of each level.
        out_channels: Channels of the bottleneck's fused map.
        detach: Stop gradients into the forward student.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], out_channels: int, detach: bool = True) -> None:
        super().__init__()
        self.fusion = MultiScaleFeatureFusion(channels, strides, out_channels)
        self.detach = detach

    def forward(self, fused_teacher: torch.Tensor, student_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return ``fused_teacher`` plus the fused student features."""
        if self.detach:
            student_features = [feature.detach() for feature in student_features]
        return fused_teacher + self.fusion(student_features)
