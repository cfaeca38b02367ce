"""The IR contract between kd_ext's exporter and its edge runtime, in one torch-free module.

Both sides import their names from here: the ``rt_info`` section and keys kd_ext writes into an IR, the output
field names (anomalib's ``InferenceBatch`` fields), how a multi-task IR names a task's outputs, the weights'
checksum, a model's description of its anomaly-map tail (:class:`MapTail`, with the one top-k count rule
:func:`top_k_count`), and that tail bound to a features IR's outputs, run *outside* the IR (:class:`AnomalyTail`).

Two kinds of image IR exist:

* **standard** (:attr:`ExportMode.STANDARD`): anomalib's whole ``AnomalibModule.forward``; outputs ``pred_score``,
  ``anomaly_map`` and, when the post-processor thresholds, ``pred_label``, ``pred_mask``. Any anomalib runtime reads it.
* **features** (:attr:`ExportMode.FEATURES`): the pre-processor and networks only; its outputs are the per-scale
  teacher and student features, named ``feature/<index>``, and ``rt_info[kd_ext][tail]`` holds the
  :class:`AnomalyTail` (JSON) that turns them into the same four fields with :mod:`kd_ext.kernels` and numpy.

Nothing here imports torch, anomalib or openvino.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

RT_INFO_KEY = "kd_ext"
"""Section of the IR's ``rt_info`` where kd_ext's exporter records what it did."""
CHECKSUM_KEY = "weights_sha256"
"""Key (under :data:`RT_INFO_KEY`) of the SHA-256 of the IR's ``.bin``."""
TAIL_KEY = "tail"
"""Key (under :data:`RT_INFO_KEY`) of a features IR's :class:`AnomalyTail` (JSON)."""
EXPORT_MODE_KEY = "export_mode"
"""Key (under :data:`RT_INFO_KEY`) of the :class:`ExportMode` an IR was exported with."""
REQUIRED_OUTPUTS = ("pred_score", "anomaly_map")
"""Outputs every standard anomaly IR has."""
OUTPUT_FIELDS = ("pred_score", "anomaly_map", "pred_label", "pred_mask")
"""anomalib's ``InferenceBatch`` fields an anomaly IR may output (and the edge runtime returns)."""
TASK_SEPARATOR = "/"
"""A multi-task IR names a task's outputs ``<task>/<field>``."""
FEATURE_PREFIX = "feature/"
"""A features IR names its outputs ``feature/<index>``."""
PRIOR_OUTPUT = "prior/distance"
"""Name of a features IR's normal-feature prior output (Mahalanobis distances on the prior's grid)."""
TAIL_VERSION = 2
"""Newest :class:`AnomalyTail` layout this kd_ext reads; the runtime refuses a newer one. A tail is written with
the oldest layout that describes it: 1 without a prior, 2 with one (an older runtime then refuses it rather than
ignoring the prior)."""
PRIOR_TAIL_VERSION = 2
"""First :class:`AnomalyTail` layout with a :class:`TailPrior`."""
PRIOR_MAPS = ("distillation", "prior")
"""The maps a :class:`TailPrior` standardises and fuses, in the order of its statistics."""


class ExportMode(str, Enum):
    """Where an exported image IR ends.

    Attributes:
        STANDARD: anomalib's whole forward (pre-processor, networks, anomaly-map tail, post-processor).
        FEATURES: pre-processor and networks; the tail runs in the edge runtime through :mod:`kd_ext.kernels`.
        AUTO: ``FEATURES`` where the model and options allow it (BiDirMSKD and MTHF, a static input size, not
            ``int8_acq``), else ``STANDARD``. Only an export option; an IR records the mode it got.
    """

    STANDARD = "standard"
    FEATURES = "features"
    AUTO = "auto"


def task_output(task: str | None, output: str) -> str:
    """Name of a task's output in a multi-task IR (``output`` itself for a single-task IR).

    Args:
        task: Task name, or ``None``.
        output: Field name (one of :data:`OUTPUT_FIELDS`).

    Returns:
        str: ``<task>/<output>`` or ``output``.
    """
    return output if task is None else f"{task}{TASK_SEPARATOR}{output}"


def tasks_of(names: set[str]) -> list[str]:
    """Tasks of a multi-task IR, from its output names (empty for a single-task IR).

    Args:
        names: All output names of the IR.

    Returns:
        list[str]: Sorted task names.
    """
    suffix = f"{TASK_SEPARATOR}pred_score"
    return sorted(name.split(TASK_SEPARATOR, 1)[0] for name in names if name.endswith(suffix))


def feature_output(index: int) -> str:
    """Name of a features IR's ``index``-th output."""
    return f"{FEATURE_PREFIX}{index}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (an IR's weights), read in 1 MiB chunks; the exporter records it, the runtime checks it."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TailGroup:
    """Teacher/student feature pairs whose maps are fused in one kernel call.

    Attributes:
        pairs: ``(teacher output, student output)`` names of :data:`FEATURE_PREFIX` outputs, one per scale.
        fusion: :class:`kd_ext.kernels.Fusion` value across the pairs.
    """

    pairs: tuple[tuple[str, str], ...]
    fusion: str = "mean"


@dataclass(frozen=True)
class Normalization:
    """anomalib ``PostProcessor`` statistics (raw values; NaN = not collected).

    Attributes:
        image_min: Minimum image score on the validation images.
        image_max: Maximum image score.
        image_threshold: Image threshold (raw scale).
        pixel_min: Minimum map value.
        pixel_max: Maximum map value.
        pixel_threshold: Pixel threshold (raw scale).
    """

    image_min: float
    image_max: float
    image_threshold: float
    pixel_min: float
    pixel_max: float
    pixel_threshold: float


@dataclass(frozen=True)
class TailPrior:
    """A normal-feature prior fused into the tail (kd_ext's ``PriorFusion``).

    The IR output ``output`` holds the prior's Mahalanobis distances ``[B, 1, h, w]`` on its own grid. The tail
    upsamples them to the map size (bilinear, ``align_corners=False``, as the prior does in torch), standardises
    the distillation map ``D`` and the prior map ``P`` with their statistics on normal training images,
    ``z = ((D - map_mean[0]) / map_std[0], (P - map_mean[1]) / map_std[1])``, and fuses them by ``rule``
    (``"mean"`` or ``"max"`` of the two). The image score is taken from the fused map; the anomaly map is the fused
    map (``scope`` ``"map"``) or the distillation map (``"score"``).

    Attributes:
        output: Name of the IR output with the prior's distances (:data:`PRIOR_OUTPUT`).
        rule: ``"mean"`` or ``"max"``.
        scope: ``"map"`` or ``"score"``.
        map_mean: Means of the distillation and the prior map on normal training images.
        map_std: Their standard deviations.
    """

    output: str = PRIOR_OUTPUT
    rule: str = "mean"
    scope: str = "score"
    map_mean: tuple[float, float] = (0.0, 0.0)
    map_std: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        """Check the rule, the scope and the statistics.

        Raises:
            ValueError: If one is unknown or malformed (named in the message).
        """
        if self.rule not in {"mean", "max"}:
            msg = f"Unknown prior rule '{self.rule}'; choose 'mean' or 'max'."
            raise ValueError(msg)
        if self.scope not in {"map", "score"}:
            msg = f"Unknown prior scope '{self.scope}'; choose 'map' or 'score'."
            raise ValueError(msg)
        if len(self.map_mean) != len(PRIOR_MAPS) or len(self.map_std) != len(PRIOR_MAPS):
            msg = f"A prior needs a map mean and std per map {PRIOR_MAPS}, got {self.map_mean}, {self.map_std}."
            raise ValueError(msg)
        if not all(math.isfinite(value) for value in self.map_mean) or any(
            not math.isfinite(value) or value <= 0 for value in self.map_std
        ):
            msg = f"The prior's map statistics must be finite, the stds positive: {self.map_mean}, {self.map_std}."
            raise ValueError(msg)


def top_k_count(size: int, ratio: float) -> int:
    """Values a ``"topk"`` score averages on a map of ``size`` values: ``max(1, int(size * ratio))``.

    The one top-k rule of kd_ext's models: the torch forward, the exporter (:meth:`MapTail.bind` writes the count
    into the :class:`AnomalyTail`, which the edge runtime uses as is) and SignalKD's series score all take the count
    from here.

    Args:
        size: Values per map (``H * W``, or a series' length).
        ratio: Share of them averaged, in ``(0, 1]``.

    Returns:
        int: The count, at least 1.
    """
    return max(1, int(size * ratio))


@dataclass(frozen=True)
class MapTail:
    """How a model turns teacher/student features into its anomaly map and image score, described once.

    The model's own description of its tail (``model.tail()``), independent of the image size and of any IR's
    output names: the torch forward reads its score rule and prior scope from it, the exporter binds it to an IR
    (:meth:`bind`, giving the :class:`AnomalyTail` the edge runtime runs), so the three cannot disagree. Stage 1:
    the teacher/student pairs of each group give one map through the fused kernel (``distance``, bilinear
    upsampling with ``align_corners``, the group's entry of ``fusions``). One group with ``group_fusion``
    ``"none"`` is blurred (``sigma``) and scored as it is; otherwise (MTHF's stage 2) the group maps are
    standardised with ``group_mean`` / ``group_std``, combined by ``group_fusion`` and blurred. A ``prior``
    (:class:`TailPrior`) is fused after that. The image score is ``score``: ``"max"``, or ``"topk"``, the mean of the
    :func:`top_k_count` largest values for ``top_k_ratio``.

    Statistics (``group_mean``, ``group_std``, the prior's map statistics) are the model's fitted buffers, read as
    numbers. A tail built without them (``statistics=False``: the torch forward, which keeps them as tensors so that
    they stay constants of a traced graph) has empty group statistics and the prior's default ones, and cannot be
    bound.

    Attributes:
        fusions: :class:`kd_ext.kernels.Fusion` value of each group's pairs (stage 1), one entry per group.
        distance: :class:`kd_ext.kernels.Distance` value.
        align_corners: Bilinear ``align_corners``.
        sigma: Gaussian sigma of the final map (0: none).
        score: :class:`kd_ext.kernels.ScoreMode` value.
        top_k_ratio: Share of the map's values averaged by ``"topk"``.
        group_fusion: ``"none"`` (one group), ``"mean"`` or ``"max"``.
        group_mean: Per-group map means on normal training images (stage 2).
        group_std: Per-group map standard deviations (stage 2).
        prior: The fitted normal-feature prior fused into the map, or ``None``.
        statistics: Whether the statistics were read (see above).
    """

    fusions: tuple[str, ...] = ("mean",)
    distance: str = "cosine"
    align_corners: bool = False
    sigma: float = 4.0
    score: str = "max"
    top_k_ratio: float = 0.01
    group_fusion: str = "none"
    group_mean: tuple[float, ...] = field(default_factory=tuple)
    group_std: tuple[float, ...] = field(default_factory=tuple)
    prior: TailPrior | None = None
    statistics: bool = True

    def __post_init__(self) -> None:
        """Check the layout.

        Raises:
            ValueError: If it is inconsistent (named in the message).
        """
        if not self.fusions:
            msg = "A map tail needs at least one group."
            raise ValueError(msg)
        if self.group_fusion not in {"none", "mean", "max"}:
            msg = f"Unknown group_fusion '{self.group_fusion}'; choose 'none', 'mean' or 'max'."
            raise ValueError(msg)
        if self.group_fusion == "none" and len(self.fusions) != 1:
            msg = f"group_fusion='none' takes one group, got {len(self.fusions)}; use 'mean' or 'max'."
            raise ValueError(msg)
        if not 0 < self.top_k_ratio <= 1:
            msg = f"top_k_ratio must be in (0, 1], got {self.top_k_ratio}."
            raise ValueError(msg)

    def top_k(self, output_size: tuple[int, int]) -> int | None:
        """Values the ``"topk"`` score averages on maps of ``output_size`` (:func:`top_k_count`), ``None`` for max."""
        if self.score == "max":
            return None
        return top_k_count(int(output_size[0]) * int(output_size[1]), self.top_k_ratio)

    def bind(
        self,
        output_size: tuple[int, int],
        pairs: tuple[tuple[tuple[str, str], ...], ...],
        normalization: Normalization | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> AnomalyTail:
        """The :class:`AnomalyTail` of an IR whose outputs hold this tail's features, for maps of ``output_size``.

        Args:
            output_size: ``(H, W)`` of the maps (the IR's input size).
            pairs: ``(teacher output, student output)`` names of each group, in the order of :attr:`fusions`.
            normalization: The post-processor's statistics, or ``None``.
            image_threshold: Threshold of the (normalised) score, or ``None``.
            pixel_threshold: Threshold of the (normalised) map, or ``None``.

        Returns:
            AnomalyTail: The tail the edge runtime runs.

        Raises:
            ValueError: If the tail was built without statistics, or ``pairs`` has another number of groups.
        """
        if not self.statistics:
            msg = "A map tail built with statistics=False cannot be bound to an IR; build it with statistics."
            raise ValueError(msg)
        if len(pairs) != len(self.fusions):
            msg = f"The map tail has {len(self.fusions)} group(s), got feature pairs of {len(pairs)}."
            raise ValueError(msg)
        return AnomalyTail(
            output_size=(int(output_size[0]), int(output_size[1])),
            groups=tuple(
                TailGroup(pairs=tuple(group), fusion=fusion) for group, fusion in zip(pairs, self.fusions, strict=True)
            ),
            distance=self.distance,
            align_corners=self.align_corners,
            sigma=float(self.sigma),
            score=self.score,
            top_k=self.top_k(output_size),
            group_fusion=self.group_fusion,
            group_mean=self.group_mean if self.group_fusion != "none" else (),
            group_std=self.group_std if self.group_fusion != "none" else (),
            normalization=normalization,
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            prior=self.prior,
        )


@dataclass(frozen=True)
class AnomalyTail:
    """Everything a features IR's anomaly-map tail needs, recorded at export in the IR's ``rt_info``.

    The exporter writes the model's :class:`MapTail` bound to the IR (:meth:`MapTail.bind`): the same rules, with
    the IR's output names, the map size, the top-k count for that size and the post-processor's statistics.

    Stage 1: each group's pairs give a map through the fused kernel (``distance``, bilinear upsampling to
    ``output_size`` with ``align_corners``, the group's ``fusion``). With one group and ``group_fusion`` ``"none"``
    the kernel also blurs (``sigma``) and scores. Stage 2 (MTHF): each group map ``M_g`` is standardised,
    ``(M_g - group_mean[g]) / group_std[g]``, the standardised maps are combined by ``group_fusion`` (``"mean"`` or
    ``"max"``) and blurred. With a ``prior`` (:class:`TailPrior`) that map is fused with the prior's map, and the
    fused map gives the image score (and, by the prior's scope, the anomaly map). The image score is ``score``
    (``"max"`` or ``"topk"`` of ``top_k`` values). Then
    anomalib's post-processor: min-max normalisation around the threshold (``normalization``) and the labels and
    masks at ``image_threshold`` / ``pixel_threshold`` of the normalised values (``None``: no labels).

    Attributes:
        output_size: ``(H, W)`` of the maps.
        groups: Feature pairs of each group.
        distance: :class:`kd_ext.kernels.Distance` value.
        align_corners: Bilinear ``align_corners``.
        sigma: Gaussian sigma of the final map (0: none).
        score: :class:`kd_ext.kernels.ScoreMode` value.
        top_k: Values averaged by ``"topk"``.
        group_fusion: ``"none"`` (one group), ``"mean"`` or ``"max"``.
        group_mean: Per-group map means on normal training images (stage 2).
        group_std: Per-group map standard deviations (stage 2).
        normalization: Post-processor statistics, or ``None`` (raw outputs).
        image_threshold: Threshold of the (normalised) score, or ``None``.
        pixel_threshold: Threshold of the (normalised) map, or ``None``.
        prior: The fused normal-feature prior, or ``None``.
        version: Layout version read (:attr:`layout_version` is what :meth:`to_json` writes).
    """

    output_size: tuple[int, int]
    groups: tuple[TailGroup, ...]
    distance: str = "cosine"
    align_corners: bool = False
    sigma: float = 4.0
    score: str = "max"
    top_k: int | None = None
    group_fusion: str = "none"
    group_mean: tuple[float, ...] = field(default_factory=tuple)
    group_std: tuple[float, ...] = field(default_factory=tuple)
    normalization: Normalization | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    prior: TailPrior | None = None
    version: int = TAIL_VERSION

    def __post_init__(self) -> None:
        """Check what the runtime relies on.

        Raises:
            ValueError: If the layout is inconsistent (named in the message).
        """
        if not self.groups or any(not group.pairs for group in self.groups):
            msg = "An anomaly tail needs at least one group with at least one feature pair."
            raise ValueError(msg)
        if self.group_fusion not in {"none", "mean", "max"}:
            msg = f"Unknown group_fusion '{self.group_fusion}'; choose 'none', 'mean' or 'max'."
            raise ValueError(msg)
        if self.group_fusion == "none" and len(self.groups) != 1:
            msg = f"group_fusion='none' takes one group, got {len(self.groups)}; use 'mean' or 'max'."
            raise ValueError(msg)
        if self.group_fusion != "none" and not (len(self.group_mean) == len(self.group_std) == len(self.groups)):
            msg = "Stage-2 fusion needs one group_mean and one group_std per group."
            raise ValueError(msg)
        if any(not math.isfinite(value) or value <= 0 for value in self.group_std):
            msg = f"group_std must be finite and positive, got {self.group_std}."
            raise ValueError(msg)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The IR outputs the tail reads, in first-use order (the prior's output last)."""
        names: dict[str, None] = {}
        for group in self.groups:
            for teacher, student in group.pairs:
                names[teacher] = names[student] = None
        if self.prior is not None:
            names[self.prior.output] = None
        return tuple(names)

    @property
    def layout_version(self) -> int:
        """The oldest layout that describes this tail: :data:`PRIOR_TAIL_VERSION` with a prior, else 1."""
        return PRIOR_TAIL_VERSION if self.prior is not None else 1

    @property
    def thresholds(self) -> bool:
        """Whether the tail produces labels and masks."""
        return self.image_threshold is not None and self.pixel_threshold is not None

    def to_json(self) -> str:
        """The tail as compact JSON (NaN statistics written as ``null``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {key: clean(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(item) for item in value]
            return value

        data = asdict(self)
        data["version"] = self.layout_version
        if self.prior is None:
            del data["prior"]  # the layout-1 vocabulary: a runtime that knows no prior reads it
        return json.dumps(clean(data), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AnomalyTail:
        """Read a tail written by :meth:`to_json`.

        Args:
            text: The JSON text.

        Returns:
            AnomalyTail: The tail.

        Raises:
            ValueError: If the text is not a tail of a version this runtime reads.
        """
        try:
            data = json.loads(text)
            version = int(data.get("version", 0))
            if version > TAIL_VERSION:
                msg = (
                    f"The IR's anomaly tail has layout version {version}; this kd_ext reads up to {TAIL_VERSION}. "
                    "Upgrade kd_ext on the device, or export with mode='standard'."
                )
                raise ValueError(msg)
            normalization = data.get("normalization")
            prior = data.get("prior")
            return cls(
                output_size=(int(data["output_size"][0]), int(data["output_size"][1])),
                groups=tuple(
                    TailGroup(pairs=tuple((str(t), str(s)) for t, s in group["pairs"]), fusion=str(group["fusion"]))
                    for group in data["groups"]
                ),
                distance=str(data["distance"]),
                align_corners=bool(data["align_corners"]),
                sigma=float(data["sigma"]),
                score=str(data["score"]),
                top_k=None if data.get("top_k") is None else int(data["top_k"]),
                group_fusion=str(data["group_fusion"]),
                group_mean=tuple(float(value) for value in data.get("group_mean", ())),
                group_std=tuple(float(value) for value in data.get("group_std", ())),
                normalization=None
                if normalization is None
                else Normalization(**{key: _number(value) for key, value in normalization.items()}),
                image_threshold=None if data.get("image_threshold") is None else float(data["image_threshold"]),
                pixel_threshold=None if data.get("pixel_threshold") is None else float(data["pixel_threshold"]),
                prior=None if prior is None else _prior(prior),
                version=version,
            )
        except (KeyError, TypeError, IndexError, json.JSONDecodeError) as error:
            msg = f"The IR's anomaly tail (rt_info {RT_INFO_KEY}/{TAIL_KEY}) is unreadable: {error!r}. Re-export it."
            raise ValueError(msg) from error


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _prior(data: dict[str, Any]) -> TailPrior:
    return TailPrior(
        output=str(data["output"]),
        rule=str(data["rule"]),
        scope=str(data["scope"]),
        map_mean=(float(data["map_mean"][0]), float(data["map_mean"][1])),
        map_std=(float(data["map_std"][0]), float(data["map_std"][1])),
    )


__all__ = [
    "CHECKSUM_KEY",
    "EXPORT_MODE_KEY",
    "FEATURE_PREFIX",
    "OUTPUT_FIELDS",
    "PRIOR_OUTPUT",
    "PRIOR_TAIL_VERSION",
    "REQUIRED_OUTPUTS",
    "RT_INFO_KEY",
    "TAIL_KEY",
    "TAIL_VERSION",
    "TASK_SEPARATOR",
    "AnomalyTail",
    "ExportMode",
    "MapTail",
    "Normalization",
    "TailGroup",
    "TailPrior",
    "feature_output",
    "file_sha256",
    "task_output",
    "tasks_of",
    "top_k_count",
]
