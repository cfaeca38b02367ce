"""Cross-task distillation: soft-label loss, adaptive temperature, DWA and config checks (our own logic)."""

import itertools
import math

import pytest
import torch

from kd_ext.distill.config import DistillConfig
from kd_ext.models.cross_task import check_task_names
from kd_ext.models.cross_task.loss import (
    AdaptiveTemperature,
    DynamicWeightAverage,
    class_balance_weights,
    cosine_curriculum,
    soft_label_loss,
)


def test_soft_label_loss_is_zero_only_when_student_matches_teacher() -> None:
    teacher = torch.randn(4, 1, 8, 8) * 3
    assert soft_label_loss(teacher.clone(), teacher, 4.0).abs().item() < 1e-6
    assert soft_label_loss(teacher + 1.0, teacher, 4.0).item() > 1e-4


def test_soft_label_loss_gradient_points_to_the_teacher() -> None:
    teacher = torch.tensor([3.0, -3.0])
    student = torch.zeros(2, requires_grad=True)
    soft_label_loss(student, teacher, 2.0, imbalance="none").backward()
    assert student.grad[0] < 0 < student.grad[1]  # descent raises logit 0, lowers logit 1


def test_temperature_scales_as_tau_squared_times_softened_kl() -> None:
    teacher, student = torch.tensor([2.0]), torch.tensor([-1.0])
    p, q = torch.sigmoid(teacher / 3), torch.sigmoid(student / 3)
    expected = 9 * (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)))
    assert soft_label_loss(student, teacher, 3.0, imbalance="none").item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_balance_gives_each_class_half_the_weight() -> None:
    teacher = -torch.ones(100)
    teacher[:5] = 1.0
    weights = class_balance_weights(teacher)
    assert weights[:5].sum().item() == pytest.approx(50.0)
    assert weights[5:].sum().item() == pytest.approx(50.0)
    assert torch.equal(class_balance_weights(-torch.ones(10)), torch.ones(10))
    assert class_balance_weights(teacher, max_weight=5.0).max().item() == 5.0


def test_balanced_loss_counts_rare_anomalous_pixels_more() -> None:
    teacher = -torch.ones(100) * 4
    teacher[:2] = 4.0
    wrong_on_anomalies = teacher.clone()
    wrong_on_anomalies[:2] = -4.0
    plain = soft_label_loss(wrong_on_anomalies, teacher, 1.0, imbalance="none")
    balanced = soft_label_loss(wrong_on_anomalies, teacher, 1.0, imbalance="balanced")
    assert balanced.item() > 10 * plain.item()


def test_soft_label_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ"):
        soft_label_loss(torch.zeros(2, 3), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="imbalance"):
        soft_label_loss(torch.zeros(2), torch.zeros(2), 1.0, imbalance="focal")


def test_adaptive_temperature_starts_at_initial_value_and_stays_in_range() -> None:
    temperature = AdaptiveTemperature(3, initial=4.0, minimum=1.0, maximum=21.0)
    assert temperature.values() == pytest.approx([4.0] * 3, rel=1e-5)
    with torch.no_grad():
        temperature.theta.fill_(100.0)
    assert temperature.values()[0] == pytest.approx(21.0)
    with pytest.raises(ValueError, match="strictly between"):
        AdaptiveTemperature(1, initial=30.0)


def test_adaptive_temperature_gradient_is_reversed_and_scaled() -> None:
    teacher, student = torch.tensor([3.0, -2.0]), torch.tensor([0.5, 0.5])
    reference = AdaptiveTemperature(1)
    plain_theta = reference.theta.detach().clone().requires_grad_(True)
    tau = reference.minimum + (reference.maximum - reference.minimum) * torch.sigmoid(plain_theta[0])
    soft_label_loss(student, teacher, tau).backward()
    temperature = AdaptiveTemperature(1)
    soft_label_loss(student, teacher, temperature(0, reversal_scale=0.5)).backward()
    assert plain_theta.grad.abs().item() > 0
    assert temperature.theta.grad.item() == pytest.approx(-0.5 * plain_theta.grad.item(), rel=1e-5)


def test_cosine_curriculum_rises_from_start_to_end() -> None:
    values = [cosine_curriculum(epoch, 10) for epoch in range(10)]
    assert values[0] == 0.0
    assert values[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert cosine_curriculum(0, 1) == 0.0


def test_dwa_weights_favour_the_task_whose_loss_falls_slowest() -> None:
    dwa = DynamicWeightAverage(2, temperature=2.0)
    assert dwa.weights() == [1.0, 1.0]
    dwa.update([1.0, 1.0])
    assert dwa.weights() == [1.0, 1.0]
    dwa.update([0.5, 0.9])  # task 0 halves, task 1 barely moves
    weights = dwa.weights()
    assert sum(weights) == pytest.approx(2.0)
    assert weights[1] > weights[0]
    expected = 2 * math.exp(0.9 / 2) / (math.exp(0.5 / 2) + math.exp(0.9 / 2))
    assert weights[1] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="Expected 2"):
        dwa.update([1.0])


@pytest.mark.parametrize(
    ("tasks", "match"),
    [([], "At least one"), (["a", "a"], "Duplicate"), (["a.b"], "Invalid"), (["ok", ""], "Invalid")],
)
def test_task_names_are_checked(tasks: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_task_names(tasks)


def _task(name: str = "a") -> dict:
    return {"name": name, "checkpoint": "a.ckpt", "data": {"root": "data", "category": "a"}}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"tasks": [_task(), _task()], "output": "out"}, "Duplicate"),
        ({"tasks": [_task()], "output": "out", "trainer": {}}, "Unknown top-level"),
        ({"tasks": [_task()], "output": "out", "training": {"epoch": 3}}, "Unknown keys"),
        ({"tasks": [_task()], "output": "out", "training": {"task_weighting": "gradnorm"}}, "task_weighting"),
        ({"tasks": [_task()], "output": "out", "training": {"temperature": "hot"}}, "temperature"),
        ({"tasks": [{"name": "a", "checkpoint": "x", "data": {"root": "r"}}], "output": "o"}, "data.category"),
        ({"tasks": [], "output": "out"}, "non-empty"),
        ({"tasks": [_task()], "output": "out", "export": {"precision": "int4"}}, "precision"),
    ],
)
def test_config_errors_name_the_problem(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig.from_dict(values)


def test_config_from_yaml(tmp_path) -> None:
    path = tmp_path / "distill.yaml"
    path.write_text(
        "output: out\ntasks:\n  - {name: bottle, checkpoint: b.ckpt, data: {root: d, category: bottle}}\n"
        "training: {epochs: 3, temperature: fixed, task_weighting: fixed}\n"
    )
    config = DistillConfig.from_yaml(path)
    assert config.tasks[0].data_dir.as_posix() == "d/bottle"
    assert (config.training.epochs, config.training.temperature, config.training.task_weighting) == (
        3,
        "fixed",
        "fixed",
    )
    (tmp_path / "bad.yaml").write_text("tasks: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        DistillConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError):
        DistillConfig.from_yaml(tmp_path / "missing.yaml")
