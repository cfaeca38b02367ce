"""Teacher and student backbones: offline pretrained weights, multi-scale feature stages."""

from .efficientnet_lite import LITE_WEIGHTS, load_efficientnet_lite_imagenet
from .registry import BACKBONES, BackboneSpec, create_backbone, get_backbone_spec, no_pretrained_downloads
from .staged import StagedFeatureExtractor, split_into_stages

__all__ = [
    "BACKBONES",
    "LITE_WEIGHTS",
    "BackboneSpec",
    "StagedFeatureExtractor",
    "create_backbone",
    "get_backbone_spec",
    "load_efficientnet_lite_imagenet",
    "no_pretrained_downloads",
    "split_into_stages",
]
