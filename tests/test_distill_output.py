"""``kd-ext distill``'s output folder: refused inside a task's data, an earlier run replaced only with --overwrite.

Nothing here trains: every refusal must come before any work, which the tests check by making the first step of
the work (:func:`~kd_ext.distill.tasks.prepare_tasks`) fail loudly. The student's checkpoint is written
with Lightning's ``weights_only=True`` and reloads with ``torch.load(..., weights_only=True)``.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kd_ext.distill import pipeline as distill_module
from kd_ext.distill.config import RUN_FILES, DistillConfig
from kd_ext.distill.pipeline import distill, remove_previous_run, save_checkpoint
from kd_ext.models.cross_task import CrossTaskStudent


class WorkStartedError(Exception):
    """Raised by the first step of distillation: the run got past the output checks."""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def prepare_tasks(*args: object, **kwargs: object) -> None:
        raise WorkStartedError

    monkeypatch.setattr(distill_module, "prepare_tasks", prepare_tasks)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A task's data folder (MVTec layout, one image) under ``tmp_path / "data"``."""
    folder = tmp_path / "data" / "toy" / "train" / "good"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "000.png")
    return tmp_path / "data" / "toy"


def _config(data: Path, output: Path, overwrite: bool = False) -> DistillConfig:
    task = {"name": "toy", "checkpoint": "missing.ckpt", "data": {"root": str(data.parent), "category": data.name}}
    return DistillConfig.from_dict({"tasks": [task], "output": str(output), "overwrite": overwrite})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    ("output", "where"),
    [
        (lambda data: data, "is the data folder"),
        (lambda data: data / "train" / "good", "is inside the data folder"),
        (lambda data: data.parent / "other" / ".." / "toy" / "runs", "is inside the data folder"),  # resolved
    ],
)
def test_output_inside_a_tasks_data_folder_is_refused_before_any_work(no_work: None, data: Path, output, where) -> None:
    before = _files(data)
    with pytest.raises(ValueError, match=rf"{where} .*toy of task 'toy'.*outside every task's data folder"):
        distill(_config(data, output(data)))
    assert _files(data) == before  # nothing written among the images


def test_output_through_a_link_into_the_data_folder_is_refused(no_work: None, data: Path, tmp_path: Path) -> None:
    link = tmp_path / "runs"
    link.symlink_to(data / "train", target_is_directory=True)
    with pytest.raises(ValueError, match="is inside the data folder"):
        distill(_config(data, link / "student"))


def test_output_beside_the_data_is_accepted(no_work: None, data: Path, tmp_path: Path) -> None:
    with pytest.raises(WorkStartedError):  # got past the output checks
        distill(_config(data, tmp_path / "data" / "toy_student"))


def _earlier_run(output: Path) -> dict[str, bytes]:
    for name in RUN_FILES:
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(f"earlier {name}")
    return _files(output)


def test_an_earlier_run_is_kept_without_overwrite(no_work: None, data: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    before = _earlier_run(output)
    with pytest.raises(ValueError, match=r"already holds an earlier run's report.json, student.ckpt.*pass --overwrite"):
        distill(_config(data, output))
    assert _files(output) == before
    with pytest.raises(WorkStartedError):
        distill(_config(data, output, overwrite=True))


def test_overwrite_must_be_a_boolean(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overwrite must be true or false, got 'yes'"):
        _config(data, tmp_path / "run", overwrite="yes")


def test_overwrite_removes_every_file_of_the_earlier_run(tmp_path: Path) -> None:
    """A new run without export must not leave the earlier run's IR next to its own report."""
    _earlier_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    remove_previous_run(tmp_path)
    assert _files(tmp_path) == {"notes.txt": b"mine"}


def _cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd_ext.cli", "distill", *arguments], capture_output=True, text=True, timeout=300
    )


def test_cli_refuses_an_earlier_run_and_names_the_flag(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    before = _earlier_run(output)
    task = {"name": "toy", "checkpoint": str(tmp_path / "missing.ckpt"), "data": {"root": str(data.parent)}}
    task["data"]["category"] = data.name
    arguments = ["--output", str(output), "--tasks", json.dumps([task])]
    refused = _cli(*arguments)
    assert refused.returncode == 2
    assert "already holds an earlier run's" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert _files(output) == before
    inside = _cli("--output", str(data / "student"), "--tasks", json.dumps([task]), "--overwrite")
    assert inside.returncode == 2
    assert "is inside the data folder" in inside.stderr
    assert not (data / "student").exists()
    overwritten = _cli(*arguments, "--overwrite")  # accepted: the task checks come next and find no checkpoint
    assert overwritten.returncode == 2
    assert "teacher checkpoint not found" in overwritten.stderr
    assert _files(output) == before  # replaced only once a new student exists


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_student_checkpoint_is_saved_weights_only_and_loads_weights_only(tmp_path: Path) -> None:
    """Lightning logged "`weights_only` was not set, defaulting to `False`" while distill saved the student."""
    student = CrossTaskStudent(tasks=["a", "b"], image_size=(64, 64), pre_trained=False, visualizer=False)
    records = _Records()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        path = save_checkpoint(student, tmp_path / "student.ckpt")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert not [message for message in records.messages if "weights_only" in message]
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in content
    assert "callbacks" not in content
    reloaded = CrossTaskStudent.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(reloaded.state_dict(), student.state_dict(), rtol=0, atol=0, equal_nan=True)
