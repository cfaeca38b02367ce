"""Building blocks shared by kd_ext models: attention, bottleneck, decoder, fusion, prior, students, teacher."""

from .attention import CBAM, ChannelAttention, SpatialAttention
from .bottleneck import OneClassBottleneck
from .decoder import ReverseDecoder
from .fusion import FeatureFusionResidual
from .prior import MapStandardiser, NormalFeaturePrior, PriorFusion
from .students import build_forward_student, build_teacher
from .teacher import FrozenTeacherModel, check_score_options, level_strides, probe_levels, require_halving_strides

__all__ = [
    "CBAM",
    "ChannelAttention",
    "FeatureFusionResidual",
    "FrozenTeacherModel",
    "MapStandardiser",
    "NormalFeaturePrior",
    "OneClassBottleneck",
    "PriorFusion",
    "ReverseDecoder",
    "SpatialAttention",
    "build_forward_student",
    "build_teacher",
    "check_score_options",
    "level_strides",
    "probe_levels",
    "require_halving_strides",
]
