"""Building blocks of kd_ext models: attention, bottleneck, decoder, fusion, prior, students, teacher, fine-tuning."""

from .attention import CBAM, ChannelAttention, SpatialAttention
from .bottleneck import OneClassBottleneck
from .decoder import ReverseDecoder
from .finetune import FinetuneReport, FinetuneSchedule, TeacherFinetune, finetune_teacher, resolve_teacher_finetune
from .fusion import FeatureFusionResidual
from .prior import MapStandardiser, NormalFeaturePrior, PriorFusion, PriorRule, PriorScope
from .students import build_forward_student, build_teacher
from .teacher import FrozenTeacherModel, check_score_options, level_strides, probe_levels, require_halving_strides

__all__ = [
    "CBAM",
    "ChannelAttention",
    "FeatureFusionResidual",
    "FinetuneReport",
    "FinetuneSchedule",
    "FrozenTeacherModel",
    "MapStandardiser",
    "NormalFeaturePrior",
    "OneClassBottleneck",
    "PriorFusion",
    "PriorRule",
    "PriorScope",
    "ReverseDecoder",
    "SpatialAttention",
    "TeacherFinetune",
    "build_forward_student",
    "build_teacher",
    "check_score_options",
    "finetune_teacher",
    "level_strides",
    "probe_levels",
    "require_halving_strides",
    "resolve_teacher_finetune",
]
