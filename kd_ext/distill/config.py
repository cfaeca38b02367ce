"""The ``kd-ext distill`` configuration: tasks (teacher checkpoint + data), student, training, export.

``kd-ext distill`` parses it with jsonargparse, as anomalib's CLI does: ``--config FILE`` (repeatable, later files
and arguments override earlier ones), ``--print_config`` and dotted overrides (``--training.epochs 5``,
``--student.hidden_channels 16``). Example YAML (relative paths are relative to the working directory)::

    output: runs/cross_task
    tasks:
      - name: hazelnut
        checkpoint: results/BiDirMSKD/MVTecAD/hazelnut_toy/latest/weights/lightning/model.ckpt
        data: {root: ../shared/data, category: hazelnut_toy}
      - name: brain
        checkpoint: results/Padim/brain_mri/latest/weights/lightning/model.ckpt
        model: Padim          # anomalib checkpoints do not record their class; kd_ext ones do
        data: {root: ../shared/data, category: brain_mri, layout: folder}
    student: {hidden_channels: 32}
    training: {epochs: 20, batch_size: 8, task_weighting: dwa, temperature: adaptive}
    export: {precision: fp32}

``output`` must lie outside every task's data folder, and a folder that holds an earlier run's files
(:data:`RUN_FILES`) is refused unless ``overwrite: true`` (``--overwrite``) replaces them.
"""

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from kd_ext.models.cross_task.loss import Imbalance, TaskWeighting, TemperatureMode
from kd_ext.models.cross_task.torch_model import check_task_names
from kd_ext.options import check_choice, check_epochs, check_learning_rate, check_positive, check_whole


class DataLayout(StrEnum):
    """How a task's images are stored (member names equal values)."""

    mvtec = "mvtec"
    """MVTec AD: ``train/good``, ``test/<defect>``, optional ``ground_truth/<defect>/*_mask.png``."""
    folder = "folder"
    """``train/good``, ``test/good`` and ``test/<abnormal>`` without masks (anomalib ``Folder``), e.g. brain MRI."""
    video = "video"
    """Video frames (:class:`kd_ext.data.VideoFrames`), scored per frame, e.g. UCSD Ped2."""


class TargetKind(StrEnum):
    """What the student learns from."""

    teacher = "teacher"
    """The teachers: soft maps and scores, and intermediate features (distillation)."""
    synthetic = "synthetic"
    """No teacher: the synthetic anomalies' own masks and labels (the small trunk trained directly, a baseline)."""


class ExportPrecision(StrEnum):
    """Precision of the multi-task OpenVINO IR (``none``: no export)."""

    none = "none"
    fp32 = "fp32"
    fp16 = "fp16"


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
    """One task: a trained teacher and the folder of its images.

    Attributes:
        name: Task name (head name, IR output prefix).
        checkpoint: The teacher's Lightning checkpoint.
        root: Dataset root (the folder holding ``category``).
        category: Category folder (see ``layout``).
        model: Teacher class name; required for anomalib checkpoints.
        layout: How the images are stored: ``mvtec``, ``folder`` or ``video``.
        frame_stride: For ``video``: train on every ``frame_stride``-th training frame.
        test_frame_stride: For ``video``: test on the frames whose number in their clip is a multiple of it
            (1: every test frame, the standard frame-level metric).
    """

    name: str
    checkpoint: Path
    root: Path
    category: str
    model: str | None = None
    layout: DataLayout = DataLayout.mvtec
    frame_stride: int = 10
    test_frame_stride: int = 1

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.root = Path(self.root)
        self.layout = check_choice(self.layout, DataLayout, f"data layout of task '{self.name}'")

    @property
    def data_dir(self) -> Path:
        """``root / category``."""
        return self.root / self.category


TASK_KEYS = ("name", "checkpoint", "data", "model")
DATA_KEYS = ("root", "category", "layout", "frame_stride")


def task_from_dict(task: object, index: int) -> TaskConfig:
    """One entry of ``tasks`` (``{name, checkpoint, data: {root, category[, layout, frame_stride]}[, model]}``).

    Raises:
        ValueError: Naming the entry and the missing or unknown keys.
    """
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
    extra = sorted(set(task) - set(TASK_KEYS)) + sorted(f"data.{key}" for key in set(data) - set(DATA_KEYS))
    if extra:
        msg = f"tasks[{index}] has unknown keys {extra}; allowed: {list(TASK_KEYS)}, data: {list(DATA_KEYS)}."
        raise ValueError(msg)
    return TaskConfig(
        task["name"],
        task["checkpoint"],
        data["root"],
        data["category"],
        task.get("model"),
        data.get("layout", DataLayout.mvtec),
        int(data.get("frame_stride", 10)),
    )


SMALL_TRUNK = "small"
FROZEN_TRUNK_BASELINE = "benchmarks/frozen_trunk.py"
"""Where the frozen-trunk student (formerly ``student.trunk: frozen``) lives: a baseline of the benchmark."""


@dataclass
class StudentConfig:
    """Student architecture (see :class:`~kd_ext.models.cross_task.torch_model.CrossTaskStudentModel`).

    Attributes:
        trunk: ``small``, the narrow trainable trunk (the only one; the key stays so that earlier configs parse).
        backbone: Whose normalisation and level names the trunk follows.
        layers: Trunk feature levels; ``None`` for the defaults.
        width: Channel multiplier of the small trunk against EfficientNet-Lite0.
        hidden_channels: Width of each task head.
        top_k: Map logits averaged into the image score.
    """

    trunk: str = SMALL_TRUNK
    backbone: str = "efficientnet_lite0"
    layers: list[str] | None = None
    width: float = 0.5
    hidden_channels: int = 32
    top_k: int = 10

    def __post_init__(self) -> None:
        if self.trunk == "frozen":
            msg = (
                "student.trunk 'frozen' (the frozen-trunk prior student) is no longer distilled by kd-ext distill: it "
                f"is a baseline of the cross-task benchmark ({FROZEN_TRUNK_BASELINE}, row 'frozen-trunk prior "
                "student'). Remove student.trunk or set it to 'small'."
            )
            raise ValueError(msg)
        if self.trunk != SMALL_TRUNK:
            msg = f"Unknown trunk '{self.trunk}'; kd-ext distill trains the '{SMALL_TRUNK}' trunk."
            raise ValueError(msg)


@dataclass
class TrainingConfig:
    """Distillation settings.

    Attributes:
        epochs: Passes over the largest task's samples.
        batch_size: Samples per task per step: the global batch. With ``P`` processes (``devices``, or
            ``torchrun``) each process takes an equal share of ``batch_size / P`` samples of every task's batch (the
            union of the shares is the one-process batch, so any ``P`` trains the same student); ``P`` must divide
            the batch (``min(batch_size, samples)`` for a task with fewer samples) and no task may have fewer samples
            than ``P``, else distillation stops before it starts.
        learning_rate: Adam learning rate of trunk, heads, adapters, task weights and temperatures.
        synthetic_per_image: Perlin synthetic anomalies generated per normal training image.
        crop_size: Side of the random square crop (aligned to 32 pixels) the trainable trunk trains on at each
            step, targets cropped alike; 0 trains on whole images. The student is fully convolutional, so it
            still scores whole images; crops cut the training compute by ``(H / crop_size)**2``.
        targets: ``teacher`` (distillation) or ``synthetic`` (the synthetic anomalies' masks, no teacher).
        feature_distillation: Also distil the teachers' intermediate features into the trainable trunk through
            per-task 1x1 adapters (off by itself for a frozen trunk or synthetic targets).
        feature_weight: Weight of the feature loss in each task's loss.
        task_weighting: ``fixed`` (all 1), ``dwa`` (Dynamic Weight Average) or ``uncertainty`` (learned).
        dwa_temperature: Softmax temperature of DWA.
        temperature: ``fixed`` or ``adaptive`` (learnable per task, adversarial, cosine curriculum).
        initial_temperature: Fixed temperature, or the adaptive one's start.
        imbalance: ``balanced`` (class-balanced loss weights) or ``none``.
        score_weight: Weight of the image-score loss against the map loss.
        seed: Random seed (synthetic anomalies, initialisation, order).
        accelerator: Lightning's accelerator (``auto``, ``cpu``, ``gpu``, ...).
        devices: Processes training together on this machine through Lightning's DDP (one per device; from the
            command line, as Lightning starts the others by running the same command again). Under ``torchrun`` the
            processes are torchrun's and this is ignored.
        distributed_timeout: With several processes: minutes a process waits for the others at one collective
            operation before failing (Lightning's ``DDPStrategy(timeout=...)``), so that a crashed or stuck process
            stops the job instead of hanging it.
    """

    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-3
    synthetic_per_image: int = 2
    crop_size: int = 128
    targets: TargetKind = TargetKind.teacher
    feature_distillation: bool = True
    feature_weight: float = 1.0
    task_weighting: TaskWeighting = TaskWeighting.dwa
    dwa_temperature: float = 2.0
    temperature: TemperatureMode = TemperatureMode.adaptive
    initial_temperature: float = 4.0
    imbalance: Imbalance = Imbalance.balanced
    score_weight: float = 1.0
    seed: int = 0
    accelerator: str = "auto"
    devices: int = 1
    distributed_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.task_weighting = check_choice(self.task_weighting, TaskWeighting, "task_weighting")
        self.temperature = check_choice(self.temperature, TemperatureMode, "temperature")
        self.imbalance = check_choice(self.imbalance, Imbalance, "imbalance")
        self.targets = check_choice(self.targets, TargetKind, "targets")
        check_epochs(self.epochs, "training.epochs")
        check_whole(self.batch_size, "training.batch_size (BatchNorm needs 2 images)", minimum=2)
        check_whole(self.synthetic_per_image, "training.synthetic_per_image", minimum=0)
        check_whole(self.crop_size, "training.crop_size", minimum=0)
        check_learning_rate(self.learning_rate, "training.learning_rate")
        check_whole(self.devices, "training.devices", minimum=1)
        check_positive(self.distributed_timeout, "training.distributed_timeout")
        if self.targets == TargetKind.synthetic and self.synthetic_per_image < 1:
            msg = "targets 'synthetic' learns from synthetic anomalies: set synthetic_per_image >= 1."
            raise ValueError(msg)


@dataclass
class ExportConfig:
    """OpenVINO export of the trained student (one IR with every task's outputs)."""

    precision: ExportPrecision = ExportPrecision.fp32

    def __post_init__(self) -> None:
        self.precision = check_choice(self.precision, ExportPrecision, "export precision")


RUN_FILES = ("report.json", "student.ckpt", "openvino/student.xml", "openvino/student.bin")
"""What a run writes into ``output`` (``report.json`` first in the list: it is removed first and written last)."""


@dataclass
class DistillConfig:
    """Everything ``kd-ext distill`` needs.

    Attributes:
        tasks: The tasks.
        output: Folder of the student's checkpoint, IR and report; outside every task's data folder.
        student: Student architecture.
        training: Distillation settings.
        export: OpenVINO export.
        overwrite: Replace an earlier run's files (:data:`RUN_FILES`) in ``output``; without it such a folder is
            refused before any work. They are replaced once the new student is trained and evaluated.
    """

    tasks: list[TaskConfig]
    output: Path
    student: StudentConfig = field(default_factory=StudentConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        check_task_names([task.name for task in self.tasks])
        if not isinstance(self.overwrite, bool):
            msg = f"overwrite must be true or false, got {self.overwrite!r}."
            raise ValueError(msg)

    def previous_run_files(self) -> list[str]:
        """The files of an earlier run in ``output`` (see :data:`RUN_FILES`), relative to it."""
        return [name for name in RUN_FILES if (self.output / name).exists()]

    def check_output(self) -> None:
        """Refuse an ``output`` inside (or equal to) a task's data folder, or holding an earlier run without overwrite.

        Paths are compared resolved (symbolic links followed, ``..`` removed). Called before any work.

        Raises:
            ValueError: Naming the task's data folder, or the earlier run's files and ``--overwrite``.
        """
        output = self.output.expanduser().resolve()
        for task in self.tasks:
            data = task.data_dir.expanduser().resolve()
            if output.is_relative_to(data):
                where = "is" if output == data else "is inside"
                msg = (
                    f"output {self.output} {where} the data folder {task.data_dir} of task '{task.name}': the "
                    f"student's files ({', '.join(RUN_FILES)}) would be written among its images; choose an output "
                    "folder outside every task's data folder."
                )
                raise ValueError(msg)
        existing = self.previous_run_files()
        if existing and not self.overwrite:
            msg = (
                f"output {self.output} already holds an earlier run's {', '.join(existing)}; choose another output "
                "folder, or pass --overwrite (overwrite: true in the config) to replace them."
            )
            raise ValueError(msg)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        """Build from plain data (a parsed YAML file).

        Raises:
            ValueError: On missing or unknown keys and invalid values.
        """
        if not isinstance(values, dict):
            msg = "The distillation config must be a mapping with 'tasks' and 'output'."
            raise ValueError(msg)
        unknown = sorted(set(values) - {"tasks", "output", "student", "training", "export", "overwrite"})
        if unknown:
            msg = f"Unknown top-level keys {unknown}; allowed: tasks, output, student, training, export, overwrite."
            raise ValueError(msg)
        if not values.get("tasks") or "output" not in values:
            msg = "The distillation config needs 'output' and a non-empty list 'tasks'."
            raise ValueError(msg)
        return cls(
            tasks=[task_from_dict(task, index) for index, task in enumerate(values["tasks"])],
            output=values["output"],
            student=_build(StudentConfig, values.get("student"), "student"),
            training=_build(TrainingConfig, values.get("training"), "training"),
            export=_build(ExportConfig, values.get("export"), "export"),
            overwrite=values.get("overwrite", False),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DistillConfig":
        """Read a YAML config file (the library route; ``kd-ext distill`` uses :func:`parse_distill_args`).

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


def distill_parser() -> Any:
    """The jsonargparse parser of ``kd-ext distill`` (``--config``, ``--print_config``, dotted overrides).

    ``tasks`` is a list of mappings checked by :func:`task_from_dict`; ``student``, ``training`` and ``export`` are
    the dataclasses above, one dotted option per field (``--training.task_weighting uncertainty``).

    Returns:
        jsonargparse.ArgumentParser: The parser.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: PLC0415

    parser = ArgumentParser(
        prog="kd-ext distill",
        description=(
            "Distil N trained task teachers into one lightweight multi-task student (a shared trunk, a head per "
            "task) and write its checkpoint, one OpenVINO IR for all tasks and report.json (teacher vs student AUROC "
            "per task, size and compute) into OUTPUT. Every task is checked before any training."
        ),
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (see README)")
    parser.add_argument("--output", type=Path, required=True, help="output folder (outside every task's data folder)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's student.ckpt, openvino/student.* and report.json in OUTPUT (else refused)",
    )
    parser.add_argument(
        "--tasks",
        type=list[dict[str, Any]],
        required=True,
        help="tasks: [{name, checkpoint, data: {root, category[, layout, frame_stride]}[, model]}, ...]",
    )
    parser.add_class_arguments(StudentConfig, "student", instantiate=False)
    parser.add_class_arguments(TrainingConfig, "training", instantiate=False)
    parser.add_class_arguments(ExportConfig, "export", instantiate=False)
    return parser


def parse_distill_args(argv: list[str]) -> DistillConfig:
    """Parse ``kd-ext distill`` arguments into a checked :class:`DistillConfig`.

    jsonargparse exits with status 2 on syntax and type errors (``--print_config`` prints and exits 0).

    Raises:
        ValueError: On invalid tasks or values (the messages of :meth:`DistillConfig.from_dict`).
    """
    parser = distill_parser()
    namespace = parser.parse_args(argv)
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return DistillConfig.from_dict(values)
