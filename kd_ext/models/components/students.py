"""Teacher and forward-student feature extractors built from a backbone spec."""

from collections.abc import Sequence

from torch import nn

from kd_ext.backbones import StagedFeatureExtractor, create_backbone, split_into_stages

from .attention import CBAM


def build_teacher(backbone: str, layers: Sequence[str], pre_trained: bool = True) -> StagedFeatureExtractor:
    """Frozen multi-scale teacher.

    Args:
        backbone: Backbone name.
        layers: Feature levels, shallow to deep.
        pre_trained: Load ImageNet weights.

    Returns:
        StagedFeatureExtractor: The teacher, in eval mode with gradients off.
    """
    teacher = StagedFeatureExtractor(split_into_stages(create_backbone(backbone, pre_trained), layers))
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    return teacher.eval()


def build_forward_student(
    backbone: str,
    layers: Sequence[str],
    channels: Sequence[int],
    attention: bool = True,
) -> StagedFeatureExtractor:
    """Randomly initialised student with the teacher's first stages and optional CBAM after each.

    Args:
        backbone: Backbone name (the teacher's).
        layers: Feature levels, shallow to deep.
        channels: Channels of each level (for the attention modules).
        attention: Insert CBAM after each stage.

    Returns:
        StagedFeatureExtractor: The student.
    """
    stages = split_into_stages(create_backbone(backbone, pre_trained=False), layers)
    adapters: list[nn.Module | None] = [CBAM(channel) if attention else None for channel in channels]
    return StagedFeatureExtractor(stages, adapters)
