"""Features IRs: the anomaly-map tail on the edge through kd_ext's kernels, against the torch model.

A BiDirMSKD and an MTHF (random teachers, 64x64 inputs) are trained for one epoch on hazelnut_toy once per module
(the post-processor gets real normalisation statistics and thresholds), exported to OpenVINO in both modes, and
scored on the real test images by the torch model, the standard IR and the features IR (real OpenVINO, real
compiled kernel). The two-stage fusion paths of the tail are checked against MTHF's torch fusion without OpenVINO.
Models with a fitted normal-feature prior (untrained, the prior calibrated directly on real training images) are
exported once per model; every prior scope and rule is checked on that IR's outputs against torch.
"""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from kd_ext import kernels
from kd_ext.cli import main
from kd_ext.edge import EdgeModel, EdgeModelError
from kd_ext.edge.contract import (
    PRIOR_OUTPUT,
    RT_INFO_KEY,
    TAIL_KEY,
    AnomalyTail,
    ExportMode,
    MapTail,
    Normalization,
    TailGroup,
    TailPrior,
    feature_output,
    top_k_count,
)
from kd_ext.edge.tail import (
    bilinear_resize,
    fuse_prior,
    fuse_standardised,
    gaussian_blur,
    raw_map_and_score,
    run_tail,
    two_stage_numpy,
)
from kd_ext.export import export_openvino
from kd_ext.export.features import anomaly_tail, feature_layout, features_map_function, supports_features
from kd_ext.models import MTHF, BiDirMSKD
from kd_ext.models.bidirmskd.torch_model import BiDirMSKDModel
from kd_ext.models.components import PriorFusion
from kd_ext.models.components.prior import PriorRule, PriorScope
from kd_ext.models.mthf.anomaly_map import MTHFAnomalyMap
from kd_ext.models.mthf.torch_model import MTHFModel

DATA = Path(__file__).parents[2] / "shared" / "data"
SIZE = (64, 64)
pytestmark = pytest.mark.skipif(not kernels.native_available(), reason="kd_ext._native is not built")


def _train(model_class: type, root: Path) -> torch.nn.Module:
    if not (DATA / "hazelnut_toy").is_dir():
        pytest.skip(f"hazelnut_toy data not found at {DATA / 'hazelnut_toy'}")
    seed_everything(0, workers=True)
    datamodule = MVTecAD(root=DATA, category="hazelnut_toy", train_batch_size=8, eval_batch_size=8, num_workers=0)
    module = model_class(
        pre_trained=False, pre_processor=model_class.configure_pre_processor(SIZE), visualizer=False, epochs=1
    )
    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, accelerator="cpu", devices=1)
    engine.fit(module, datamodule=datamodule)
    return module.eval()


def _hazelnut_images(split: str, count: int | None = None) -> torch.Tensor:
    """The first ``count`` (all) images of hazelnut_toy's ``"train"`` or ``"test"`` split, resized to ``SIZE``."""
    if not (DATA / "hazelnut_toy").is_dir():
        pytest.skip(f"hazelnut_toy data not found at {DATA / 'hazelnut_toy'}")
    datamodule = MVTecAD(root=DATA, category="hazelnut_toy", eval_batch_size=8, num_workers=0)
    datamodule.setup("fit" if split == "train" else "test")
    dataset = datamodule.train_data if split == "train" else datamodule.test_data
    batch = torch.stack([dataset[index].image for index in range(count or len(dataset))])
    return F.interpolate(batch, size=SIZE, mode="bilinear", align_corners=False, antialias=True).contiguous()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _hazelnut_images("test")


@pytest.fixture(scope="module", params=["BiDirMSKD", "MTHF"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model_class = {"BiDirMSKD": BiDirMSKD, "MTHF": MTHF}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    module = _train(model_class, root / "train")
    standard = export_openvino(module, root / "standard", "fp32", input_size=SIZE, mode="standard")
    features = export_openvino(module, root / "features", "fp32", input_size=SIZE, mode="features")
    return module, standard, features


@torch.no_grad()
def _torch_outputs(module: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    out = module(images)
    return {
        "pred_score": out.pred_score.numpy(),
        "pred_label": out.pred_label.numpy(),
        "anomaly_map": out.anomaly_map.reshape(len(images), *SIZE).numpy(),
        "pred_mask": out.pred_mask.reshape(len(images), *SIZE).numpy(),
    }


def test_features_ir_matches_torch(exported: tuple, images: torch.Tensor) -> None:
    module, _, features = exported
    expected = _torch_outputs(module, images)
    edge = EdgeModel(features, precision_hint="f32", mode="latency")
    assert edge.tail is not None
    predictions = [edge.predict(images[i : i + 4].numpy()) for i in range(0, len(images), 4)]
    maps = np.concatenate([p.anomaly_map for p in predictions])
    scores = np.concatenate([p.pred_score for p in predictions])
    labels = np.concatenate([p.pred_label for p in predictions])
    assert np.abs(maps - expected["anomaly_map"]).max() <= 1e-5
    assert np.abs(scores - expected["pred_score"]).max() <= 1e-5
    # anomalib's adaptive threshold is one of the scores (normalised to 0.5): that image's label is a tie, which
    # float32 noise within the 1e-5 budget may break either way. Every other label must be identical.
    tie = np.abs(expected["pred_score"] - 0.5) <= 1e-5
    assert tie.sum() <= 1
    np.testing.assert_array_equal(labels[~tie], expected["pred_label"][~tie])
    masks = np.concatenate([p.pred_mask for p in predictions])
    near = np.abs(expected["anomaly_map"] - 0.5) <= 1e-5  # a pixel at the threshold may flip with 1e-6 noise
    np.testing.assert_array_equal(masks[~near], expected["pred_mask"][~near])


def test_features_ir_equals_standard_ir_in_throughput_mode(exported: tuple, images: torch.Tensor) -> None:
    _, standard, features = exported
    batches = [(i, images[i : i + 3].numpy()) for i in range(0, len(images), 3)]
    reference = dict(EdgeModel(standard, precision_hint="f32").iter_predict(batches))
    tail_model = EdgeModel(features, precision_hint="f32", num_requests=2)
    for key, prediction in tail_model.iter_predict(batches):
        assert np.abs(prediction.anomaly_map - reference[key].anomaly_map).max() <= 1e-5
        # The in-IR tail rounds differently from the kernel (1e-7): a score that ties with the threshold (the
        # validation images are the test images here) may flip in the standard IR; the features IR follows torch.
        clear = np.abs(reference[key].pred_score - 0.5) > 1e-5
        np.testing.assert_array_equal(prediction.pred_label[clear], reference[key].pred_label[clear])


def test_standard_ir_stays_anomalibs(exported: tuple) -> None:
    import openvino as ov

    module, standard, features = exported
    core = ov.Core()
    standard_model, features_model = core.read_model(standard), core.read_model(features)
    names = {name for output in standard_model.outputs for name in output.get_names()}
    assert {"pred_score", "anomaly_map", "pred_label", "pred_mask"} <= names
    assert not standard_model.has_rt_info([RT_INFO_KEY, TAIL_KEY])
    assert standard_model.get_rt_info([RT_INFO_KEY, "export_mode"]).astype(str) == "standard"
    assert EdgeModel(standard).tail is None
    feature_names = {name for output in features_model.outputs for name in output.get_names()}
    prior = module.model.prior_fusion is not None and module.model.prior_fusion.ready
    assert (PRIOR_OUTPUT in feature_names) == prior  # BiDirMSKD's default prior is fitted in training
    assert all(name.startswith("feature/") for name in feature_names - {PRIOR_OUTPUT})
    assert EdgeModel(features).describe()["anomaly_tail"].startswith("kd_ext.kernels")


def test_tail_metadata_in_rt_info(exported: tuple) -> None:
    import openvino as ov

    module, _, features = exported
    tail = AnomalyTail.from_json(ov.Core().read_model(features).get_rt_info([RT_INFO_KEY, TAIL_KEY]).astype(str))
    post = module.post_processor
    assert tail.output_size == SIZE
    assert tail.sigma == module.model.anomaly_map_generator.sigma
    assert tail.score == module.model.score_mode
    assert tail.normalization is not None
    assert tail.normalization.image_threshold == pytest.approx(float(post.image_threshold))
    assert tail.normalization.pixel_max == pytest.approx(float(post.pixel_max))
    assert tail.image_threshold == pytest.approx(0.5)
    if isinstance(module, MTHF):
        generator = module.model.anomaly_map_generator
        assert len(tail.groups) == len(module.model.groups)
        assert tail.group_fusion == generator.group_fusion
        assert tail.group_std == pytest.approx(generator.map_std.tolist())
    else:
        assert tail.group_fusion == "none"
        assert tail.groups[0].fusion == module.model.anomaly_map_generator.fusion


def test_kd_ext_infer_reads_a_features_ir(exported: tuple, images: torch.Tensor, tmp_path: Path) -> None:
    from PIL import Image

    module, _, features = exported
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        array = (images[index].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index}.png")
    out = tmp_path / "out"
    assert main(["infer", str(features), str(folder), "--out", str(out), "--batch-size", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["anomaly_tail"].startswith("kd_ext.kernels")
    assert len(results["images"]) == 3
    del module


def test_tail_is_torch_free(exported: tuple) -> None:
    _, _, features = exported
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"torch", "anomalib", "torchvision", "lightning"}}:
            raise ImportError(f"blocked import of {{name}}")
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from kd_ext.edge import EdgeModel
model = EdgeModel({str(features)!r})
prediction = model.predict(np.full((2, 3, {SIZE[0]}, {SIZE[1]}), 0.5, dtype=np.float32))
assert prediction.anomaly_map.shape == (2, {SIZE[0]}, {SIZE[1]})
assert not any(name.split(".")[0] in {{"torch", "anomalib"}} for name in sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_features_ir_refuses_a_task(exported: tuple) -> None:
    _, _, features = exported
    with pytest.raises(EdgeModelError, match="drop --task"):
        EdgeModel(features, task="bottle")


# ---------------------------------------------------------------- export refusals (no export runs)


def test_features_mode_needs_a_static_size_and_a_known_mode() -> None:
    module = BiDirMSKD(pre_trained=False, visualizer=False)
    with pytest.raises(ValueError, match="static input_size"):
        export_openvino(module, "unused", input_size=None, mode="features")
    with pytest.raises(ValueError, match="Unknown export mode"):
        export_openvino(module, "unused", mode="tail")
    with pytest.raises(ValueError, match="int8_acq"):
        export_openvino(module, "unused", "int8_acq", calibration=object(), mode=ExportMode.FEATURES)


def test_auto_mode_picks_features_where_it_applies() -> None:
    from kd_ext.export import Precision
    from kd_ext.export.openvino import _export_mode

    bidir = BiDirMSKD(pre_trained=False, visualizer=False)
    assert _export_mode("auto", Precision.FP32, SIZE, bidir) is ExportMode.FEATURES
    assert _export_mode("auto", Precision.INT8_PTQ, SIZE, bidir) is ExportMode.FEATURES
    assert _export_mode("auto", Precision.INT8_ACQ, SIZE, bidir) is ExportMode.STANDARD
    assert _export_mode("auto", Precision.FP32, None, bidir) is ExportMode.STANDARD
    other = mock.Mock(model=torch.nn.Identity())
    assert _export_mode("auto", Precision.FP32, SIZE, other) is ExportMode.STANDARD
    assert _export_mode("standard", Precision.FP32, SIZE, bidir) is ExportMode.STANDARD


def test_auto_mode_picks_features_for_a_fitted_prior() -> None:
    from kd_ext.export import Precision
    from kd_ext.export.openvino import _export_mode

    module = BiDirMSKD(pre_trained=False, visualizer=False)  # prior=True, prior_scope="score": the default
    with mock.patch.object(PriorFusion, "ready", new=property(lambda self: True)):
        assert _export_mode("auto", Precision.FP32, SIZE, module) is ExportMode.FEATURES
        assert _export_mode("auto", Precision.INT8_PTQ, SIZE, module) is ExportMode.FEATURES


# ---------------------------------------------------------------- a fitted normal-feature prior

PRIOR_VARIANTS = [("score", "mean"), ("score", "max"), ("map", "mean"), ("map", "max")]
STANDARD_VARIANT = {"BiDirMSKD": ("map", "max"), "MTHF": ("score", "mean")}
"""The variant each model's standard IR is exported with (the features IR's graph is the same for every variant)."""


def _set_prior(module: torch.nn.Module, scope: str, rule: str) -> None:
    fusion = module.model.prior_fusion
    fusion.scope = PriorScope(scope)
    fusion.standardiser.rule = PriorRule(rule)


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return _hazelnut_images("train", 16)


@pytest.fixture(scope="module", params=["BiDirMSKD", "MTHF"])
def prior_exported(
    request: pytest.FixtureRequest, train_images: torch.Tensor, tmp_path_factory: pytest.TempPathFactory
):
    """An untrained model whose prior is calibrated on real normal images, its features IR and a standard IR."""
    model_class = {"BiDirMSKD": BiDirMSKD, "MTHF": MTHF}[request.param]
    torch.manual_seed(0)
    module = model_class(
        pre_trained=False, prior=True, pre_processor=model_class.configure_pre_processor(SIZE), visualizer=False
    ).eval()
    transform = module.pre_processor.transform
    module.model.calibrate(lambda: [transform(train_images[:8]), transform(train_images[8:])])
    assert module.model.prior_fusion.ready
    root = tmp_path_factory.mktemp(f"{request.param}_prior")
    _set_prior(module, *STANDARD_VARIANT[request.param])
    standard = export_openvino(module, root / "standard", "fp32", input_size=SIZE, mode="standard")
    features = export_openvino(module, root / "features", "fp32", input_size=SIZE, mode="features")
    return request.param, module, standard, features


def _ir_outputs(xml: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    return {port.get_any_name(): np.ascontiguousarray(value) for port, value in result.items()}


PRIOR_BUDGET = 5e-5
"""Parity budget where a whole prior model runs in one IR: its Mahalanobis distances (float32, far larger than the
standardised map) are standardised inside the graph, which scales their rounding up by the mean over the spread."""


def _close(actual: np.ndarray, expected: np.ndarray, budget: float = 1e-5) -> bool:
    """Within the tail's parity budget: ``budget`` of the maps' scale (raw maps: the calibrated-only model has no
    post-processor statistics, so the maps are not normalised to [0, 1])."""
    return bool(np.abs(actual - expected).max() <= budget * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize(("scope", "rule"), PRIOR_VARIANTS)
def test_prior_tail_on_the_features_ir_matches_torch(
    prior_exported: tuple, images: torch.Tensor, scope: str, rule: str
) -> None:
    _, module, _, features = prior_exported
    _set_prior(module, scope, rule)
    outputs = _ir_outputs(features, images)
    assert PRIOR_OUTPUT in outputs
    tail, _ = anomaly_tail(module, SIZE)
    assert tail.prior == TailPrior(
        output=PRIOR_OUTPUT,
        rule=rule,
        scope=scope,
        map_mean=tuple(module.model.prior_fusion.standardiser.map_mean.tolist()),
        map_std=tuple(module.model.prior_fusion.standardiser.map_std.tolist()),
    )
    result = run_tail(tail, outputs)
    with torch.no_grad():
        expected = module(images)
    expected_maps = expected.anomaly_map.reshape(result["anomaly_map"].shape).numpy()
    assert _close(result["anomaly_map"], expected_maps)
    assert _close(result["pred_score"], expected.pred_score.numpy())
    without = run_tail(AnomalyTail(**{**tail.__dict__, "prior": None}), outputs)  # the distillation map alone
    assert not _close(without["pred_score"], expected.pred_score.numpy())  # the prior decides the score
    if scope == "score":
        np.testing.assert_array_equal(result["anomaly_map"], without["anomaly_map"])
    else:
        assert not _close(without["anomaly_map"], expected_maps)


def test_prior_features_ir_equals_the_standard_ir_and_torch_on_the_edge(
    prior_exported: tuple, images: torch.Tensor
) -> None:
    name, module, standard, features = prior_exported
    _set_prior(module, *STANDARD_VARIANT[name])
    edge = EdgeModel(features, precision_hint="f32")
    assert edge.tail is not None
    assert edge.tail.prior is not None
    assert (edge.tail.prior.scope, edge.tail.prior.rule) == STANDARD_VARIANT[name]
    reference = EdgeModel(standard, precision_hint="f32")
    with torch.no_grad():
        expected = module(images)
    for start in range(0, len(images), 4):
        batch = images[start : start + 4]
        prediction, baseline = edge.predict(batch.numpy()), reference.predict(batch.numpy())
        torch_maps = expected.anomaly_map[start : start + 4].reshape(prediction.anomaly_map.shape).numpy()
        assert _close(prediction.anomaly_map, torch_maps)
        assert _close(prediction.pred_score, expected.pred_score[start : start + 4].numpy())
        assert _close(prediction.anomaly_map, baseline.anomaly_map, PRIOR_BUDGET)
        assert _close(prediction.pred_score, baseline.pred_score, PRIOR_BUDGET)
        assert _close(baseline.anomaly_map, torch_maps, PRIOR_BUDGET)


def test_int8_keeps_the_prior_in_float(prior_exported: tuple) -> None:
    """Every op between the networks and the prior output is in the quantisation's ignored scope."""
    import openvino as ov

    from kd_ext.export.quantization import anomaly_map_ignored_scope

    _, _, _, features = prior_exported
    ir = ov.Core().read_model(features)
    ignored = set(anomaly_map_ignored_scope(ir).names)
    result = next(output.get_node() for output in ir.outputs if PRIOR_OUTPUT in output.get_names())
    stack, prior_ops, network = [result.input_value(0).get_node()], [], {"Convolution", "GroupConvolution"}
    while stack:
        op = stack.pop()
        if op.get_type_name() in {"Constant", "Parameter"} | network or op.get_friendly_name() not in ignored:
            continue  # the teacher's features feed the prior: quantised with the networks
        prior_ops.append(op)
        stack.extend(value.get_node() for value in op.input_values())
    types = {op.get_type_name() for op in prior_ops}
    assert {"MatMul", "Sqrt"} <= types, types  # the Mahalanobis distance itself stays float
    assert "AvgPool" in types or "ReduceMean" in types, types  # and the pooled embedding it reads


def test_int8_map_check_sees_the_prior(prior_exported: tuple, images: torch.Tensor) -> None:
    """The INT8 map check compares the fused (score) map too when the anomaly map is the distillation map."""
    _, module, _, features = prior_exported
    outputs = _ir_outputs(features, images[:4])
    moved = {**outputs, PRIOR_OUTPUT: outputs[PRIOR_OUTPUT] * np.float32(1.5)}
    for scope in ("score", "map"):
        _set_prior(module, scope, "mean")
        maps = features_map_function(anomaly_tail(module, SIZE)[0])
        assert np.abs(np.asarray(maps(moved)) - np.asarray(maps(outputs))).max() > 1e-3


# ---------------------------------------------------------------- MTHF's stage 2 without OpenVINO


@pytest.mark.parametrize("group_fusion", ["mean", "max"])
def test_two_stage_tail_matches_mthf_fusion(group_fusion: str) -> None:
    torch.manual_seed(0)
    fusion = MTHFAnomalyMap(num_groups=3, group_fusion=group_fusion, sigma=4.0, backend="reference")
    fusion.map_mean.copy_(torch.tensor([0.2, 0.5, 0.1]))
    fusion.map_std.copy_(torch.tensor([0.05, 0.3, 0.02]))
    shapes = [[(16, 16, 16), (24, 8, 8)], [(16, 16, 16), (24, 8, 8), (40, 4, 4)], [(24, 8, 8), (40, 4, 4)]]
    pairs = [
        ([torch.rand(2, *shape) for shape in group], [torch.rand(2, *shape) for shape in group]) for group in shapes
    ]
    expected = fusion(pairs, SIZE).numpy()
    features: dict[str, np.ndarray] = {}
    groups = []
    for g, (teacher, student) in enumerate(pairs):
        names = []
        for level, (t, s) in enumerate(zip(teacher, student, strict=True)):
            features[f"t{g}{level}"], features[f"s{g}{level}"] = t.numpy(), s.numpy()
            names.append((f"t{g}{level}", f"s{g}{level}"))
        groups.append(TailGroup(pairs=tuple(names), fusion="mean"))
    tail = AnomalyTail(
        output_size=SIZE,
        groups=tuple(groups),
        sigma=4.0,
        group_fusion=group_fusion,
        group_mean=tuple(fusion.map_mean.tolist()),
        group_std=tuple(fusion.map_std.tolist()),
    )
    maps, scores = raw_map_and_score(tail, features)
    assert np.abs(maps - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(scores, expected.reshape(2, -1).max(axis=1), rtol=1e-5, atol=1e-5)
    numpy_maps, _ = two_stage_numpy(tail, features)
    assert np.abs(numpy_maps - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


# ---------------------------------------------------------------- the model's own tail description, without OpenVINO


def _tail_model(name: str, score_mode: str, prior: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "BiDirMSKD":
        model = BiDirMSKDModel(pre_trained=False, score_mode=score_mode, prior=prior)
    else:
        model = MTHFModel(
            pre_trained=False, score_mode=score_mode, prior=prior, fusion_stages=2 if name == "MTHF" else 1
        )
        model.anomaly_map_generator.map_mean.copy_(torch.tensor([0.2, 0.5, 0.1]))
        model.anomaly_map_generator.map_std.copy_(torch.tensor([0.05, 0.3, 0.02]))
    model.eval()
    if prior:
        normal = torch.rand(8, 3, *SIZE, generator=torch.Generator().manual_seed(1))
        model.calibrate(lambda: [normal[:4], normal[4:]])
    return model


@pytest.mark.parametrize("name", ["BiDirMSKD", "MTHF", "MTHF one stage"])
@pytest.mark.parametrize("score_mode", ["max", "topk"])
@pytest.mark.parametrize("prior", [False, True])
def test_model_tail_on_the_edge_is_the_torch_forward(name: str, score_mode: str, prior: bool) -> None:
    """``model.tail()`` bound to the model's features and run by the numpy tail gives the torch forward's outputs."""
    model = _tail_model(name, score_mode, prior)
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
        (tensors, groups), distances = feature_layout(model, images)
    assert supports_features(model)
    features = {feature_output(index): tensor.numpy() for index, tensor in enumerate(tensors)}
    if distances is not None:
        features[PRIOR_OUTPUT] = distances.numpy()
    description = model.tail()
    assert (description.prior is not None) == prior
    tail = description.bind(SIZE, tuple(tuple((feature_output(t), feature_output(s)) for t, s in g) for g in groups))
    assert tail.top_k == (None if score_mode == "max" else top_k_count(SIZE[0] * SIZE[1], model.top_k_ratio))
    maps, scores = raw_map_and_score(tail, features)
    assert _close(maps, expected.anomaly_map.numpy())
    assert _close(scores, expected.pred_score.numpy())


def test_top_k_count_is_one_rule_for_every_model() -> None:
    assert [top_k_count(size, 0.01) for size in (1, 99, 100, 199, 4096)] == [1, 1, 1, 1, 40]
    assert top_k_count(96, 0.1) == 9  # int(), not round(): SignalKD counts as the image models do
    description = MapTail(score="topk", top_k_ratio=0.05)
    assert description.top_k((10, 10)) == 5
    assert MapTail(score="max").top_k((10, 10)) is None
    model = _tail_model("BiDirMSKD", "topk", prior=False)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 40, 48))
    k = top_k_count(40 * 48, model.top_k_ratio)
    expected = out.anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)
    torch.testing.assert_close(out.pred_score, expected, rtol=1e-6, atol=1e-6)


def test_map_tail_refuses_what_it_cannot_bind() -> None:
    with pytest.raises(ValueError, match="statistics=False"):
        MapTail(statistics=False).bind(SIZE, ((("feature/0", "feature/1"),),))
    with pytest.raises(ValueError, match="1 group"):
        MapTail().bind(SIZE, ((("feature/0", "feature/1"),), (("feature/0", "feature/2"),)))
    with pytest.raises(ValueError, match="one group"):
        MapTail(fusions=("mean", "mean"))
    with pytest.raises(ValueError, match="top_k_ratio"):
        MapTail(top_k_ratio=0.0)
    model = _tail_model("MTHF", "max", prior=False)
    assert model.tail(statistics=False).group_mean == ()
    assert model.tail().group_std == pytest.approx([0.05, 0.3, 0.02])


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_fuse_standardised_is_one_rule_in_numpy_and_torch(rule: str) -> None:
    rng = np.random.default_rng(0)
    maps = [rng.random((2, 1, 8, 8), dtype=np.float32) * scale for scale in (1.0, 5.0, 20.0)]
    means, stds = [0.5, 2.0, 9.0], [0.25, 1.5, 4.0]
    numpy_fused = fuse_standardised(maps, [np.float32(m) for m in means], [np.float32(s) for s in stds], rule)
    tensor_fused = fuse_standardised(
        [torch.from_numpy(m) for m in maps], torch.tensor(means).unbind(), torch.tensor(stds).unbind(), rule
    )
    stacked = np.concatenate([(m - mean) / std for m, mean, std in zip(maps, means, stds, strict=True)], axis=1)
    expected = stacked.mean(axis=1, keepdims=True) if rule == "mean" else stacked.max(axis=1, keepdims=True)
    assert numpy_fused.dtype == np.float32
    np.testing.assert_allclose(numpy_fused, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tensor_fused.numpy(), numpy_fused, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fusion rule"):
        fuse_standardised(maps, means, stds, "median")


@pytest.mark.parametrize(
    ("grid", "size"), [((2, 2), (64, 64)), ((4, 4), (64, 64)), ((5, 7), (33, 48)), ((9, 6), (4, 3))]
)
@pytest.mark.parametrize("align_corners", [False, True])
def test_numpy_resize_is_torchs_bilinear_interpolate(grid: tuple, size: tuple, align_corners: bool) -> None:
    maps = np.random.default_rng(0).random((2, 1, *grid), dtype=np.float32) * 10
    expected = F.interpolate(torch.from_numpy(maps), size=size, mode="bilinear", align_corners=align_corners).numpy()
    np.testing.assert_allclose(bilinear_resize(maps, size, align_corners), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_fuse_prior_is_prior_fusion(rule: str) -> None:
    torch.manual_seed(0)
    fusion = PriorFusion(levels=(-2, -1), rule=rule)
    fusion.standardiser.map_mean.copy_(torch.tensor([0.3, 12.0]))
    fusion.standardiser.map_std.copy_(torch.tensor([0.05, 3.0]))
    distillation, grid = torch.rand(2, 1, *SIZE), torch.rand(2, 1, 4, 4) * 20
    upsampled = F.interpolate(grid, size=SIZE, mode="bilinear", align_corners=False)
    expected = fusion.standardiser([distillation, upsampled]).numpy()
    prior = TailPrior(rule=rule, map_mean=(0.3, 12.0), map_std=(0.05, 3.0))
    np.testing.assert_allclose(fuse_prior(prior, distillation.numpy(), grid.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_numpy_blur_is_the_kernels_blur() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 1, 40, 48), dtype=np.float32)
    from kd_ext.kernels.reference import gaussian_blur as torch_blur

    np.testing.assert_allclose(gaussian_blur(maps, 2.5), torch_blur(torch.from_numpy(maps), 2.5).numpy(), atol=1e-6)


def test_tail_json_round_trip_keeps_missing_statistics() -> None:
    tail = AnomalyTail(
        output_size=(8, 8),
        groups=(TailGroup(pairs=(("feature/0", "feature/1"),)),),
        normalization=Normalization(0.0, 1.0, float("nan"), 0.0, 2.0, 1.0),
        image_threshold=0.5,
        pixel_threshold=0.5,
    )
    again = AnomalyTail.from_json(tail.to_json())
    assert np.isnan(again.normalization.image_threshold)
    assert again.groups == tail.groups
    assert again.pixel_threshold == 0.5
    with pytest.raises(ValueError, match="layout version"):
        AnomalyTail.from_json(tail.to_json().replace('"version":1', '"version":99'))


def test_tail_json_carries_the_prior_and_reads_old_tails() -> None:
    group = TailGroup(pairs=(("feature/0", "feature/1"),))
    old = '{"align_corners":false,"distance":"cosine","group_fusion":"none","groups":[{"fusion":"mean","pairs":'
    old += '[["feature/0","feature/1"]]}],"output_size":[8,8],"score":"max","sigma":4.0,"top_k":null,"version":1}'
    assert AnomalyTail.from_json(old).prior is None  # a tail written before priors were exported
    plain = AnomalyTail(output_size=(8, 8), groups=(group,))
    assert json.loads(plain.to_json())["version"] == 1  # without a prior: readable by every runtime
    assert "prior" not in json.loads(plain.to_json())
    prior = TailPrior(rule="max", scope="map", map_mean=(0.25, 11.5), map_std=(0.125, 2.5))
    tail = AnomalyTail(output_size=(8, 8), groups=(group,), prior=prior)
    assert json.loads(tail.to_json())["version"] == 2  # a runtime that knows no prior refuses it
    again = AnomalyTail.from_json(tail.to_json())
    assert again.prior == prior
    assert again.feature_names == ("feature/0", "feature/1", PRIOR_OUTPUT)
    for bad, match in (
        ({"rule": "median"}, "prior rule"),
        ({"scope": "all"}, "prior scope"),
        ({"map_std": (1.0, 0.0)}, "stds"),
    ):
        with pytest.raises(ValueError, match=match):
            TailPrior(**{**prior.__dict__, **bad})
