"""Backbones kd_ext models can use as teacher, and how to get their pretrained weights."""

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import timm
from torch import nn

from .efficientnet_lite import LITE_WEIGHTS, load_efficientnet_lite_imagenet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)
HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and feed it.

    Attributes:
        name: Name users pass (``backbone=...``).
        timm_name: timm architecture that implements it.
        layers: Default feature levels (timm module names, shallow to deep).
        mean: Per-channel normalisation mean the pretrained weights expect.
        std: Per-channel normalisation std the pretrained weights expect.
        offline_weights: Whether pretrained weights ship with an installed package (no network).
    """

    name: str
    timm_name: str
    layers: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    offline_weights: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        *(
            BackboneSpec(
                name=name,
                timm_name=weights.timm_name,
                layers=("blocks.1", "blocks.2", "blocks.4"),
                mean=TF_LITE_MEAN,
                std=TF_LITE_STD,
                offline_weights=True,
            )
            for name, weights in LITE_WEIGHTS.items()
        ),
        BackboneSpec(name="resnet18", timm_name="resnet18", layers=("layer1", "layer2", "layer3")),
        BackboneSpec(name="resnet34", timm_name="resnet34", layers=("layer1", "layer2", "layer3")),
        BackboneSpec(name="wide_resnet50_2", timm_name="wide_resnet50_2", layers=("layer1", "layer2", "layer3")),
    )
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """Return the spec of a supported backbone.

    Args:
        name: Backbone name, one of :data:`BACKBONES`.

    Returns:
        BackboneSpec: Its spec.

    Raises:
        ValueError: If the name is unknown.
    """
    if name not in BACKBONES:
        msg = f"Unknown backbone '{name}'. Supported backbones: {', '.join(sorted(BACKBONES))}."
        raise ValueError(msg)
    return BACKBONES[name]


def _hub_weights_cached(timm_name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415
    except ModuleNotFoundError:
        return False
    hub_id = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None)
    if not hub_id:
        return False
    return any(
        isinstance(try_to_load_from_cache(hub_id, filename), str)
        for filename in ("model.safetensors", "pytorch_model.bin")
    )


def _hub_unreachable_reason() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "") not in {"", "0"}:
        return "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError as error:
        return f"the weights hub cannot be reached ({error})"


def ensure_pretrained_weights_available(spec: BackboneSpec) -> None:
    """Fail fast, with a clear message, when pretrained weights cannot be obtained.

    Without this check timm retries the download for about a minute before failing.

    Args:
        spec: Backbone spec.

    Raises:
        RuntimeError: If the weights are neither shipped, cached nor downloadable.
    """
    if spec.offline_weights or _hub_weights_cached(spec.timm_name):
        return
    reason = _hub_unreachable_reason()
    if reason is None:
        return
    msg = (
        f"Cannot load ImageNet weights for backbone '{spec.name}': they are not in the local cache and {reason}. "
        f"Use one of {', '.join(repr(name) for name in LITE_WEIGHTS)} (their weights ship with the "
        f"{', '.join(repr(weights.package) for weights in LITE_WEIGHTS.values())} packages), download the weights "
        "once on a machine with internet access, or pass pre_trained=False for a randomly initialised teacher "
        "(tests only)."
    )
    raise RuntimeError(msg)


def create_backbone(name: str, pre_trained: bool = True) -> nn.Module:
    """Create a full timm backbone, with ImageNet weights when ``pre_trained``.

    Args:
        name: Backbone name, one of :data:`BACKBONES`.
        pre_trained: Load ImageNet weights (offline for the EfficientNet-Lite backbones).

    Returns:
        nn.Module: The timm model.
    """
    spec = get_backbone_spec(name)
    if not pre_trained:
        return timm.create_model(spec.timm_name, pretrained=False)
    if spec.offline_weights:
        model = timm.create_model(spec.timm_name, pretrained=False)
        return load_efficientnet_lite_imagenet(model, LITE_WEIGHTS[spec.name])
    ensure_pretrained_weights_available(spec)
    return timm.create_model(spec.timm_name, pretrained=True)


def resolve_layers(spec: BackboneSpec, layers: Sequence[str] | None) -> tuple[str, ...]:
    """Return the requested feature levels, or the backbone's defaults.

    Args:
        spec: Backbone spec.
        layers: Requested levels, or ``None``.

    Returns:
        tuple[str, ...]: Feature levels, shallow to deep.
    """
    return spec.layers if layers is None else tuple(layers)


@contextmanager
def no_pretrained_downloads() -> Iterator[None]:
    """Build timm models without fetching pretrained weights (for models whose checkpoint provides every weight).

    Yields:
        None: Inside the block ``timm.create_model`` ignores ``pretrained=True``.
    """
    create = timm.create_model

    def create_without_download(*args: object, **kwargs: object) -> nn.Module:
        kwargs["pretrained"] = False
        return create(*args, **kwargs)

    with mock.patch.object(timm, "create_model", create_without_download):
        yield
