"""Teacher fine-tuning before distillation (``teacher_finetune``): what changes, what stays frozen, checkpoints."""

from pathlib import Path

import pytest
import torch

from kd_ext.models import MTHF, BiDirMSKD
from kd_ext.models.bidirmskd.torch_model import BiDirMSKDModel
from kd_ext.models.components import FinetuneSchedule, TeacherFinetune, finetune_teacher, resolve_teacher_finetune
from kd_ext.models.components.finetune import DEFAULT_SCHEDULE
from kd_ext.models.mthf.torch_model import MTHFModel

SIZE = (64, 64)


def teacher_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.teacher.state_dict().items()}


def stage_changed(before: dict, after: dict, stage: int) -> bool:
    prefix = f"stages.{stage}."
    return any(not torch.equal(before[name], after[name]) for name in before if name.startswith(prefix))


def random_batches(count: int = 2, batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(batch, 3, *SIZE, generator=generator) for _ in range(count)]


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.5


def fit(model, datamodule, root: Path):
    from anomalib.engine import Engine

    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    return engine


def bidirmskd(mode: object) -> BiDirMSKD:
    return BiDirMSKD(
        pre_trained=False, teacher_finetune=mode, pre_processor=BiDirMSKD.configure_pre_processor(SIZE), epochs=1
    )


def test_off_keeps_the_teacher_bit_identical_through_a_fit(tmp_path: Path, tiny_folder_datamodule) -> None:
    torch.manual_seed(0)
    model = bidirmskd(False)
    before = teacher_state(model.model)
    fit(model, tiny_folder_datamodule(), tmp_path / "run")
    after = teacher_state(model.model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert "teacher_finetuned" not in model.model.state_dict()
    assert not model.teacher_finetune_reports


def test_on_adapts_the_last_stages_once_then_freezes_the_teacher(tmp_path: Path, tiny_folder_datamodule) -> None:
    torch.manual_seed(0)
    model = bidirmskd(TeacherFinetune.SYNTHETIC)
    assert model.hparams["teacher_finetune"] == "synthetic" and type(model.hparams["teacher_finetune"]) is str
    before = teacher_state(model.model)
    adapted: dict[str, torch.Tensor] = {}
    original = model.model.finetune_teachers

    def record(*args, **kwargs):
        reports = original(*args, **kwargs)
        adapted.update(teacher_state(model.model))
        return reports

    model.model.finetune_teachers = record
    engine = fit(model, tiny_folder_datamodule(), tmp_path / "run")
    after = teacher_state(model.model)

    assert adapted, "the fine-tuning stage did not run inside the Engine"
    assert not stage_changed(before, after, 0)  # stem and first stage stay as pretrained
    assert stage_changed(before, after, 1) and stage_changed(before, after, 2)  # the last two stages are adapted
    assert all(torch.equal(adapted[name], after[name]) for name in after)  # distillation never moved the teacher
    assert all(not parameter.requires_grad for parameter in model.model.teacher.parameters())
    assert not model.model.teacher.training
    assert bool(model.model.teacher_finetuned)
    (report,) = model.teacher_finetune_reports
    assert report.steps == DEFAULT_SCHEDULE.epochs * 2  # 6 training images, batch 3
    assert report.weight_shift > 0

    # Checkpoint round trip: the adapted teacher comes back, and a resumed fit does not adapt again.
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = BiDirMSKD.load_from_checkpoint(checkpoint, weights_only=True)
    restored_state = teacher_state(restored.model)
    assert all(torch.equal(after[name], restored_state[name]) for name in after)
    assert bool(restored.model.teacher_finetuned) and not restored.model.teacher_finetune_pending
    assert all(not parameter.requires_grad for parameter in restored.model.teacher.parameters())

    # A model created without fine-tuning refuses the checkpoint, naming the difference.
    with pytest.raises(ValueError, match="teacher_finetune='synthetic'"):
        fit_free = bidirmskd("none")
        fit_free.on_load_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True))


def test_objective_learns_and_l2sp_holds_the_weights_near_the_pretrained_ones() -> None:
    shifts = {}
    for weight in (0.0, 1e4):
        torch.manual_seed(0)
        model = BiDirMSKDModel(pre_trained=False, forward_student=False, attention=False, fusion=False)
        report = finetune_teacher(
            model.teacher,
            random_batches,
            normalise,
            FinetuneSchedule(epochs=4, learning_rate=1e-3, l2sp_weight=weight),
        )
        assert report.steps == 8
        shifts[weight] = report.weight_shift
        if weight == 0.0:
            assert report.last_loss < report.first_loss
        assert all(not parameter.requires_grad for parameter in model.teacher.parameters())
        assert not model.teacher.training
    assert 0 < shifts[1e4] < 0.5 * shifts[0.0]


def test_mthf_adapts_every_teacher_and_stays_frozen_when_off() -> None:
    torch.manual_seed(0)
    backbones = ["efficientnet_lite0", "efficientnet_lite0", "efficientnet_lite1"]
    model = MTHFModel(pre_trained=False, group_backbones=backbones, teacher_finetune=True)
    before = {name: {k: v.clone() for k, v in t.state_dict().items()} for name, t in model._teachers().items()}
    schedule = FinetuneSchedule(epochs=1)
    reports = model.finetune_teachers(lambda: random_batches(1), normalise, schedule)
    assert len(reports) == 2
    for name, teacher in model._teachers().items():
        last = len(teacher.stages) - 1
        assert stage_changed(before[name], teacher.state_dict(), last)
        assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert model.finetune_teachers(lambda: random_batches(1), normalise, schedule) == []  # once only

    frozen = MTHFModel(pre_trained=False)
    state = teacher_state(frozen)
    assert frozen.finetune_teachers(lambda: random_batches(1), normalise, schedule) == []
    assert all(torch.equal(state[name], tensor) for name, tensor in frozen.teacher.state_dict().items())


@pytest.mark.parametrize("value", ["sometimes", "", 3, None])
def test_bad_modes_are_refused_with_the_choices(value: object) -> None:
    with pytest.raises(ValueError, match="choose one of 'none', 'synthetic'"):
        resolve_teacher_finetune(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown teacher_finetune"):
        BiDirMSKD(pre_trained=False, teacher_finetune=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown teacher_finetune"):
        MTHF(pre_trained=False, teacher_finetune=value)  # type: ignore[arg-type]


def test_modes_by_name_and_bool_and_bad_schedules() -> None:
    assert resolve_teacher_finetune("Synthetic") is TeacherFinetune.SYNTHETIC
    assert resolve_teacher_finetune(True) is TeacherFinetune.SYNTHETIC
    assert resolve_teacher_finetune(False) is TeacherFinetune.NONE
    with pytest.raises(ValueError, match="epochs >= 1"):
        FinetuneSchedule(epochs=0)
    with pytest.raises(ValueError, match="learning_rate > 0"):
        FinetuneSchedule(learning_rate=0)


def test_no_training_images_is_a_clear_error() -> None:
    model = BiDirMSKDModel(pre_trained=False, teacher_finetune="synthetic")
    with pytest.raises(RuntimeError, match="no normal training images"):
        model.finetune_teachers(list, normalise, FinetuneSchedule(epochs=1))
    assert all(not parameter.requires_grad for parameter in model.teacher.parameters())
