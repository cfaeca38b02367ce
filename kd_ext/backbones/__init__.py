"""Teacher and student backbones: offline pretrained weights, multi-scale feature stages."""

from .efficientnet_lite import LITE_WEIGHTS, load_efficientnet_lite_imagenet
from .registry import BACKBONES, BackboneSpec, create_backbone, get_backbone_spec, no_pretrained_downloads
from .small_lite import build_small_lite_trunk, lite0_reference_trunk
from .staged import StagedFeatureExtractor, split_into_stages

__all__ = [
    "BACKBONES",
    "LITE_WEIGHTS",
    "BackboneSpec",
    "StagedFeatureExtractor",
    "build_small_lite_trunk",
    "create_backbone",
    "get_backbone_spec",
    "lite0_reference_trunk",
    "load_efficientnet_lite_imagenet",
    "no_pretrained_downloads",
    "split_into_stages",
]
