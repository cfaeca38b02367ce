"""Cross-task distillation benchmark: task teachers vs one multi-task student, per task, on real data.

Tasks: MVTec AD *bottle* and the hazelnut set, each with its own trained BiDirMSKD teacher (the 10-epoch
checkpoints of ``benchmarks/accuracy.py``; ``--train-teachers`` trains them if missing). The teachers' soft
targets and the student's trunk features are cached once and shared by every variant, so the variants differ
only in the loss:

- N = 2: fixed task weights + fixed temperature, DWA weights, adaptive (CTKD) temperature, both;
- N = 1: one BiDirMSKD (bottle) compressed into a one-head student with plain soft-label KD (fixed, fixed).

It also exports the teachers and the student to OpenVINO (FP32, f32 inference hint) and measures batch-1
latency interleaved in rounds: the teachers together, the student with all heads in one IR, and the student
one head at a time (one single-task IR per task).

Run (about an hour on 2 CPU cores):
    python benchmarks/cross_task.py --epochs 30
"""

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import seed_everything

from kd_ext.crosstask import DistillConfig, TaskConfig, TrainingConfig
from kd_ext.crosstask.distill import (
    build_student,
    cache_samples,
    comparison,
    compute_report,
    evaluate_student,
    evaluate_teachers,
)
from kd_ext.crosstask.export import export_all_tasks_openvino
from kd_ext.crosstask.tasks import prepare_tasks
from kd_ext.crosstask.training import train_student
from kd_ext.edge import EdgeModel
from kd_ext.export import export_openvino

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KD_EXT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
ACCURACY_RUNS = REPO / "kd_ext_runs" / "accuracy" / "BiDirMSKD"
TASKS = {
    "bottle": (DATA / "mvtec_ad", "bottle"),
    "hazelnut": (DATA, "hazelnut_toy"),
}
VARIANTS = {
    "fixed weights + fixed tau": {"task_weighting": "fixed", "temperature": "fixed"},
    "DWA + fixed tau": {"task_weighting": "dwa", "temperature": "fixed"},
    "fixed weights + adaptive tau": {"task_weighting": "fixed", "temperature": "adaptive"},
    "DWA + adaptive tau": {"task_weighting": "dwa", "temperature": "adaptive"},
}
N1_VARIANT = "N=1 soft-label KD (first task only)"


def teacher_checkpoint(category: str, train: bool, epochs: int) -> Path:
    """The accuracy benchmark's BiDirMSKD checkpoint for a category (trained here if asked and missing)."""
    found = sorted((ACCURACY_RUNS / category).rglob("model.ckpt"))
    if found:
        return found[-1]
    if not train:
        sys.exit(
            f"No BiDirMSKD teacher for {category} under {ACCURACY_RUNS}; run benchmarks/accuracy.py --rows BiDirMSKD "
            f"--categories {category}, or pass --train-teachers."
        )
    import subprocess

    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "accuracy.py"),
            "--rows",
            "BiDirMSKD",
            "--categories",
            category,
            "--epochs",
            str(epochs),
        ],
        check=True,
    )
    return sorted((ACCURACY_RUNS / category).rglob("model.ckpt"))[-1]


def latency_ms(runners: dict[str, callable], image: np.ndarray, rounds: int = 5, repeats: int = 10) -> dict[str, float]:
    """Median batch-1 latency per runner, measured in interleaved rounds (load hits every runner alike)."""
    for run in runners.values():
        run(image)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run(image)
            samples[name].append(1000 * (time.perf_counter() - start) / repeats)
    return {name: float(np.median(values)) for name, values in samples.items()}


def openvino_latencies(tasks: list, student, workdir: Path) -> dict[str, float]:
    """Batch-1 OpenVINO FP32 latency: teachers, the all-heads student IR, and single-head student IRs."""
    size = tasks[0].image_size
    runners = {}
    for task in tasks:
        xml = export_openvino(task.teacher, workdir / "teachers" / task.name, "fp32", input_size=size)
        runners[f"teacher {task.name}"] = EdgeModel(xml, mode="latency").predict
    all_heads = export_all_tasks_openvino(student, workdir / "student_all" / "student.xml", size)
    runners["student, all heads"] = EdgeModel(all_heads, task=tasks[0].name, mode="latency").predict
    for task in tasks:
        student.select_task(task.name)
        xml = export_openvino(student, workdir / "student_single" / task.name, "fp32", input_size=size)
        runners[f"student, head {task.name} only"] = EdgeModel(xml, mode="latency").predict
    student.select_task(tasks[0].name)
    image = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    return latency_ms(runners, image)


def render(report: dict, command: str) -> str:
    lines = [
        "# Cross-task distillation: task teachers vs one multi-task student",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only. "
        f"Teachers: BiDirMSKD (offline EfficientNet-Lite0 teacher, {report['teacher_epochs']} epochs, 256x256), "
        "one per task. Student: frozen EfficientNet-Lite0 trunk (blocks.1/2/4) shared by all tasks + one head per "
        f"task; {report['epochs']} epochs on cached teacher targets for each normal training image and "
        f"{report['synthetic_per_image']} Perlin synthetic anomalies per image (anomalib's generator), seed 0. "
        "AUROC on each task's full test set with anomalib's metrics; retained = student / teacher.",
        "",
        "## Accuracy per task",
        "",
        "| variant | task | teacher image AUROC | student image AUROC | retained | teacher pixel AUROC | "
        "student pixel AUROC | retained | final tau | final weight |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, row in report["variants"].items():
        last = row["history"][-1]
        for task, values in row["tasks"].items():
            teacher, student = values["teacher"], values["student"]
            lines.append(
                f"| {variant} | {task} | {teacher['image_AUROC']:.4f} | {student['image_AUROC']:.4f} | "
                f"{100 * values['image_AUROC_retained']:.1f} % | {teacher['pixel_AUROC']:.4f} | "
                f"{student['pixel_AUROC']:.4f} | {100 * values['pixel_AUROC_retained']:.1f} % | "
                f"{last['temperature'][task]:.2f} | {last['weight'][task]:.2f} |"
            )
    compute = report["compute"]
    latency = report["openvino_latency_ms"]
    teachers_latency = sum(value for name, value in latency.items() if name.startswith("teacher "))
    single = [value for name, value in latency.items() if name.startswith("student, head ")]
    lines += [
        "",
        f"## Size, compute and OpenVINO latency (N = {len(compute['teachers'])})",
        "",
        "| model | parameters | GFLOPs / image | OpenVINO FP32 batch-1 latency (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, teacher in compute["teachers"].items():
        lines.append(
            f"| teacher {name} (BiDirMSKD) | {teacher['parameters']:,} | {teacher['flops'] / 1e9:.2f} | "
            f"{latency[f'teacher {name}']:.1f} |"
        )
    lines += [
        f"| teachers together | {compute['teachers_parameters']:,} | {compute['teachers_flops'] / 1e9:.2f} | "
        f"{teachers_latency:.1f} |",
        f"| student, all heads (one IR) | {compute['student_parameters']:,} "
        f"(+ {compute['student_normal_statistics']:,} fitted normal statistics) | "
        f"{compute['student_flops'] / 1e9:.2f} | {latency['student, all heads']:.1f} |",
    ]
    lines += [
        f"| student, head {name.removeprefix('student, head ').removesuffix(' only')} only | | | {value:.1f} |"
        for name, value in latency.items()
        if name.startswith("student, head ")
    ]
    lines += [
        "",
        f"Student / teachers: {100 * compute['student_parameters'] / compute['teachers_parameters']:.1f} % of the "
        f"parameters, {100 * compute['student_flops'] / compute['teachers_flops']:.1f} % of the FLOPs, "
        f"{100 * latency['student, all heads'] / teachers_latency:.1f} % of the latency. Serving every task for an "
        f"image: all heads in one IR {latency['student, all heads']:.1f} ms vs one head at a time "
        f"{sum(single):.1f} ms (sum of the single-head IRs); one task alone: {min(single):.1f}-{max(single):.1f} ms.",
        "",
        f"Teacher targets cached in {report['cache_seconds']:.0f} s; training seconds per variant: "
        + ", ".join(f"{name} {row['train_seconds']:.0f}" for name, row in report["variants"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def train_variant(
    variant: str, base, tasks: list, samples: dict, teacher_metrics: dict, args: argparse.Namespace
) -> tuple:
    """Train one loss variant from a copy of the calibrated base student and test it per task."""
    seed_everything(0, workers=True)
    if variant == N1_VARIANT:
        first = tasks[0]
        config = DistillConfig(tasks=[first.config], output=args.workdir)
        student = build_student(config, first.image_size)
        student.model.heads[first.name].load_state_dict(base.model.heads[first.name].state_dict())
        variant_tasks, variant_samples = [first], {first.name: samples[first.name]}
        settings = VARIANTS["fixed weights + fixed tau"]
    else:
        student = copy.deepcopy(base)
        variant_tasks, variant_samples = tasks, samples
        settings = VARIANTS[variant]
    training = TrainingConfig(epochs=args.epochs, synthetic_per_image=args.synthetic_per_image, **settings)
    started = time.perf_counter()
    history = train_student(student, variant_samples, training, log=lambda line: print(line, flush=True))
    train_seconds = time.perf_counter() - started
    student_metrics, _ = evaluate_student(student, variant_tasks, args.workdir / "test" / variant.replace(" ", "_"))
    rows = comparison({task.name: teacher_metrics[task.name] for task in variant_tasks}, student_metrics)
    return student, {"tasks": rows, "history": history, "train_seconds": train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--synthetic-per-image", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--train-teachers", action="store_true", help="train missing teachers with accuracy.py")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, N1_VARIANT], choices=[*VARIANTS, N1_VARIANT])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="first: the N=1 task")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=REPO / "kd_ext_runs" / "cross_task")
    args = parser.parse_args()
    selected = {name: TASKS[name] for name in args.tasks}
    for root, category in selected.values():
        if not (root / category).is_dir():
            sys.exit(f"Data for '{category}' not found under {root}; see ../shared/data/README.md.")
    command = shlex.join(["python", "benchmarks/cross_task.py", *sys.argv[1:]])
    task_configs = [
        TaskConfig(name, teacher_checkpoint(category, args.train_teachers, args.teacher_epochs), root, category)
        for name, (root, category) in selected.items()
    ]
    config = DistillConfig(tasks=task_configs, output=args.workdir)
    seed_everything(0, workers=True)
    tasks = prepare_tasks(config.tasks)
    base = build_student(config, tasks[0].image_size)
    start = time.perf_counter()
    samples = cache_samples(tasks, base, args.synthetic_per_image)
    report = {
        "command": command,
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "synthetic_per_image": args.synthetic_per_image,
        "cache_seconds": time.perf_counter() - start,
        "variants": {},
    }
    teacher_metrics = evaluate_teachers(tasks, args.workdir / "test" / "teachers")
    print(json.dumps({"teachers": teacher_metrics}), flush=True)
    final_student = base  # the student whose size and speed are reported: "DWA + adaptive tau" when run
    for variant in args.variants:
        student, report["variants"][variant] = train_variant(variant, base, tasks, samples, teacher_metrics, args)
        print(json.dumps({variant: report["variants"][variant]["tasks"]}), flush=True)
        if variant != N1_VARIANT and (variant == "DWA + adaptive tau" or final_student is base):
            final_student = student
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "cross_task.json").write_text(json.dumps(report, indent=2) + "\n")  # partial results
    report["compute"] = compute_report(final_student, tasks)
    report["openvino_latency_ms"] = openvino_latencies(tasks, final_student, args.workdir / "openvino")
    (args.results / "cross_task.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / "cross_task.md").write_text(render(report, command))
    print((args.results / "cross_task.md").read_text())


if __name__ == "__main__":
    main()
