"""The small trainable student: its size against EfficientNet-Lite0, joint training and the switchable mechanisms.

Tiny 64x64 inputs and made-up teacher targets: these tests check our own training logic, not accuracy
(``benchmarks/cross_task.py`` measures that).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from kd_ext.backbones import build_small_lite_trunk, create_backbone, lite0_reference_trunk
from kd_ext.backbones.small_lite import slice_state_dict
from kd_ext.distill.config import DistillConfig, TrainingConfig, parse_distill_args
from kd_ext.distill.pipeline import flops_per_image, parameter_count
from kd_ext.distill.targets import TaskSamples
from kd_ext.distill.training import train_student
from kd_ext.models.cross_task import CrossTaskStudent, DistilledHead
from kd_ext.models.cross_task.lightning_model import Window
from kd_ext.models.cross_task.loss import DynamicWeightAverage

SIZE = 64
TASKS = ("a", "b")


def _student() -> CrossTaskStudent:
    return CrossTaskStudent(
        tasks=list(TASKS), pre_trained=False, image_size=(SIZE, SIZE), hidden_channels=8, visualizer=False
    )


def _samples(sizes: dict[str, int], features: bool = True) -> dict[str, TaskSamples]:
    """Made-up targets: task 'a' is easy (constant), task 'b' noisy; teacher features are random projections."""
    generator = torch.Generator().manual_seed(0)
    samples = {}
    for task, count in sizes.items():
        images = torch.randn(count, 3, SIZE, SIZE, generator=generator)
        scale = 0.5 if task == "a" else 4.0
        maps = torch.randn(count, 1, SIZE // 4, SIZE // 4, generator=generator) * scale - 2
        scores = torch.randn(count, generator=generator) * scale
        teacher = [torch.randn(count, 24, SIZE // 4, SIZE // 4, generator=generator)] if features else []
        samples[task] = TaskSamples(images, maps, scores, teacher)
    return samples


def _train(student: CrossTaskStudent, epochs: int = 3, features: bool = True, **settings: object) -> list[dict]:
    config = TrainingConfig(epochs=epochs, batch_size=4, **settings)
    return train_student(student, _samples({"a": 8, "b": 12}, features), config)


def test_small_trunk_has_at_most_half_of_lite0s_parameters_and_flops() -> None:
    trunk = build_small_lite_trunk(pre_trained=False).eval()
    reference = lite0_reference_trunk().eval()  # EfficientNet-Lite0 cut at the same levels (blocks.1/2/4)
    full = create_backbone("efficientnet_lite0", pre_trained=False).eval()
    size = (256, 256)
    assert parameter_count(trunk) <= parameter_count(reference) / 2
    assert flops_per_image(trunk, size) <= flops_per_image(reference, size) / 2
    assert parameter_count(trunk) <= parameter_count(full) / 2
    assert flops_per_image(trunk, size) <= flops_per_image(full, size) / 2
    assert [level.shape[-1] for level in trunk(torch.zeros(1, 3, *size))] == [64, 32, 16]  # strides 4 / 8 / 16


def test_small_trunk_starts_from_sliced_lite0_weights() -> None:
    trunk = build_small_lite_trunk(pre_trained=True)
    lite0 = create_backbone("efficientnet_lite0", pre_trained=True).state_dict()
    stem = trunk.state_dict()["stages.0.0.weight"]
    assert torch.equal(stem, lite0["conv_stem.weight"][: stem.shape[0], :3])
    with pytest.raises(ValueError, match="Cannot slice"):
        slice_state_dict({"w": torch.zeros(2, 2)}, {"w": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="width"):
        build_small_lite_trunk(width=1.5, pre_trained=False)


def test_student_heads_are_small_and_distilled() -> None:
    student = _student()
    assert all(isinstance(head, DistilledHead) for head in student.model.heads.values())
    assert all(parameter_count(head) < 5_000 for head in student.model.heads.values())
    assert not any("normal_" in name for name, _ in student.model.named_buffers())  # no fitted statistics


@pytest.fixture(scope="module")
def trained() -> tuple[CrossTaskStudent, dict[str, torch.Tensor], list[dict]]:
    """One small student trained 4 epochs with DWA, the adaptive temperature and feature distillation."""
    torch.manual_seed(0)
    student = _student()
    before = {name: value.detach().clone() for name, value in student.model.trunk.named_parameters()}
    history = _train(
        student, epochs=4, task_weighting="dwa", dwa_temperature=0.05, temperature="adaptive", learning_rate=0.05
    )
    return student, before, history


def test_trunk_receives_gradients_and_its_weights_change_in_training(trained: tuple) -> None:
    student, before, history = trained
    changed = [name for name, value in student.model.trunk.named_parameters() if not torch.equal(value, before[name])]
    assert len(changed) == len(before)  # every trunk tensor moved: the tasks' losses reach the shared trunk
    assert history[-1]["parts"]["a"]["feature"] > 0  # the feature-distillation term is on
    assert student.model.training is False


def test_dwa_weights_follow_the_recorded_loss_ratios(trained: tuple) -> None:
    history = trained[2]
    assert [record["weight"] for record in history[:2]] == [{"a": 1.0, "b": 1.0}] * 2
    for epoch in (2, 3):
        dwa = DynamicWeightAverage(2, temperature=0.05)
        for record in history[epoch - 2 : epoch]:
            dwa.update([record["loss"]["a"], record["loss"]["b"]])
        assert list(history[epoch]["weight"].values()) == pytest.approx(dwa.weights(), rel=1e-6)
    assert history[2]["weight"]["a"] != pytest.approx(1.0, abs=1e-3)  # the losses fell at different rates


def test_uncertainty_weighting_learns_task_weights() -> None:
    torch.manual_seed(0)
    history = _train(_student(), epochs=2, task_weighting="uncertainty", temperature="fixed", learning_rate=0.05)
    weights = history[-1]["weight"]
    assert weights["a"] != pytest.approx(1.0, abs=1e-3)
    assert weights["a"] > weights["b"]  # the noisier task's loss stays higher: it is down-weighted


def test_adaptive_temperature_is_learned_within_its_curriculum_bounds(trained: tuple) -> None:
    history = trained[2]
    assert history[0]["reversal"] == 0.0 and history[-1]["reversal"] == pytest.approx(1.0)
    # Epoch 1: the curriculum's reversal strength is 0, so the temperature cannot move yet.
    assert list(history[0]["temperature"].values()) == pytest.approx([4.0, 4.0], abs=1e-6)
    final = list(history[-1]["temperature"].values())
    assert all(1.0 <= tau <= 21.0 for tau in final)
    assert all(abs(tau - 4.0) > 1e-3 for tau in final)


def test_switches_off_give_the_fixed_versions() -> None:
    torch.manual_seed(0)
    history = _train(_student(), epochs=2, task_weighting="fixed", temperature="fixed", feature_distillation=False)
    for record in history:
        assert record["weight"] == {"a": 1.0, "b": 1.0}
        assert record["temperature"] == {"a": 4.0, "b": 4.0}
        assert record["parts"]["a"]["feature"] == 0.0


def test_one_ir_for_all_tasks_matches_torch(trained: tuple, tmp_path) -> None:
    from kd_ext.distill.export import export_all_tasks_openvino
    from kd_ext.edge import EdgeModel

    student = trained[0]
    xml = export_all_tasks_openvino(student, tmp_path / "student.xml", (SIZE, SIZE))
    images = torch.rand(2, 3, SIZE, SIZE)
    for task in TASKS:
        student.select_task(task)
        with torch.no_grad():
            expected = student(images)
        prediction = EdgeModel(xml, task=task, mode="latency").predict(images.numpy())
        np.testing.assert_allclose(prediction.anomaly_map, expected.anomaly_map[:, 0].numpy(), atol=1e-3)
        np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-3)


def test_distill_config_parses_like_anomalib(tmp_path) -> None:
    config = tmp_path / "distill.yaml"
    config.write_text(
        "output: out\ntasks:\n  - {name: brain, checkpoint: b.ckpt, data: {root: d, category: brain_mri, "
        "layout: folder}}\ntraining: {epochs: 3}\n"
    )
    parsed = parse_distill_args(
        ["--config", str(config), "--training.task_weighting", "uncertainty", "--student.hidden_channels", "16"]
    )
    assert isinstance(parsed, DistillConfig)
    assert (parsed.training.epochs, parsed.training.task_weighting, parsed.student.hidden_channels) == (
        3,
        "uncertainty",
        16,
    )
    assert parsed.student.trunk == "small"
    assert parsed.tasks[0].layout == "folder"
    with pytest.raises(SystemExit) as exit_info:
        parse_distill_args(["--config", str(config), "--training.temperature", "hot"])
    assert exit_info.value.code == 2
    # The frozen trunk became a benchmark baseline: the earlier key value is refused with where it went.
    with pytest.raises(ValueError, match=r"student.trunk 'frozen'.*benchmarks/frozen_trunk.py"):
        parse_distill_args(["--config", str(config), "--student.trunk", "frozen"])
    with pytest.raises(ValueError, match="Unknown trunk 'tiny'"):
        parse_distill_args(["--config", str(config), "--student.trunk", "tiny"])


def test_training_crops_match_at_every_resolution() -> None:
    image = torch.arange(128 * 128, dtype=torch.float32).reshape(1, 1, 128, 128)
    window = Window(top=32, left=64, size=64, image_size=(128, 128))
    assert window(image).shape[-2:] == (64, 64)
    for stride in (4, 8, 16):  # a feature level or target map of the whole image, cropped, = that of the crop
        torch.testing.assert_close(window(F.avg_pool2d(image, stride)), F.avg_pool2d(window(image), stride))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        random = Window.random((256, 192), 128, generator)
        assert random.top % 32 == 0 and random.left % 32 == 0
        assert random.top + 128 <= 256 and random.left + 128 <= 192
    assert Window.random((64, 64), 128, generator) is None  # a crop as large as the image: whole images


def test_checkpoint_reloads_with_weights_only(trained: tuple, tmp_path) -> None:
    from kd_ext.distill.pipeline import save_checkpoint

    student = trained[0]
    path = save_checkpoint(student, tmp_path / "student.ckpt")
    torch.load(path, map_location="cpu", weights_only=True)  # plain hyper-parameters, no pickled classes
    reloaded = CrossTaskStudent.load_from_checkpoint(path).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    for task in TASKS:
        student.select_task(task)
        reloaded.select_task(task)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(images).anomaly_map, student(images).anomaly_map, atol=1e-6, rtol=0)
