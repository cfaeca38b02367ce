"""kd_ext models behave like anomalib's built-in ones: CLI, configs, Engine, checkpoints, get_model.

The CLI tests run ``anomalib`` in a fresh subprocess, exactly as a user types it, so they also check that
the ``.pth`` hook registers the models without any import of kd_ext.
"""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cli

ANOMALIB = [str(Path(sys.executable).with_name("anomalib"))]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_get_model_by_bare_name_in_fresh_process(tmp_path: Path) -> None:
    result = python(
        "from anomalib.models import get_model, list_models\n"
        "model = get_model('BiDirMSKD', pre_trained=False, reverse_student=False, fusion=False)\n"
        "print(type(model).__module__, model.model.bottleneck is None, 'BiDirMSKD' in list_models(case='pascal'))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["kd_ext.models.bidirmskd.lightning_model", "True", "True"]


def test_autoload_switch_off(tmp_path: Path) -> None:
    result = python(
        "from anomalib.models import get_model\nget_model('BiDirMSKD')", tmp_path, env={"KD_EXT_NO_AUTOLOAD": "1"}
    )
    assert result.returncode != 0
    assert "UnknownModelError" in result.stderr


def test_plain_python_process_imports_nothing_of_kd_ext(tmp_path: Path) -> None:
    result = python("import sys; print(sorted(sys.modules))", tmp_path)
    modules = set(eval(result.stdout))
    assert "_kd_ext_autoload" in modules, "the .pth hook is not installed"
    assert not {"torch", "anomalib", "numpy", "kd_ext", "kd_ext.models"} & modules


def test_hook_module_imports_nothing(tmp_path: Path) -> None:
    """Without site (-S), importing the hook adds exactly one module and one finder."""
    code = (
        "import os, sys  # site imports both before any .pth file runs\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "before = set(sys.modules)\n"
        "import _kd_ext_autoload\n"
        "print(sorted(set(sys.modules) - before))\n"
        "print(type(sys.meta_path[0]).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    added, finder = result.stdout.splitlines()
    assert eval(added) == ["_kd_ext_autoload"]
    assert finder == "AnomalibModelsFinder"


def _checkpoint(root: Path) -> Path:
    checkpoints = sorted(root.rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint written under {root}"
    return checkpoints[-1]


def _metric(output: str, name: str) -> float:
    match = re.search(rf"{name}\s*│\s*([0-9.]+)", output)
    assert match, f"{name} not printed:\n{output[-3000:]}"
    return float(match.group(1))


def test_cli_train_test_predict_with_bare_name(tmp_path: Path, hazelnut_root: Path) -> None:
    data = [
        "--data",
        "MVTecAD",
        "--data.root",
        str(hazelnut_root),
        "--data.category",
        "hazelnut_toy",
        "--data.num_workers",
        "0",
        "--data.train_batch_size",
        "8",
        "--data.eval_batch_size",
        "8",
    ]
    output = run(
        [
            *ANOMALIB,
            "train",
            "--model",
            "BiDirMSKD",
            *data,
            "--model.epochs",
            "2",
            "--default_root_dir",
            str(tmp_path / "results"),
            "--logging.log_graph",
            "false",
        ],
        tmp_path,
    )
    assert 0.0 <= _metric(output, "image_AUROC") <= 1.0
    assert 0.0 <= _metric(output, "pixel_AUROC") <= 1.0
    checkpoint = _checkpoint(tmp_path / "results")
    output = run(
        [
            *ANOMALIB,
            "test",
            "--model",
            "BiDirMSKD",
            *data,
            "--ckpt_path",
            str(checkpoint),
            "--default_root_dir",
            str(tmp_path / "tested"),
        ],
        tmp_path,
    )
    assert 0.0 <= _metric(output, "image_AUROC") <= 1.0
    images = hazelnut_root / "hazelnut_toy" / "test" / "colour"
    run(
        [
            *ANOMALIB,
            "predict",
            "--model",
            "BiDirMSKD",
            "--ckpt_path",
            str(checkpoint),
            "--data",
            str(images),
            "--default_root_dir",
            str(tmp_path / "predicted"),
        ],
        tmp_path,
    )
    written = list((tmp_path / "predicted").rglob("*.png"))
    assert len(written) == len(list(images.glob("*.png")))


def test_yaml_config_with_class_path(tmp_path: Path, hazelnut_root: Path) -> None:
    config = tmp_path / "bidirmskd.yaml"
    config.write_text(
        "model:\n"
        "  class_path: BiDirMSKD\n"
        "  init_args:\n"
        "    reverse_student: false\n"
        "    fusion: false\n"
        "    epochs: 1\n"
        "data:\n"
        "  class_path: anomalib.data.MVTecAD\n"
        "  init_args:\n"
        f"    root: {hazelnut_root}\n"
        "    category: hazelnut_toy\n"
        "    num_workers: 0\n"
        "    train_batch_size: 8\n"
        "trainer:\n"
        "  max_epochs: 1\n"
        f"default_root_dir: {tmp_path / 'results'}\n"
    )
    run([*ANOMALIB, "fit", "--config", str(config)], tmp_path)
    checkpoint = torch.load(_checkpoint(tmp_path / "results"), map_location="cpu", weights_only=False)
    assert checkpoint["kd_ext_model"] == "BiDirMSKD"
    assert checkpoint["hyper_parameters"]["reverse_student"] is False


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, hazelnut_root: Path) -> tuple:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from kd_ext.models import BiDirMSKD

    workdir = tmp_path_factory.mktemp("engine")
    datamodule = MVTecAD(
        root=hazelnut_root, category="hazelnut_toy", train_batch_size=8, eval_batch_size=8, num_workers=0
    )
    engine = Engine(max_epochs=2, default_root_dir=workdir, logger=False, accelerator="cpu", devices=1)
    model = BiDirMSKD(epochs=2)
    engine.fit(model, datamodule=datamodule)
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    return (
        engine,
        model,
        datamodule,
        metrics,
        Path(engine.trainer.checkpoint_callback.best_model_path or _checkpoint(workdir)),
    )


def test_engine_fit_test_on_real_images(trained: tuple) -> None:
    _, _, _, metrics, _ = trained
    # Two epochs with the pretrained teacher already separate the hazelnut defects well.
    assert metrics["image_AUROC"] > 0.8
    assert metrics["pixel_AUROC"] > 0.9


def test_checkpoint_reload_gives_identical_predictions(trained: tuple) -> None:
    from kd_ext.models import BiDirMSKD

    _, model, datamodule, _, checkpoint = trained
    batch = next(iter(datamodule.test_dataloader()))
    model.eval()
    reloaded = BiDirMSKD.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        expected = model(batch.image)
        actual = reloaded(batch.image)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(actual.pred_label, expected.pred_label)


def test_engine_predict_handles_grayscale_and_odd_sizes(trained: tuple, tmp_path: Path, hazelnut_root: Path) -> None:
    from PIL import Image

    engine, model, _, _, _ = trained
    source = next((hazelnut_root / "hazelnut_toy" / "test" / "colour").glob("*.png"))
    Image.open(source).convert("L").save(tmp_path / "gray.png")
    Image.open(source).convert("RGB").resize((173, 301)).save(tmp_path / "odd.png")
    Image.open(source).convert("RGBA").save(tmp_path / "rgba.png")
    predictions = engine.predict(model, data_path=tmp_path, return_predictions=True)
    maps = torch.cat([p.anomaly_map for p in predictions])
    assert maps.shape[0] == 3
    assert torch.isfinite(maps).all()


def test_engine_predict_reports_corrupt_and_missing_images(trained: tuple, tmp_path: Path) -> None:
    engine, model, _, _, _ = trained
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(Exception, match=r"corrupt\.png"):
        engine.predict(model, data_path=corrupt, return_predictions=True)
    with pytest.raises(Exception, match=r"missing\.png"):
        engine.predict(model, data_path=tmp_path / "missing.png", return_predictions=True)


def test_checkpoint_of_another_model_is_refused(trained: tuple, tmp_path: Path, hazelnut_datamodule) -> None:
    from anomalib.engine import Engine
    from anomalib.models import Padim

    from kd_ext.models import BiDirMSKD

    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1)
    engine.fit(
        Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=32), datamodule=hazelnut_datamodule
    )
    padim_checkpoint = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not by BiDirMSKD"):
        BiDirMSKD.load_from_checkpoint(padim_checkpoint)
    _, _, _, _, checkpoint = trained
    forward_only = BiDirMSKD(reverse_student=False, fusion=False)
    with pytest.raises(ValueError, match="architecture differs: reverse_student=True"):
        Engine(logger=False, default_root_dir=tmp_path).test(
            forward_only, datamodule=hazelnut_datamodule, ckpt_path=checkpoint
        )


def test_importing_models_writes_nothing(tmp_path: Path) -> None:
    """kd_ext never writes into the working directory on import."""
    before = set(tmp_path.iterdir())
    result = python("import kd_ext.models", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(tmp_path.iterdir()) == before
