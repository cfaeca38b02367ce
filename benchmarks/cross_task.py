r"""Cross-task distillation benchmark: task teachers vs one small multi-task student and lightweight baselines.

Primary tasks (the default ``--tasks``): the two abnormal-behaviour sets, ``ped1`` (UCSD Ped1) and ``ped2`` (UCSD
Ped2), frames scored as images with frame-level AUROC. Their teachers are the per-task BiDirMSKD with its
normal-feature prior (row ``BiDirMSKD +prior``) trained by the accuracy benchmark's ``screen`` protocol, seed 0, under
``kd_ext_runs/accuracy/screen-1/BiDirMSKD_+prior/ucsd_ped{1,2}/seed0`` (git-ignored). When absent, create them with::

    python benchmarks/accuracy.py --protocol screen --sets ucsd_ped1 ucsd_ped2 --rows 'BiDirMSKD +prior'

Those checkpoints are written before the prior is fitted; the prior is fitted here on the same training frames
(every 20th frame of each training clip, as in the screen) before the teacher scores or gives targets.
Extra tasks, with the teachers they had before (the accuracy benchmark's runs from before its protocol folders,
``kd_ext_runs/accuracy/<row>/<set>/seed0``): ``hazelnut`` (hazelnut_toy, BiDirMSKD), ``brain`` (brain MRI, anomalib
Padim) and ``bottle`` (MVTec bottle, BiDirMSKD). One student serves one input size: all teachers of a run must share
theirs.

Video frames: training (teacher targets, the prior's fit, the students) uses every ``--frame-stride``-th frame of each
training clip (default 20, the screen's); testing uses the test frames whose number in their clip is a multiple of
``--test-frame-stride`` (default 1: every test frame, the standard frame-level metric; the screen used 4). Teachers and
students are tested on the same frames.

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

The results page shows the teachers' row (each teacher on its own task's test frames), every row's mean AUROC over
the tasks, and the students' mean against the teachers' and against the same trunk trained without distillation.
Teacher targets are computed once per task and seed and shared by every row of that seed. Results are merged into
``cross_task.json`` in ``--results`` after every row (``--resume`` skips finished rows; ``--render-only`` redraws md
and png).

Run (the primary comparison: teachers, the student by distillation and the undistilled trunk, 3 seeds):
    nohup nice python benchmarks/cross_task.py --tasks ped1 ped2 --seeds 0 1 2 --rows 'DWA + adaptive tau' \
        'fixed w + fixed tau' 'small trunk, no distillation (per task)' > cross_task.log 2>&1 &
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
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

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
SCREEN_TEACHERS = "python benchmarks/accuracy.py --protocol screen --sets ucsd_ped1 ucsd_ped2 --rows 'BiDirMSKD +prior'"
"""Creates the primary tasks' teachers (one seed, 6 epochs, every 20th training frame)."""
EARLIER_TEACHERS = (
    "a run of the accuracy benchmark from before its protocol folders (today's benchmarks/accuracy.py writes under "
    "kd_ext_runs/accuracy/<protocol>/ instead)"
)


class TaskSpec(NamedTuple):
    """A task of the benchmark and its teacher.

    Attributes:
        run: The teacher's run folder under ``kd_ext_runs/accuracy`` (its ``<set>/seed0`` holds the checkpoint).
        category: Data set folder.
        root: Folder holding ``category``.
        layout: ``mvtec``, ``folder`` or ``video``.
        model: Teacher class name for anomalib checkpoints (kd_ext checkpoints record theirs).
        teacher: The teacher as the results page names it.
        create: What writes the teacher's checkpoint.
    """

    run: str
    category: str
    root: Path
    layout: str
    model: str | None
    teacher: str
    create: str


TASKS = {
    "ped1": TaskSpec(
        "screen-1/BiDirMSKD_+prior", "ucsd_ped1", DATA, "video", None, "BiDirMSKD +prior (screen-1)", SCREEN_TEACHERS
    ),
    "ped2": TaskSpec(
        "screen-1/BiDirMSKD_+prior", "ucsd_ped2", DATA, "video", None, "BiDirMSKD +prior (screen-1)", SCREEN_TEACHERS
    ),
    "hazelnut": TaskSpec("BiDirMSKD", "hazelnut_toy", DATA, "mvtec", None, "BiDirMSKD", EARLIER_TEACHERS),
    # BiDirMSKD + prior (0.884) ranked first on brain MRI, but its checkpoints predate the prior's current buffers;
    # anomalib Padim on the same teacher backbone is within 0.005 of it (0.880).
    "brain": TaskSpec("anomalib_Padim", "brain_mri", DATA, "folder", "Padim", "anomalib Padim", EARLIER_TEACHERS),
    "bottle": TaskSpec("BiDirMSKD", "bottle", DATA / "mvtec_ad", "mvtec", None, "BiDirMSKD", EARLIER_TEACHERS),
}
DEFAULT_TASKS = ["ped1", "ped2"]
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


def teacher_checkpoint(run: str, category: str) -> Path | None:
    """The accuracy benchmark's seed-0 checkpoint of a run folder and category, if it exists."""
    found = sorted((RUNS / run / category / "seed0").rglob("model.ckpt"))
    return found[-1] if found else None


def task_configs(names: list[str], frame_stride: int, test_frame_stride: int = 1) -> list[TaskConfig]:
    """Task configurations (video tasks strided as given); exits naming what is missing and how to create it."""
    configs = []
    for name in names:
        spec = TASKS[name]
        checkpoint = teacher_checkpoint(spec.run, spec.category)
        if not (spec.root / spec.category).is_dir():
            sys.exit(f"Task '{name}' needs its data in {spec.root / spec.category} (see ../shared/data/README.md).")
        if checkpoint is None:
            sys.exit(
                f"Task '{name}' needs its teacher, a model.ckpt under {RUNS / spec.run / spec.category / 'seed0'}, "
                f"written by {spec.create}."
            )
        configs.append(
            TaskConfig(
                name,
                checkpoint,
                spec.root,
                spec.category,
                spec.model,
                spec.layout,
                frame_stride,
                test_frame_stride,
            )
        )
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
        started = time.perf_counter()
        record["tasks"].update(evaluate_student(student, group_tasks))
        record["test_seconds"] = record.get("test_seconds", 0.0) + time.perf_counter() - started
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
    """Per row and task: mean and std of each metric over the seeds that ran, and the mean AUROC over the tasks.

    The mean is over each run's ``image_AUROC`` of every task (a video task's frame AUROC).
    """
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


def _layout(report: dict, task: str) -> str:
    """A task's data layout (from the report; older reports: from ``TASKS``)."""
    return report.get("task_layouts", {}).get(task) or (TASKS[task].layout if task in TASKS else "mvtec")


def _metric_name(report: dict, task: str) -> str:
    """``frame AUROC`` for video tasks (every test frame is an image), else ``image AUROC``."""
    return "frame AUROC" if _layout(report, task) == "video" else "image AUROC"


def _mean_name(report: dict) -> str:
    """What the mean over the tasks averages."""
    names = {_metric_name(report, task) for task in report["tasks"]}
    return f"mean {names.pop()}" if len(names) == 1 else "mean AUROC (frame for video tasks, image otherwise)"


def _every(stride: int, split: str) -> str:
    """``one frame in 20 of each training clip (frame numbers 0, 20, 40, ...)``; every frame for a stride of 1."""
    if stride == 1:
        return f"every frame of each {split} clip"
    return f"one frame in {stride} of each {split} clip (frame numbers 0, {stride}, {2 * stride}, ...)"


def video_lines(report: dict) -> str:
    """Which frames of the video tasks were used, for the results page (empty without video tasks)."""
    video = [task for task in report["tasks"] if _layout(report, task) == "video"]
    if not video:
        return ""
    train = report.get("frame_stride")
    test = report.get("test_frame_stride", 1)
    trained = "strided training frames" if train is None else _every(train, "training")
    tested = (
        "every test frame of the test clips (the standard frame-level metric: all test frames pooled)"
        if test == 1
        else f"{_every(test, 'test')}, not every test frame"
    )
    return (
        f" Video tasks ({', '.join(video)}): teacher targets, the teachers' prior fit and the students' training use "
        f"{trained}; teachers and students are tested on {tested}, scored per frame (frame AUROC)."
    )


def render(report: dict) -> str:
    """The markdown report."""
    summary = summarise(report)
    tasks = report["tasks"]
    teachers = report["teachers"]
    pixel_tasks = [task for task in tasks if "pixel_AUROC" in teachers[task]["metrics"]]
    mean_name = _mean_name(report)
    lines = [
        "# Cross-task distillation: task teachers vs one small multi-task student",
        "",
        "Commands (in order; later ones added rows with `--resume`): "
        + "; ".join(f"`{command}`" for command in report.get("commands", [report.get("command", "")])),
        "",
        f"Machine: {report['machine']}. Tasks: "
        + ", ".join(
            f"{name} ({report['task_sets'][name]}, teacher {teachers[name].get('label', teachers[name]['model'])})"
            for name in tasks
        )
        + f". Images {report['image_size']}. Training per row and seed: {report['training']['epochs']} epochs over "
        f"the largest task's samples, each normal training image plus {report['training']['synthetic_per_image']} "
        f"Perlin synthetic anomalies of it, batch {report['training']['batch_size']} per task, random "
        f"{report['training']['crop_size']}x{report['training']['crop_size']} crops for the small trunk. Metrics "
        "rank raw outputs over each task's test images; teachers are deterministic (one run)." + video_lines(report),
        "",
        "## Accuracy (mean ± std over the seeds that ran)",
        "",
        "| row | seeds | "
        + " | ".join(f"{task} {_metric_name(report, task)}" for task in tasks)
        + "".join(f" | {task} pixel AUROC" for task in pixel_tasks)
        + f" | {mean_name} | retained (mean over tasks) |",
        "|---|---|" + "---:|" * (len(tasks) + len(pixel_tasks) + 2),
    ]
    teacher_mean = statistics.fmean(teachers[task]["metrics"]["image_AUROC"] for task in tasks)
    lines.append(
        "| teachers (one per task) | - | "
        + " | ".join(f"{teachers[task]['metrics']['image_AUROC']:.4f}" for task in tasks)
        + "".join(f" | {teachers[task]['metrics']['pixel_AUROC']:.4f}" for task in pixel_tasks)
        + f" | {teacher_mean:.4f} | 100 % |"
    )
    for row, values in summary.items():
        seeds = len(values["seeds"])
        cells = [_cell(values["tasks"].get(task, {}).get("image_AUROC"), seeds) for task in tasks]
        cells += [_cell(values["tasks"].get(task, {}).get("pixel_AUROC"), seeds) for task in pixel_tasks]
        retained = "-"
        if values["mean_image_AUROC"] is not None:
            retained = f"{100 * values['mean_image_AUROC'][0] / teacher_mean:.1f} %"
        lines.append(
            f"| {row} | {','.join(map(str, values['seeds']))} | {' | '.join(cells)} | "
            f"{_cell(values['mean_image_AUROC'], seeds)} | {retained} |"
        )
    lines += [
        "",
        *comparison_lines(summary, teacher_mean, mean_name),
        "",
        *claims(summary),
        "",
        *compute_lines(report),
        "",
        *not_run_lines(report),
    ]
    return "\n".join(lines) + "\n"


def _verdict(margin: float, spread: float, seeds: int, shown: str = "effect") -> str:
    if seeds < 2:
        return "one seed only: no claim"
    if abs(margin) > spread:
        return "beyond the spread" + (" (better)" if margin > 0 else " (worse)")
    return f"within the spread: no {shown} shown"


def comparison_lines(summary: dict, teacher_mean: float, mean_name: str) -> list[str]:
    """The distilled students' mean over the tasks against the teachers' (deterministic) and the undistilled trunk's.

    A difference counts only beyond the spread: the student's standard deviation over its seeds against the teachers,
    the larger of the two rows' standard deviations against the undistilled trunk.
    """
    lines = ["## The student against the teachers and the undistilled trunk", ""]
    direct = summary.get(DIRECT, {}).get("mean_image_AUROC")
    rows = [
        row for row in ("DWA + adaptive tau", "fixed w + fixed tau") if summary.get(row, {}).get("mean_image_AUROC")
    ]
    if not rows:
        return [*lines, "No distilled student row over every task ran yet."]
    for row in rows:
        mean, std = summary[row]["mean_image_AUROC"]
        seeds = len(summary[row]["seeds"])
        margin = mean - teacher_mean
        text = (
            f"- {row}: {mean_name} {mean:.4f} ± {std:.4f} ({seeds} seed{'s' if seeds > 1 else ''}). Against the "
            f"teachers ({teacher_mean:.4f}): "
            f"{margin:+.4f}, {_verdict(margin, std, seeds, 'difference')}."
        )
        if direct is None:
            text += f" Against {DIRECT}: not run."
        else:
            margin = mean - direct[0]
            spread = max(std, direct[1])
            verdict = _verdict(margin, spread, min(seeds, len(summary[DIRECT]["seeds"])), "difference")
            text += (
                f" Against {DIRECT} ({direct[0]:.4f} ± {direct[1]:.4f}): {margin:+.4f} (spread {spread:.4f}), "
                f"{verdict}."
            )
        lines.append(text)
    return lines


def claims(summary: dict) -> list[str]:
    """Whether each mechanism helps beyond the spread of the seeds (mean AUROC over the tasks)."""
    base = summary.get("fixed w + fixed tau", {}).get("mean_image_AUROC")
    lines = ["## Do DWA and the adaptive temperature help?", ""]
    if base is None:
        return [*lines, "The reference row (fixed weights + fixed tau) did not run."]
    for row in ("DWA + fixed tau", "fixed w + adaptive tau", "DWA + adaptive tau", "uncertainty + adaptive tau"):
        values = summary.get(row, {}).get("mean_image_AUROC")
        if values is None:
            continue
        seeds = min(len(summary[row]["seeds"]), len(summary["fixed w + fixed tau"]["seeds"]))
        margin = values[0] - base[0]
        spread = max(values[1], base[1])
        lines.append(
            f"- {row} vs fixed w + fixed tau: {margin:+.4f} mean AUROC over the tasks (spread {spread:.4f}): "
            f"{_verdict(margin, spread, seeds)}."
        )
    if len(lines) == 2:
        lines.append("No ablation row ran beside the reference.")
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
        spec = TASKS[name]
        reason = (
            "its teacher checkpoint is missing"
            if teacher_checkpoint(spec.run, spec.category) is None
            else "an extra task, not in this run"
        )
        lines.append(f"- Task {name} ({spec.category}, teacher {spec.teacher}): not in this run, {reason}.")
    if missing_rows:
        lines.append(f"- Rows not run: {', '.join(missing_rows)}.")
    short = [row for row, runs in report["rows"].items() if len(runs) < 3]
    if short:
        lines.append(f"- Fewer than 3 seeds: {', '.join(short)}.")
    lines.append("- Teachers quantised to INT8 (not measured).")
    lines.append("- INT8 student IR and its map-accuracy check.")
    return lines


def plot(report: dict, path: Path) -> None:
    """Mean AUROC over the tasks against GFLOPs for serving every task on one image."""
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
    axis.set_ylabel(f"{_mean_name(report)} over the tasks")
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
    """Save JSON, markdown and plot (size and compute from ``cross_task_compute.json`` when measured apart for the
    same tasks)."""
    results.mkdir(parents=True, exist_ok=True)
    separate = results / "cross_task_compute.json"
    if "compute" not in report and separate.is_file():
        measured = json.loads(separate.read_text())
        if set(measured["compute"]["small"]["teachers"]) == set(report["tasks"]):
            report.update(measured)
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
            seconds = {"train_seconds": round(record["train_seconds"]), "test_seconds": round(record["test_seconds"])}
            log(json.dumps({row: record["tasks"], "seed": seed, **seconds}))
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
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--synthetic-per-image", type=int, default=1)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--frame-stride", type=int, default=20, help="video tasks train on every n-th frame of each training clip"
    )
    parser.add_argument(
        "--test-frame-stride",
        type=int,
        default=1,
        help="video tasks test on every n-th frame of each test clip (default 1: every test frame)",
    )
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
    started = time.perf_counter()
    tasks = prepare_tasks(task_configs(args.tasks, args.frame_stride, args.test_frame_stride))
    log(f"tasks prepared (teachers loaded, priors fitted where pending) in {time.perf_counter() - started:.0f} s")
    if args.compute_only:
        args.results.mkdir(parents=True, exist_ok=True)
        measure_compute(tasks, args)
        return
    if path.is_file() and not args.resume:
        sys.exit(f"{path} holds earlier runs: add to them with --resume, or write elsewhere with --results DIR.")
    report = json.loads(path.read_text()) if path.is_file() else {}
    strides = {"frame_stride": args.frame_stride, "test_frame_stride": args.test_frame_stride}
    settings = {"tasks": [task.name for task in tasks], **strides}
    changed = [key for key, value in settings.items() if report.get(key, value) != value]
    if changed:
        sys.exit(f"--resume: {path} was run with other {', '.join(changed)}; give the same or another --results.")
    command = shlex.join(["python", "benchmarks/cross_task.py", *sys.argv[1:]])
    commands = report.get("commands", [report["command"]] if "command" in report else [])
    report.update(
        {
            "command": command,
            "commands": commands if command in commands else [*commands, command],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only",
            "tasks": [task.name for task in tasks],
            "task_sets": {task.name: task.config.category for task in tasks},
            "task_layouts": {task.name: task.config.layout.value for task in tasks},
            **strides,
            "image_size": "x".join(map(str, tasks[0].image_size)),
            "training": {key: str(value) if isinstance(value, str) else value for key, value in vars(training).items()},
        }
    )
    report.setdefault("rows", {})
    if "teachers" not in report:
        started = time.perf_counter()
        report["teachers"] = {
            task.name: {
                "model": type(task.teacher).__name__,
                "label": TASKS[task.name].teacher,
                "checkpoint": str(task.config.checkpoint.relative_to(REPO)),
                "checkpoint_written": datetime.fromtimestamp(task.config.checkpoint.stat().st_mtime, UTC).isoformat(
                    timespec="seconds"
                ),
                "metrics": test_metrics(task.teacher, task),
            }
            for task in tasks
        }
        report["teacher_test_seconds"] = round(time.perf_counter() - started, 1)
        log(json.dumps({"teachers": report["teachers"], "seconds": report["teacher_test_seconds"]}))
    run_seeds(report, tasks, training, args)
    write(report, args.results)
    print((args.results / "cross_task.md").read_text())


if __name__ == "__main__":
    main()
