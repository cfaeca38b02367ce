"""A narrow EfficientNet-Lite trunk for students, initialised by channel slicing of EfficientNet-Lite0.

The trunk has EfficientNet-Lite0's block layout up to ``blocks.4`` (stride 16: the levels ``blocks.1/2/4`` the
Lite0 teachers use, strides 4/8/16) with every channel count multiplied by ``width`` (rounded to multiples of 8,
stem included) and the same ReLU6, TF "same" padding and 0.5 normalisation. With ``pre_trained`` each tensor is
the leading slice of the matching Lite0 ImageNet tensor (the first output, input and BatchNorm channels): the
trunk starts from ImageNet filters rather than noise and is then trained by distillation.
"""

from collections.abc import Sequence
from functools import partial

import torch
from timm.models._efficientnet_builder import BN_EPS_TF_DEFAULT, decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from torch import nn

from .registry import create_backbone
from .staged import StagedFeatureExtractor, split_into_stages

LITE0_TRUNK_ARCH = (
    ("ds_r1_k3_s1_e1_c16",),
    ("ir_r2_k3_s2_e6_c24",),
    ("ir_r2_k5_s2_e6_c40",),
    ("ir_r3_k3_s2_e6_c80",),
    ("ir_r3_k5_s1_e6_c112",),
)
"""EfficientNet-Lite0's first five stages (``blocks.0`` - ``blocks.4``), timm's notation."""

SMALL_TRUNK_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
SMALL_TRUNK_WIDTH = 0.5
LITE0_STEM = 32


def slice_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The leading slice of every ``source`` tensor with the shape of the same-named ``target`` tensor.

    Args:
        source: State dict of the wide network.
        target: State dict of the narrow network (same key names, no dimension larger than the source's).

    Returns:
        dict: ``target``'s keys with sliced copies of ``source``'s tensors.

    Raises:
        ValueError: If a key is missing from ``source`` or a target dimension exceeds the source's.
    """
    sliced = {}
    for key, reference in target.items():
        if key not in source:
            msg = f"Cannot slice '{key}': the source network has no such tensor."
            raise ValueError(msg)
        tensor = source[key]
        if tensor.dim() != reference.dim() or any(
            want > have for want, have in zip(reference.shape, tensor.shape, strict=True)
        ):
            msg = f"Cannot slice '{key}' {tuple(tensor.shape)} down to {tuple(reference.shape)}."
            raise ValueError(msg)
        sliced[key] = tensor[tuple(slice(0, size) for size in reference.shape)].clone() if tensor.dim() else tensor
    return sliced


def _narrow_lite0(width: float) -> EfficientNet:
    return EfficientNet(
        block_args=decode_arch_def([list(stage) for stage in LITE0_TRUNK_ARCH], 1.0, fix_first_last=True),
        num_features=round_channels(1280, width),
        stem_size=round_channels(LITE0_STEM, width),
        fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=width),
        act_layer=nn.ReLU6,
        norm_layer=partial(nn.BatchNorm2d, eps=BN_EPS_TF_DEFAULT),
        pad_type="same",
    )


def build_small_lite_trunk(
    width: float = SMALL_TRUNK_WIDTH,
    layers: Sequence[str] = SMALL_TRUNK_LAYERS,
    pre_trained: bool = True,
) -> StagedFeatureExtractor:
    """The narrow, trainable EfficientNet-Lite0-style trunk.

    Args:
        width: Channel multiplier against Lite0 (``0 < width <= 1``).
        layers: Feature levels (timm names up to ``blocks.4``), shallow to deep.
        pre_trained: Initialise from Lite0's offline ImageNet weights by channel slicing; random otherwise.

    Returns:
        StagedFeatureExtractor: The trunk, trainable (gradients on).

    Raises:
        ValueError: If ``width`` is outside ``(0, 1]``.
    """
    if not 0 < width <= 1:
        msg = f"The small trunk's width must lie in (0, 1], got {width}; 0.5 keeps it under half of Lite0."
        raise ValueError(msg)
    network = _narrow_lite0(width)
    if pre_trained:
        lite0 = create_backbone("efficientnet_lite0", pre_trained=True).state_dict()
        state = network.state_dict()
        target = {key: value for key, value in state.items() if key.startswith(("conv_stem", "bn1", "blocks."))}
        network.load_state_dict(slice_state_dict(lite0, target), strict=False)
    return StagedFeatureExtractor(split_into_stages(network, list(layers)))


def lite0_reference_trunk(layers: Sequence[str] = SMALL_TRUNK_LAYERS) -> StagedFeatureExtractor:
    """EfficientNet-Lite0 cut at the same levels (random weights): what the small trunk is measured against."""
    return StagedFeatureExtractor(split_into_stages(create_backbone("efficientnet_lite0", pre_trained=False), layers))
