"""``distill``: N trained task teachers -> one multi-task student, evaluated per task and exported.

Steps: check every task (names, data, checkpoints, image sizes) -> cache teacher soft targets on normal and
synthetic images -> train -> test teacher and student per task with anomalib's metrics -> save the student's
checkpoint, one OpenVINO IR for all tasks and ``report.json``.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from lightning.pytorch import seed_everything
from torch.utils.flop_counter import FlopCounterMode

from kd_ext.models.cross_task import CrossTaskStudent

from .config import DistillConfig
from .export import export_all_tasks_openvino
from .tasks import PreparedTask, prepare_tasks
from .training import TaskSamples, build_task_samples, train_student


@dataclass
class DistillResult:
    """What :func:`distill` produced.

    Attributes:
        student: The trained student.
        checkpoint: Its Lightning checkpoint.
        ir: The multi-task OpenVINO IR (``None`` when export is off).
        report: Metrics, sizes, compute and training history (also in ``report.json``).
    """

    student: CrossTaskStudent
    checkpoint: Path
    ir: Path | None
    report: dict[str, Any]


def build_student(config: DistillConfig, image_size: tuple[int, int]) -> CrossTaskStudent:
    """The untrained student for the configured tasks."""
    return CrossTaskStudent(
        tasks=[task.name for task in config.tasks],
        backbone=config.student.backbone,
        layers=config.student.layers,
        hidden_channels=config.student.hidden_channels,
        image_size=image_size,
        top_k=config.student.top_k,
        visualizer=False,
    )


def test_metrics(model: AnomalibModule, task: PreparedTask, workdir: Path) -> tuple[dict[str, float], Engine]:
    """Image and pixel AUROC of a model on a task's test images (anomalib ``Engine.test``).

    Returns:
        tuple: The metrics and the engine (its trainer holds the model, for saving checkpoints).
    """
    engine = Engine(default_root_dir=workdir, logger=False, devices=1)
    metrics = engine.test(model, datamodule=task.datamodule(), verbose=False)[0]
    return {"image_AUROC": float(metrics["image_AUROC"]), "pixel_AUROC": float(metrics["pixel_AUROC"])}, engine


def parameter_count(module: torch.nn.Module) -> int:
    """All parameters (trainable and frozen)."""
    return sum(parameter.numel() for parameter in module.parameters())


@torch.no_grad()
def flops_per_image(function: Callable[[torch.Tensor], object], image_size: tuple[int, int]) -> int:
    """Floating-point operations of one call on one image (``torch.utils.flop_counter``, 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter:
        function(torch.rand(1, 3, *image_size))
    return int(counter.get_total_flops())


def compute_report(student: CrossTaskStudent, tasks: list[PreparedTask]) -> dict[str, Any]:
    """Parameters and FLOPs of the student (all heads, one trunk pass) against the teachers together.

    The heads' normal statistics (per-location means and spreads, fitted, not trained) are counted separately.
    """
    image_size = tasks[0].image_size
    model = student.model
    teachers = {
        task.name: {
            "parameters": parameter_count(task.teacher.model),
            "flops": flops_per_image(task.teacher.model.eval(), image_size),
        }
        for task in tasks
    }
    return {
        "student_parameters": parameter_count(model),
        "student_normal_statistics": sum(
            head.normal_mean.numel() + head.normal_std.numel() for head in model.heads.values()
        ),
        "student_trunk_parameters": parameter_count(model.trunk),
        "student_head_parameters": {name: parameter_count(head) for name, head in model.heads.items()},
        "student_flops": flops_per_image(model.forward_all, image_size),
        "teachers": teachers,
        "teachers_parameters": sum(teacher["parameters"] for teacher in teachers.values()),
        "teachers_flops": sum(teacher["flops"] for teacher in teachers.values()),
    }


def cache_samples(
    tasks: list[PreparedTask], student: CrossTaskStudent, synthetic_per_image: int, log: Callable[[str], None] = print
) -> dict[str, TaskSamples]:
    """Teacher targets and trunk features of every task (also fits each head's normal statistics)."""
    start = time.perf_counter()
    samples = {}
    for task in tasks:
        samples[task.name] = build_task_samples(task, student, synthetic_per_image)
        log(f"task {task.name}: {len(samples[task.name])} samples cached ({time.perf_counter() - start:.0f} s)")
    return samples


def evaluate_teachers(tasks: list[PreparedTask], workdir: Path) -> dict[str, dict[str, float]]:
    """Each teacher's image and pixel AUROC on its task's test images."""
    return {task.name: test_metrics(task.teacher, task, workdir / task.name)[0] for task in tasks}


def evaluate_student(
    student: CrossTaskStudent, tasks: list[PreparedTask], workdir: Path
) -> tuple[dict[str, dict[str, float]], Engine]:
    """The student's image and pixel AUROC per task (its head selected in turn).

    Returns:
        tuple: Metrics per task and the last engine (its trainer holds the student, for saving a checkpoint).
    """
    metrics = {}
    for task in tasks:
        student.select_task(task.name)
        metrics[task.name], engine = test_metrics(student, task, workdir / task.name)
    student.select_task(tasks[0].name)
    return metrics, engine


def comparison(teacher: dict[str, dict[str, float]], student: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per task: teacher and student metrics and the fraction of the teacher's AUROC the student keeps."""
    return {
        name: {
            "teacher": teacher[name],
            "student": student[name],
            "image_AUROC_retained": student[name]["image_AUROC"] / teacher[name]["image_AUROC"],
            "pixel_AUROC_retained": student[name]["pixel_AUROC"] / teacher[name]["pixel_AUROC"],
        }
        for name in student
    }


def distill(config: DistillConfig, log: Callable[[str], None] = print) -> DistillResult:
    """Distil the configured task teachers into one student; evaluate, save and export it.

    Args:
        config: Tasks, student, training and export settings.
        log: Progress sink.

    Returns:
        DistillResult: The student, its files and the report.

    Raises:
        ValueError: Before any training, naming every problem with the tasks (see :func:`prepare_tasks`).
    """
    tasks = prepare_tasks(config.tasks)
    seed_everything(config.training.seed, workers=True)
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    student = build_student(config, tasks[0].image_size)
    start = time.perf_counter()
    samples = cache_samples(tasks, student, config.training.synthetic_per_image, log)
    cache_seconds = time.perf_counter() - start
    history = train_student(student, samples, config.training, log)
    train_seconds = time.perf_counter() - start - cache_seconds
    teacher_metrics = evaluate_teachers(tasks, output / "test" / "teachers")
    student_metrics, engine = evaluate_student(student, tasks, output / "test" / "student")
    results = comparison(teacher_metrics, student_metrics)
    for task in tasks:
        results[task.name]["teacher_model"] = type(task.teacher).__name__
        log(f"task {task.name}: teacher {teacher_metrics[task.name]}, student {student_metrics[task.name]}")
    checkpoint = output / "student.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    ir = None
    if config.export.precision != "none":
        ir = export_all_tasks_openvino(
            student, output / "openvino" / "student.xml", tasks[0].image_size, config.export.precision
        )
    report = {
        "tasks": results,
        "compute": compute_report(student, tasks),
        "cache_seconds": round(cache_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "checkpoint": str(checkpoint),
        "openvino": str(ir) if ir else None,
    }
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return DistillResult(student=student, checkpoint=checkpoint, ir=ir, report=report)
