"""Transfer-learning anomaly detection on brain MRI and ECG: one report from the two benchmarks' JSON results.

Nothing is trained here. The brain MRI runs come from ``benchmarks/accuracy.py`` (set ``brain_mri``, per-image scores
in ``accuracy.json``), the ECG runs from ``benchmarks/signals.py`` (``signals.json``, per-series scores of the official
split). This script writes ``signals_medical.md``, ``signals_medical.json`` and one ROC figure per modality
(``signals_medical_mri_roc.png``, ``signals_medical_ecg_roc.png``: one panel per method, one curve per seed).

    python benchmarks/signals_medical_report.py

The commands that produced the runs are listed in the Markdown.
"""

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_report as report

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL, EPOCHS, SET = "dev-1", 10, "brain_mri"
OUTPUT = "signals_medical"
MRI_ROWS = (
    "BiDirMSKD",
    "BiDirMSKD +finetune",
    "BiDirMSKD reverse-only",
    "BiDirMSKD reverse-only +finetune",
    "MTHF",
    "MTHF +finetune",
    "BiDirMSKD +prior",
    "anomalib Padim",
    "anomalib Patchcore",
    "anomalib Stfpm",
)
FINETUNE_PAIRS = (
    ("BiDirMSKD +finetune", "BiDirMSKD"),
    ("BiDirMSKD reverse-only +finetune", "BiDirMSKD reverse-only"),
    ("MTHF +finetune", "MTHF"),
)
MRI_METRICS = {"image_AUROC": "image AUROC", "image_F1Max": "image F1max"}
ECG_METRICS = {"auroc": "AUROC", "f1": "F1", "accuracy": "accuracy", "recall": "recall"}
MRI_COMMANDS = (
    "python benchmarks/accuracy.py --sets brain_mri --rows BiDirMSKD 'BiDirMSKD +prior' 'anomalib Padim' "
    "'anomalib Patchcore' 'anomalib Stfpm' --seeds 0 1 2 --resume   # earlier runs, see accuracy.md",
    "python benchmarks/accuracy.py --sets brain_mri --rows 'BiDirMSKD reverse-only' MTHF 'BiDirMSKD +finetune' "
    "'BiDirMSKD reverse-only +finetune' 'MTHF +finetune' --seeds 0 1 2 --resume",
    "python benchmarks/accuracy.py --sets brain_mri --rows BiDirMSKD 'BiDirMSKD +prior' 'anomalib Padim' "
    "'anomalib Patchcore' 'anomalib Stfpm' --seeds 0 1 2 --rescore   # per-image scores from the stored checkpoints",
)
GREYSCALE_NOTE = (
    "Greyscale: anomalib's `Folder` reads every slice as RGB, so a greyscale slice reaches the model as three equal "
    "channels; the ImageNet teacher's stem sums its three colour filters over them, which is what a one-channel stem "
    "with summed weights would compute, so nothing is lost and the pretrained weights are used unchanged. Mixed sizes: "
    "`Folder` collates a batch at the size of its largest slice and the pre-processor resizes to 256x256."
)

FINETUNE_NOTE = (
    'Teacher fine-tuning (`+finetune`, `teacher_finetune="synthetic"`): before distillation the teacher\'s last two '
    "stages are adapted to the 60 normal training slices by segmenting anomalib's Perlin synthetic anomalies drawn on "
    "them, with an L2-SP penalty towards the ImageNet weights, batch-norm statistics kept; then the teacher is frozen "
    "and distillation runs as for the frozen rows (`kd_ext/models/components/finetune.py`; schedule fixed before any "
    "test slice was scored)."
)


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[list[float], list[float]]:
    """False- and true-positive rates at every distinct score threshold (abnormal = 1 is positive), from (0, 0)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        msg = "A ROC curve needs both normal and abnormal samples."
        raise ValueError(msg)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tpr = np.r_[0, np.cumsum(y)[last]] / positives
    fpr = np.r_[0, np.cumsum(1 - y)[last]] / negatives
    return fpr.round(6).tolist(), tpr.round(6).tolist()


def auc(fpr: Sequence[float], tpr: Sequence[float]) -> float:
    """Area under a ROC curve (trapezoids; ties count half, as the Mann-Whitney AUROC)."""
    return float(np.trapezoid(tpr, fpr))


def summary(values: Sequence[float], deterministic: bool) -> dict:
    value = report.stat(values, deterministic=deterministic)
    return {"mean": value.mean, "std": value.std, "n": value.n}


def mean_std(cell: dict | None, digits: int = 4) -> str:
    if not cell:
        return "—"
    text = f"{cell['mean']:.{digits}f}"
    return text + (f" ± {cell['std']:.{digits}f}" if cell["n"] > 1 and cell["std"] is not None else "")


def mri_section(runs: list[dict]) -> dict:
    """Per-row metrics over seeds and ROC curves of every brain MRI run of the current protocol."""
    section = {}
    for row in MRI_ROWS:
        chosen = (run for run in runs if run["row"] == row and run["set"] == SET)
        mine = sorted((run for run in chosen if report.in_protocol(run, PROTOCOL, EPOCHS)), key=lambda run: run["seed"])
        if not mine:
            continue
        one_pass = all(run.get("one_pass", False) for run in mine)
        entry = {
            "seeds": [run["seed"] for run in mine],
            "one_pass": one_pass,
            "metrics": {
                name: summary([run["metrics"][name] for run in mine], one_pass)
                for name in MRI_METRICS
                if all(name in run["metrics"] for run in mine)
            },
            "fit_seconds": statistics.fmean(run["fit_seconds"] for run in mine),
            "roc": {},
            "teacher_finetune": [report for run in mine for report in run.get("teacher_finetune", [])],
        }
        for run in mine:
            scores = run.get("image_scores")
            if scores:
                fpr, tpr = roc_curve(scores["gt_label"], scores["pred_score"])
                entry["roc"][str(run["seed"])] = {"fpr": fpr, "tpr": tpr, "auroc": auc(fpr, tpr)}
        section[row] = entry
    return section


def ecg_section(runs: list[dict]) -> dict:
    """Per-row CV and test metrics and test-split ROC curves of the ECG200 benchmark."""
    section = {}
    for row in dict.fromkeys(run["row"] for run in runs):
        mine = [run for run in runs if run["row"] == row]
        cv = [run for run in mine if run["split"] != "test"]
        test = sorted((run for run in mine if run["split"] == "test"), key=lambda run: run["seed"])
        seeded = len(test) > 1
        entry = {
            "input": mine[0].get("input"),
            "cv": {key: summary([run["metrics"][key] for run in cv], False) for key in ECG_METRICS} if cv else {},
            "test": {key: summary([run["metrics"][key] for run in test], not seeded) for key in ECG_METRICS}
            if test
            else {},
            "roc": {},
        }
        for run in test:
            if "scores" in run:
                fpr, tpr = roc_curve(run["labels"], run["scores"])
                entry["roc"][str(run["seed"])] = {"fpr": fpr, "tpr": tpr, "auroc": auc(fpr, tpr)}
        section[row] = entry
    return section


def finetune_lines(mri: dict) -> list[str]:
    """Fine-tuned vs frozen teacher, per metric: 'helps' / 'hurts' only when the margin exceeds the two spreads."""
    lines = []
    for tuned, frozen in FINETUNE_PAIRS:
        if tuned not in mri or frozen not in mri:
            lines.append(f"- {tuned} vs {frozen}: not both run yet.")
            continue
        parts = []
        for name, label in MRI_METRICS.items():
            a, b = mri[tuned]["metrics"].get(name), mri[frozen]["metrics"].get(name)
            if not a or not b:
                continue
            margin = a["mean"] - b["mean"]
            if a["std"] is None or b["std"] is None or min(a["n"], b["n"]) < 2:
                verdict = "spread unknown (fewer than 2 seeds), no claim"
            else:
                spread = a["std"] + b["std"]
                verdict = (
                    ("**fine-tuning helps**" if margin > 0 else "**fine-tuning hurts**")
                    if abs(margin) > spread
                    else "no difference beyond the seed spread"
                )
                verdict += f", spread {spread:.4f}"
            parts.append(f"{label} {margin:+.4f} ({verdict})")
        seeds = f"{len(mri[tuned]['seeds'])} / {len(mri[frozen]['seeds'])} seeds"
        lines.append(f"- {tuned} vs {frozen} ({seeds}): " + "; ".join(parts))
    return lines


def adaptation_lines(mri: dict) -> list[str]:
    """What the fine-tuning stage did in the ``+finetune`` runs (training data only): loss and weight shift."""
    lines = []
    for name, entry in mri.items():
        reports = entry.get("teacher_finetune", [])
        if not reports:
            continue
        first = statistics.fmean(report["first_loss"] for report in reports)
        last = statistics.fmean(report["last_loss"] for report in reports)
        shift = statistics.fmean(report["weight_shift"] for report in reports)
        lines.append(
            f"- {name}: {reports[0]['steps']} steps per teacher; synthetic-anomaly segmentation loss {first:.3f} "
            f"(first batch) -> {last:.3f} (last epoch); trained weights moved by {shift:.2%} of their norm (mean of "
            f"{len(reports)} teacher(s) over the seeds)."
        )
    if lines:
        lines = ["The adaptation stage, on the normal training slices:", "", *lines, ""]
    return lines


def plot_rocs(section: dict, title: str, path: Path) -> bool:
    """One panel per method with its ROC curve per seed; ``False`` when no method has scores."""
    methods = [name for name, entry in section.items() if entry["roc"]]
    if not methods:
        return False
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(methods))
    rows = -(-len(methods) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(methods) :]:
        axis.axis("off")
    for axis, name in zip(axes.flat, methods, strict=False):
        aurocs = []
        for seed, curve in section[name]["roc"].items():
            axis.plot(curve["fpr"], curve["tpr"], linewidth=1.2, label=f"seed {seed}")
            aurocs.append(curve["auroc"])
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
        text = f"{statistics.fmean(aurocs):.3f}" + (f" ± {statistics.stdev(aurocs):.3f}" if len(aurocs) > 1 else "")
        plotted = f"{len(aurocs)} seed{'s' if len(aurocs) > 1 else ''}"
        axis.set_title(f"{name}\nAUROC {text} ({plotted} plotted)", fontsize=8.5)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.01)
        axis.set_aspect("equal")
        axis.tick_params(labelsize=7)
        axis.set_xlabel("false-positive rate", fontsize=7.5)
        axis.set_ylabel("true-positive rate", fontsize=7.5)
        axis.legend(fontsize=6.5, loc="lower right", frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def render(data: dict, mri_png: str | None, ecg_png: str | None) -> str:
    mri, ecg = data["mri"], data["ecg"]
    lines = [
        "# Transfer learning for medical images and ECG",
        "",
        "Seed 004: anomaly detection with a model pretrained on a large data set and adapted to a small one; reverse "
        "distillation for medical images; for ECG, normalisation, a CNN + recurrent hybrid and cross-validated AUROC, "
        "F1, accuracy and recall. Built from `accuracy.json` and `signals.json` by "
        "`python benchmarks/signals_medical_report.py`; nothing here was chosen on test data.",
        "",
        "## Brain MRI (image level)",
        "",
        "Protocol `dev-1` of `benchmarks/accuracy.py` (see `accuracy.md`): anomalib's `Folder` on `../shared/data/"
        "brain_mri` (60 normal training slices; test 19 normal, 78 tumour), EfficientNet-Lite0 ImageNet teacher, "
        "256x256, batch 8, 10 epochs, seeds 0, 1, 2 for trained rows; Padim and Patchcore deterministic, once. Scores "
        "are raw (no normalisation or threshold). Image F1max takes the best threshold over the test scores (an "
        "optimistic figure, with a floor of 0.891 from calling every slice a tumour); AUROC is the comparison.",
        "",
        GREYSCALE_NOTE,
        "",
        FINETUNE_NOTE,
        "",
        "| method | seeds | image AUROC | image F1max | fit s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in mri.items():
        cells = [mean_std(entry["metrics"].get(metric)) for metric in MRI_METRICS]
        seeds = "1 pass" if entry["one_pass"] else str(len(entry["seeds"]))
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {entry['fit_seconds']:.0f} |")
    lines += [
        "",
        "Fine-tuned vs frozen teacher (a difference counts only when the margin exceeds the sum of the two standard "
        "deviations):",
        "",
        *finetune_lines(mri),
        "",
        *adaptation_lines(mri),
    ]
    pending = [name for name in MRI_ROWS if name not in mri]
    if pending:
        lines += [f"Not run yet (no finished seed in `accuracy.json`): {', '.join(pending)}.", ""]
    missing = [name for name, entry in mri.items() if not entry["roc"]]
    if mri_png:
        lines += [f"![ROC curves, brain MRI]({mri_png})", ""]
    if missing:
        lines += [f"No per-image scores stored (no ROC curve) for: {', '.join(missing)}.", ""]
    lines += [
        "## ECG200 (per beat)",
        "",
        "From `benchmarks/signals.py` (see `signals.md` for the protocol): 5-fold CV over ECG200_TRAIN and the "
        "official test split; threshold = the highest score of held-out normal training series. CV cells are mean ± "
        "std over folds (x seeds), test cells over seeds (sample standard deviations here; `signals.md` shows "
        "population ones). ROC curves: the official test split.",
        "",
        "| method | input | CV AUROC | CV F1 | CV accuracy | CV recall | test AUROC | test F1 | test accuracy | "
        "test recall |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in ecg.items():
        cells = [mean_std(entry["cv"].get(key), 3) for key in ECG_METRICS]
        cells += [mean_std(entry["test"].get(key), 3) for key in ECG_METRICS]
        lines.append(f"| {name} | {entry['input']} | " + " | ".join(cells) + " |")
    lines += [""]
    if ecg_png:
        lines += [f"![ROC curves, ECG200 test split]({ecg_png})", ""]
    lines += [
        "## Commands",
        "",
        "```",
        *data["commands"]["mri"],
        *data["commands"]["ecg"],
        "python benchmarks/signals_medical_report.py",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of accuracy.json and signals.json")
    args = parser.parse_args(argv)
    accuracy = report.load(args.results / "accuracy.json")
    signals_path = args.results / "signals.json"
    signals = json.loads(signals_path.read_text()) if signals_path.is_file() else {"runs": []}
    data = {
        "mri": mri_section(accuracy["runs"]),
        "ecg": ecg_section(signals["runs"]),
        "commands": {"mri": list(MRI_COMMANDS), "ecg": list(signals.get("commands", []))},
    }
    data["finetune_vs_frozen"] = finetune_lines(data["mri"])
    mri_png = f"{OUTPUT}_mri_roc.png"
    ecg_png = f"{OUTPUT}_ecg_roc.png"
    wrote_mri = plot_rocs(data["mri"], "Brain MRI: ROC per method (one curve per seed)", args.results / mri_png)
    wrote_ecg = plot_rocs(data["ecg"], "ECG200 test split: ROC per method (one curve per seed)", args.results / ecg_png)
    (args.results / f"{OUTPUT}.json").write_text(json.dumps(data, indent=1) + "\n")
    markdown = render(data, mri_png if wrote_mri else None, ecg_png if wrote_ecg else None)
    (args.results / f"{OUTPUT}.md").write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
