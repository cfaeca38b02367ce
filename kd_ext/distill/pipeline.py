"""``distill``: N trained task teachers -> one multi-task student, evaluated per task and exported.

Steps: check the output folder and every task (names, data, checkpoints, image sizes) -> train through Lightning
(:mod:`.training`): the teachers' soft targets and features on normal and synthetic images are computed once the
processes have started (:mod:`.targets`) and the student trains on one batch of every task per step
(:class:`~kd_ext.models.cross_task.CrossTaskDistillation`) -> test teacher and student per task -> save the
student's checkpoint, one OpenVINO IR for all tasks and ``report.json``.

With several processes (``training.devices``, or ``torchrun --nproc-per-node P --no-python kd-ext distill CONFIG``)
every process checks the tasks, Lightning starts the process group (gloo on CPUs, NCCL on GPUs, with
``training.distributed_timeout``), the teachers' targets are computed in shares and gathered, the student trains on
equal shares of every global batch, and rank 0 alone evaluates, saves, exports and writes the report while the
others end. The result equals one process's with the same config.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.models import AnomalibModule
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.functional.classification import binary_auroc
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from kd_ext.backbones import lite0_reference_trunk
from kd_ext.models.cross_task import CrossTaskStudent

from .config import RUN_FILES, DistillConfig, ExportPrecision, StudentConfig, TargetKind, TrainingConfig
from .data import DistillationData, check_process_shares
from .export import export_all_tasks_openvino
from .targets import TaskSamples, build_task_samples, teacher_targets
from .tasks import PreparedTask, prepare_tasks, training_image_count
from .teachers import raw_predictions, teacher_channels
from .training import distillation_module, distillation_trainer, fit_student

EVALUATION_BATCH = 8


@dataclass
class DistillResult:
    """What :func:`distill` produced.

    Attributes:
        student: The trained student.
        checkpoint: Its Lightning checkpoint.
        ir: The multi-task OpenVINO IR (``None`` when export is off, and on the other processes than rank 0).
        report: Metrics, sizes, compute and training history (also in ``report.json``); empty on the other
            processes than rank 0 of a several-process run (rank 0 evaluates and writes everything).
    """

    student: CrossTaskStudent
    checkpoint: Path
    ir: Path | None
    report: dict[str, Any]


def build_student(
    tasks: list[str],
    image_size: tuple[int, int],
    config: StudentConfig | None = None,
    student_class: type[CrossTaskStudent] = CrossTaskStudent,
) -> CrossTaskStudent:
    """The untrained student for the given tasks (``student_class``: a subclass with another torch model)."""
    config = config or StudentConfig()
    return student_class(
        tasks=tasks,
        backbone=config.backbone,
        layers=config.layers,
        width=config.width,
        hidden_channels=config.hidden_channels,
        image_size=image_size,
        top_k=config.top_k,
        visualizer=False,
    )


def _normalised(values: torch.Tensor) -> torch.Tensor:
    """Min-max to ``[0, 1]`` (rank-preserving), so that torchmetrics does not pass raw values through a sigmoid."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


@torch.no_grad()
def test_metrics(model: AnomalibModule, task: PreparedTask) -> dict[str, float]:
    """Image AUROC (and pixel AUROC where the test set has masks) of a model's raw outputs on a task's test set.

    Every test image is resized to the task's image size; AUROC ranks the raw scores and map values (torchmetrics'
    ``binary_auroc`` after a rank-preserving min-max scaling).

    Returns:
        dict: ``image_AUROC`` and, with masks, ``pixel_AUROC``.
    """
    datamodule = task.datamodule()
    datamodule.setup()
    items = list(datamodule.test_data)
    scores, maps, labels, masks = [], [], [], []
    for start in range(0, len(items), EVALUATION_BATCH):
        chunk = items[start : start + EVALUATION_BATCH]
        images = torch.stack([TF.resize(item.image, list(task.image_size), antialias=True) for item in chunk])
        anomaly_map, score = raw_predictions(model, images.clamp(0, 1))
        scores.append(score)
        maps.append(anomaly_map)
        labels += [int(item.gt_label) for item in chunk]
        if all(item.gt_mask is not None for item in chunk):
            masks += [
                TF.resize(
                    item.gt_mask.reshape(1, *item.gt_mask.shape[-2:]).float(),
                    list(task.image_size),
                    interpolation=InterpolationMode.NEAREST,
                )[0]
                for item in chunk
            ]
    target = torch.tensor(labels)
    metrics = {"image_AUROC": float(binary_auroc(_normalised(torch.cat(scores)), target))}
    if len(masks) == len(items) and any(mask.any() for mask in masks):
        values = _normalised(torch.cat(maps).flatten())
        metrics["pixel_AUROC"] = float(binary_auroc(values, (torch.stack(masks).flatten() > 0.5).long()))
    return metrics


def parameter_count(module: torch.nn.Module) -> int:
    """All parameters (trainable and frozen)."""
    return sum(parameter.numel() for parameter in module.parameters())


def buffer_count(module: torch.nn.Module) -> int:
    """All floating-point buffers (BatchNorm statistics, fitted normal statistics)."""
    return sum(buffer.numel() for buffer in module.buffers() if buffer.is_floating_point())


@torch.no_grad()
def flops_per_image(function: Callable[[torch.Tensor], object], image_size: tuple[int, int]) -> int:
    """Floating-point operations of one call on one image (``torch.utils.flop_counter``, 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter:
        function(torch.rand(1, 3, *image_size))
    return int(counter.get_total_flops())


def compute_report(student: CrossTaskStudent, teachers: dict[str, AnomalibModule], image_size: tuple[int, int]) -> dict:
    """Size and compute of the student (one trunk pass, all heads) against the teachers together.

    Memory counts every float32 tensor the deployed model holds: parameters and buffers, including the frozen
    heads' fitted normal statistics. The trunk is also compared with EfficientNet-Lite0 cut at the same levels
    (the teachers' feature extractor).
    """
    model = student.model.eval()
    reference = lite0_reference_trunk().eval()
    heads = {name: head for name, head in model.heads.items()}
    teacher_rows = {
        name: {
            "parameters": parameter_count(teacher.model),
            "bytes": 4 * (parameter_count(teacher.model) + buffer_count(teacher.model)),
            "flops": flops_per_image(teacher.model.eval(), image_size),
        }
        for name, teacher in teachers.items()
    }
    return {
        "trunk": model.trunk_name,
        "student_parameters": parameter_count(model),
        "student_bytes": 4 * (parameter_count(model) + buffer_count(model)),
        "student_normal_statistics": sum(
            buffer.numel() for head in heads.values() for name, buffer in head.named_buffers() if "normal_" in name
        ),
        "student_trunk_parameters": parameter_count(model.trunk),
        "student_trunk_flops": flops_per_image(model.trunk, image_size),
        "lite0_trunk_parameters": parameter_count(reference),
        "lite0_trunk_flops": flops_per_image(reference, image_size),
        "student_head_parameters": {name: parameter_count(head) for name, head in heads.items()},
        "student_head_bytes": {name: 4 * (parameter_count(head) + buffer_count(head)) for name, head in heads.items()},
        "student_flops": flops_per_image(model.forward_all, image_size),
        "teachers": teacher_rows,
        "teachers_parameters": sum(row["parameters"] for row in teacher_rows.values()),
        "teachers_bytes": sum(row["bytes"] for row in teacher_rows.values()),
        "teachers_flops": sum(row["flops"] for row in teacher_rows.values()),
    }


def cache_samples(
    tasks: list[PreparedTask],
    student: CrossTaskStudent,
    config: TrainingConfig,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, TaskSamples]:
    """Targets (and teacher features) of every task, the synthetic anomalies drawn from ``config.seed``.

    With several processes every process gets every sample (computed in shares and gathered, see
    :func:`~.targets.teacher_targets`).

    Args:
        tasks: The tasks.
        student: The student (its pre-processor and trunk).
        config: Training settings.
        device: Where the teachers run.
        log: Progress sink.

    Returns:
        dict[str, TaskSamples]: The samples per task.
    """
    seed_everything(config.seed, workers=True, verbose=False)  # the synthetic anomalies depend on the seed alone
    start = time.perf_counter()
    samples = {}
    distilled = config.targets == TargetKind.teacher
    features = distilled and config.feature_distillation and student.model.trunk_is_trainable
    for task in tasks:
        targets = teacher_targets(task, config.synthetic_per_image, teacher=distilled, features=features, device=device)
        samples[task.name] = build_task_samples(task.name, targets, student, config)
        log(f"task {task.name}: {len(samples[task.name])} samples cached ({time.perf_counter() - start:.0f} s)")
    return samples


def evaluate_teachers(tasks: list[PreparedTask]) -> dict[str, dict[str, float]]:
    """Each teacher's AUROCs on its task's test images."""
    return {task.name: test_metrics(task.teacher, task) for task in tasks}


def evaluate_student(student: CrossTaskStudent, tasks: list[PreparedTask]) -> dict[str, dict[str, float]]:
    """The student's AUROCs per task (its head selected in turn)."""
    student.eval()
    metrics = {}
    for task in tasks:
        student.select_task(task.name)
        metrics[task.name] = test_metrics(student, task)
    student.select_task(tasks[0].name)
    return metrics


def comparison(teacher: dict[str, dict[str, float]], student: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per task: teacher and student metrics and the fraction of the teacher's AUROC the student keeps."""
    rows = {}
    for name, values in student.items():
        row = {"teacher": teacher[name], "student": values}
        for metric in ("image_AUROC", "pixel_AUROC"):
            if metric in values and metric in teacher[name]:
                row[f"{metric}_retained"] = values[metric] / teacher[name][metric]
        rows[name] = row
    return rows


def save_checkpoint(student: CrossTaskStudent, path: Path) -> Path:
    """Write a Lightning checkpoint of the student (``CrossTaskStudent.load_from_checkpoint`` reads it).

    Only the weights, hyper-parameters and kd_ext's own entries are written (Lightning's ``weights_only=True``: no
    optimizer or callback states, which belong to the distillation, not to the student), so the file loads with
    ``torch.load(..., weights_only=True)``.
    """
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(student)
    trainer.save_checkpoint(path, weights_only=True)
    return path


def remove_previous_run(output: Path) -> None:
    """Delete an earlier run's files from ``output`` (``report.json`` first, so the folder reads as unfinished)."""
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)


def _silent(line: str) -> None:
    del line


def distill(config: DistillConfig, log: Callable[[str], None] = print, progress_bar: bool = True) -> DistillResult:
    """Distil the configured task teachers into one student; evaluate, save and export it.

    With several processes (``training.devices`` or torchrun) they train together (see the module's description)
    and only rank 0 logs.

    Args:
        config: Tasks, student, training and export settings.
        log: Progress sink.
        progress_bar: Show Lightning's progress bar (on stderr).

    Returns:
        DistillResult: The student, its files and the report (see :class:`DistillResult` for the other processes).

    Raises:
        ValueError: Before any work, naming the problem with ``output`` (inside a task's data folder, or an earlier
            run's files there without ``overwrite``: :meth:`~.config.DistillConfig.check_output`); before any
            training, naming every problem with the tasks (see :func:`prepare_tasks`) or with sharing the batches
            among the processes (:func:`~.data.check_process_shares`).
    """
    config.check_output()
    trainer = distillation_trainer(config.training, config.output, progress_bar=progress_bar)
    check_process_shares(config.training.batch_size, trainer.world_size)  # before any process waits for another
    return _distill(config, trainer, log if rank_zero_only.rank == 0 else _silent)


def _distill(config: DistillConfig, trainer: Trainer, log: Callable[[str], None]) -> DistillResult:
    training = config.training
    tasks = prepare_tasks(config.tasks)
    counts = {task.name: training_image_count(task) * (1 + training.synthetic_per_image) for task in tasks}
    check_process_shares(training.batch_size, trainer.world_size, counts)
    seed_everything(training.seed, workers=True, verbose=False)
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    image_size = tasks[0].image_size
    student = build_student([task.name for task in tasks], image_size, config.student)
    channels = {task.name: teacher_channels(task.teacher, image_size) for task in tasks}
    module = distillation_module(student, training, channels)
    data = DistillationData(
        training.batch_size,
        training.seed,
        build=lambda device: cache_samples(tasks, student, training, device, log),
    )
    start = time.perf_counter()
    history = fit_student(trainer, module, data)
    train_seconds = time.perf_counter() - start - data.build_seconds
    if trainer.global_rank != 0:  # rank 0 evaluates, saves and exports the same student
        return DistillResult(student=student, checkpoint=output / "student.ckpt", ir=None, report={})
    teacher_metrics = evaluate_teachers(tasks)
    student_metrics = evaluate_student(student, tasks)
    results = comparison(teacher_metrics, student_metrics)
    for task in tasks:
        results[task.name]["teacher_model"] = type(task.teacher).__name__
        log(f"task {task.name}: teacher {teacher_metrics[task.name]}, student {student_metrics[task.name]}")
    if config.overwrite:
        remove_previous_run(output)  # no file of the earlier run stays next to the new ones
    checkpoint = save_checkpoint(student, output / "student.ckpt")
    ir = None
    if config.export.precision != ExportPrecision.none:
        ir = export_all_tasks_openvino(
            student, output / "openvino" / "student.xml", image_size, config.export.precision
        )
    compute = compute_report(student, {task.name: task.teacher for task in tasks}, image_size)
    compute["training_only_adapter_parameters"] = module.adapter_parameter_count()
    report = {
        "tasks": results,
        "compute": compute,
        "cache_seconds": round(data.build_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "processes": trainer.world_size,
        "history": history,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "checkpoint": str(checkpoint),
        "openvino": str(ir) if ir else None,
    }
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return DistillResult(student=student, checkpoint=checkpoint, ir=ir, report=report)
