"""Task teachers: trained anomaly models loaded from checkpoints, and their calibrated soft targets.

A teacher is any anomalib model checkpoint — kd_ext's (``BiDirMSKD``, ``MTHF``; the class is recorded in the
checkpoint) or anomalib's own (``Padim``, ``Stfpm``, ...; name the class). Its raw anomaly maps and scores live
on scales of their own, so :class:`TeacherCalibration` turns them into logits on a common scale, fitted on the
task's *normal training images only* (no test image is used): the median maps to logit ``-sharpness`` and the
high quantile of normal values (99.5 % of pixels, the largest normal image score) to logit 0, i.e. probability
0.5 — the student's threshold.

A teacher that fits statistics on normal training images after training (a normal-feature prior, ``prior=True``)
may come from a checkpoint written before that fit, holding an unfitted prior; its trainer would fit it before the
first test. :func:`calibrate_teacher` does the same on the task's training images, so that the teacher scores with
its prior here too rather than falling back to its distillation map alone.
"""

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.models import AnomalibModule

from kd_ext.backbones import no_pretrained_downloads
from kd_ext.models.checkpoint import CHECKPOINT_MODEL_KEY, pre_processor_image_size

POST_PROCESSOR_KEYS = ("post_processor.image_min", "post_processor._image_threshold")
IGNORED_PREFIXES = ("evaluator.", "visualizer.")


MODEL_PACKAGES = ("anomalib.models", "kd_ext.models")


def model_class(name: str) -> type[AnomalibModule]:
    """An anomalib or kd_ext model class by name (``"Padim"``, ``"BiDirMSKD"``, ...).

    Dotted paths are accepted only inside anomalib's and kd_ext's model packages
    (``anomalib.models.Padim``, ``kd_ext.models.BiDirMSKD``): a name read from a config file or a
    checkpoint never makes Python import an arbitrary module.

    Args:
        name: Class name, or a dotted path inside ``anomalib.models`` or ``kd_ext.models``.

    Returns:
        type[AnomalibModule]: The class.

    Raises:
        ValueError: If no anomaly model has that name, or a dotted path points outside the model packages.
    """
    import anomalib.models  # noqa: PLC0415

    import kd_ext.models  # noqa: PLC0415

    found = None
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        if not any(module_name == package or module_name.startswith(package + ".") for package in MODEL_PACKAGES):
            msg = (
                f"'{name}' is outside anomalib's and kd_ext's model packages; kd_ext does not import other "
                f"modules named in configs or checkpoints. Name the class (e.g. 'Padim') or use a path under "
                f"{' or '.join(MODEL_PACKAGES)}."
            )
            raise ValueError(msg)
        import importlib  # noqa: PLC0415

        try:
            found = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            found = None
    else:
        found = getattr(kd_ext.models, name, None) or getattr(anomalib.models, name, None)
    if not (isinstance(found, type) and issubclass(found, AnomalibModule)):
        known = sorted(
            n
            for n in [*kd_ext.models.__all__, *anomalib.models.__all__]
            if isinstance(getattr(kd_ext.models, n, getattr(anomalib.models, n, None)), type)
        )
        msg = f"'{name}' is not an anomaly model; known models: {', '.join(known)}."
        raise ValueError(msg)
    return found


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a Lightning checkpoint without running code from it.

    The file is opened with ``torch.load(..., weights_only=True)``: tensors, numbers, strings and
    containers load; a pickle that names any other Python object is refused before it runs.

    Args:
        path: The checkpoint.

    Returns:
        dict: The checkpoint's content.

    Raises:
        ValueError: If the file is not a readable checkpoint, or holds objects other than weights.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        msg = (
            f"{path} was refused: it holds Python objects other than weights, and kd_ext never runs code from a "
            f"checkpoint (torch.load with weights_only=True). Use a checkpoint written by anomalib's Engine for a "
            f"trained model. Detail: {str(error).strip().splitlines()[0]}"
        )
        raise ValueError(msg) from error
    except Exception as error:  # torch raises many types for foreign or corrupt files
        msg = f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})."
        raise ValueError(msg) from error
    if not isinstance(content, dict):
        msg = f"{path} is not a Lightning checkpoint (it holds a {type(content).__name__}, not a dict)."
        raise ValueError(msg)
    return content


def load_anomaly_model(checkpoint: str | Path, model: str | None = None) -> AnomalibModule:
    """Load a trained anomaly model from a Lightning checkpoint, in eval mode.

    Args:
        checkpoint: ``.ckpt`` written by anomalib's ``Engine`` (``weights/lightning/model.ckpt``).
        model: Model class name; optional for kd_ext checkpoints (they record it), required for anomalib's.

    Returns:
        AnomalibModule: The model with its pre- and post-processor restored.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not an anomaly-model checkpoint or the class is unknown or does not fit it.
    """
    path = Path(checkpoint)
    if not path.is_file():
        msg = f"Teacher checkpoint not found: {path}"
        raise FileNotFoundError(msg)
    content = read_checkpoint(path)
    state = content.get("state_dict")
    if not isinstance(state, dict) or not all(key in state for key in POST_PROCESSOR_KEYS):
        msg = (
            f"{path} is not an anomaly-model checkpoint (no anomalib post-processor state); give the "
            "weights/lightning/model.ckpt that anomalib's Engine wrote for a trained model."
        )
        raise ValueError(msg)
    recorded = content.get(CHECKPOINT_MODEL_KEY)
    if recorded is not None and not isinstance(recorded, str):
        msg = f"{path} records its model class as a {type(recorded).__name__}, not a name: not a kd_ext checkpoint."
        raise ValueError(msg)
    if model is None and recorded is None:
        msg = f"{path} is an anomalib checkpoint that does not record its model class; name it (model: Padim, ...)."
        raise ValueError(msg)
    cls = model_class(model or recorded)
    hyper_parameters = dict(content.get("hyper_parameters") or {})
    if "pre_trained" in hyper_parameters:
        hyper_parameters["pre_trained"] = False  # every weight comes from the checkpoint
    with no_pretrained_downloads():
        try:
            instance = cls(**hyper_parameters)
        except TypeError as error:
            msg = f"{path} does not hold a {cls.__name__} (its hyper-parameters do not fit): {error}"
            raise ValueError(msg) from error
    instance.on_load_checkpoint(content)
    try:
        result = instance.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        first = str(error).strip().splitlines()[-1].strip()
        msg = f"{path} does not hold a {cls.__name__} with these settings: {first}"
        raise ValueError(msg) from error
    # Metric states of the evaluator that trained it (e.g. AUPRO's fpr_limit) are not part of the model.
    unexpected = [key for key in result.unexpected_keys if not key.startswith(IGNORED_PREFIXES)]
    missing = [key for key in result.missing_keys if not key.startswith(IGNORED_PREFIXES)]
    if unexpected or missing:
        msg = (
            f"{path} does not hold a {cls.__name__} with these settings: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
        raise ValueError(msg)
    return instance.eval()


def image_size_of(model: AnomalibModule) -> tuple[int, int]:
    """The ``(H, W)`` a model's pre-processor resizes images to.

    Raises:
        ValueError: If the pre-processor does not resize to a fixed size.
    """
    size = pre_processor_image_size(getattr(model, "pre_processor", None))
    if size is None:
        msg = f"{type(model).__name__}'s pre-processor has no fixed Resize: the teacher's image size is unknown."
        raise ValueError(msg)
    return size


def calibration_pending(model: AnomalibModule) -> bool:
    """Whether a teacher must fit statistics on normal training images before it scores (e.g. an unfitted prior)."""
    return bool(getattr(model.model, "calibration_pending", False))


@torch.no_grad()
def calibrate_teacher(model: AnomalibModule, images: torch.Tensor, batch_size: int = 8) -> bool:
    """Fit what a restored teacher fits on normal training images (its prior and map statistics), as its trainer would.

    Does nothing for a teacher with nothing pending (:func:`calibration_pending`). The images go through the
    teacher's pre-processor, as Lightning's calibration before a test does with the training loader's images.

    Args:
        model: Teacher in eval mode.
        images: The task's normal training images, RGB ``[N, 3, H, W]`` in ``[0, 1]`` at the teacher's image size.
        batch_size: Batch size of the passes over the images.

    Returns:
        bool: Whether the teacher was calibrated.
    """
    if not calibration_pending(model):
        return False
    transform = model.pre_processor.transform if model.pre_processor is not None else None

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            yield transform(chunk) if transform is not None else chunk

    model.model.calibrate(batches)
    return True


@torch.no_grad()
def raw_predictions(model: AnomalibModule, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's raw (unnormalised) anomaly maps and scores.

    Args:
        model: Teacher in eval mode.
        images: RGB ``[N, 3, H, W]`` in ``[0, 1]`` at the teacher's image size.

    Returns:
        tuple: Maps ``[N, H, W]`` and scores ``[N]``.
    """
    batch = model.pre_processor.transform(images) if model.pre_processor is not None else images
    output = model.model(batch)
    anomaly_map = output.anomaly_map.reshape(images.shape[0], *output.anomaly_map.shape[-2:]).float()
    score = output.pred_score
    if score is None:
        score = anomaly_map.flatten(1).amax(dim=1)
    return anomaly_map, score.reshape(-1).float()


@torch.no_grad()
def teacher_features(model: AnomalibModule, images: torch.Tensor) -> list[torch.Tensor]:
    """A teacher's intermediate (multi-scale backbone) features, shallow to deep; empty when it exposes none.

    kd_ext models keep their frozen feature extractor as ``model.teacher`` (a list of levels); anomalib's Stfpm as
    ``teacher_model`` and Padim / Patchcore / most others as ``feature_extractor`` (a dict of levels).

    Args:
        model: Teacher in eval mode.
        images: RGB ``[N, 3, H, W]`` in ``[0, 1]`` at the teacher's image size.

    Returns:
        list[torch.Tensor]: Features per level ``[N, C_l, h_l, w_l]``.
    """
    batch = model.pre_processor.transform(images) if model.pre_processor is not None else images
    network = model.model
    extractor = next(
        (
            getattr(network, name)
            for name in ("teacher", "teacher_model", "feature_extractor")
            if isinstance(getattr(network, name, None), torch.nn.Module)
        ),
        None,
    )
    if extractor is None:
        return []
    features = extractor(batch)
    levels = list(features.values()) if isinstance(features, dict) else list(features)
    return [level.float() for level in levels if isinstance(level, torch.Tensor) and level.dim() == 4]


@torch.no_grad()
def teacher_channels(model: AnomalibModule, image_size: tuple[int, int]) -> list[int]:
    """Channels of a teacher's intermediate feature levels (:func:`teacher_features` of one blank image).

    Args:
        model: Teacher in eval mode.
        image_size: The teacher's ``(H, W)``.

    Returns:
        list[int]: Channels per level, shallow to deep (empty when it exposes no features).
    """
    return [level.shape[1] for level in teacher_features(model, torch.zeros(1, 3, *image_size))]


@dataclass(frozen=True)
class TeacherCalibration:
    """Maps a teacher's raw values to logits: ``sharpness * (raw - high) / (high - median)``.

    Attributes:
        pixel_median: Median of the normal training images' map values.
        pixel_high: Their 99.5 % quantile (logit 0).
        score_median: Median of their image scores.
        score_high: Largest of their image scores (logit 0).
        sharpness: Logit magnitude at the median.
    """

    pixel_median: float
    pixel_high: float
    score_median: float
    score_high: float
    sharpness: float = 4.0

    @classmethod
    def fit(cls, maps: torch.Tensor, scores: torch.Tensor, sharpness: float = 4.0) -> "TeacherCalibration":
        """Fit on a teacher's raw maps and scores of normal images.

        Args:
            maps: Maps ``[N, H, W]``.
            scores: Scores ``[N]``.
            sharpness: Logit magnitude at the median.

        Returns:
            TeacherCalibration: The calibration.
        """
        values = maps.flatten()
        if values.numel() > 1_000_000:  # quantile() has an input-size limit; a strided subsample is plenty
            values = values[:: values.numel() // 1_000_000 + 1]
        pixel_median, pixel_high = torch.quantile(values, torch.tensor([0.5, 0.995])).tolist()
        score_median = scores.median().item()
        score_high = scores.max().item()
        return cls(pixel_median, pixel_high, score_median, score_high, sharpness)

    def _logits(self, raw: torch.Tensor, median: float, high: float) -> torch.Tensor:
        spread = max(high - median, 1e-6 * max(abs(high), 1.0))
        return self.sharpness * (raw - high) / spread

    def pixel_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of raw maps."""
        return self._logits(maps, self.pixel_median, self.pixel_high)

    def score_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of raw scores."""
        return self._logits(scores, self.score_median, self.score_high)
