"""The normal-feature prior and its fusion into BiDirMSKD's map."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_ext.models.bidirmskd.torch_model import BiDirMSKDModel
from kd_ext.models.components import MapStandardiser, NormalFeaturePrior, PriorFusion, PriorScope


def _features(batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(batch, 6, 8, 8, generator=generator), torch.randn(batch, 10, 4, 4, generator=generator)]


def test_prior_scores_an_outlier_location_highest() -> None:
    generator = torch.Generator().manual_seed(0)
    prior = NormalFeaturePrior(levels=(-2, -1))
    for _ in range(5):
        prior.accumulate(_features(16, generator))
    prior.finalize()
    test = _features(2, generator)
    test[1][0, :, 1, 2] += 25.0  # one deep location of the first image far from every normal feature
    maps = prior(test, (32, 32))
    assert maps.shape == (2, 1, 32, 32)
    peak = divmod(int(maps[0, 0].argmax()), 32)
    # Deep grid 4x4 -> 32x32 pixels: the outlier at cell (1, 2) is pooled over cells (0..2, 1..3).
    assert 0 <= peak[0] < 24 and 8 <= peak[1] < 32
    assert maps[0].amax() > 2 * maps[1].amax()


def test_prior_state_loads_into_an_unfitted_prior_and_refuses_other_grids() -> None:
    generator = torch.Generator().manual_seed(1)
    prior = NormalFeaturePrior()
    prior.accumulate(_features(8, generator))
    prior.finalize()
    restored = NormalFeaturePrior()
    assert not restored.fitted
    restored.load_state_dict(prior.state_dict())
    features = _features(3, generator)
    torch.testing.assert_close(restored(features, (16, 16)), prior(features, (16, 16)), rtol=0, atol=0)
    other = [torch.randn(1, 6, 16, 16), torch.randn(1, 10, 8, 8)]
    with pytest.raises(RuntimeError, match="score images at the size the model was trained at"):
        prior(other, (64, 64))
    with pytest.raises(RuntimeError, match="not fitted"):
        NormalFeaturePrior()(features, (16, 16))


def test_standardiser_gives_zero_mean_unit_std_on_its_own_maps() -> None:
    generator = torch.Generator().manual_seed(2)
    first, second = torch.rand(4, 1, 8, 8, generator=generator) * 5 + 3, torch.rand(4, 1, 8, 8, generator=generator)
    standardiser = MapStandardiser(num_maps=2)
    standardiser.accumulate([first, second])
    standardiser.finalize()
    torch.testing.assert_close(standardiser.map_mean, torch.stack([first.mean(), second.mean()]), rtol=1e-5, atol=1e-6)
    std = torch.stack([first.std(unbiased=False), second.std(unbiased=False)])
    torch.testing.assert_close(standardiser.map_std, std, rtol=1e-4, atol=1e-6)
    fused = standardiser([first, second])
    expected = ((first - first.mean()) / std[0] + (second - second.mean()) / std[1]) / 2
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    assert abs(float(fused.mean())) < 1e-5


def test_standardiser_max_rule_keeps_the_more_anomalous_map_at_every_pixel() -> None:
    generator = torch.Generator().manual_seed(3)
    first, second = torch.rand(4, 1, 8, 8, generator=generator) * 5 + 3, torch.rand(4, 1, 8, 8, generator=generator)
    mean_rule, max_rule = MapStandardiser(num_maps=2), MapStandardiser(num_maps=2, rule="max")
    for standardiser in (mean_rule, max_rule):
        standardiser.accumulate([first, second])
        standardiser.finalize()
    z = [(m - m.mean()) / m.std(unbiased=False) for m in (first, second)]
    torch.testing.assert_close(max_rule([first, second]), torch.maximum(*z), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(max_rule([first, second]), mean_rule([first, second]))
    with pytest.raises(ValueError, match="'median' is not a valid PriorRule"):
        MapStandardiser(num_maps=2, rule="median")


def test_prior_scope_score_keeps_the_distillation_map_and_scores_the_fused_map() -> None:
    torch.manual_seed(0)
    model = BiDirMSKDModel(pre_trained=False, prior=True)
    model.calibrate(lambda: [torch.rand(4, 3, 64, 64) for _ in range(2)])
    images = torch.rand(3, 3, 64, 64)
    model.eval()
    assert model.prior_fusion is not None
    with torch.no_grad():
        fused = model(images)
        model.prior_fusion.scope = PriorScope("score")
        scored = model(images)
        model.prior_fusion = None
        plain = model(images)
    torch.testing.assert_close(scored.anomaly_map, plain.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scored.pred_score, fused.pred_score, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scored.pred_score, plain.pred_score)


def test_bidirmskd_with_prior_calibrates_and_changes_the_map() -> None:
    torch.manual_seed(0)
    model = BiDirMSKDModel(pre_trained=False, prior=True, prior_scope="map")
    images = torch.rand(4, 3, 64, 64)
    model.train()
    model(images)
    assert model.needs_calibration
    model.calibrate(lambda: [torch.rand(4, 3, 64, 64) for _ in range(2)])
    assert not model.needs_calibration
    assert model.prior_fusion is not None and model.prior_fusion.ready
    model.eval()
    with torch.no_grad():
        fused = model(images)
        plain = model.anomaly_map_generator(*model.distill(images)[:1], [model.distill(images)[1]], (64, 64))
    assert fused.anomaly_map.shape == (4, 1, 64, 64)
    torch.testing.assert_close(fused.pred_score, fused.anomaly_map.flatten(1).amax(dim=1))
    assert not torch.allclose(fused.anomaly_map, plain)


def test_engine_fit_test_and_reload_with_prior(tmp_path: Path, tiny_folder_datamodule) -> None:
    from anomalib.engine import Engine

    from kd_ext.models import BiDirMSKD

    model = BiDirMSKD(
        pre_trained=False, prior=True, pre_processor=BiDirMSKD.configure_pre_processor((64, 64)), epochs=1
    )
    engine = Engine(max_epochs=1, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=tiny_folder_datamodule())
    assert model.model.prior_fusion.ready and not model.model.needs_calibration
    assert float(model.model.prior_fusion.standardiser.map_std[1]) != 1.0
    engine.test(model, datamodule=tiny_folder_datamodule(), verbose=False)
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = BiDirMSKD.load_from_checkpoint(checkpoint, weights_only=True)
    batch = torch.rand(2, 3, 64, 64)
    model.model.eval()
    restored.model.eval()
    with torch.no_grad():
        restored_output, output = restored.model(batch), model.model(batch)
        torch.testing.assert_close(restored_output.anomaly_map, output.anomaly_map)
        torch.testing.assert_close(restored_output.pred_score, output.pred_score)

    # The fitted prior and statistics are constants of the exported graph: FP32 IR == torch.
    from kd_ext.edge import EdgeModel
    from kd_ext.export import export_openvino

    images = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(images)
    prediction = EdgeModel(export_openvino(model, tmp_path / "ir", "fp32", input_size=(64, 64))).predict(images.numpy())
    np.testing.assert_allclose(
        prediction.anomaly_map, expected.anomaly_map.reshape(prediction.anomaly_map.shape).numpy(), atol=1e-3
    )
    np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-3)


def test_mthf_with_distinct_group_teachers_and_prior() -> None:
    from kd_ext.models.mthf.torch_model import MTHFModel

    torch.manual_seed(0)
    backbones = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    model = MTHFModel(pre_trained=False, group_backbones=backbones, prior=True)
    assert sorted(model.extra_teachers) == backbones[1:]
    assert model.group_backbones == dict(zip(("A", "B", "C"), backbones, strict=True))
    images = torch.rand(2, 3, 64, 64)
    model.train()
    model(images)
    assert all(not teacher.training for teacher in model._teachers().values())
    assert model.needs_calibration
    model.calibrate(lambda: [torch.rand(2, 3, 64, 64)])
    model.eval()
    with torch.no_grad():
        output = model(images)
    assert output.anomaly_map.shape == (2, 1, 64, 64)
    assert model.prior_fusion is not None and model.prior_fusion.ready


@pytest.mark.parametrize(
    ("group_backbones", "match"),
    [
        (["efficientnet_lite0"], "one backbone per group"),
        ("efficientnet_lite1", "one backbone per group"),
        (["efficientnet_lite0", "resnet18", "efficientnet_lite2"], "different input normalisations"),
    ],
)
def test_mthf_refuses_bad_group_backbones(group_backbones: object, match: str) -> None:
    from kd_ext.models.mthf.torch_model import MTHFModel

    with pytest.raises(ValueError, match=match):
        MTHFModel(pre_trained=False, group_backbones=group_backbones)


def test_checkpoint_saved_before_calibration_is_calibrated_when_scored(tmp_path: Path, tiny_folder_datamodule) -> None:
    """Without validation the checkpoint is written before the prior is fitted: scoring it must fit the prior."""
    from anomalib.engine import Engine

    from kd_ext.models import BiDirMSKD

    assert not BiDirMSKDModel(pre_trained=False).calibration_pending  # no prior: nothing to fit
    model = BiDirMSKD(
        pre_trained=False, prior=True, pre_processor=BiDirMSKD.configure_pre_processor((64, 64)), epochs=1
    )
    assert model.model.calibration_pending
    engine = Engine(
        max_epochs=1, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False, limit_val_batches=0
    )
    engine.fit(model, datamodule=tiny_folder_datamodule())
    checkpoint = next((tmp_path / "run").glob("**/model.ckpt"))
    restored = BiDirMSKD.load_from_checkpoint(checkpoint, weights_only=True)
    assert not restored.model.prior_fusion.ready and restored.model.calibration_pending
    engine.test(restored, datamodule=tiny_folder_datamodule(), verbose=False)
    assert restored.model.prior_fusion.ready and not restored.model.calibration_pending


@pytest.mark.parametrize("calibrated", [True, False])
def test_checkpoint_with_the_former_calibrated_flag_loads(tmp_path: Path, calibrated: bool) -> None:
    """Early prior checkpoints carry ``prior_fusion.calibrated``: they load; an uncalibrated one calibrates again."""
    from kd_ext.models import BiDirMSKD

    model = BiDirMSKD(pre_trained=False, prior=True, epochs=1)
    model.model.calibrate(lambda: [torch.rand(2, 3, 64, 64)])
    assert model.model.prior_fusion.ready
    checkpoint = tmp_path / "early.ckpt"
    state = dict(model.state_dict())
    state["model.prior_fusion.calibrated"] = torch.tensor(calibrated)
    hyper_parameters = dict(model.hparams)
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": hyper_parameters,
            "kd_ext_model": "BiDirMSKD",
            "pytorch-lightning_version": "2.5.0",
        },
        checkpoint,
    )
    restored = BiDirMSKD.load_from_checkpoint(checkpoint, weights_only=True)
    assert restored.model.prior_fusion.ready is calibrated
    assert restored.model.calibration_pending is not calibrated
    if calibrated:
        torch.testing.assert_close(restored.model.prior_fusion.prior.mean, model.model.prior_fusion.prior.mean)


def _calibrated_fusion(train: torch.Tensor, held_out: bool) -> tuple[PriorFusion, Callable]:
    """A prior fusion calibrated on ``train`` (feature grids ``[N, 16, 8, 8]`` standing for images), batches of 8."""

    def teacher(images: torch.Tensor) -> list[torch.Tensor]:
        return [images[:, :6], torch.nn.functional.avg_pool2d(images[:, 6:], 2)]

    def outputs(images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return teacher(images), images[:, :1].abs()  # any distillation map: its statistics are not under test

    fusion = PriorFusion(held_out=held_out)
    fusion.calibrate(lambda: train.split(8), teacher, outputs)
    return fusion, teacher


def test_held_out_statistics_standardise_new_normal_images_and_in_sample_ones_inflate_them() -> None:
    """A Gaussian fitted on few images scores them closer than new normal images; held-out statistics see that."""
    generator = torch.Generator().manual_seed(3)
    train, new = torch.randn(48, 16, 8, 8, generator=generator), torch.randn(48, 16, 8, 8, generator=generator)
    standardised = {}
    for held_out in (True, False):
        fusion, teacher = _calibrated_fusion(train, held_out)
        prior_map = fusion.prior(teacher(new), (8, 8))
        mean, std = fusion.standardiser.map_mean[1], fusion.standardiser.map_std[1]
        standardised[held_out] = float(((prior_map - mean) / std).mean())
    assert abs(standardised[True]) < 0.5  # new normal images look like the held-out ones
    assert standardised[False] > standardised[True] + 1.0  # in-sample: every new normal image looks anomalous


def test_held_out_prior_that_scores_is_fitted_on_every_image_and_tiny_sets_fall_back_to_in_sample() -> None:
    generator = torch.Generator().manual_seed(4)
    train = torch.randn(40, 16, 8, 8, generator=generator)
    held_out, _ = _calibrated_fusion(train, held_out=True)
    in_sample, _ = _calibrated_fusion(train, held_out=False)
    torch.testing.assert_close(held_out.prior.precision, in_sample.prior.precision)
    assert held_out.standardiser.map_mean[1] > in_sample.standardiser.map_mean[1]
    tiny = train[:8]  # one block of images: nothing can be held out
    fallback, _ = _calibrated_fusion(tiny, held_out=True)
    reference, _ = _calibrated_fusion(tiny, held_out=False)
    torch.testing.assert_close(fallback.standardiser.map_mean, reference.standardiser.map_mean)
    torch.testing.assert_close(fallback.standardiser.map_std, reference.standardiser.map_std)
