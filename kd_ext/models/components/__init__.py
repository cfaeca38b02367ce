"""Building blocks shared by kd_ext models: attention, bottleneck, decoder, fusion, students."""

from .attention import CBAM, ChannelAttention, SpatialAttention
from .bottleneck import OneClassBottleneck
from .decoder import ReverseDecoder
from .fusion import FeatureFusionResidual
from .students import build_forward_student, build_teacher

__all__ = [
    "CBAM",
    "ChannelAttention",
    "FeatureFusionResidual",
    "OneClassBottleneck",
    "ReverseDecoder",
    "SpatialAttention",
    "build_forward_student",
    "build_teacher",
]
