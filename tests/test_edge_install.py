"""The edge install: ``pip install kd_ext`` without extras brings numpy, openvino and pillow only.

``test_edge_install_*`` install this checkout without extras into a fresh virtual environment (from the package
index and the pip cache, pinned by constraints.txt, CPU kernels only) and score images there with an OpenVINO IR,
with no torch in that environment. They take minutes (the C++ extension is compiled), so they carry the
``edge_install`` marker and run when ``KD_EXT_TEST_EDGE_INSTALL=1`` is set (``.ci/run`` sets it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EDGE_PACKAGES = {"kd-ext", "numpy", "openvino", "openvino-telemetry", "pillow", "packaging"}
"""Distributions the edge install may bring (openvino needs openvino-telemetry and packaging)."""
TRAINING_PACKAGES = {"torch", "torchvision", "anomalib", "lightning", "nncf", "timm", "onnx"}
SIZE = 24
needs_venv = pytest.mark.skipif(
    os.environ.get("KD_EXT_TEST_EDGE_INSTALL") != "1",
    reason="installs kd_ext into a fresh virtual environment (minutes); set KD_EXT_TEST_EDGE_INSTALL=1 (CI does)",
)


def _run(command: list[str], env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    # Run outside the checkout, so that `python -c "import kd_ext"` finds the installed package, not ./kd_ext.
    return subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=timeout, env=env, cwd=Path.home()
    )


def test_training_command_without_the_extra_names_the_fix() -> None:
    """``kd-ext distill`` where torch cannot be imported: exit 2 and the pip command, no traceback."""
    code = (
        "import sys\n"
        "sys.modules.update(dict.fromkeys(('torch', 'torchvision', 'anomalib', 'lightning')))\n"
        "from kd_ext.cli import main\n"
        "sys.exit(main(['distill', '--config', 'distill.yaml']))\n"
    )
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 2, result.stderr
    assert "pip install 'kd_ext[anomalib]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_extras_split_edge_and_training_dependencies() -> None:
    """The base install names only the edge runtime's packages; training ones live in extras, ranges only."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {requirement.split(">")[0].split("=")[0].split("<")[0].strip() for requirement in project["dependencies"]}
    assert names == {"numpy", "openvino", "pillow"}
    extras = project["optional-dependencies"]
    assert {"torch", "anomalib"} <= {r.split(">")[0].split("<")[0] for r in extras["anomalib"]}
    assert any(r.startswith("nncf") for r in extras["int8"])
    assert "kd_ext[anomalib,int8]" in extras["dev"]
    requirements = [*project["dependencies"], *(r for rs in extras.values() for r in rs)]
    assert not [r for r in requirements if "==" in r], "exact pins belong in constraints.txt"


def _anomaly_ir(path: Path) -> Path:
    """A tiny anomaly IR: the map is 1 - the mean of the RGB channels, the score its maximum, threshold 0.5."""
    image = ops.parameter([-1, 3, SIZE, SIZE], ov.Type.f32, name="input")
    one = np.array(1.0, dtype=np.float32)
    anomaly_map = ops.subtract(one, ops.reduce_mean(image, np.array([1]), keep_dims=True))
    anomaly_map.output(0).set_names({"anomaly_map"})
    score = ops.reduce_max(anomaly_map, np.array([1, 2, 3]), keep_dims=False)
    score.output(0).set_names({"pred_score"})
    half = np.array(0.5, dtype=np.float32)
    label = ops.greater(score, half)
    label.output(0).set_names({"pred_label"})
    mask = ops.greater(anomaly_map, half)
    mask.output(0).set_names({"pred_mask"})
    results = [ops.result(node) for node in (score, anomaly_map, label, mask)]
    ov.save_model(ov.Model(results, [image], "edge_install_toy"), path)
    return path


def _images(folder: Path) -> dict[str, float]:
    """Three images with a dark square on a bright background; returns each one's expected score."""
    folder.mkdir(parents=True)
    expected = {}
    for name, dark in (("bright.png", 250), ("dim.png", 120), ("dark.png", 10)):
        array = np.full((SIZE, SIZE, 3), 250, dtype=np.uint8)
        array[4:12, 4:12] = dark
        Image.fromarray(array).save(folder / name)
        expected[name] = 1.0 - dark / 255.0
    return expected


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ``pip install <this checkout>`` (no extras)."""
    root = tmp_path_factory.mktemp("edge_install")
    venv = root / "venv"
    created = _run([sys.executable, "-m", "venv", str(venv)])
    assert created.returncode == 0, created.stderr
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    install = _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            str(REPO / "constraints.txt"),
            f"--config-settings=build-dir={root / 'build'}",  # not the checkout's build/ (the editable install's)
            "--config-settings=cmake.define.KD_EXT_WITH_CUDA=OFF",  # an edge CPU build
            str(REPO),
        ],
        env=env,
        timeout=1200,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return venv


@pytest.mark.edge_install
@needs_venv
def test_edge_install_brings_no_training_packages(edge_venv: Path) -> None:
    listed = _run([str(edge_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"])
    assert listed.returncode == 0, listed.stderr
    names = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed.stdout)}
    assert not names & TRAINING_PACKAGES
    assert names - {"pip", "setuptools", "wheel"} <= EDGE_PACKAGES, names
    no_torch = _run([str(edge_venv / "bin" / "python"), "-c", "import torch"])
    assert no_torch.returncode != 0


@pytest.mark.edge_install
@needs_venv
def test_edge_install_scores_images_and_runs_the_kernels(edge_venv: Path, tmp_path: Path) -> None:
    xml = _anomaly_ir(tmp_path / "model.xml")
    expected = _images(tmp_path / "images")
    out = tmp_path / "scored"
    infer = _run([str(edge_venv / "bin" / "kd-ext"), "infer", str(xml), str(tmp_path / "images"), "--out", str(out)])
    assert infer.returncode == 0, infer.stderr
    assert json.loads(infer.stdout.splitlines()[-1])["scored"] == 3
    results = json.loads((out / "results.json").read_text())
    rows = {Path(row["image"]).name: row for row in results["images"]}
    for name, score in expected.items():
        assert rows[name]["score"] == pytest.approx(score, abs=1e-5)
        assert rows[name]["label"] == int(score > 0.5)
    assert (out / "scores.csv").is_file()

    # The native kernels with numpy only, against the same call in this (torch) environment.
    from kd_ext import kernels

    rng = np.random.default_rng(0)
    features = [rng.standard_normal((2, 8, 6, 6), dtype=np.float32) for _ in range(2)]
    np.save(tmp_path / "features.npy", np.stack(features))
    reference = kernels.anomaly_map(features[:1], features[1:], (20, 20), sigma=1.0, backend="reference")
    code = (
        "import sys, numpy as np\n"
        "from kd_ext import kernels\n"
        f"t, s = np.load({str(tmp_path / 'features.npy')!r})\n"
        "maps = kernels.anomaly_map([t], [s], (20, 20), sigma=1.0, backend='native')\n"
        f"np.save({str(tmp_path / 'maps.npy')!r}, maps)\n"
        "assert 'torch' not in sys.modules\n"
        "assert '/site-packages/' in kernels.__file__, kernels.__file__\n"
    )
    scored = _run([str(edge_venv / "bin" / "python"), "-c", code])
    assert scored.returncode == 0, scored.stderr
    np.testing.assert_allclose(np.load(tmp_path / "maps.npy"), reference, atol=1e-5)

    distill = _run([str(edge_venv / "bin" / "kd-ext"), "distill", "--config", str(tmp_path / "distill.yaml")])
    assert distill.returncode == 2
    assert "pip install 'kd_ext[anomalib]'" in distill.stderr
