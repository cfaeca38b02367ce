"""Cross-task distillation benchmark: task teachers vs one small multi-task student and lightweight baselines.

Tasks (``--tasks``), each with its best loadable teacher of the accuracy benchmark (``kd_ext_runs/accuracy``,
seed 0): ``hazelnut`` (hazelnut_toy, BiDirMSKD), ``brain`` (brain MRI, anomalib Padim), ``ped2`` (UCSD Ped2 frames,
anomalib Padim; frame-level AUROC) and ``bottle`` (MVTec bottle, BiDirMSKD, when its checkpoint exists).

Rows (``--rows``), every trained one per seed (``--seeds``):

- ``fixed w + fixed tau``, ``DWA + fixed tau``, ``fixed w + adaptive tau``, ``DWA + adaptive tau``,
  ``uncertainty + adaptive tau``: the small trainable trunk (EfficientNet-Lite0 style, width 0.5) trained jointly
  on all tasks by feature + soft-target distillation; the ablation of the paper's two mechanisms;
- ``frozen-trunk prior student``: the earlier student (frozen Lite0 trunk, fitted-statistics heads), a baseline
  (``benchmarks/frozen_trunk.py``);
- ``small trunk, no distillation``: the same small trunk trained per task on the synthetic anomalies' own masks
  (a smaller model trained directly: one model per task, no teacher);
- ``N=1 soft-label KD``: the first task's teacher compressed into a one-head student with plain soft-label KD
  (no feature distillation, fixed weights and temperature; seed 003's single-task case).

Teacher targets are computed once per task and seed and shared by every row of that seed. Results are merged into
``cross_task.json`` after every row (``--resume`` skips finished rows; ``--render-only`` redraws md and png).

Run (2 CPU cores: about 10 minutes per row and seed at the defaults):
    nohup nice python benchmarks/cross_task.py --tasks hazelnut brain --seeds 0 1 2 > cross_task.log 2>&1 &
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import seed_everything

from kd_ext.distill.config import StudentConfig, TaskConfig, TrainingConfig
from kd_ext.distill.export import export_all_tasks_openvino
from kd_ext.distill.pipeline import build_student, compute_report, evaluate_student, test_metrics
from kd_ext.distill.targets import build_task_samples, teacher_targets
from kd_ext.distill.tasks import PreparedTask, prepare_tasks
from kd_ext.distill.teachers import teacher_channels
from kd_ext.distill.training import train_student
from kd_ext.models.cross_task import CrossTaskStudent, FeatureAdapters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_trunk import FrozenTrunkStudent, fit_frozen_heads

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KD_EXT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "kd_ext_runs" / "accuracy"
TASKS = {
    "hazelnut": ("BiDirMSKD", "hazelnut_toy", DATA, "mvtec", None),
    # BiDirMSKD + prior (0.884) ranked first on brain MRI, but its checkpoints predate the prior's current buffers;
    # anomalib Padim on the same teacher backbone is within 0.005 of it (0.880).
    "brain": ("anomalib_Padim", "brain_mri", DATA, "folder", "Padim"),
    "ped2": ("anomalib_Padim", "ucsd_ped2", DATA, "video", "Padim"),
    "bottle": ("BiDirMSKD", "bottle", DATA / "mvtec_ad", "mvtec", None),
}
JOINT = {
    "fixed w + fixed tau": {"task_weighting": "fixed", "temperature": "fixed"},
    "DWA + fixed tau": {"task_weighting": "dwa", "temperature": "fixed"},
    "fixed w + adaptive tau": {"task_weighting": "fixed", "temperature": "adaptive"},
    "DWA + adaptive tau": {"task_weighting": "dwa", "temperature": "adaptive"},
    "uncertainty + adaptive tau": {"task_weighting": "uncertainty", "temperature": "adaptive"},
}
FROZEN = "frozen-trunk prior student"
DIRECT = "small trunk, no distillation (per task)"
SINGLE = "N=1 soft-label KD (first task)"
ROWS = [*JOINT, FROZEN, DIRECT, SINGLE]
DEFAULT_ROWS = [
    "fixed w + fixed tau",
    "DWA + adaptive tau",
    FROZEN,
    DIRECT,
    "DWA + fixed tau",
    "fixed w + adaptive tau",
    SINGLE,
]
"""Run in this order (the reference and the full method first, so that a short run still compares them)."""


def teacher_checkpoint(folder: str, category: str) -> Path | None:
    """The accuracy benchmark's seed-0 checkpoint of a row and category, if it exists."""
    found = sorted((RUNS / folder / category / "seed0").rglob("model.ckpt"))
    return found[-1] if found else None


def task_configs(names: list[str], frame_stride: int) -> list[TaskConfig]:
    """Task configurations; exits naming what is missing."""
    configs = []
    for name in names:
        folder, category, root, layout, model = TASKS[name]
        checkpoint = teacher_checkpoint(folder, category)
        if checkpoint is None or not (root / category).is_dir():
            sys.exit(
                f"Task '{name}' needs {root / category} and a teacher under {RUNS / folder / category / 'seed0'} "
                f"(benchmarks/accuracy.py --rows {folder} --categories {category})."
            )
        configs.append(TaskConfig(name, checkpoint, root, category, model, layout, frame_stride))
    return configs


def run_row(
    row: str, tasks: list[PreparedTask], targets: dict, training: TrainingConfig, seed: int, log: callable
) -> tuple[dict, object]:
    """Train one row for one seed and test it on every task it serves.

    Returns:
        tuple: The row's record (metrics per task, history, seconds) and the last trained student.
    """
    groups: list[tuple[list[PreparedTask], StudentConfig, TrainingConfig]]
    small = StudentConfig()
    if row in JOINT:
        groups = [(tasks, small, replace(training, **JOINT[row]))]
    elif row == FROZEN:
        groups = [(tasks, small, replace(training, **JOINT["DWA + adaptive tau"]))]
    elif row == DIRECT:
        settings = {"targets": "synthetic", "feature_distillation": False, "task_weighting": "fixed"}
        groups = [([task], small, replace(training, temperature="fixed", **settings)) for task in tasks]
    else:
        fixed = {"task_weighting": "fixed", "temperature": "fixed", "feature_distillation": False}
        groups = [([tasks[0]], small, replace(training, **fixed))]
    record = {"tasks": {}, "history": {}, "train_seconds": 0.0, "seed": seed}
    student = None
    for group_tasks, student_config, group_training in groups:
        seed_everything(seed, workers=True)
        names = [task.name for task in group_tasks]
        student_class = FrozenTrunkStudent if row == FROZEN else CrossTaskStudent
        student = build_student(names, group_tasks[0].image_size, student_config, student_class)
        samples = {name: build_task_samples(name, targets[name], student, group_training) for name in names}
        if row == FROZEN:
            fit_frozen_heads(student, samples, {name: targets[name].clean_count for name in names})
        started = time.perf_counter()
        history = train_student(student, samples, group_training)
        record["train_seconds"] += time.perf_counter() - started
        record["history"][",".join(samples)] = history
        log(json.dumps({"history": ",".join(samples), "loss": history[-1]["loss"]}))
        record["tasks"].update(evaluate_student(student, group_tasks))
        channels = {name: task_samples.teacher_channels() for name, task_samples in samples.items()}
        record["adapter_parameters"] = adapter_parameter_count(student, channels)
    return record, student


def adapter_parameter_count(student: object, channels: dict[str, list[int]]) -> int:
    """Parameters of the training-only feature adapters (not deployed) to teachers with ``channels`` per level."""
    adapters = FeatureAdapters(student.model.trunk_channels(), channels)
    return sum(parameter.numel() for parameter in adapters.parameters())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(report: dict) -> dict[str, dict]:
    """Per row and task: mean and std of each metric over the seeds that ran, and the mean image AUROC over tasks."""
    summary = {}
    for row, runs in report["rows"].items():
        per_task: dict[str, dict[str, list[float]]] = {}
        for run in runs.values():
            for task, metrics in run["tasks"].items():
                for metric, value in metrics.items():
                    per_task.setdefault(task, {}).setdefault(metric, []).append(value)
        means = [
            statistics.fmean(run["tasks"][task]["image_AUROC"] for task in run["tasks"])
            for run in runs.values()
            if len(run["tasks"]) == len(report["tasks"])
        ]
        summary[row] = {
            "seeds": sorted(int(seed) for seed in runs),
            "tasks": {
                task: {metric: mean_std(values) for metric, values in metrics.items()}
                for task, metrics in per_task.items()
            },
            "mean_image_AUROC": mean_std(means) if means else None,
        }
    return summary


def latency_ms(runners: dict, image: np.ndarray, rounds: int = 3, repeats: int = 5) -> dict[str, float]:
    """Median batch-1 latency per runner, in interleaved rounds (load hits every runner alike)."""
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


def openvino_latencies(tasks: list[PreparedTask], students: dict, workdir: Path) -> dict[str, float]:
    """OpenVINO FP32 (f32 hint) batch-1 latency: each teacher's IR and each student's one IR for all tasks."""
    from kd_ext.edge import EdgeModel
    from kd_ext.export import export_openvino

    size = tasks[0].image_size
    runners = {}
    for task in tasks:
        xml = export_openvino(task.teacher, workdir / "teachers" / task.name, "fp32", input_size=size)
        # Threshold given: an IR exported without thresholding has no pred_label output (only speed is measured).
        runners[f"teacher {task.name}"] = EdgeModel(xml, mode="latency", threshold=0.5).predict
    for name, student in students.items():
        xml = export_all_tasks_openvino(student, workdir / name / "student.xml", size)
        runners[name] = EdgeModel(xml, task=student.tasks[0], mode="latency").predict
    image = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    return latency_ms(runners, image)


def _cell(values: tuple[float, float] | None, seeds: int) -> str:
    if values is None:
        return "-"
    mean, std = values
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def render(report: dict) -> str:
    """The markdown report."""
    summary = summarise(report)
    tasks = report["tasks"]
    teachers = report["teachers"]
    lines = [
        "# Cross-task distillation: task teachers vs one small multi-task student",
        "",
        "Commands (in order; later ones added rows with `--resume`): "
        + "; ".join(f"`{command}`" for command in report.get("commands", [report.get("command", "")])),
        "",
        f"Machine: {report['machine']}. Tasks: "
        + ", ".join(f"{name} ({report['task_sets'][name]}, teacher {teachers[name]['model']})" for name in tasks)
        + f". Images {report['image_size']}. Training per row and seed: {report['training']['epochs']} epochs over "
        f"the largest task's samples, each normal training image plus {report['training']['synthetic_per_image']} "
        f"Perlin synthetic anomalies of it, batch {report['training']['batch_size']} per task, random "
        f"{report['training']['crop_size']}x{report['training']['crop_size']} crops for the small trunk. Metrics "
        "rank raw outputs over each task's whole test set; teachers are deterministic (one run).",
        "",
        "## Accuracy (mean ± std over the seeds that ran)",
        "",
        "| row | seeds | "
        + " | ".join(f"{task} image AUROC" for task in tasks)
        + " | hazelnut pixel AUROC | mean image AUROC | retained (mean over tasks) |",
        "|---|---|" + "---:|" * (len(tasks) + 3),
    ]
    teacher_mean = statistics.fmean(teachers[task]["metrics"]["image_AUROC"] for task in tasks)
    teacher_pixel = teachers.get("hazelnut", {}).get("metrics", {}).get("pixel_AUROC", float("nan"))
    lines.append(
        "| teachers (one per task) | - | "
        + " | ".join(f"{teachers[task]['metrics']['image_AUROC']:.4f}" for task in tasks)
        + f" | {teacher_pixel:.4f} | {teacher_mean:.4f} | 100 % |"
    )
    for row, values in summary.items():
        seeds = len(values["seeds"])
        cells = [_cell(values["tasks"].get(task, {}).get("image_AUROC"), seeds) for task in tasks]
        pixel = _cell(values["tasks"].get("hazelnut", {}).get("pixel_AUROC"), seeds)
        retained = "-"
        if values["mean_image_AUROC"] is not None:
            retained = f"{100 * values['mean_image_AUROC'][0] / teacher_mean:.1f} %"
        lines.append(
            f"| {row} | {','.join(map(str, values['seeds']))} | {' | '.join(cells)} | {pixel} | "
            f"{_cell(values['mean_image_AUROC'], seeds)} | {retained} |"
        )
    lines += ["", *claims(summary), "", *compute_lines(report), "", *not_run_lines(report)]
    return "\n".join(lines) + "\n"


def claims(summary: dict) -> list[str]:
    """Whether each mechanism helps beyond the spread of the seeds (mean image AUROC over tasks)."""
    base = summary.get("fixed w + fixed tau", {}).get("mean_image_AUROC")
    lines = ["## Do DWA and the adaptive temperature help?", ""]
    if base is None:
        return [*lines, "The reference row (fixed weights + fixed tau) did not run."]
    for row in ("DWA + fixed tau", "fixed w + adaptive tau", "DWA + adaptive tau", "uncertainty + adaptive tau"):
        values = summary.get(row, {}).get("mean_image_AUROC")
        if values is None:
            continue
        seeds = len(summary[row]["seeds"])
        margin = values[0] - base[0]
        spread = max(values[1], base[1])
        if seeds < 2:
            verdict = "one seed only: no claim"
        elif abs(margin) > spread:
            verdict = "beyond the spread" + (" (better)" if margin > 0 else " (worse)")
        else:
            verdict = "within the spread: no effect shown"
        lines.append(
            f"- {row} vs fixed w + fixed tau: {margin:+.4f} mean image AUROC (spread {spread:.4f}): {verdict}."
        )
    return lines


def compute_lines(report: dict) -> list[str]:
    """Size, compute, memory and latency table."""
    compute = report.get("compute", {})
    if not compute:
        return ["Size and compute: not measured yet."]
    latency = report.get("openvino_latency_ms", {})
    small, frozen = compute.get("small"), compute.get("frozen")
    reference = small or frozen
    lines = [
        "## Size, compute and memory (serving every task for one image)",
        "",
        "Latency: interleaved rounds on the shared 2-core machine while other jobs ran (load average about 15), so "
        "only the ratios mean something; untrained students (latency and size do not depend on the weights).",
        "",
        "| model | parameters | memory (float32 params + buffers) | GFLOPs / image | OpenVINO FP32 batch-1 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in reference["teachers"].items():
        lines.append(
            f"| teacher {name} | {row['parameters']:,} | {row['bytes'] / 2**20:.1f} MiB | {row['flops'] / 1e9:.2f} | "
            f"{latency.get(f'teacher {name}', float('nan')):.1f} |"
        )
    lines.append(
        f"| teachers together | {reference['teachers_parameters']:,} | {reference['teachers_bytes'] / 2**20:.1f} MiB | "
        f"{reference['teachers_flops'] / 1e9:.2f} | "
        f"{sum(v for k, v in latency.items() if k.startswith('teacher ')):.1f} |"
    )
    for label, row in (("small-trunk student (all heads)", small), ("frozen-trunk prior student", frozen)):
        if row is None:
            continue
        statistics_note = (
            f" (incl. {row['student_normal_statistics']:,} fitted statistics)"
            if row["student_normal_statistics"]
            else ""
        )
        lines.append(
            f"| {label} | {row['student_parameters']:,} | {row['student_bytes'] / 2**20:.2f} MiB{statistics_note} | "
            f"{row['student_flops'] / 1e9:.3f} | {latency.get(label, float('nan')):.1f} |"
        )
    if small:
        lines += [
            "",
            f"Small trunk: {small['student_trunk_parameters']:,} parameters and "
            f"{small['student_trunk_flops'] / 1e9:.3f} GFLOPs against {small['lite0_trunk_parameters']:,} and "
            f"{small['lite0_trunk_flops'] / 1e9:.3f} for EfficientNet-Lite0 cut at the same levels (blocks.1/2/4) at "
            f"the same input: {100 * small['student_trunk_parameters'] / small['lite0_trunk_parameters']:.0f} % of the "
            f"parameters, {100 * small['student_trunk_flops'] / small['lite0_trunk_flops']:.0f} % of the FLOPs. "
            f"Heads: {', '.join(f'{k} {v:,}' for k, v in small['student_head_parameters'].items())} parameters; "
            f"training-only feature adapters {report.get('adapter_parameters', 0):,} (not deployed). "
            "Student / teachers: "
            f"{100 * small['student_flops'] / small['teachers_flops']:.1f} % of the FLOPs, "
            f"{100 * small['student_bytes'] / small['teachers_bytes']:.1f} % of the memory.",
        ]
    return lines


def not_run_lines(report: dict) -> list[str]:
    """What the issue's protocol asks for that this run did not do."""
    missing_tasks = [name for name in TASKS if name not in report["tasks"]]
    missing_rows = [row for row in ROWS if row not in report["rows"]]
    lines = ["## Not run here", ""]
    for name in missing_tasks:
        folder, category, *_ = TASKS[name]
        reason = (
            "its teacher checkpoint is missing"
            if teacher_checkpoint(folder, category) is None
            else "left out for time (2 shared CPU cores)"
        )
        lines.append(f"- Task {name} ({category}): not in this run, {reason}.")
    if missing_rows:
        lines.append(f"- Rows not run: {', '.join(missing_rows)}.")
    short = [row for row, runs in report["rows"].items() if len(runs) < 3]
    if short:
        lines.append(f"- Fewer than 3 seeds: {', '.join(short)}.")
    lines.append("- Teachers quantised to INT8 (not measured).")
    lines.append("- INT8 student IR and its map-accuracy check.")
    return lines


def plot(report: dict, path: Path) -> None:
    """Mean image AUROC over the tasks against GFLOPs for serving every task on one image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = report.get("compute", {})
    if not compute:
        return
    summary = summarise(report)
    reference = compute.get("small") or compute.get("frozen")
    tasks = report["tasks"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    teacher_mean = statistics.fmean(report["teachers"][task]["metrics"]["image_AUROC"] for task in tasks)
    axis.scatter([reference["teachers_flops"] / 1e9], [teacher_mean], marker="s", color="black", label="teachers")
    for row, values in summary.items():
        if values["mean_image_AUROC"] is None:
            continue
        kind = "frozen" if row == FROZEN else "small"
        if compute.get(kind) is None:
            continue
        flops = compute[kind]["student_flops"]
        if row == DIRECT:
            flops = compute[kind]["student_trunk_flops"] * len(tasks)  # one small model per task
        mean, std = values["mean_image_AUROC"]
        axis.errorbar([flops / 1e9], [mean], yerr=[std], fmt="o", capsize=3, label=row)
    axis.set_xscale("log")
    axis.set_xlabel("GFLOPs per image, every task served")
    axis.set_ylabel("mean image AUROC over the tasks")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def measure_compute(tasks: list[PreparedTask], args: argparse.Namespace) -> dict:
    """Size, compute, memory and OpenVINO latency of untrained small and frozen students against the teachers.

    None of these depends on the trained weights (the frozen heads' fitted statistics are allocated at
    construction), so they can be measured while the accuracy rows train.
    """
    teachers = {task.name: task.teacher for task in tasks}
    size = tasks[0].image_size
    names = [task.name for task in tasks]
    students = {
        "small-trunk student (all heads)": build_student(names, size, StudentConfig()),
        "frozen-trunk prior student": build_student(names, size, StudentConfig(), FrozenTrunkStudent),
    }
    small = students["small-trunk student (all heads)"]
    channels = {task.name: teacher_channels(task.teacher, size) for task in tasks}
    measured = {
        "compute": {
            "small": compute_report(small, teachers, size),
            "frozen": compute_report(students["frozen-trunk prior student"], teachers, size),
        },
        "adapter_parameters": adapter_parameter_count(small, channels),
    }
    path = args.results / "cross_task_compute.json"
    path.write_text(json.dumps(measured, indent=2))
    if not args.no_latency:
        measured["openvino_latency_ms"] = openvino_latencies(tasks, students, args.workdir / "openvino")
        path.write_text(json.dumps(measured, indent=2))
    return measured


def write(report: dict, results: Path) -> None:
    """Save JSON, markdown and plot (size and compute from ``cross_task_compute.json`` when measured apart)."""
    results.mkdir(parents=True, exist_ok=True)
    separate = results / "cross_task_compute.json"
    if "compute" not in report and separate.is_file():
        report.update(json.loads(separate.read_text()))
    (results / "cross_task.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "cross_task.md").write_text(render(report))
    plot(report, results / "cross_task.png")


def run_seeds(report: dict, tasks: list[PreparedTask], training: TrainingConfig, args: argparse.Namespace) -> None:
    """Every pending row for every seed; size, compute and latency once a small and a frozen student exist."""
    log = lambda line: print(line, flush=True)  # noqa: E731
    students = {}
    for seed in args.seeds:
        pending = [row for row in args.rows if str(seed) not in report["rows"].get(row, {})]
        if not pending:
            continue
        seed_everything(seed, workers=True)
        started = time.perf_counter()
        targets = {task.name: teacher_targets(task, args.synthetic_per_image) for task in tasks}
        log(f"seed {seed}: teacher targets in {time.perf_counter() - started:.0f} s")
        for row in pending:
            log(f"seed {seed}: {row}")
            record, student = run_row(row, tasks, targets, training, seed, log)
            report["rows"].setdefault(row, {})[str(seed)] = record
            log(json.dumps({row: record["tasks"], "seed": seed, "seconds": round(record["train_seconds"])}))
            if row == "DWA + adaptive tau":
                students["small-trunk student (all heads)"] = student
                report["adapter_parameters"] = record["adapter_parameters"]
            elif row == FROZEN:
                students["frozen-trunk prior student"] = student
            write(report, args.results)
        if students and "compute" not in report:
            report["compute"] = {}
            for label, student in students.items():
                kind = "frozen" if label.startswith("frozen") else "small"
                report["compute"][kind] = compute_report(
                    student, {task.name: task.teacher for task in tasks}, tasks[0].image_size
                )
            if not args.no_latency:
                report["openvino_latency_ms"] = openvino_latencies(tasks, students, args.workdir / "openvino")
            write(report, args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["hazelnut", "brain"], choices=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--synthetic-per-image", type=int, default=1)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frame-stride", type=int, default=40, help="Ped2 training frame stride")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of cross_task.json")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--compute-only", action="store_true", help="measure size, compute and latency into cross_task_compute.json"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=REPO / "kd_ext_runs" / "cross_task")
    args = parser.parse_args()
    path = args.results / "cross_task.json"
    if args.render_only:
        write(json.loads(path.read_text()), args.results)
        return
    log = lambda line: print(line, flush=True)  # noqa: E731
    training = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        synthetic_per_image=args.synthetic_per_image,
        crop_size=args.crop_size,
    )
    tasks = prepare_tasks(task_configs(args.tasks, args.frame_stride))
    if args.compute_only:
        args.results.mkdir(parents=True, exist_ok=True)
        measure_compute(tasks, args)
        return
    report = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    command = shlex.join(["python", "benchmarks/cross_task.py", *sys.argv[1:]])
    commands = report.get("commands", [report["command"]] if "command" in report else [])
    report.update(
        {
            "command": command,
            "commands": commands if command in commands else [*commands, command],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
            "tasks": [task.name for task in tasks],
            "task_sets": {task.name: task.config.category for task in tasks},
            "image_size": "x".join(map(str, tasks[0].image_size)),
            "training": {key: str(value) if isinstance(value, str) else value for key, value in vars(training).items()},
        }
    )
    report.setdefault("rows", {})
    if "teachers" not in report:
        report["teachers"] = {
            task.name: {"model": type(task.teacher).__name__, "metrics": test_metrics(task.teacher, task)}
            for task in tasks
        }
        log(json.dumps({"teachers": report["teachers"]}))
    run_seeds(report, tasks, training, args)
    write(report, args.results)
    print((args.results / "cross_task.md").read_text())


if __name__ == "__main__":
    main()
