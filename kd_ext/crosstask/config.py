"""The ``kd-ext distill`` configuration: tasks (teacher checkpoint + data), student, training, export.

Example YAML (relative paths are relative to the working directory)::

    output: runs/cross_task
    tasks:
      - name: bottle
        checkpoint: results/BiDirMSKD/MVTecAD/bottle/latest/weights/lightning/model.ckpt
        data: {root: datasets/MVTecAD, category: bottle}
      - name: hazelnut
        checkpoint: results/Padim/MVTecAD/hazelnut/latest/weights/lightning/model.ckpt
        model: Padim          # anomalib checkpoints do not record their class; kd_ext ones do
        data: {root: datasets/MVTecAD, category: hazelnut}
    student: {backbone: efficientnet_lite0, hidden_channels: 32}
    training: {epochs: 40, batch_size: 16, task_weighting: dwa, temperature: adaptive}
    export: {precision: fp32}
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kd_ext.models.cross_task.torch_model import check_task_names

TASK_WEIGHTINGS = ("fixed", "dwa")
TEMPERATURES = ("fixed", "adaptive")
EXPORT_PRECISIONS = ("none", "fp32", "fp16")


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        msg = f"'{where}' must be a mapping, got {type(values).__name__}."
        raise ValueError(msg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        msg = f"Unknown keys {unknown} in '{where}'; allowed: {sorted(known)}."
        raise ValueError(msg)
    return cls(**values)


@dataclass
class TaskConfig:
    """One task: a trained teacher and the MVTec-style folder of its images.

    Attributes:
        name: Task name (head name, IR output prefix).
        checkpoint: The teacher's Lightning checkpoint.
        root: Dataset root (the folder holding ``category``).
        category: Category folder with ``train/good`` (and ``test``, ``ground_truth`` for evaluation).
        model: Teacher class name; required for anomalib checkpoints.
    """

    name: str
    checkpoint: Path
    root: Path
    category: str
    model: str | None = None

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.root = Path(self.root)

    @property
    def data_dir(self) -> Path:
        """``root / category``."""
        return self.root / self.category


@dataclass
class StudentConfig:
    """Student architecture (see :class:`~kd_ext.crosstask.torch_model.CrossTaskStudentModel`)."""

    backbone: str = "efficientnet_lite0"
    layers: list[str] | None = None
    hidden_channels: int = 32
    top_k: int = 10


@dataclass
class TrainingConfig:
    """Distillation settings.

    Attributes:
        epochs: Passes over the largest task's cached samples.
        batch_size: Samples per task per step.
        learning_rate: Adam learning rate of heads (and trunk when trained) and temperatures.
        synthetic_per_image: Perlin synthetic anomalies generated per normal training image.
        task_weighting: ``"fixed"`` (all 1) or ``"dwa"`` (Dynamic Weight Average).
        dwa_temperature: Softmax temperature of DWA.
        temperature: ``"fixed"`` or ``"adaptive"`` (learnable per task, adversarial, cosine curriculum).
        initial_temperature: Fixed temperature, or the adaptive one's start.
        imbalance: ``"balanced"`` (class-balanced loss weights) or ``"none"``.
        score_weight: Weight of the image-score loss against the map loss.
        seed: Random seed (synthetic anomalies, initialisation, order).
    """

    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 1e-3
    synthetic_per_image: int = 2
    task_weighting: str = "dwa"
    dwa_temperature: float = 2.0
    temperature: str = "adaptive"
    initial_temperature: float = 4.0
    imbalance: str = "balanced"
    score_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task_weighting not in TASK_WEIGHTINGS:
            msg = f"Unknown task_weighting '{self.task_weighting}'; choose one of {TASK_WEIGHTINGS}."
            raise ValueError(msg)
        if self.temperature not in TEMPERATURES:
            msg = f"Unknown temperature '{self.temperature}'; choose one of {TEMPERATURES}."
            raise ValueError(msg)
        if self.epochs < 1 or self.batch_size < 2 or self.synthetic_per_image < 0:
            msg = "Need epochs >= 1, batch_size >= 2 (BatchNorm) and synthetic_per_image >= 0."
            raise ValueError(msg)


@dataclass
class ExportConfig:
    """OpenVINO export of the trained student (one IR with every task's outputs)."""

    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in EXPORT_PRECISIONS:
            msg = f"Unknown export precision '{self.precision}'; choose one of {EXPORT_PRECISIONS}."
            raise ValueError(msg)


@dataclass
class DistillConfig:
    """Everything ``kd-ext distill`` needs."""

    tasks: list[TaskConfig]
    output: Path
    student: StudentConfig = field(default_factory=StudentConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        check_task_names([task.name for task in self.tasks])

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        """Build from plain data (a parsed YAML file).

        Raises:
            ValueError: On missing or unknown keys and invalid values.
        """
        if not isinstance(values, dict):
            msg = "The distillation config must be a mapping with 'tasks' and 'output'."
            raise ValueError(msg)
        unknown = sorted(set(values) - {"tasks", "output", "student", "training", "export"})
        if unknown:
            msg = f"Unknown top-level keys {unknown}; allowed: tasks, output, student, training, export."
            raise ValueError(msg)
        if not values.get("tasks") or "output" not in values:
            msg = "The distillation config needs 'output' and a non-empty list 'tasks'."
            raise ValueError(msg)
        tasks = []
        for index, task in enumerate(values["tasks"]):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                msg = f"tasks[{index}] needs name, checkpoint and data: {{root, category}}."
                raise ValueError(msg)
            data = task["data"]
            missing = [key for key in ("name", "checkpoint") if key not in task] + [
                f"data.{key}" for key in ("root", "category") if key not in data
            ]
            if missing:
                msg = f"tasks[{index}] lacks {missing}."
                raise ValueError(msg)
            extra = sorted(set(task) - {"name", "checkpoint", "data", "model"}) + sorted(
                f"data.{key}" for key in set(data) - {"root", "category"}
            )
            if extra:
                msg = f"tasks[{index}] has unknown keys {extra}."
                raise ValueError(msg)
            tasks.append(
                TaskConfig(task["name"], task["checkpoint"], data["root"], data["category"], task.get("model"))
            )
        return cls(
            tasks=tasks,
            output=values["output"],
            student=_build(StudentConfig, values.get("student"), "student"),
            training=_build(TrainingConfig, values.get("training"), "training"),
            export=_build(ExportConfig, values.get("export"), "export"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DistillConfig":
        """Read a YAML config file.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it is not valid YAML or not a valid config.
        """
        import yaml  # noqa: PLC0415

        path = Path(path)
        if not path.is_file():
            msg = f"Config file not found: {path}"
            raise FileNotFoundError(msg)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            msg = f"{path} is not valid YAML: {error}"
            raise ValueError(msg) from error
        return cls.from_dict(values)
