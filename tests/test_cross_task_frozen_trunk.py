"""The frozen-trunk prior student of ``benchmarks/frozen_trunk.py`` (a baseline of the cross-task benchmark).

Its fitted-statistics heads and its training through the same Lightning distillation as the small student, on
tiny made-up samples (the benchmark measures its accuracy).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from frozen_trunk import FrozenTrunkStudent, TaskHead, fit_frozen_heads

from kd_ext.distill.config import StudentConfig, TrainingConfig
from kd_ext.distill.export import export_all_tasks_openvino
from kd_ext.distill.pipeline import build_student
from kd_ext.distill.targets import TaskSamples
from kd_ext.distill.training import train_student

SIZE = 64


def _frozen() -> FrozenTrunkStudent:
    return FrozenTrunkStudent(tasks=["a", "b"], pre_trained=False, image_size=(SIZE, SIZE), hidden_channels=8)


def _samples(sizes: dict[str, int]) -> dict[str, TaskSamples]:
    generator = torch.Generator().manual_seed(0)
    return {
        task: TaskSamples(
            torch.randn(count, 3, SIZE, SIZE, generator=generator),
            torch.randn(count, 1, SIZE // 4, SIZE // 4, generator=generator) - 2,
            torch.randn(count, generator=generator),
        )
        for task, count in sizes.items()
    }


def test_frozen_student_has_fitted_statistics_heads_and_a_frozen_trunk() -> None:
    student = _frozen()
    assert all(isinstance(head, TaskHead) for head in student.model.heads.values())
    assert not student.model.trunk_is_trainable
    assert not any(parameter.requires_grad for parameter in student.model.trunk.parameters())
    student.train()
    assert student.model.heads.training and not student.model.trunk.training  # ImageNet batch-norm statistics kept
    built = build_student(["x"], (SIZE, SIZE), StudentConfig(hidden_channels=8), student_class=FrozenTrunkStudent)
    assert built.model.trunk_name == "frozen" and built.tasks == ("x",)


def test_fitted_heads_then_training_keep_the_trunk() -> None:
    torch.manual_seed(0)
    student = _frozen()
    samples = _samples({"a": 8, "b": 12})
    fit_frozen_heads(student, samples, {"a": 4, "b": 6})
    fitted = {name: value.clone() for name, value in student.model.named_buffers() if "normal_" in name}
    assert len(fitted) == 4 and all(not torch.equal(value, torch.zeros_like(value)) for value in fitted.values())
    before = {name: value.detach().clone() for name, value in student.model.trunk.named_parameters()}
    heads = {name: value.detach().clone() for name, value in student.model.heads.named_parameters()}
    config = TrainingConfig(epochs=1, batch_size=4, task_weighting="uncertainty", temperature="fixed")
    history = train_student(student, samples, config)
    assert all(torch.equal(value, before[name]) for name, value in student.model.trunk.named_parameters())
    assert any(not torch.equal(value, heads[name]) for name, value in student.model.heads.named_parameters())
    assert all(torch.equal(buffer, fitted[name]) for name, buffer in student.model.named_buffers() if name in fitted)
    assert history[0]["parts"]["b"]["feature"] == 0.0  # no feature distillation into a frozen trunk
    assert len(history[0]["steps"]) == 3  # ceil(12 / 4)


def test_frozen_student_exports_one_ir_for_all_tasks(tmp_path: Path) -> None:
    from kd_ext.edge import EdgeModel

    student = _frozen().eval()
    xml = export_all_tasks_openvino(student, tmp_path / "student.xml", (SIZE, SIZE))
    images = torch.rand(2, 3, SIZE, SIZE)
    student.select_task("b")
    with torch.no_grad():
        expected = student(images)
    prediction = EdgeModel(xml, task="b", mode="latency").predict(images.numpy())
    assert prediction.pred_score == pytest.approx(expected.pred_score.numpy(), abs=1e-3)


def test_task_head_standardises_with_fitted_normal_statistics() -> None:
    torch.manual_seed(0)
    head = TaskHead(channels=[4, 6], feature_size=(8, 8), hidden_channels=8)
    normal = [torch.randn(20, 4, 8, 8) * 2 + 1, torch.randn(20, 6, 4, 4) * 3 - 1]
    head.fit_normal_statistics(normal)
    standardised = (head.stack(normal) - head.normal_mean) / head.normal_std
    assert standardised.mean().abs().item() < 0.05
    assert 0.6 < standardised.std().item() < 0.75  # the floor (the channel's mean variance) halves the variance
    map_logits, score_logits = head(normal)
    assert map_logits.shape == (20, 1, 8, 8)
    assert score_logits.shape == (20,)


def test_task_head_starts_as_the_calibrated_deviation_score() -> None:
    torch.manual_seed(0)
    head = TaskHead(channels=[4, 6], feature_size=(8, 8), hidden_channels=8).eval()
    normal = [torch.randn(20, 4, 8, 8), torch.randn(20, 6, 4, 4)]
    head.fit_normal_statistics(normal)
    samples = [level.clone() for level in normal]
    samples[0][:5, :, 2:4, 2:4] += 6.0  # a local defect in five samples
    _, log_total, _ = head.deviations(samples)
    map_targets = 2.0 * log_total - 1.0
    head.fit_calibration(samples, map_targets, score_targets=torch.linspace(-3, 3, 20))
    assert head.deviation_scale.item() == pytest.approx(2.0, rel=1e-4)
    assert head.deviation_bias.item() == pytest.approx(-1.0, abs=1e-3)
    map_logits, _ = head(samples)
    torch.testing.assert_close(map_logits, map_targets, atol=1e-4, rtol=0)  # the residual starts at zero
    assert map_logits[:5, 0, 2:4, 2:4].mean() > map_logits[5:, 0, 2:4, 2:4].mean() + 1.0
