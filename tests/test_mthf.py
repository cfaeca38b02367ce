"""MTHF: groups, fusion modules, two-stage map fusion, ablations, anomalib integration, checkpoints, export."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

from kd_ext.edge import EdgeModel
from kd_ext.export import MAX_MAP_ERROR, export_openvino
from kd_ext.export.quantization import holdout_split
from kd_ext.models import MTHF, BiDirMSKD
from kd_ext.models.bidirmskd.anomaly_map import gaussian_blur
from kd_ext.models.checkpoint import teacher_pre_processor
from kd_ext.models.mthf import MTHFModel
from kd_ext.models.mthf.fusion import HierarchicalAttentionFusion
from kd_ext.models.mthf.torch_model import ReverseStudent

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 64  # small images keep the unit tests fast; every level still has at least 2x2 positions


@pytest.fixture(scope="module")
def model() -> MTHFModel:
    torch.manual_seed(0)
    return MTHFModel(pre_trained=False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE)


def _eval(module: MTHFModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        output = module(images)
    return output.pred_score, output.anomaly_map


def test_eval_shapes(model: MTHFModel, images: torch.Tensor) -> None:
    scores, maps = _eval(model, images)
    assert maps.shape == (2, 1, SIZE, SIZE)
    assert scores.shape == (2,)
    assert torch.isfinite(maps).all()
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))


def test_training_outputs_match_teacher_levels(model: MTHFModel, images: torch.Tensor) -> None:
    model.train()
    pairs = model(images)
    assert set(pairs) == {"A", "B", "C"}
    for teacher, student in pairs.values():
        assert len(teacher) == len(student) == 3
        for t, s in zip(teacher, student, strict=True):
            assert t.shape == s.shape
            assert not t.requires_grad
            assert s.requires_grad
    model.eval()


def test_groups_are_distinct(model: MTHFModel) -> None:
    assert model.group_layers["A"] == model.group_layers["B"] == ("blocks.1", "blocks.2", "blocks.4")
    assert model.group_layers["C"] == ("blocks.2", "blocks.4", "blocks.6")
    # A and C: forward students (same kind of network) on different levels; B: reverse distillation.
    assert isinstance(model.students["B"], ReverseStudent)
    assert not isinstance(model.students["A"], ReverseStudent)
    assert not isinstance(model.students["C"], ReverseStudent)
    assert len(model.students["C"].stages) == len(model.students["A"].stages)
    # No parameter is shared between groups, and none with the frozen teacher.
    owners = [{id(p) for p in model.students[name].parameters()} for name in ("A", "B", "C")]
    owners.append({id(p) for p in model.teacher.parameters()})
    assert sum(len(ids) for ids in owners) == len(set().union(*owners))
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_teacher_runs_once_per_batch(model: MTHFModel, images: torch.Tensor) -> None:
    assert model.layers == ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
    calls = []
    handle = model.teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        _eval(model, images)
        model.train()
        model(images)
    finally:
        handle.remove()
        model.eval()
    assert len(calls) == 2


def test_fusion_module_starts_as_identity_and_learns() -> None:
    torch.manual_seed(0)
    fusion = HierarchicalAttentionFusion([8, 16, 32], [4, 8, 16])
    features = [torch.randn(2, c, SIZE // s, SIZE // s, requires_grad=True) for c, s in ((8, 4), (16, 8), (32, 16))]
    fused = fusion(features)
    for before, after in zip(features, fused, strict=True):
        assert torch.equal(before, after)
    sum(f.square().mean() for f in fused).backward()
    assert fusion.gates.grad is not None
    assert fusion.gates.grad.abs().sum() > 0


def test_group_statistics_are_updated_in_training(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = MTHFModel(pre_trained=False)
    generator = module.anomaly_map_generator
    assert int(generator.statistics_updates) == 0
    module.train()
    with torch.no_grad():
        module(images)
    assert int(generator.statistics_updates) == 1
    assert (generator.map_mean > 0).all()
    assert not torch.allclose(generator.map_std, torch.ones(3))
    # Two-stage fusion = Gaussian blur of the mean of the standardised per-group maps.
    module.eval()
    with torch.no_grad():
        pairs = list(module.distill(images).values())
        group_maps = torch.cat(generator.group_maps(pairs, (SIZE, SIZE)), dim=1)
        standardised = (group_maps - generator.map_mean.view(1, -1, 1, 1)) / generator.map_std.view(1, -1, 1, 1)
        expected = gaussian_blur(standardised.mean(dim=1, keepdim=True), 4.0)
        _, maps = _eval(module, images)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "groups", "fusions"),
    [
        ({"groups": ("A",)}, ("A",), 1),
        ({"groups": ["C", "B"]}, ("B", "C"), 2),
        ({"fusion_stages": 1}, ("A", "B", "C"), 3),
        ({"fusion_modules": False}, ("A", "B", "C"), 0),
        ({"group_fusion": "max", "attention": False, "score_mode": "topk"}, ("A", "B", "C"), 3),
    ],
)
def test_ablations_construct_and_run(kwargs: dict, groups: tuple, fusions: int, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = MTHFModel(pre_trained=False, **kwargs)
    assert module.groups == groups
    assert len(module.fusions) == fusions
    module.train()
    pairs = module(images)
    assert tuple(pairs) == groups
    scores, maps = _eval(module, images)
    assert maps.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(scores).all()


def test_one_stage_fusion_averages_all_level_maps(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = MTHFModel(pre_trained=False, fusion_stages=1, sigma=0)
    module.eval()
    with torch.no_grad():
        pairs = module.distill(images)
        level_maps = [
            torch.nn.functional.interpolate(
                (1 - torch.nn.functional.cosine_similarity(t, s, dim=1)).unsqueeze(1),
                size=(SIZE, SIZE),
                mode="bilinear",
                align_corners=False,
            )
            for teacher, student in pairs.values()
            for t, s in zip(teacher, student, strict=True)
        ]
        _, maps = _eval(module, images)
    assert len(level_maps) == 9
    torch.testing.assert_close(maps, torch.stack(level_maps).mean(dim=0), atol=1e-5, rtol=1e-4)


def test_native_kernels_match_torch_maps(model: MTHFModel, images: torch.Tensor) -> None:
    generator = model.anomaly_map_generator
    try:
        generator.backend = "reference"
        _, reference = _eval(model, images)
        generator.backend = "native"
        _, kernel = _eval(model, images)
    finally:
        generator.backend = "auto"
    torch.testing.assert_close(kernel, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": ()}, "At least one group"),
        ({"groups": ("A", "D")}, "Unknown group"),
        ({"groups": "ABC"}, "not the string"),
        ({"groups": ("A", "A")}, "Duplicate groups"),
        ({"fusion_stages": 3}, "fusion_stages must be 1"),
        ({"group_fusion": "median"}, "Unknown group_fusion"),
        ({"sigma": -1.0}, "sigma must be >= 0"),
        ({"score_mode": "mean"}, "Unknown score_mode"),
        ({"deep_layers": ("blocks.1", "blocks.2", "blocks.4")}, "Group C must use other feature levels"),
        ({"deep_layers": ("blocks.4", "blocks.2")}, "shallow to deep"),
        ({"deep_layers": ("blocks.2", "blocks.9")}, "not modules of backbone"),
        ({"deep_layers": ("blocks.2", "blocks.6")}, "consecutive levels must halve"),
        ({"backbone": "vgg16"}, "Unknown backbone"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"kernel_backend": "gpu"}, "Unknown kernel backend"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MTHF(pre_trained=False, visualizer=False, **kwargs)


def test_export_trace_onnx_opset14(images: torch.Tensor) -> None:
    """The eval path (pre-processing + model + post-processing) traces with torch.onnx.export."""
    torch.manual_seed(0)
    module = MTHF(
        pre_trained=False,
        pre_processor=teacher_pre_processor("efficientnet_lite0", (SIZE, SIZE)),
        evaluator=False,
        visualizer=False,
    ).eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (images[:1],),
            buffer,
            opset_version=14,
            input_names=["input"],
            output_names=["output"],
            dynamo=False,
        )
    assert buffer.getbuffer().nbytes > 1_000_000


@pytest.fixture(scope="module")
def hazelnut_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    if not (DATA / "hazelnut_toy").is_dir():
        pytest.skip(f"tiny real dataset not found at {DATA / 'hazelnut_toy'} (../shared/data/hazelnut_toy)")
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mthf_engine")
    datamodule = MVTecAD(root=DATA, category="hazelnut_toy", train_batch_size=8, eval_batch_size=8, num_workers=0)
    module = MTHF(pre_trained=False, pre_processor=MTHF.configure_pre_processor((96, 96)), visualizer=False, epochs=1)
    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, accelerator="cpu", devices=1)
    engine.fit(module, datamodule=datamodule)
    metrics = engine.test(module, datamodule=datamodule, verbose=False)[0]
    checkpoint = root / "mthf.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return module, datamodule, metrics, checkpoint


def test_engine_fit_and_test_on_hazelnut(hazelnut_engine: tuple) -> None:
    module, _, metrics, _ = hazelnut_engine
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    for name in ("image_AUROC", "pixel_AUROC", "image_F1Score", "pixel_F1Score"):
        if name in metrics:
            assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
    assert int(module.model.anomaly_map_generator.statistics_updates) == 4  # 28 images, batch 8


def test_checkpoint_reload_gives_identical_predictions(hazelnut_engine: tuple) -> None:
    module, datamodule, _, checkpoint = hazelnut_engine
    batch = next(iter(datamodule.test_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module(batch.image)
    reloaded = MTHF.load_from_checkpoint(checkpoint, visualizer=False).eval()
    assert reloaded.model.groups == module.model.groups
    with torch.no_grad():
        actual = reloaded(batch.image)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(reloaded.model.anomaly_map_generator.map_std, module.model.anomaly_map_generator.map_std)


def test_wrong_checkpoints_are_refused(hazelnut_engine: tuple) -> None:
    _, _, _, checkpoint = hazelnut_engine
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    other_model = BiDirMSKD(pre_trained=False, visualizer=False)
    with pytest.raises(ValueError, match="saved by kd_ext's MTHF, not by BiDirMSKD"):
        other_model.on_load_checkpoint(saved)
    other_groups = MTHF(pre_trained=False, groups=("A", "B"), visualizer=False)
    with pytest.raises(ValueError, match="architecture differs: groups="):
        other_groups.on_load_checkpoint(saved)
    no_fusion = MTHF(pre_trained=False, fusion_modules=False, visualizer=False)
    with pytest.raises(ValueError, match="fusion_modules=True"):
        no_fusion.on_load_checkpoint(saved)


def test_openvino_export_runs_in_the_edge_runtime(hazelnut_engine: tuple, tmp_path: Path) -> None:
    """FP32 IR matches torch; INT8 IR keeps normal-image maps within the exporter's bound of FP32."""
    module, datamodule, _, _ = hazelnut_engine
    images = next(iter(datamodule.test_dataloader())).image
    size = tuple(images.shape[-2:])
    module.eval()
    with torch.no_grad():
        expected = module(images)
    fp32 = export_openvino(module, tmp_path / "fp32", "fp32", input_size=size)
    prediction = EdgeModel(fp32).predict(images.numpy())
    expected_maps = expected.anomaly_map.reshape(prediction.anomaly_map.shape).numpy()
    np.testing.assert_allclose(prediction.anomaly_map, expected_maps, atol=1e-3)
    np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-3)

    int8 = export_openvino(module, tmp_path / "int8", "int8_ptq", calibration=datamodule, input_size=size)
    assert "FakeQuantize" in {op.get_type_name() for op in ov.Core().read_model(int8).get_ordered_ops()}
    datamodule.setup("fit")
    _, held_out = holdout_split(len(datamodule.train_data))
    normal = torch.stack([datamodule.train_data[index].image for index in held_out]).numpy()
    int8_maps = EdgeModel(int8).predict(normal).anomaly_map
    fp32_maps = EdgeModel(fp32).predict(normal).anomaly_map
    assert np.abs(int8_maps - fp32_maps).mean() <= MAX_MAP_ERROR + 1e-4


def test_get_model_in_fresh_subprocess() -> None:
    code = (
        "from anomalib.models import get_model\n"
        "model = get_model('MTHF', pre_trained=False, visualizer=False)\n"
        "print(type(model).__module__, model.model.groups)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "KD_EXT_NO_AUTOLOAD"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kd_ext.models.mthf.lightning_model ('A', 'B', 'C')" in result.stdout
