"""Cross-task distillation end to end: real teachers trained here, N = 3 tasks (two real, one generated).

Teachers are trained for one epoch at 64x64 to keep the suite fast; the accuracy of the method is measured by
``benchmarks/cross_task.py``, not here.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Padim
from PIL import Image

from kd_ext.backbones import no_pretrained_downloads
from kd_ext.distill import DistillConfig, distill
from kd_ext.distill.tasks import prepare_tasks
from kd_ext.distill.teachers import load_anomaly_model
from kd_ext.edge import EdgeModel
from kd_ext.edge.errors import EdgeModelError
from kd_ext.models import BiDirMSKD
from kd_ext.models.checkpoint import teacher_pre_processor
from kd_ext.models.cross_task import CrossTaskStudent

SIZE = 64


def _generated_task(root: Path, rng: np.random.Generator) -> Path:
    """A procedural MVTec-layout category: striped texture, anomalies are dark blobs (with masks)."""
    category = root / "stripes"
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]

    def texture() -> np.ndarray:
        phase = rng.uniform(0, 2 * np.pi)
        base = 0.5 + 0.25 * np.sin(xx / 3.0 + phase) + rng.normal(0, 0.03, (SIZE, SIZE))
        return np.stack([base, base * 0.9, base * 0.7], axis=-1)

    def save(image: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)

    for index in range(24):
        save(texture(), category / "train" / "good" / f"{index:03d}.png")
    for index in range(6):
        save(texture(), category / "test" / "good" / f"{index:03d}.png")
        image = texture()
        cy, cx, radius = rng.integers(16, 48), rng.integers(16, 48), rng.integers(5, 10)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[mask] = 0.05
        save(image, category / "test" / "blob" / f"{index:03d}.png")
        mask_path = category / "ground_truth" / "blob" / f"{index:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return root


def _train(model: object, root: Path, category: str, workdir: Path) -> Path:
    engine = Engine(max_epochs=1, default_root_dir=workdir, logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=MVTecAD(root=root, category=category, train_batch_size=8, num_workers=0))
    return Path(engine.trainer.checkpoint_callback.best_model_path or next(workdir.rglob("*.ckpt")))


def _pre(size: int) -> object:
    return teacher_pre_processor("efficientnet_lite0", (size, size))


def _padim(size: int) -> Padim:
    """anomalib's Padim on the offline teacher (weights are not needed for the logic tested here)."""
    with no_pretrained_downloads():
        return Padim(
            backbone="tf_efficientnet_lite0",
            layers=["blocks.1", "blocks.2"],
            pre_trained=False,
            n_features=32,
            pre_processor=_pre(size),
        )


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory, hazelnut_root: Path, bottle_root: Path) -> dict:
    """Trained teacher checkpoints: BiDirMSKD on hazelnut and bottle, anomalib Padim on a generated task."""
    base = tmp_path_factory.mktemp("cross_task")
    generated = _generated_task(base / "data", np.random.default_rng(0))
    hazelnut = _train(BiDirMSKD(pre_processor=_pre(SIZE), epochs=1), hazelnut_root, "hazelnut_toy", base / "t1")
    bottle = _train(BiDirMSKD(pre_processor=_pre(SIZE), epochs=1), bottle_root, "bottle", base / "t2")
    stripes = _train(_padim(SIZE), generated, "stripes", base / "t3")
    stripes_96 = _train(_padim(96), generated, "stripes", base / "t4")
    return {
        "base": base,
        "tasks": {
            "hazelnut": (hazelnut, hazelnut_root, "hazelnut_toy", None),
            "bottle": (bottle, bottle_root, "bottle", None),
            "stripes": (stripes, generated, "stripes", "Padim"),
        },
        "padim_96": (stripes_96, generated, "stripes", "Padim"),
    }


def _config(teachers: dict, names: list[str], output: Path, **training: object) -> DistillConfig:
    tasks = []
    for name in names:
        checkpoint, root, category, model = teachers["tasks"][name]
        task = {"name": name, "checkpoint": str(checkpoint), "data": {"root": str(root), "category": category}}
        if model:
            task["model"] = model
        tasks.append(task)
    settings = {"epochs": 2, "batch_size": 8, "synthetic_per_image": 1, **training}
    return DistillConfig.from_dict({"tasks": tasks, "output": str(output), "training": settings})


@pytest.fixture(scope="module")
def distilled(teachers: dict) -> tuple:
    config = _config(teachers, ["hazelnut", "bottle", "stripes"], teachers["base"] / "student")
    return config, distill(config, log=lambda line: None)


def test_three_tasks_are_evaluated_per_task_with_anomalib_metrics(distilled: tuple) -> None:
    _, result = distilled
    assert list(result.report["tasks"]) == ["hazelnut", "bottle", "stripes"]
    for row in result.report["tasks"].values():
        for side in ("teacher", "student"):
            assert 0.0 <= row[side]["image_AUROC"] <= 1.0
            assert 0.0 <= row[side]["pixel_AUROC"] <= 1.0
    assert result.report["tasks"]["stripes"]["teacher_model"] == "Padim"
    history = result.report["history"]
    assert len(history) == 2 and set(history[-1]["temperature"]) == {"hazelnut", "bottle", "stripes"}
    assert json.loads((result.checkpoint.parent / "report.json").read_text())["tasks"].keys() == {
        "hazelnut",
        "bottle",
        "stripes",
    }


def test_student_is_smaller_than_the_teachers_together(distilled: tuple) -> None:
    compute = distilled[1].report["compute"]
    assert compute["student_parameters"] < compute["teachers_parameters"]
    assert compute["student_flops"] < compute["teachers_flops"]
    assert set(compute["student_head_parameters"]) == {"hazelnut", "bottle", "stripes"}


def test_checkpoint_reloads_with_identical_predictions_per_task(distilled: tuple) -> None:
    _, result = distilled
    reloaded = CrossTaskStudent.load_from_checkpoint(result.checkpoint).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    for task in ("hazelnut", "bottle", "stripes"):
        result.student.select_task(task)
        reloaded.select_task(task)
        with torch.no_grad():
            expected, actual = result.student(images), reloaded(images)
        torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-6, rtol=0)
        torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Unknown task 'cable'"):
        reloaded.select_task("cable")


def test_one_ir_serves_every_task_through_the_edge_runtime(distilled: tuple, hazelnut_root: Path) -> None:
    _, result = distilled
    datamodule = MVTecAD(root=hazelnut_root, category="hazelnut_toy", eval_batch_size=4, num_workers=0)
    datamodule.setup()
    images = torch.nn.functional.interpolate(next(iter(datamodule.test_dataloader())).image, size=(SIZE, SIZE))
    for task in ("hazelnut", "bottle", "stripes"):
        edge = EdgeModel(result.ir, task=task, mode="latency")
        prediction = edge.predict(images.numpy())
        result.student.select_task(task)
        with torch.no_grad():
            expected = result.student(images)  # AnomalibModule.forward: pre-processing, model, post-processing
        # Probabilities in [0, 1]; issue 4's FP32 parity bound for normalised maps is 1e-3.
        np.testing.assert_allclose(prediction.anomaly_map, expected.anomaly_map[:, 0].numpy(), atol=1e-3)
        np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-3)
        np.testing.assert_array_equal(prediction.pred_label, expected.pred_score.numpy() > 0.5)
    with pytest.raises(EdgeModelError, match="multi-task IR with tasks"):
        EdgeModel(result.ir)
    with pytest.raises(EdgeModelError, match="no task 'cable'"):
        EdgeModel(result.ir, task="cable")


def test_student_is_not_trained_by_engine_fit(distilled: tuple, hazelnut_root: Path, tmp_path: Path) -> None:
    student = CrossTaskStudent(tasks=["a"], image_size=(SIZE, SIZE), pre_trained=False)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1)
    with pytest.raises(RuntimeError, match="kd-ext distill"):
        engine.fit(student, datamodule=MVTecAD(root=hazelnut_root, category="hazelnut_toy", num_workers=0))


def test_bad_tasks_are_refused_before_training(teachers: dict, tmp_path: Path) -> None:
    config = _config(teachers, ["hazelnut", "stripes"], tmp_path / "out")
    config.tasks[1].model = None  # an anomalib checkpoint does not record its class
    not_a_model = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, not_a_model)
    config.tasks.append(type(config.tasks[0])("broken", not_a_model, config.tasks[0].root, "hazelnut_toy"))
    with pytest.raises(ValueError, match="Cannot start distillation") as error:
        prepare_tasks(config.tasks)
    message = str(error.value)
    assert "task 'stripes'" in message and "does not record its model class" in message
    assert "task 'broken'" in message and "not an anomaly-model checkpoint" in message
    assert not (tmp_path / "out").exists()


def test_teachers_at_different_image_sizes_are_refused(teachers: dict, tmp_path: Path) -> None:
    config = _config(teachers, ["hazelnut"], tmp_path / "out")
    checkpoint, root, category, model = teachers["padim_96"]
    config.tasks.append(type(config.tasks[0])("stripes96", checkpoint, root, category, model))
    with pytest.raises(ValueError, match=r"different image sizes.*'hazelnut' 64x64, 'stripes96' 96x96"):
        prepare_tasks(config.tasks)


def test_checkpoint_of_the_wrong_class_is_refused(teachers: dict) -> None:
    checkpoint = teachers["tasks"]["stripes"][0]
    with pytest.raises(ValueError, match="does not hold a Stfpm"):
        load_anomaly_model(checkpoint, "Stfpm")
    with pytest.raises(ValueError, match="does not hold a BiDirMSKD"):
        load_anomaly_model(checkpoint, "BiDirMSKD")
    with pytest.raises(ValueError, match="'Nope' is not an anomaly model"):
        load_anomaly_model(checkpoint, "Nope")


def test_distill_cli_reports_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "distill.yaml"
    config.write_text(
        f"output: {tmp_path / 'out'}\ntasks:\n"
        "  - {name: a, checkpoint: missing.ckpt, data: {root: nowhere, category: a}}\n"
        "  - {name: a, checkpoint: missing.ckpt, data: {root: nowhere, category: b}}\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "kd_ext.cli", "distill", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "Duplicate task names ['a']" in completed.stderr
    assert not (tmp_path / "out").exists()
