"""Edge runtime without torch: import isolation, CLI outputs and bad input, on small synthetic IRs.

The IRs here are built with OpenVINO's opset API (no torch, no training): an "anomaly model" whose
anomaly map is the mean of the RGB channels and whose score is the map's maximum, thresholded at 0.5 like
an anomalib export, and a classifier-like IR without anomaly outputs.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from PIL import Image

from kd_ext.cli import main
from kd_ext.edge import EdgeInputError, EdgeModel, EdgeModelError, score_folder

SIZE = 32


def anomaly_ir(path: Path, batch: int = -1, with_labels: bool = True) -> Path:
    image = ops.parameter([batch, 3, SIZE, SIZE], ov.Type.f32, name="input")
    anomaly_map = ops.reduce_mean(image, np.array([1]), keep_dims=True)
    anomaly_map.output(0).set_names({"anomaly_map"})
    score = ops.reduce_max(anomaly_map, np.array([1, 2, 3]), keep_dims=False)
    score.output(0).set_names({"pred_score"})
    results = [ops.result(score), ops.result(anomaly_map)]
    if with_labels:
        half = np.array(0.5, dtype=np.float32)
        label = ops.greater(score, half)
        label.output(0).set_names({"pred_label"})
        mask = ops.greater(anomaly_map, half)
        mask.output(0).set_names({"pred_mask"})
        results += [ops.result(label), ops.result(mask)]
    ov.save_model(ov.Model(results, [image], "toy_anomaly"), path)
    return path


def classifier_ir(path: Path) -> Path:
    image = ops.parameter([-1, 3, SIZE, SIZE], ov.Type.f32, name="input")
    logits = ops.reduce_mean(image, np.array([2, 3]), keep_dims=False)
    logits.output(0).set_names({"logits"})
    ov.save_model(ov.Model([ops.result(logits)], [image], "classifier"), path)
    return path


def write_image(path: Path, value: int, size: int = SIZE, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3), value, dtype=np.uint8)
    array[: size // 4, : size // 4] = min(value + 30, 255)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture
def ir(tmp_path: Path) -> Path:
    return anomaly_ir(tmp_path / "model" / "model.xml")


def sample_images(folder: Path) -> Path:
    """Five readable images (gray, RGBA, larger JPEG, two anomalous) and a corrupt one."""
    write_image(folder / "a_normal.png", 20)
    write_image(folder / "b_anomalous.png", 200)
    write_image(folder / "c_gray.png", 20, mode="L")
    write_image(folder / "d_large.jpg", 200, size=48)
    write_image(folder / "e_rgba.png", 20, mode="RGBA")
    (folder / "f_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return sample_images(tmp_path / "images")


def test_import_is_torch_free() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "anomalib", "torchvision", "lightning"}:
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, Block())
import kd_ext.edge, kd_ext.cli, kd_ext.edge.contract, kd_ext.edge.tail
from kd_ext.edge import EdgeModel, score_folder
assert not any(name.split(".")[0] in {"torch", "anomalib"} for name in sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_scores_folder(ir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["infer", str(ir), str(images), "--out", str(out), "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "out": str(out),
        "scored": 5,
        "anomalous": 2,
        "skipped": 1,
        "images_per_second": summary["images_per_second"],
        "inference_precision": "f32",
    }
    err = capsys.readouterr().err
    del err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert results["model"]["precision_hint"] == "f32"
    rows = {row["image"]: row for row in results["images"]}
    assert [row["label_name"] for row in rows.values()] == ["normal", "anomalous", "normal", "anomalous", "normal"]
    assert "converted from L to RGB" in rows["c_gray.png"]["notes"]
    assert "converted from RGBA to RGB" in rows["e_rgba.png"]["notes"]
    assert "resized from 48x48 to 32x32" in rows["d_large.jpg"]["notes"]
    assert results["skipped"][0]["image"] == "f_corrupt.png"
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert csv_lines[0].startswith("image,score,label")
    assert len(csv_lines) == 6
    # Masks and overlays at each image's own size; the mask is binary.
    mask = np.asarray(Image.open(out / "masks" / "d_large.png"))
    assert mask.shape == (48, 48)
    assert set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / "overlays" / "b_anomalous.png").size == (32, 32)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_scores_match_direct_prediction(ir: Path, images: Path, tmp_path: Path) -> None:
    model = EdgeModel(ir, num_requests=2)
    report = score_folder(model, images, tmp_path / "out", batch_size=3, progress=None)
    normal = np.full((1, 3, SIZE, SIZE), 20 / 255, dtype=np.float32)
    normal[..., : SIZE // 4, : SIZE // 4] = 50 / 255
    direct = model.predict(normal)
    assert report.rows[0]["score"] == pytest.approx(float(direct.pred_score[0]), abs=1e-6)
    assert direct.anomaly_map.shape == (1, SIZE, SIZE)


@pytest.mark.parametrize("num_requests", [1, 2, 3])
def test_iter_predict_keeps_input_order_and_stops_cleanly(ir: Path, num_requests: int) -> None:
    model = EdgeModel(ir, num_requests=num_requests)
    rng = np.random.default_rng(0)
    batches = [(f"b{i}", rng.random((2, 3, SIZE, SIZE), dtype=np.float32)) for i in range(7)]
    results = list(model.iter_predict(batches))
    assert [key for key, _ in results] == [key for key, _ in batches]
    for (_, images), (_, prediction) in zip(batches, results, strict=True):
        np.testing.assert_allclose(prediction.pred_score, model.predict(images).pred_score, atol=1e-6)
    stream = model.iter_predict(batches)
    assert next(stream)[0] == "b0"
    stream.close()  # requests still running are waited for, not abandoned
    bad = [*batches[:3], ("bad", np.zeros((2, 1, SIZE, SIZE), dtype=np.float32)), *batches[3:]]
    seen = []
    with pytest.raises(EdgeInputError, match="Expected float32 images"):
        seen.extend(key for key, _ in model.iter_predict(bad))
    assert seen == ["b0", "b1", "b2"][: 3 - num_requests]  # results already due before the bad batch came
    assert [key for key, _ in model.iter_predict(batches[:2])] == ["b0", "b1"]  # the model is still usable


def test_threshold_needed_without_labels(tmp_path: Path) -> None:
    path = anomaly_ir(tmp_path / "raw.xml", with_labels=False)
    with pytest.raises(EdgeModelError, match="no pred_label output"):
        EdgeModel(path)
    model = EdgeModel(path, threshold=0.3)
    prediction = model.predict(np.full((2, 3, SIZE, SIZE), 0.4, dtype=np.float32))
    assert prediction.pred_label.tolist() == [True, True]


def test_missing_model_and_weights(ir: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgeModelError, match="Model file not found"):
        EdgeModel(tmp_path / "nothing.xml")
    with pytest.raises(EdgeModelError, match=r"Expected an OpenVINO IR \.xml"):
        EdgeModel(ir.with_suffix(".bin"))
    ir.with_suffix(".bin").unlink()
    with pytest.raises(EdgeModelError, match=r"model\.bin is missing"):
        EdgeModel(ir)


def test_mismatched_or_corrupt_pair(ir: Path, tmp_path: Path) -> None:
    other = classifier_ir(tmp_path / "other" / "model.xml")
    ir.with_suffix(".bin").write_bytes(other.with_suffix(".bin").read_bytes()[:3])
    with pytest.raises(EdgeModelError, match=r"Could not read the IR .*different exports"):
        EdgeModel(ir)
    corrupt = tmp_path / "corrupt.xml"
    corrupt.write_text("<net><layers>")
    corrupt.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(EdgeModelError, match="Could not read the IR"):
        EdgeModel(corrupt)


def test_checksum_catches_bin_of_another_export(tmp_path: Path) -> None:
    # kd_ext's exporter records the .bin's SHA-256 in the .xml; a same-sized .bin from elsewhere is caught.
    from kd_ext.edge.runtime import RT_INFO_KEY

    image = ops.parameter([-1, 3, SIZE, SIZE], ov.Type.f32, name="input")
    scale = ops.constant(np.array([[[[2.0]]]], dtype=np.float32))
    amap = ops.reduce_mean(ops.multiply(image, scale), np.array([1]), keep_dims=True)
    amap.output(0).set_names({"anomaly_map"})
    score = ops.reduce_max(amap, np.array([1, 2, 3]), keep_dims=False)
    score.output(0).set_names({"pred_score"})
    model = ov.Model([ops.result(score), ops.result(amap)], [image], "scaled")
    model.set_rt_info("0" * 64, [RT_INFO_KEY, "weights_sha256"])
    path = tmp_path / "scaled.xml"
    ov.save_model(model, path)
    with pytest.raises(EdgeModelError, match="does not belong to"):
        EdgeModel(path, threshold=0.5)
    assert EdgeModel(path, threshold=0.5, verify_weights=False).predict(np.zeros((1, 3, SIZE, SIZE))) is not None


def test_not_an_anomaly_model(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    other = classifier_ir(tmp_path / "classifier.xml")
    with pytest.raises(EdgeModelError, match=r"not an anomaly-detection IR.*logits"):
        EdgeModel(other)
    assert main(["infer", str(other), str(images), "--out", str(tmp_path / "out")]) == 2
    assert "not an anomaly-detection IR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrong_input_layout(tmp_path: Path) -> None:
    image = ops.parameter([1, 1, SIZE, SIZE], ov.Type.f32, name="input")
    amap = ops.relu(image)
    amap.output(0).set_names({"anomaly_map"})
    score = ops.reduce_max(amap, np.array([1, 2, 3]), keep_dims=False)
    score.output(0).set_names({"pred_score"})
    path = tmp_path / "gray.xml"
    ov.save_model(ov.Model([ops.result(score), ops.result(amap)], [image]), path)
    with pytest.raises(EdgeModelError, match=r"expected images \[N, 3, H, W\]"):
        EdgeModel(path, threshold=0.5)


def test_wrong_array_shape(ir: Path) -> None:
    model = EdgeModel(ir)
    with pytest.raises(EdgeInputError, match=r"Expected float32 images \[N, 3, 32, 32\]"):
        model.predict(np.zeros((1, 4, SIZE, SIZE), dtype=np.float32))
    with pytest.raises(EdgeInputError, match="Expected float32 images"):
        model.predict(np.zeros((1, 3, 64, 64), dtype=np.float32))


def test_static_batch_of_one(tmp_path: Path, images: Path) -> None:
    model = EdgeModel(anomaly_ir(tmp_path / "b1.xml", batch=1))
    report = score_folder(model, images, tmp_path / "out", batch_size=8, progress=None)
    assert len(report.rows) == 5


def test_empty_and_missing_folders(ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    assert main(["infer", str(ir), str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "No images found" in err
    assert "--recursive" in err
    assert main(["infer", str(ir), str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "Image folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_only_corrupt_images(ir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"garbage")
    with pytest.raises(EdgeInputError, match="None of the 1 images"):
        score_folder(EdgeModel(ir), folder, tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_existing_output_and_overwrite(ir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(EdgeInputError, match="already exists"):
        score_folder(EdgeModel(ir), images, out, progress=None)
    score_folder(EdgeModel(ir), images, out, overwrite=True, progress=None)
    assert not (out / "old.txt").exists()
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_failure_midway_leaves_nothing(ir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_ext.edge import results

    calls = {"n": 0}
    original = results.overlay

    def failing_overlay(*args: object, **kwargs: object) -> Image.Image:
        calls["n"] += 1
        if calls["n"] == 3:
            msg = "disk full"
            raise OSError(msg)
        return original(*args, **kwargs)

    monkeypatch.setattr(results, "overlay", failing_overlay)
    with pytest.raises(OSError, match="disk full"):
        score_folder(EdgeModel(ir), images, tmp_path / "out", batch_size=2, progress=None)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_recursive_keeps_relative_names(ir: Path, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_image(root / "good" / "000.png", 20)
    write_image(root / "bad" / "000.png", 200)
    report = score_folder(EdgeModel(ir), root, tmp_path / "out", recursive=True, progress=None)
    assert sorted(row["image"] for row in report.rows) == ["bad/000.png", "good/000.png"]
    assert (tmp_path / "out" / "masks" / "bad" / "000.png").is_file()


def test_progress_bar_on_stderr(ir: Path, images: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kd_ext.cli", "infer", str(ir), str(images), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "inference precision f32 (hint f32)" in result.stderr
    assert "6/6 images" in result.stderr
    assert "skipped f_corrupt.png" in result.stderr
