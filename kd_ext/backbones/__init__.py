"""Teacher and student backbones: offline pretrained weights, multi-scale feature stages."""

from .efficientnet_lite import load_efficientnet_lite0_imagenet
from .registry import BACKBONES, BackboneSpec, create_backbone, get_backbone_spec, no_pretrained_downloads
from .staged import StagedFeatureExtractor, split_into_stages

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "StagedFeatureExtractor",
    "create_backbone",
    "get_backbone_spec",
    "load_efficientnet_lite0_imagenet",
    "no_pretrained_downloads",
    "split_into_stages",
]
