"""Behaviour shared by kd_ext's anomalib modules: teacher-aware pre-processing, input and checkpoint checks."""

from typing import Any

from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from kd_ext.backbones import get_backbone_spec
from kd_ext.models.image_checks import check_dataloader_images, evaluation_datasets

CHECKPOINT_MODEL_KEY = "kd_ext_model"
ARCHITECTURE_KEYS = ("backbone", "layers", "forward_student", "reverse_student", "attention", "fusion", "prior")


def teacher_pre_processor(backbone: str, image_size: tuple[int, int] | None = None) -> PreProcessor:
    """Resize and normalise images the way the teacher's pretrained weights expect.

    Args:
        backbone: Teacher backbone name.
        image_size: Target size, ``(256, 256)`` by default.

    Returns:
        PreProcessor: anomalib pre-processor (also traced into exported models).
    """
    spec = get_backbone_spec(backbone)
    return PreProcessor(
        transform=Compose(
            [
                Resize(image_size or (256, 256), antialias=True),
                Normalize(mean=list(spec.mean), std=list(spec.std)),
            ]
        ),
    )


def pre_processor_image_size(pre_processor: object) -> tuple[int, int] | None:
    """The ``(H, W)`` a pre-processor resizes images to, or ``None`` when it has no fixed ``Resize``.

    Args:
        pre_processor: An anomalib ``PreProcessor`` (or anything with a torchvision ``transform``), or ``None``.

    Returns:
        tuple[int, int] | None: The size.
    """
    transform = getattr(pre_processor, "transform", None)
    transforms = transform.transforms if isinstance(transform, Compose) else [transform]
    for step in transforms:
        if isinstance(step, Resize) and step.size is not None:
            size = list(step.size)
            return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    return None


class KDExtCheckpointMixin:
    """Tag checkpoints with the model class, refuse checkpoints of another model or architecture.

    Also checks, before training, testing or predicting, that every image of the run can be read.

    Attributes:
        architecture_keys: Hyper-parameters that change the network; a checkpoint must match them all.
    """

    architecture_keys: tuple[str, ...] = ARCHITECTURE_KEYS

    def on_train_start(self) -> None:
        """Check the training images and the validation and test images the run will read later."""
        trainer = self.trainer  # type: ignore[attr-defined]
        check_dataloader_images([trainer.train_dataloader, *evaluation_datasets(trainer)])
        super().on_train_start()  # type: ignore[misc]

    def on_test_start(self) -> None:
        """Check the test images."""
        check_dataloader_images(self.trainer.test_dataloaders)  # type: ignore[attr-defined]
        super().on_test_start()  # type: ignore[misc]

    def on_predict_start(self) -> None:
        """Check the images to predict."""
        check_dataloader_images(self.trainer.predict_dataloaders)  # type: ignore[attr-defined]
        super().on_predict_start()  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which kd_ext model wrote the checkpoint."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[CHECKPOINT_MODEL_KEY] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint was written by this model class with the same architecture.

        Raises:
            ValueError: If the checkpoint comes from another model or another configuration.
        """
        name = type(self).__name__
        saved_by = checkpoint.get(CHECKPOINT_MODEL_KEY)
        if saved_by != name:
            origin = f"by kd_ext's {saved_by}" if saved_by else "by another model (not a kd_ext checkpoint)"
            msg = (
                f"This checkpoint was saved {origin}, not by {name}; load it with the model class that "
                f"trained it, or train {name} first."
            )
            raise ValueError(msg)
        saved = checkpoint.get("hyper_parameters", {})
        current = getattr(self, "hparams", {})
        differences = [
            f"{key}={saved[key]!r} (model has {current[key]!r})"
            for key in self.architecture_keys
            if key in saved and key in current and _normalise(saved[key]) != _normalise(current[key])
        ]
        if differences:
            msg = (
                f"The checkpoint's {name} architecture differs: {', '.join(differences)}. Create the model with the "
                f"same arguments, or use {name}.load_from_checkpoint(path), which restores them."
            )
            raise ValueError(msg)
        _drop_foreign_metric_states(checkpoint, set(self.state_dict()))  # type: ignore[attr-defined]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


def _drop_foreign_metric_states(checkpoint: dict[str, Any], own_keys: set[str]) -> None:
    """Forget metric states of the evaluator the checkpoint was trained with (e.g. AUPRO's ``fpr_limit``).

    They are not model weights: a model loaded with another evaluator (the default one) must still load.
    """
    state = checkpoint.get("state_dict", {})
    for key in [key for key in state if key.startswith("evaluator.") and key not in own_keys]:
        del state[key]


def _normalise(value: object) -> object:
    return tuple(value) if isinstance(value, list | tuple) else value
