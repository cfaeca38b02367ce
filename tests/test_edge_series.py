"""Edge scoring of series files with a real SignalKD IR: parity with torch, torch-free scoring, bad input.

One tiny SignalKD (teacher and students 1 epoch) is trained through anomalib's Engine on synthetic UCR files with a
low-pass filter, exported to OpenVINO once per module, and scored by ``kd-ext infer MODEL.xml SERIES_FILE``.
Tolerance of the parity checks: scores and per-time-step maps within 1e-5 (absolute; f32 inference), identical labels.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from test_edge import anomaly_ir, sample_images
from test_signals import LENGTH, write_ucr

from kd_ext.cli import main
from kd_ext.edge import EdgeInputError, EdgeModel, EdgeModelError
from kd_ext.edge.runtime import fold_constant_nan_checks
from kd_ext.edge.series import score_series, series_preprocessing
from kd_ext.edge.series_preprocessing import METADATA_KEY, METADATA_SECTION, SeriesPreprocessing

TOLERANCE = 1e-5
BAND_PASS = (0.0, 0.5)
TORCH_FREE_CLI = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "anomalib", "torchvision", "lightning", "scipy"}:
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, Block())
from kd_ext.cli import main
code = main(sys.argv[1:])
assert not any(name.split(".")[0] in {"torch", "anomalib", "scipy"} for name in sys.modules)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A SignalKD trained with a low-pass filter, its IR, and torch's predictions on the test file."""
    import torch
    from anomalib.engine import Engine

    from kd_ext.data import UCRSeries
    from kd_ext.export import export_openvino
    from kd_ext.models.signal_kd import SignalKD

    root = tmp_path_factory.mktemp("series_edge")
    train = write_ucr(root / "SYN_TRAIN.txt")
    test = write_ucr(root / "SYN_TEST.txt", normal=6, abnormal=6, seed=5)
    module = UCRSeries(train, test, band_pass=BAND_PASS, seed=0, train_batch_size=8, eval_batch_size=8)
    torch.manual_seed(0)
    model = SignalKD(width=8, hidden=16, teacher_epochs=1, epochs=1)
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
    engine.fit(model, datamodule=module)
    xml = export_openvino(model, root / "export", input_size=None)
    model.eval()
    with torch.no_grad():
        expected = model(module.test_data.series())
    return SimpleNamespace(
        root=root,
        xml=xml,
        test=test,
        model=model,
        preprocessing=module.preprocessing,
        checkpoint=engine.trainer.checkpoint_callback.best_model_path,
        lines=module.test_data.samples.line.tolist(),
        labels=module.test_data.samples.ucr_label.to_numpy(),
        score=expected.pred_score.numpy(),
        label=expected.pred_label.numpy().astype(int),
        anomaly_map=expected.anomaly_map.numpy(),
    )


def read_scores(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open() as stream:
        return list(csv.DictReader(stream))


def run_cli(*arguments: object) -> int:
    return main(["infer", *map(str, arguments), "--quiet"])


# ----------------------------------------------------------------------------------------------------- scoring


def test_cli_scores_a_series_file_without_torch_like_the_torch_model(exported: SimpleNamespace, tmp_path: Path) -> None:
    """In a process where torch, anomalib and scipy cannot be imported: same scores, maps and labels as torch."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", TORCH_FREE_CLI, "infer", str(exported.xml), str(exported.test), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["scored"] == 12
    assert summary["skipped"] == 0
    rows = read_scores(out)
    assert [int(row["line"]) for row in rows] == exported.lines
    assert [float(row["ucr_label"]) for row in rows] == exported.labels.tolist()  # kept from the file
    scores = np.array([float(row["score"]) for row in rows])
    np.testing.assert_allclose(scores, exported.score, atol=TOLERANCE, rtol=0)  # scores.csv rounds to 1e-6
    assert [int(row["label"]) for row in rows] == exported.label.tolist()
    assert {row["label_name"] for row in rows} <= {"normal", "anomalous"}
    maps = np.load(out / "maps.npy")
    assert maps.shape == (12, LENGTH)
    np.testing.assert_allclose(maps, exported.anomaly_map, atol=TOLERANCE, rtol=0)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert results["label_column"] is True
    assert results["preprocessing"] == {"normalize": True, "band_pass": list(BAND_PASS), "filter_order": 2}
    assert results["model"]["input_kind"] == "series"
    assert results["model"]["input_size"] == [LENGTH]
    assert not (out / "skipped.csv").exists()


def test_the_training_preprocessing_travels_with_the_ir_and_the_checkpoint(exported: SimpleNamespace) -> None:
    from kd_ext.models.signal_kd import SignalKD

    model = EdgeModel(exported.xml)
    assert series_preprocessing(model) == exported.preprocessing == SeriesPreprocessing(band_pass=BAND_PASS)
    # The filter matters: without it the IR scores the same series differently.
    raw = np.loadtxt(exported.test)[:, 1:]
    filtered = model.predict(exported.preprocessing.apply(raw)[:, None]).pred_score
    unfiltered = model.predict(SeriesPreprocessing().apply(raw)[:, None]).pred_score
    np.testing.assert_allclose(filtered, exported.score, atol=TOLERANCE, rtol=0)
    assert np.abs(unfiltered - filtered).max() > 100 * TOLERANCE
    assert SignalKD.load_from_checkpoint(exported.checkpoint).series_preprocessing == exported.preprocessing


def test_series_without_label_column_and_a_file_with_one_series(exported: SimpleNamespace, tmp_path: Path) -> None:
    raw = np.loadtxt(exported.test)
    one = tmp_path / "one.csv"
    one.write_text(",".join(f"{value:.7e}" for value in raw[3, 1:]) + "\n")  # no label, comma separated
    report = score_series(EdgeModel(exported.xml), one, tmp_path / "out", progress=None)
    assert len(report.rows) == 1
    assert report.rows[0]["ucr_label"] is None
    assert report.rows[0]["score"] == pytest.approx(float(exported.score[3]), abs=TOLERANCE)
    assert read_scores(tmp_path / "out")[0]["ucr_label"] == ""
    assert json.loads((tmp_path / "out" / "results.json").read_text())["label_column"] is False


def test_series_with_nan_samples_are_skipped_with_the_reason(exported: SimpleNamespace, tmp_path: Path) -> None:
    lines = exported.test.read_text().splitlines()
    cells = lines[2].split()
    cells[5] = "NaN"
    lines[2] = " ".join(cells)
    path = tmp_path / "nan.txt"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run_cli(exported.xml, path, "--out", out) == 0
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    assert skipped == [
        {"index": "2", "line": "3", "reason": skipped[0]["reason"]},
    ]
    assert skipped[0]["reason"].startswith("NaN or infinite value at position 5; interpolate")
    rows = read_scores(out)
    assert [int(row["line"]) for row in rows] == [line for line in exported.lines if line != 3]
    kept = [index for index in range(12) if index != 2]
    np.testing.assert_allclose([float(row["score"]) for row in rows], exported.score[kept], atol=TOLERANCE, rtol=0)
    assert np.load(out / "maps.npy").shape == (11, LENGTH)


def test_nan_guards_on_constants_are_folded_so_every_stream_count_agrees(tmp_path: Path) -> None:
    """The pattern of anomalib's normalisation guard, ``where(!isnan(min) & !isnan(max), 2x, x)``, at 1 and 2 streams.

    OpenVINO 2026.4's CPU plugin selects ``x`` with two streams unless the ``IsNaN`` of constants is folded first
    (EdgeModel does so when it reads an IR; on a one-core machine both stream counts agree anyway).
    """
    series = ops.parameter([-1, 1, LENGTH], ov.Type.f32, name="input")
    doubled = ops.multiply(series, np.float32(2))
    lower, upper = ops.constant(np.float32(0.9)), ops.constant(np.float32(1.1))
    finite = ops.logical_and(ops.logical_not(ops.is_nan(lower)), ops.logical_not(ops.is_nan(upper)))
    guarded = ops.select(finite, doubled, series)
    model = ov.Model([ops.result(guarded)], [series], "guard")
    assert fold_constant_nan_checks(model) == 2
    data = np.random.default_rng(0).random((4, 1, LENGTH), dtype=np.float32)
    for streams in ("1", "2"):
        compiled = ov.Core().compile_model(model, "CPU", {"NUM_STREAMS": streams, "INFERENCE_PRECISION_HINT": "f32"})
        np.testing.assert_array_equal(compiled(data)[0], 2 * data)


# ----------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: [*lines[:4], lines[4].rsplit(" ", 1)[0], *lines[5:]], r"different lengths.*line 5: 32 values"),
        (lambda lines: [lines[0].replace(lines[0].split()[7], "0.1x", 1), *lines[1:]], r"line 1, column 8: '0\.1x'"),
        (lambda lines: [" ".join(line.split()[:-3]) for line in lines], r"30 numbers per line \(expected 32, or 33"),
        (lambda lines: [" ".join([*line.split(), "0.0", "1.0"]) for line in lines], r"35 numbers per line"),
        (lambda lines: ["1 " + " ".join(["nan"] * LENGTH)], r"None of the 1 series .* can be scored: NaN"),
        (lambda lines: ["", "  "], r"has no series"),
    ],
    ids=["ragged", "non-numeric", "shorter", "longer", "all-nan", "empty"],
)
def test_bad_series_files_stop_before_scoring_with_exit_2(
    exported: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture, edit, message: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(edit(exported.test.read_text().splitlines())) + "\n")
    out = tmp_path / "out"
    assert run_cli(exported.xml, path, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-ext infer: error: ")
    assert __import__("re").search(message, err, flags=__import__("re").DOTALL), err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_length_mismatch_names_both_lengths_and_the_label_column_can_be_forced(
    exported: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert run_cli(exported.xml, exported.test, "--out", out, "--no-label-column") == 2
    err = capsys.readouterr().err
    assert f"the series have {LENGTH + 1} values per line, but the model takes series of {LENGTH} time steps" in err
    assert "Resample the series to 32 samples" in err
    assert run_cli(exported.xml, exported.test, "--out", out, "--label-column") == 0


def test_image_ir_with_a_series_file_and_series_ir_with_an_image_folder(
    exported: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image_ir = anomaly_ir(tmp_path / "image" / "model.xml")
    assert run_cli(image_ir, exported.test, "--out", tmp_path / "a") == 2
    assert "scores images [N, 3, H, W], not series: pass a folder of images, not " in capsys.readouterr().err
    images = sample_images(tmp_path / "images")
    assert run_cli(exported.xml, images, "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert f"scores series [N, 1, {LENGTH}], not images: pass a series file" in err
    assert run_cli(exported.xml, exported.test, "--out", tmp_path / "c", "--recursive") == 2
    assert "--recursive apply to image folders, not to series files" in capsys.readouterr().err
    with pytest.raises(EdgeInputError, match=rf"Expected float32 series \[N, 1, {LENGTH}\], got \(2, 1, 40\)"):
        EdgeModel(exported.xml).predict(np.zeros((2, 1, 40), dtype=np.float32))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_ir_without_recorded_preprocessing_is_refused(
    exported: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    xml = tmp_path / "model.xml"
    text = exported.xml.read_text()
    assert f"<{METADATA_KEY} value=" in text
    xml.write_text("\n".join(line for line in text.splitlines() if METADATA_KEY not in line))
    shutil.copy(exported.xml.with_suffix(".bin"), xml.with_suffix(".bin"))
    core = ov.Core()
    assert not core.read_model(xml).has_rt_info([METADATA_SECTION, METADATA_KEY])
    assert run_cli(xml, exported.test, "--out", tmp_path / "out") == 2
    assert "does not record how its series were preprocessed in training" in capsys.readouterr().err
    with pytest.raises(EdgeModelError, match="Re-export the model"):
        series_preprocessing(EdgeModel(xml))


def test_results_replace_an_output_folder_only_with_overwrite(
    exported: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous results")
    assert run_cli(exported.xml, exported.test, "--out", out) == 2
    assert "already exists; choose another or pass --overwrite" in capsys.readouterr().err
    assert run_cli(exported.xml, exported.test, "--out", out, "--overwrite") == 0
    assert not (out / "old.txt").exists()
    assert (out / "maps.npy").is_file()
    assert run_cli(exported.xml, exported.test, "--out", exported.test.parent, "--overwrite") == 2
    assert "is, or contains, the series file" in capsys.readouterr().err
