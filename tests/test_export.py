"""Export of BiDirMSKD (ONNX, OpenVINO FP32/FP16/INT8) and the edge runtime on real images.

A BiDirMSKD is trained for one epoch on hazelnut_toy once per session (fast tests). The parity and
AUROC checks on MVTec bottle are marked ``slow`` (deselect with ``-m "not slow"``); they use the
checkpoint in ``KD_EXT_BOTTLE_CKPT`` when set, else train a few epochs themselves.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy.export import CompressionType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

from kd_ext.cli import main
from kd_ext.edge import EdgeModel
from kd_ext.edge.contract import PRIOR_OUTPUT
from kd_ext.export import MAX_MAP_ERROR, KDExtExportMixin, Precision, export_onnx, export_openvino, resolve_precision
from kd_ext.export.quantization import holdout_split, quantize_on_training_images
from kd_ext.models import BiDirMSKD

DATA = Path(__file__).parents[2] / "shared" / "data"
TOY = DATA / "hazelnut_toy"
BOTTLE = DATA / "mvtec_ad" / "bottle"
needs_toy = pytest.mark.skipif(not TOY.is_dir(), reason=f"hazelnut_toy data not found at {TOY}")
needs_bottle = pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {BOTTLE}")


def toy_datamodule() -> MVTecAD:
    return MVTecAD(root=DATA, category="hazelnut_toy", train_batch_size=8, eval_batch_size=8, num_workers=0)


def bottle_datamodule() -> MVTecAD:
    return MVTecAD(root=DATA / "mvtec_ad", category="bottle", train_batch_size=8, eval_batch_size=8, num_workers=0)


def train(datamodule: MVTecAD, epochs: int, root: Path) -> tuple[BiDirMSKD, Path]:
    seed_everything(0, workers=True)
    model = BiDirMSKD(visualizer=False, epochs=epochs)
    engine = Engine(max_epochs=epochs, default_root_dir=root, logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    ckpt = root / "bidirmskd.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    return model.eval(), ckpt


def test_images(datamodule: MVTecAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    images = torch.cat([batch.image for batch in batches])
    labels = torch.cat([batch.gt_label for batch in batches]).int()
    masks = torch.cat([batch.gt_mask for batch in batches]).reshape(len(images), *images.shape[-2:]).int()
    return images, labels, masks


test_images.__test__ = False  # a helper, not a test


@torch.no_grad()
def torch_predict(model: BiDirMSKD, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    outputs = [model(images[i : i + 8]) for i in range(0, len(images), 8)]
    maps = torch.cat([o.anomaly_map for o in outputs]).reshape(len(images), *images.shape[-2:]).numpy()
    scores = torch.cat([o.pred_score for o in outputs]).numpy()
    labels = torch.cat([o.pred_label for o in outputs]).numpy()
    return maps, scores, labels


def edge_predict(xml: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edge = EdgeModel(xml, precision_hint="f32")
    preds = [edge.predict(images[i : i + 8].numpy()) for i in range(0, len(images), 8)]
    return (
        np.concatenate([p.anomaly_map for p in preds]),
        np.concatenate([p.pred_score for p in preds]),
        np.concatenate([p.pred_label for p in preds]),
    )


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[BiDirMSKD, Path]:
    if not TOY.is_dir():
        pytest.skip(f"hazelnut_toy data not found at {TOY}")
    return train(toy_datamodule(), 1, tmp_path_factory.mktemp("toy_train"))


@pytest.fixture(scope="session")
def toy_fp32(toy: tuple[BiDirMSKD, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_openvino(toy[0], tmp_path_factory.mktemp("toy_fp32"), "fp32")


def test_mixin_replaces_anomalib_quantisation() -> None:
    assert BiDirMSKD._post_training_quantization_ov is KDExtExportMixin._post_training_quantization_ov
    assert BiDirMSKD._accuracy_control_quantization_ov is KDExtExportMixin._accuracy_control_quantization_ov


def export_mode_of(xml: Path) -> str:
    return str(ov.Core().read_model(xml).get_rt_info(["kd_ext", "export_mode"]).astype(str))


def test_anomalib_to_openvino_writes_the_features_ir_by_default(tmp_path: Path) -> None:
    """``anomalib export`` (ExportMixin.to_openvino) picks the features IR; standard on request or where needed."""
    from anomalib.models.components.base.export_mixin import ExportMixin

    model = BiDirMSKD(pre_trained=False, visualizer=False, pre_processor=BiDirMSKD.configure_pre_processor((96, 128)))
    with (
        mock.patch("kd_ext.export.openvino.export_openvino", return_value=tmp_path / "f.xml") as features,
        mock.patch.object(ExportMixin, "to_openvino", return_value=tmp_path / "s.xml") as standard,
    ):
        assert model.to_openvino(tmp_path) == tmp_path / "f.xml"
        assert features.call_args.kwargs["mode"] == "features"
        assert features.call_args.kwargs["input_size"] == (96, 128)  # the model's image size when none is given
        model.to_openvino(tmp_path, input_size=(64, 64), compression_type=CompressionType.INT8_PTQ, datamodule="dm")
        assert features.call_args.args[2] is Precision.INT8_PTQ
        assert features.call_args.kwargs["calibration"] == "dm"
        assert features.call_args.kwargs["input_size"] == (64, 64)
        assert standard.call_count == 0
        assert model.to_openvino(tmp_path, onnx_kwargs={"export_mode": "standard"}) == tmp_path / "s.xml"
        assert standard.call_args.args[-1] == {}  # the option is kd_ext's; anomalib's export does not see it
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_ACQ, datamodule="dm")
        assert standard.call_count == 2  # INT8_ACQ checks scores, which a features IR does not output
        assert features.call_count == 2
    with pytest.raises(ValueError, match='"export_mode": "standard"'):
        model.to_openvino(tmp_path, onnx_kwargs={"opset_version": 17})
    with pytest.raises(ValueError, match="Unknown export mode"):
        model.to_openvino(tmp_path, onnx_kwargs={"export_mode": "tail"})


def test_anomalib_to_openvino_writes_the_features_ir_for_a_fitted_prior(tmp_path: Path) -> None:
    """The default BiDirMSKD (prior fitted, scope "score") gets the features IR, not anomalib's whole forward."""
    from anomalib.models.components.base.export_mixin import ExportMixin

    from kd_ext.models.components import PriorFusion

    model = BiDirMSKD(pre_trained=False, visualizer=False, pre_processor=BiDirMSKD.configure_pre_processor((64, 64)))
    with (
        mock.patch.object(PriorFusion, "ready", new=property(lambda self: True)),
        mock.patch("kd_ext.export.openvino.export_openvino", return_value=tmp_path / "f.xml") as features,
        mock.patch.object(ExportMixin, "to_openvino", return_value=tmp_path / "s.xml") as standard,
    ):
        assert model.model.prior_fusion.ready
        assert model.to_openvino(tmp_path) == tmp_path / "f.xml"
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_PTQ, datamodule="dm")
    assert features.call_count == 2
    assert standard.call_count == 0


def test_int8_needs_calibration() -> None:
    model = BiDirMSKD(pre_trained=False, visualizer=False)
    for precision in ("int8_ptq", "int8_acq", CompressionType.INT8_PTQ):
        with pytest.raises(ValueError, match="needs calibration"):
            export_openvino(model, "unused", precision)
    with pytest.raises(ValueError, match="Unknown precision"):
        export_openvino(model, "unused", "int4")


def test_precision_names_are_anomalibs() -> None:
    """anomalib's CompressionType members, values and names are accepted; kd_ext's former names warn."""
    calibration = object()
    for member in CompressionType:
        assert resolve_precision(member) is Precision(member.value)
        assert resolve_precision(member.name) is Precision(member.value)
        assert resolve_precision(member, calibration) is Precision(member.value)  # an Enum member is never the alias
    assert resolve_precision(None) is Precision.FP32
    assert resolve_precision("fp32") is Precision.FP32
    assert resolve_precision("int8") is Precision.INT8  # anomalib's weight-only INT8
    with pytest.warns(FutureWarning, match="'int8_weights' is deprecated; use 'int8'"):
        assert resolve_precision("int8_weights") is Precision.INT8
    with pytest.warns(FutureWarning, match="former name of 'int8_ptq'"):
        assert resolve_precision("int8", calibration) is Precision.INT8_PTQ
    with pytest.raises(ValueError, match="Unknown precision 'int4'"):
        resolve_precision("int4")


@needs_toy
def test_onnx_export_is_valid(toy: tuple[BiDirMSKD, Path], tmp_path: Path) -> None:
    import onnx

    path = export_onnx(toy[0], tmp_path)
    onnx.checker.check_model(str(path))
    outputs = {o.name for o in onnx.load(str(path)).graph.output}
    assert outputs == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}
    images, _, _ = test_images(toy_datamodule())
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images[:2].numpy())
    reference, _, _ = torch_predict(toy[0], images[:2])
    assert np.abs(result["anomaly_map"].reshape(reference.shape) - reference).max() < 1e-3


@needs_toy
def test_fp32_ir_matches_torch(toy: tuple[BiDirMSKD, Path], toy_fp32: Path) -> None:
    images, _, _ = test_images(toy_datamodule())
    assert toy[0].model.prior_fusion is not None and toy[0].model.prior_fusion.ready  # the default prior, fitted
    assert export_mode_of(toy_fp32) == "features"  # which the features IR carries
    ref_maps, ref_scores, ref_labels = torch_predict(toy[0], images)
    maps, scores, labels = edge_predict(toy_fp32, images)
    assert np.abs(maps - ref_maps).max() < 1e-3
    assert np.abs(scores - ref_scores).max() < 1e-3
    assert (labels == ref_labels).mean() >= 0.95  # scores within 1e-3 of the threshold may flip
    info = EdgeModel(toy_fp32).describe()
    assert info["export_precision"] == "fp32"
    assert info["inference_precision"] == "f32"


@needs_toy
@pytest.mark.slow
def test_fp16_ir_close_to_torch(toy: tuple[BiDirMSKD, Path], tmp_path: Path) -> None:
    xml = export_openvino(toy[0], tmp_path, "fp16")
    images, _, _ = test_images(toy_datamodule())
    ref_maps, _, _ = torch_predict(toy[0], images[:8])
    maps, _, _ = edge_predict(xml, images[:8])
    assert np.abs(maps - ref_maps).max() < 0.05


@needs_toy
@pytest.mark.slow
def test_int8_is_anomalibs_weight_only_compression(toy: tuple[BiDirMSKD, Path], toy_fp32: Path, tmp_path: Path) -> None:
    xml = export_openvino(toy[0], tmp_path, "int8")  # no calibration data: weights only, as anomalib's INT8
    assert EdgeModel(xml).describe()["export_precision"] == "int8"
    assert "FakeQuantize" not in {op.get_type_name() for op in ov.Core().read_model(xml).get_ops()}
    assert xml.with_suffix(".bin").stat().st_size < 0.5 * toy_fp32.with_suffix(".bin").stat().st_size
    images, _, _ = test_images(toy_datamodule())
    maps, scores, _ = edge_predict(xml, images[:8])
    assert np.isfinite(maps).all()
    assert np.isfinite(scores).all()


@pytest.mark.parametrize(
    ("n_images", "held_out"),
    [(1, []), (2, [1]), (9, [8]), (23, [9, 19]), (30, [9, 19, 29])],
)
def test_holdout_split_keeps_every_tenth_training_image_for_the_map_check(n_images: int, held_out: list[int]) -> None:
    calibration, held = holdout_split(n_images)
    assert held == held_out
    assert sorted(calibration + held) == list(range(n_images))


def test_max_map_error_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="max_map_error must be between 0 and 1"):
        quantize_on_training_images(mock.Mock(), toy_datamodule(), max_map_error=2.0)


def held_out_training_images(datamodule: MVTecAD) -> torch.Tensor:
    datamodule.setup("fit")
    _, held = holdout_split(len(datamodule.train_data))
    return torch.stack([datamodule.train_data[index].image for index in held])


@needs_toy
def test_engine_export_int8_ptq_calibrates_on_training_images(
    toy: tuple[BiDirMSKD, Path], toy_fp32: Path, tmp_path: Path
) -> None:
    datamodule = toy_datamodule()
    engine = Engine(logger=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    failing = mock.Mock(side_effect=AssertionError("INT8 must not calibrate on the validation (test) images"))
    with mock.patch.object(MVTecAD, "val_dataloader", failing):
        xml = engine.export(
            toy[0],
            "openvino",
            export_root=tmp_path,
            input_size=(256, 256),
            compression_type=CompressionType.INT8_PTQ,
            datamodule=datamodule,
        )
    assert failing.call_count == 0
    assert export_mode_of(xml) == "features"  # anomalib's export writes kd_ext's features IR, maps checked
    ops = {op.get_type_name() for op in ov.Core().read_model(xml).get_ordered_ops()}
    assert "FakeQuantize" in ops
    held_out = held_out_training_images(toy_datamodule())
    fp32_maps, _, _ = edge_predict(toy_fp32, held_out)
    int8_maps, _, _ = edge_predict(xml, held_out)
    assert np.abs(int8_maps - fp32_maps).mean() <= MAX_MAP_ERROR + 1e-4  # the accuracy control's bound
    images, _, _ = test_images(toy_datamodule())
    ref_maps, ref_scores, _ = torch_predict(toy[0], images)
    maps, scores, _ = edge_predict(xml, images)
    assert np.std(scores) > 1e-3, "INT8 model gives (nearly) the same score for every image"
    # A one-epoch model on 23 images separates little, so INT8 noise shows; bottle AUROCs are checked (slow).
    assert np.corrcoef(scores, ref_scores)[0, 1] > 0.7
    assert np.abs(maps - ref_maps).mean() < 0.05


@needs_toy
@pytest.mark.cli
@pytest.mark.parametrize(
    ("extra", "mode"), [([], "features"), (["--onnx_kwargs", '{"export_mode": "standard"}'], "standard")]
)
def test_anomalib_cli_export(toy: tuple[BiDirMSKD, Path], tmp_path: Path, extra: list[str], mode: str) -> None:
    """What an anomalib user runs writes the features IR; the standard one on request; both match torch."""
    command = [
        str(Path(sys.executable).parent / "anomalib"),
        "export",
        "--model",
        "BiDirMSKD",
        "--export_type",
        "openvino",
        "--ckpt_path",
        str(toy[1]),
        "--export_root",
        str(tmp_path),
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    xml = tmp_path / "weights" / "openvino" / "model.xml"
    core_model = ov.Core().read_model(xml)
    names = {name for output in core_model.outputs for name in output.get_names()}
    if mode == "features":
        assert export_mode_of(xml) == "features"
        assert PRIOR_OUTPUT in names  # the default model's fitted prior travels with the features IR
        assert all(name.startswith("feature/") for name in names - {PRIOR_OUTPUT})
        assert tuple(core_model.input(0).get_partial_shape()[2:].to_shape()) == (256, 256)  # the model's size
    else:
        assert not core_model.has_rt_info(["kd_ext"])  # anomalib's own IR, as anomalib writes it
        assert "anomaly_map" in names
    images, _, _ = test_images(toy_datamodule())
    ref_maps, _, _ = torch_predict(toy[0], images[:4])
    maps, _, _ = edge_predict(xml, images[:4])
    assert np.abs(maps - ref_maps).max() < 1e-3


@needs_toy
def test_kd_ext_infer_on_real_images(toy: tuple[BiDirMSKD, Path], toy_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["infer", str(toy_fp32), str(TOY / "test"), "--out", str(out), "--recursive", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert len(results["images"]) == 23
    assert results["model"]["inference_precision"] == "f32"
    # Files are read and resized by PIL here, by torchvision in anomalib's loader: same images (256x256 PNG).
    images, _, _ = test_images(toy_datamodule())
    _, ref_scores, _ = torch_predict(toy[0], images)
    scores = {row["image"]: row["score"] for row in results["images"]}
    datamodule = toy_datamodule()
    datamodule.setup("test")
    names = [Path(p).relative_to(TOY / "test").as_posix() for p in datamodule.test_data.samples.image_path]
    assert np.abs(np.array([scores[name] for name in names]) - ref_scores).max() < 1e-3
    assert len(list((out / "masks").rglob("*.png"))) == 23
    assert len(list((out / "overlays").rglob("*.png"))) == 23


@pytest.fixture(scope="module")
def bottle(tmp_path_factory: pytest.TempPathFactory) -> BiDirMSKD:
    if not BOTTLE.is_dir():
        pytest.skip(f"MVTec AD bottle data not found at {BOTTLE}")
    ckpt = os.environ.get("KD_EXT_BOTTLE_CKPT")
    if ckpt:
        return BiDirMSKD.load_from_checkpoint(ckpt).eval()
    epochs = int(os.environ.get("KD_EXT_BOTTLE_EPOCHS", "3"))
    return train(bottle_datamodule(), epochs, tmp_path_factory.mktemp("bottle_train"))[0]


def aurocs(scores: np.ndarray, maps: np.ndarray, labels: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    image = float(binary_auroc(torch.from_numpy(scores), labels))
    pixel = float(binary_auroc(torch.from_numpy(maps).flatten(), masks.flatten()))
    return image, pixel


@needs_bottle
@pytest.mark.slow
def test_bottle_parity_fp32_and_int8(bottle: BiDirMSKD, tmp_path: Path) -> None:
    images, labels, masks = test_images(bottle_datamodule())
    ref_maps, ref_scores, _ = torch_predict(bottle, images)
    ref_image, ref_pixel = aurocs(ref_scores, ref_maps, labels, masks)

    fp32 = export_openvino(bottle, tmp_path / "fp32", "fp32")
    maps, scores, _ = edge_predict(fp32, images)
    assert np.abs(maps - ref_maps).max() < 1e-3
    image, pixel = aurocs(scores, maps, labels, masks)
    assert abs(image - ref_image) <= 0.001
    assert abs(pixel - ref_pixel) <= 0.001

    int8 = export_openvino(bottle, tmp_path / "int8", "int8_ptq", calibration=bottle_datamodule())
    maps, scores, _ = edge_predict(int8, images)
    int8_image, int8_pixel = aurocs(scores, maps, labels, masks)
    assert ref_image - int8_image <= 0.005, (ref_image, int8_image)
    assert ref_pixel - int8_pixel <= 0.01, (ref_pixel, int8_pixel)


@needs_toy
@pytest.mark.slow
def test_int8_acq_export(toy: tuple[BiDirMSKD, Path], tmp_path: Path) -> None:
    xml = export_openvino(toy[0], tmp_path, "int8_acq", calibration=toy_datamodule(), max_drop=0.01)
    images, labels, masks = test_images(toy_datamodule())
    ref_maps, ref_scores, _ = torch_predict(toy[0], images)
    maps, scores, _ = edge_predict(xml, images)
    ref_image, _ = aurocs(ref_scores, ref_maps, labels, masks)
    image, _ = aurocs(scores, maps, labels, masks)
    assert ref_image - image <= 0.01 + 1e-6


def test_a_1d_model_exports_with_its_own_series_length(tmp_path: Path) -> None:
    """``export_openvino(signal_kd_model, root)`` failed: the default input_size was (256, 256), an image size."""
    from kd_ext.models.signal_kd import SignalKD

    torch.manual_seed(0)
    length = 40
    model = SignalKD(width=4, hidden=8, teacher_epochs=1, visualizer=False, prior=False)  # never calibrated
    model.model.pretrain_teacher(torch.randn(4, 1, length), epochs=1, seed=0)  # fixes the series length
    xml = export_openvino(model, tmp_path)  # default input_size
    ir = ov.Core().read_model(xml)
    assert ir.input(0).get_partial_shape().to_string() == f"[?,1,{length}]"
    assert ir.get_rt_info(["kd_ext", "input_size"]).astype(str) == f"{length} time steps"
    assert export_onnx(model, tmp_path / "onnx").is_file()
    with pytest.raises(ValueError, match="SignalKD takes series, not images"):
        export_openvino(model, tmp_path / "image", input_size=(256, 256))
    with pytest.raises(ValueError, match=r"input_size must be \(H, W\), None \(dynamic\) or 'auto'"):
        export_openvino(model, tmp_path / "typo", input_size="model")
