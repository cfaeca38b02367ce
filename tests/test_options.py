"""kd_ext.options: one choice and range rule for kernels, models, datamodules and the distill configuration."""

import math
import re
from enum import Enum

import pytest
import torch
from jsonargparse import ArgumentParser

from kd_ext.distill.config import TrainingConfig
from kd_ext.models import MTHF, BiDirMSKD, CrossTaskStudent
from kd_ext.models.components.multiscale_map import MapFusion
from kd_ext.models.components.optimizer import resolve_optimizer
from kd_ext.models.cross_task.lightning_model import CrossTaskDistillation
from kd_ext.models.signal_kd import SignalKD
from kd_ext.options import (
    check_choice,
    check_epochs,
    check_fraction,
    check_learning_rate,
    check_name,
    check_positive,
    check_whole,
    choice_values,
    literal_of,
)


class Colour(str, Enum):
    RED = "red"
    BLUE = "blue"


def test_check_choice_accepts_members_and_values() -> None:
    assert check_choice("blue", Colour, "colour") is Colour.BLUE
    assert check_choice(Colour.RED, Colour, "colour") is Colour.RED


@pytest.mark.parametrize("value", ["green", "RED", None, 3, ["red"]])
def test_check_choice_names_option_value_and_choices(value: object) -> None:
    message = f"Unknown colour {value!r}; choose one of 'red', 'blue'."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_choice(value, Colour, "colour")


def test_check_name_for_plain_tuples() -> None:
    assert check_name("max", ("mean", "max"), "group_fusion") == "max"
    assert check_name(Colour.RED, ("red",), "colour") == "red"
    assert type(check_name(Colour.RED, ("red",), "colour")) is str
    with pytest.raises(ValueError, match=r"Unknown group_fusion 'median'; choose one of 'mean', 'max'\."):
        check_name("median", ("mean", "max"), "group_fusion")


def test_choice_values_and_literal() -> None:
    assert choice_values(Colour) == ("red", "blue")
    assert choice_values(["a", "b"]) == ("a", "b")
    assert literal_of(Colour).__args__ == ("red", "blue")


@pytest.mark.parametrize("value", [0, -1e-3, math.nan, math.inf, -math.inf, True, "0.1", None])
def test_learning_rate_must_be_finite_and_positive(value: object) -> None:
    with pytest.raises(ValueError, match=r"^learning_rate must be > 0 and finite, got "):
        check_learning_rate(value)


def test_positive_numbers_pass_as_floats() -> None:
    assert check_learning_rate(1) == 1.0
    assert isinstance(check_learning_rate(1), float)
    assert check_positive(2.5, "timeout") == 2.5


@pytest.mark.parametrize("value", [0, -1, 1.0, 2.5, True, "3", None])
def test_epochs_must_be_whole_and_at_least_one(value: object) -> None:
    with pytest.raises(ValueError, match=rf"^teacher_epochs must be a whole number >= 1, got {value!r}\.$"):
        check_epochs(value, "teacher_epochs")


def test_whole_numbers_and_fractions() -> None:
    assert check_epochs(3) == 3
    assert check_whole(0, "crop_size") == 0
    with pytest.raises(ValueError, match="num_folds must be a whole number >= 2, got 1"):
        check_whole(1, "num_folds", minimum=2)
    assert check_fraction(1, "top_k_ratio") == 1.0
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\), got 1"):
        check_fraction(1, "mask_ratio", include_one=False)
    for bad in (0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"top_k_ratio must be a number in \(0, 1\]"):
            check_fraction(bad, "top_k_ratio")


MODEL_CHECKS = [
    ({"learning_rate": 0.0}, "learning_rate must be > 0 and finite, got 0.0"),
    ({"learning_rate": -1e-3}, "learning_rate must be > 0 and finite"),
    ({"learning_rate": math.nan}, "learning_rate must be > 0 and finite, got nan"),
    ({"learning_rate": math.inf}, "learning_rate must be > 0 and finite, got inf"),
    ({"epochs": 0}, "epochs must be a whole number >= 1, got 0"),
    ({"epochs": 2.5}, "epochs must be a whole number >= 1, got 2.5"),
    ({"epochs": True}, "epochs must be a whole number >= 1, got True"),
]


@pytest.mark.parametrize("model", [BiDirMSKD, MTHF])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        *MODEL_CHECKS,
        ({"score_mode": "p99"}, "Unknown score_mode 'p99'; choose one of 'max', 'topk'"),
        ({"kernel_backend": "gpu"}, "Unknown kernel backend 'gpu'; choose one of 'auto', 'native', 'reference'"),
        ({"prior_scope": "pixel"}, "Unknown prior_scope 'pixel'; choose one of"),
    ],
)
def test_image_models_refuse_bad_options(model: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(pre_trained=False, visualizer=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        *MODEL_CHECKS,
        ({"teacher_learning_rate": 0}, "teacher_learning_rate must be > 0 and finite, got 0"),
        ({"teacher_epochs": 0}, "teacher_epochs must be a whole number >= 1, got 0"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be a number in \(0, 1\), got 1.0"),
        ({"score_mode": "median"}, "Unknown score_mode 'median'; choose one of 'mean', 'max', 'topk'"),
    ],
)
def test_signal_kd_refuses_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SignalKD(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": 0.0}, "learning_rate must be > 0 and finite, got 0.0"),
        ({"learning_rate": math.nan}, "learning_rate must be > 0 and finite, got nan"),
        ({"task_weighting": "gradnorm"}, "Unknown task_weighting 'gradnorm'; choose one of 'fixed', 'dwa'"),
        ({"temperature": "warm"}, "Unknown temperature 'warm'; choose one of 'fixed', 'adaptive'"),
        ({"imbalance": "focal"}, "Unknown imbalance 'focal'; choose one of 'balanced', 'none'"),
    ],
)
def test_cross_task_distillation_refuses_bad_options(kwargs: dict, match: str) -> None:
    student = CrossTaskStudent(tasks=["a"], pre_trained=False, image_size=(64, 64), hidden_channels=8, visualizer=False)
    with pytest.raises(ValueError, match=match):
        CrossTaskDistillation(student, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": 0}, r"training\.learning_rate must be > 0 and finite, got 0"),
        ({"epochs": 0}, r"training\.epochs must be a whole number >= 1, got 0"),
        ({"batch_size": 1}, r"training\.batch_size \(BatchNorm needs 2 images\) must be a whole number >= 2, got 1"),
        ({"task_weighting": "gradnorm"}, "Unknown task_weighting 'gradnorm'; choose one of 'fixed', 'dwa'"),
    ],
)
def test_distill_training_config_refuses_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainingConfig(**kwargs)


def test_options_stay_plain_strings_in_the_saved_hparams() -> None:
    """Members are accepted, but the hparams anomalib saves hold their values (checkpoints load weights_only)."""
    model = BiDirMSKD(pre_trained=False, visualizer=False, map_fusion=MapFusion.SUM, score_mode="topk")
    assert type(model.hparams["map_fusion"]) is str
    assert model.hparams["map_fusion"] == "sum"
    assert model.hparams["score_mode"] == "topk"
    assert model.model.anomaly_map_generator.fusion == "sum"


@pytest.mark.parametrize(
    ("model", "argument", "good", "bad"),
    [
        (BiDirMSKD, "map_fusion", "product", "median"),
        (BiDirMSKD, "score_mode", "topk", "p99"),
        (BiDirMSKD, "kernel_backend", "reference", "gpu"),
        (BiDirMSKD, "prior_scope", "map", "pixel"),
        (MTHF, "group_fusion", "max", "median"),
        (SignalKD, "score_mode", "topk", "median"),
    ],
)
def test_cli_parser_checks_option_values(model: type, argument: str, good: str, bad: str) -> None:
    """anomalib's CLI (jsonargparse) refuses a bad value while parsing, from the signature's Literal type."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(model, "model", skip={"pre_processor", "post_processor", "evaluator", "visualizer"})
    assert parser.parse_args([f"--model.{argument}", good]).model[argument] == good
    with pytest.raises(Exception, match=bad):
        parser.parse_args([f"--model.{argument}", bad])


def test_optimizer_choice_and_its_default_learning_rate() -> None:
    assert resolve_optimizer("adam", None) == ("adam", 0.005)
    assert resolve_optimizer("sgd", None) == ("sgd", 0.4)
    assert resolve_optimizer("sgd", 0.01) == ("sgd", 0.01)
    with pytest.raises(ValueError, match=r"optimizer.*rmsprop.*'adam', 'sgd'"):
        resolve_optimizer("rmsprop", None)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        resolve_optimizer("sgd", 0)


@pytest.mark.parametrize(
    ("optimizer", "kind", "rate"), [("adam", torch.optim.Adam, 0.005), ("sgd", torch.optim.SGD, 0.4)]
)
def test_models_train_with_the_chosen_optimizer(optimizer: str, kind: type, rate: float) -> None:
    for model_class in (BiDirMSKD, MTHF):
        model = model_class(pre_trained=False, optimizer=optimizer, visualizer=False)
        built = model.configure_optimizers()
        assert isinstance(built, kind)
        assert built.param_groups[0]["lr"] == rate
        assert model.hparams["optimizer"] == optimizer  # a plain str: checkpoints load with weights_only
        trainable = {id(p) for p in model.model.parameters() if p.requires_grad}
        assert {id(p) for group in built.param_groups for p in group["params"]} == trainable
    if optimizer == "sgd":
        assert built.param_groups[0]["momentum"] == 0.9
