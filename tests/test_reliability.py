"""Reliability of the training-side entry points: no code runs from a checkpoint, bad images are named early."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from kd_ext.distill.config import TaskConfig
from kd_ext.distill.tasks import prepare_tasks
from kd_ext.distill.teachers import load_anomaly_model, model_class
from kd_ext.models.image_checks import unreadable_images


class _Payload:
    """Unpickling this object creates a folder: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    state = {"post_processor.image_min": torch.zeros(()), "post_processor._image_threshold": torch.zeros(())}
    torch.save({"state_dict": state, "kd_ext_model": "BiDirMSKD", "hyper_parameters": {"x": _Payload(marker)}}, path)
    return path


def test_pickle_payload_is_refused_by_the_python_api(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = _payload_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match=r"refused: it holds Python objects other than weights"):
        load_anomaly_model(checkpoint)
    assert not marker.exists()


def test_pickle_payload_is_refused_by_kd_ext_distill(tmp_path: Path, hazelnut_root: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = _payload_checkpoint(tmp_path / "evil.ckpt", marker)
    config = tmp_path / "distill.yaml"
    config.write_text(
        f"output: {tmp_path / 'out'}\ntasks:\n"
        f"  - {{name: a, checkpoint: {checkpoint}, data: {{root: {hazelnut_root}, category: hazelnut_toy}}}}\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "kd_ext.cli", "distill", str(config)], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 2, completed.stderr
    assert "refused" in completed.stderr and "weights_only=True" in completed.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_checks_that_need_no_checkpoint_run_before_any_checkpoint_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: opened.append(args))
    checkpoint = _payload_checkpoint(tmp_path / "evil.ckpt", tmp_path / "pwned")
    tasks = [
        TaskConfig("good_data_missing_model", checkpoint, tmp_path, "nowhere"),
        TaskConfig("bad_model", checkpoint, tmp_path, "nowhere", model="os.system"),
        TaskConfig("no_file", tmp_path / "missing.ckpt", tmp_path, "nowhere"),
    ]
    with pytest.raises(ValueError, match="Cannot start distillation") as error:
        prepare_tasks(tasks)
    message = str(error.value)
    assert "does not exist" in message
    assert "'os.system' is outside anomalib's and kd_ext's model packages" in message
    assert "teacher checkpoint not found" in message
    assert opened == []


def test_model_names_never_import_arbitrary_modules() -> None:
    sys.modules.pop("this", None)
    with pytest.raises(ValueError, match="outside anomalib's and kd_ext's model packages"):
        model_class("this.Zen")
    assert "this" not in sys.modules
    assert model_class("anomalib.models.Padim").__name__ == "Padim"
    assert model_class("kd_ext.models.BiDirMSKD").__name__ == "BiDirMSKD"


def test_images_too_large_for_pillow_are_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "huge.png")
    Image.new("RGB", (4, 3)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels > 2 x limit: a DecompressionBombError
    failures = dict(unreadable_images([tmp_path / "huge.png", tmp_path / "small.png"]))
    assert list(failures) == [str(tmp_path / "huge.png")]
    assert "too large for Pillow" in failures[str(tmp_path / "huge.png")]


def _break_one_test_image(root: Path) -> Path:
    broken = sorted((root / "test" / "bad").glob("*.png"))[-1]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    return broken


def test_broken_test_image_is_named_before_training(tmp_path: Path, tiny_folder: Path, tiny_folder_datamodule) -> None:
    from anomalib.engine import Engine

    from kd_ext.models import BiDirMSKD

    broken = _break_one_test_image(tiny_folder)
    datamodule = tiny_folder_datamodule()
    model = BiDirMSKD(
        pre_trained=False, pre_processor=BiDirMSKD.configure_pre_processor((64, 64)), visualizer=False, epochs=1
    )
    engine = Engine(max_epochs=1, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"1 of \d+ images cannot be read") as error:
        engine.fit(model, datamodule=datamodule)
    assert broken.name in str(error.value)
    assert engine.trainer.global_step == 0


@pytest.mark.parametrize("sigma", [math.nan, math.inf, -1.0, 100.0])
@pytest.mark.parametrize("model_name", ["BiDirMSKD", "MTHF"])
def test_bad_sigma_is_refused_by_the_constructor(model_name: str, sigma: float) -> None:
    from kd_ext import models

    with pytest.raises(ValueError, match="sigma"):
        getattr(models, model_name)(pre_trained=False, sigma=sigma)


@pytest.mark.parametrize("model_name", ["BiDirMSKD", "MTHF"])
def test_training_without_a_logger_prints_no_spurious_warnings(
    model_name: str, tmp_path: Path, tiny_folder_datamodule
) -> None:
    from anomalib.engine import Engine

    from kd_ext import models

    cls = getattr(models, model_name)
    model = cls(pre_trained=False, pre_processor=cls.configure_pre_processor((64, 64)), visualizer=False, epochs=1)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.fit(model, datamodule=tiny_folder_datamodule())
    messages = [str(warning.message) for warning in caught]
    assert engine.trainer.global_step > 0
    assert not [message for message in messages if "no logger configured" in message], messages
    assert not [message for message in messages if "in eval mode at the start of training" in message], messages


@pytest.mark.parametrize("model_name", ["BiDirMSKD", "MTHF"])
def test_training_protocol_comes_from_the_model(model_name: str) -> None:
    from kd_ext import models
    from kd_ext.models.base import DEFAULT_EPOCHS

    cls = getattr(models, model_name)
    assert cls(pre_trained=False).trainer_arguments["max_epochs"] == DEFAULT_EPOCHS
    assert cls(pre_trained=False, epochs=3).trainer_arguments["max_epochs"] == 3
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1"):
        cls(pre_trained=False, epochs=0)
