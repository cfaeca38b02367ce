"""BiDirMSKD: components, ablations, training signal, input checks."""

import pytest
import torch
from anomalib.metrics import AUPRO, Evaluator

from kd_ext.models import BiDirMSKD
from kd_ext.models.bidirmskd import BiDirMSKDModel
from kd_ext.models.bidirmskd.anomaly_map import AnomalyMapGenerator, gaussian_blur
from kd_ext.models.components import CBAM

ABLATIONS = {
    "full": {},
    "forward-only": {"reverse_student": False, "fusion": False},
    "reverse-only": {"forward_student": False, "attention": False, "fusion": False},
    "no-attention": {"attention": False},
    "no-fusion": {"fusion": False},
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablations_train_and_infer(ablation: str, images: torch.Tensor) -> None:
    model = BiDirMSKDModel(pre_trained=False, **ABLATIONS[ablation])
    teacher, forward, reverse = model.train()(images)
    assert (forward is None) == (ablation == "reverse-only")
    assert (reverse is None) == (ablation == "forward-only")
    assert (model.fusion is None) == (ablation not in {"full", "no-attention"})
    has_attention = model.forward_student is not None and any(
        isinstance(module, CBAM) for module in model.forward_student.modules()
    )
    assert has_attention == (ablation in {"full", "no-fusion", "forward-only"})
    for student in (forward, reverse):
        if student is not None:
            assert [s.shape for s in student] == [t.shape for t in teacher]
    output = model.eval()(images)
    assert output.anomaly_map.shape == (2, 1, 128, 128)
    assert output.pred_score.shape == (2,)
    assert torch.isfinite(output.anomaly_map).all()


def test_teacher_is_frozen_and_stays_in_eval_mode(images: torch.Tensor) -> None:
    model = BiDirMSKDModel(pre_trained=False).train()
    assert not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model(images)
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher BN statistics changed in training"


def test_fusion_feeds_forward_features_into_reverse_student(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = BiDirMSKDModel(pre_trained=False).eval()
    _, _, reverse = model.distill(images)
    with torch.no_grad():
        for parameter in model.forward_student.parameters():
            parameter.add_(0.5)
    _, _, changed = model.distill(images)
    assert not torch.allclose(reverse[0], changed[0]), "reverse student ignores the forward student"


def test_training_reduces_the_distillation_loss(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = BiDirMSKD(pre_trained=False, evaluator=False, visualizer=False)
    optimizer = module.configure_optimizers()
    module.model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = module.loss(*module.model(images))["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_anomaly_map_is_zero_where_students_match_teacher() -> None:
    teacher = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8)]
    generator = AnomalyMapGenerator(fusion="mean", sigma=4.0)
    same = generator(teacher, [teacher, teacher], (64, 64))
    assert same.abs().max() < 1e-5
    student = [t.clone() for t in teacher]
    student[0][..., 4:6, 4:6] *= -1  # an anomaly at one location of the shallow level
    anomalous = generator(teacher, [student], (64, 64))
    peak = torch.nonzero(anomalous[0, 0] == anomalous[0, 0].max())[0]
    assert 16 <= peak[0] <= 24 and 16 <= peak[1] <= 24


def test_gaussian_blur_preserves_constants_and_mass_location() -> None:
    constant = torch.full((1, 1, 40, 30), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 4.0), constant)
    impulse = torch.zeros(1, 1, 41, 41)
    impulse[0, 0, 20, 20] = 1
    blurred = gaussian_blur(impulse, 2.0)
    assert blurred[0, 0, 20, 20] == blurred.max()
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forward_student": False, "reverse_student": False}, "At least one"),
        ({"reverse_student": False}, "fusion=True needs both students"),
        ({"forward_student": False, "fusion": False}, "attention=True applies to the forward student"),
        ({"map_fusion": "median"}, "Unknown map fusion"),
        ({"sigma": -1.0}, "sigma must be >= 0"),
        ({"score_mode": "p99"}, "Unknown score_mode"),
        ({"backbone": "vgg_nope"}, "Unknown backbone 'vgg_nope'"),
        ({"layers": ["layer1", "layer2"]}, "Feature layer 'layer1' was not found"),
        ({"layers": ["blocks.1", "blocks.4"]}, r"strides \[4, 16\]; consecutive levels must halve"),
    ],
)
def test_invalid_configuration_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BiDirMSKDModel(pre_trained=False, **kwargs)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(1, 1, 64, 64), "3 channels"),
        (torch.zeros(3, 64, 64), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 3, 16, 16), "at least 32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_image_tensors_are_a_clear_error(images: torch.Tensor, message: str) -> None:
    model = BiDirMSKDModel(pre_trained=False).eval()
    with pytest.raises(ValueError, match=message):
        model(images)


def test_odd_and_non_square_sizes_work() -> None:
    model = BiDirMSKDModel(pre_trained=False).eval()
    output = model(torch.randn(1, 3, 97, 131))
    assert output.anomaly_map.shape == (1, 1, 97, 131)


def test_pre_processor_uses_the_teachers_normalisation() -> None:
    lite = BiDirMSKD(pre_trained=False, evaluator=False, visualizer=False)
    resnet = BiDirMSKD(backbone="resnet18", pre_trained=False, evaluator=False, visualizer=False)
    white = torch.ones(1, 3, 256, 256)
    assert lite.pre_processor(white).mean().item() == pytest.approx(1.0, abs=1e-4)  # (1 - 0.5) / 0.5
    assert resnet.pre_processor(white)[0, 0].mean().item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-3)


@pytest.mark.parametrize("score_mode", ["max", "topk"])
def test_native_kernel_and_reference_agree_on_model_outputs(score_mode: str) -> None:
    from kd_ext import kernels

    if not kernels.native_available():
        pytest.skip("kd_ext._native is not built")
    torch.manual_seed(0)
    model = BiDirMSKDModel(pre_trained=False, score_mode=score_mode).eval()
    images = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        native = model(images)
        model.anomaly_map_generator.backend = "reference"
        reference = model(images)
    torch.testing.assert_close(native.anomaly_map, reference.anomaly_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(native.pred_score, reference.pred_score, atol=1e-5, rtol=0)


def test_unknown_kernel_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Unknown kernel backend 'gpu'"):
        BiDirMSKDModel(pre_trained=False, kernel_backend="gpu")


def test_channels_last_training_matches_the_default_layout(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = BiDirMSKD(pre_trained=False, evaluator=False, visualizer=False)
    module.model.train()
    default = module.loss(*module.model(images))
    default["loss"].backward()
    gradients = [parameter.grad.clone() for parameter in module.model.parameters() if parameter.grad is not None]
    module.model.zero_grad()
    module.model.to(memory_format=torch.channels_last)
    channels_last = module.loss(*module.model(module.training_input(images)))
    channels_last["loss"].backward()
    assert channels_last["loss"].item() == pytest.approx(default["loss"].item(), rel=1e-4)
    # Same math, different summation order in the convolution backward (float32 error grows through the
    # layers to ~1e-3 relative): compare each gradient as a whole, 1 % of its norm. A bias followed by batch norm
    # has a zero gradient in exact arithmetic, so its computed one is rounding noise: the absolute floor is 1e-5 of
    # the largest gradient's norm.
    floor = 1e-5 * max(float(gradient.norm()) for gradient in gradients)
    for expected, parameter in zip(
        gradients, [p for p in module.model.parameters() if p.grad is not None], strict=True
    ):
        assert (parameter.grad - expected).norm() <= 1e-2 * expected.norm() + floor


def test_checkpoint_trained_with_another_evaluator_loads() -> None:
    trained = BiDirMSKD(
        pre_trained=False,
        evaluator=Evaluator(test_metrics=[AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)]),
        visualizer=False,
    )
    checkpoint = {"state_dict": trained.state_dict(), "kd_ext_model": "BiDirMSKD", "hyper_parameters": {}}
    assert any(key.startswith("evaluator.") for key in checkpoint["state_dict"])
    loaded = BiDirMSKD(pre_trained=False, visualizer=False)
    loaded.on_load_checkpoint(checkpoint)
    loaded.load_state_dict(checkpoint["state_dict"], strict=True)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, trained.model.state_dict()[key])
