"""ECG200 benchmark of the 1-D signal paths of kd_ext, with scikit-learn and anomalib baselines.

Rows: the native 1-D teacher-student model (``SignalKD``, series batches; its defaults, and its former defaults
without the prior and the reverse student's code), anomalib Padim and kd_ext BiDirMSKD on
series turned into images (``UCRSeries(as_image=...)``, EfficientNet-Lite0 ImageNet teacher as in
``benchmarks/accuracy.py``), and Isolation Forest and one-class SVM on the raw (z-normalised) beats.

Protocol, the same for every row (see ``PROTOCOL``):

* Data: ``kd_ext.data.UCRSeries`` on ECG200 (label 1 normal, -1 abnormal), z-normalised series, no band-pass.
* Splits: 5-fold class-stratified cross-validation over ECG200_TRAIN (fold seed 0: each fold in turn is the test set,
  normal and abnormal series; the normal series of the other four folds are the training series) and the official
  split (the normal series of ECG200_TRAIN for training, all of ECG200_TEST for testing).
* 20 % of the normal training series (seed 0) are held out for validation and never trained on.
* Decision threshold: the highest score of those held-out normal series, the threshold anomalib's post-processor
  sets when validation holds normal samples only. A series is called abnormal when its score exceeds it. No test
  label chooses anything; every setting was fixed before the test split was scored.
* Metrics with abnormal as the positive class: AUROC (threshold-free); F1, accuracy and recall at the threshold.
* Trained rows and Isolation Forest run with 3 seeds; Padim and the one-class SVM are deterministic and run once.
  Cross-validation cells are mean ± std over the folds (and seeds); test cells mean ± std over the seeds.

Each finished (row, split, seed) run is merged into ``benchmarks/results/signals.json`` and the Markdown table and the
ROC figure of the official split (``signals_roc.png``) are re-rendered, so an interrupted run keeps what finished
(``--resume`` skips it).

Everything (about half an hour on 2 busy CPU cores):
    nice python benchmarks/signals.py --threads 1
A subset:
    python benchmarks/signals.py --rows 'Isolation Forest' 'One-class SVM' --splits test
Re-render the Markdown and the ROC figure from the JSON:
    python benchmarks/signals.py --render-only
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KD_EXT_DATA", REPO.parent / "shared" / "data"))
ECG = DATA / "ecg"
RESULTS = REPO / "benchmarks" / "results"
ROC_PNG = "signals_roc.png"
FOLDS = 5
FOLD_SEED = 0
VAL_SEED = 0
VAL_RATIO = 0.2
SEEDS = (0, 1, 2)
SPLITS = (*(f"fold{fold}" for fold in range(FOLDS)), "test")
METRICS = ("auroc", "f1", "accuracy", "recall")
PROTOCOL = (
    "ECG200 via kd_ext.data.UCRSeries (label 1 normal, -1 abnormal; z-normalised, no band-pass). "
    f"{FOLDS}-fold class-stratified cross-validation over ECG200_TRAIN (fold seed {FOLD_SEED}; test = the held-out "
    "fold, normal and abnormal; training = the normal series of the other folds) and the official split (normal "
    "series of ECG200_TRAIN / all of ECG200_TEST). "
    f"{VAL_RATIO:.0%} of the normal training series (seed {VAL_SEED}) held out, never trained on; decision threshold = "
    "the highest score of those held-out normal series (anomalib's threshold when validation is normal-only). "
    "Abnormal is the positive class: AUROC, and F1, accuracy and recall at the threshold. Trained rows and Isolation "
    f"Forest: seeds {', '.join(map(str, SEEDS))}; Padim and one-class SVM deterministic, once. CV cells: mean ± std "
    "over folds (x seeds); test cells: mean ± std over seeds."
)


@dataclass(frozen=True)
class Row:
    """A benchmark row.

    Attributes:
        kind: ``"anomalib"`` (trained through anomalib's Engine) or ``"sklearn"``.
        as_image: The datamodule's image transform, or ``None`` for series.
        build: Returns the model (``epochs`` and ``seed`` are passed to sklearn rows and ``SignalKD``).
        seeded: Runs with every seed (else once, seed 0).
        input: What the model reads, for the table.
        epochs: Training epochs of an anomalib row (1 for one-pass rows).
        batch_size: Training batch size.
    """

    kind: str
    as_image: str | None
    build: Callable[..., Any]
    seeded: bool
    input: str
    epochs: int = 1
    batch_size: int = 32


def signal_kd(teacher_epochs: int, **kwargs: Any) -> Any:
    from kd_ext.models.signal_kd import SignalKD

    return SignalKD(teacher_epochs=teacher_epochs, **kwargs)


def in_sample_prior(model: Any) -> Any:
    """``model`` with its prior's map standardised in-sample (SignalKD's prior before held-out statistics)."""
    model.model.prior_fusion.held_out = False
    return model


def padim() -> Any:
    import accuracy

    return accuracy.padim()


def bidirmskd() -> Any:
    import accuracy

    return accuracy.ROWS["BiDirMSKD"]()


def isolation_forest(seed: int) -> Any:
    from sklearn.ensemble import IsolationForest

    return IsolationForest(random_state=seed)


def one_class_svm(seed: int) -> Any:
    from sklearn.svm import OneClassSVM

    del seed
    return OneClassSVM(kernel="rbf", gamma="scale", nu=0.1)


def rows(epochs: int, teacher_epochs: int, image_epochs: int) -> dict[str, Row]:
    """The rows, in table order."""
    return {
        "SignalKD + prior (1-D KD)": Row(
            "anomalib",
            None,
            lambda: signal_kd(teacher_epochs),
            seeded=True,
            input="series",
            epochs=epochs,
            batch_size=16,
        ),
        "SignalKD + in-sample prior (1-D KD)": Row(
            "anomalib",
            None,
            lambda: in_sample_prior(signal_kd(teacher_epochs)),
            seeded=True,
            input="series",
            epochs=epochs,
            batch_size=16,
        ),
        "SignalKD no prior, no code (1-D KD)": Row(
            "anomalib",
            None,
            lambda: signal_kd(teacher_epochs, prior=False, bottleneck=None),
            seeded=True,
            input="series",
            epochs=epochs,
            batch_size=16,
        ),
        "Padim GAF": Row("anomalib", "gaf", padim, seeded=False, input="GAF image"),
        "Padim recurrence": Row("anomalib", "recurrence", padim, seeded=False, input="recurrence image"),
        "Padim scalogram": Row("anomalib", "scalogram", padim, seeded=False, input="scalogram image"),
        "BiDirMSKD GAF": Row("anomalib", "gaf", bidirmskd, seeded=True, input="GAF image", epochs=image_epochs),
        "Isolation Forest": Row("sklearn", None, isolation_forest, seeded=True, input="series"),
        "One-class SVM": Row("sklearn", None, one_class_svm, seeded=False, input="series"),
    }


def datamodule(split: str, row: Row, workdir: Path) -> Any:
    from kd_ext.data import UCRSeries

    common = {
        "as_image": row.as_image,
        "image_dir": workdir / "images",
        "val_split_ratio": VAL_RATIO,
        "seed": VAL_SEED,
        "train_batch_size": row.batch_size,
    }
    if split == "test":
        module = UCRSeries(ECG / "ECG200_TRAIN.txt", ECG / "ECG200_TEST.txt", **common)
    else:
        fold = int(split.removeprefix("fold"))
        module = UCRSeries(ECG / "ECG200_TRAIN.txt", num_folds=FOLDS, fold=fold, fold_seed=FOLD_SEED, **common)
    module.setup()
    return module


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, and F1, accuracy and recall of ``scores > threshold``; abnormal (1) is positive."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

    predicted = scores > threshold
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
    }


def anomalib_scores(row: Row, module: Any, seed: int, workdir: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit through anomalib's Engine; raw scores of the validation and test series, and the fit time."""
    import accuracy
    from anomalib.post_processing import PostProcessor
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True)
    model = row.build()
    model.post_processor = PostProcessor(enable_normalization=False, enable_thresholding=False)
    model.evaluator = None
    model.visualizer = None
    if getattr(model, "epochs", None) is not None:  # kd_ext image models carry their epochs in trainer_arguments
        model.epochs = row.epochs
    engine = accuracy.quiet_engine(workdir / "runs", "cpu", row.epochs)
    seconds = accuracy.timed_fit(engine, model, module)

    def scores(loader: Any) -> np.ndarray:
        batches = engine.predict(model, dataloaders=loader, return_predictions=True)
        return np.concatenate([batch.pred_score.reshape(-1).float().numpy() for batch in batches])

    return scores(module.val_dataloader()), scores(module.test_dataloader()), seconds


def sklearn_scores(row: Row, module: Any, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit on the normal training series; negated ``score_samples`` (higher = more abnormal) of validation and test."""

    def flat(dataset: Any) -> np.ndarray:
        return dataset.series().flatten(1).numpy()

    model = row.build(seed)
    start = time.perf_counter()
    model.fit(flat(module.train_data))
    seconds = time.perf_counter() - start
    return -model.score_samples(flat(module.val_data)), -model.score_samples(flat(module.test_data)), seconds


def run(name: str, row: Row, split: str, seed: int, workdir: Path) -> dict:
    """One (row, split, seed) run: its record."""
    module = datamodule(split, row, workdir)
    if row.kind == "sklearn":
        val, test, seconds = sklearn_scores(row, module, seed)
    else:
        val, test, seconds = anomalib_scores(row, module, seed, workdir)
    labels = module.test_data.samples.label_index.to_numpy()
    if len(test) != len(labels) or len(val) != len(module.val_data):
        expected = f"{len(labels)} and {len(module.val_data)}"
        msg = f"{name} scored {len(test)} test and {len(val)} validation series instead of {expected}."
        raise RuntimeError(msg)
    threshold = float(val.max())
    record = {
        "row": name,
        "split": split,
        "seed": seed,
        "input": row.input,
        "epochs": row.epochs if row.kind == "anomalib" else None,
        "threshold": threshold,
        "metrics": metrics(labels, test, threshold),
        "fit_seconds": round(seconds, 2),
        "train_series": len(module.train_data),
        "val_series": len(module.val_data),
    }
    if split == "test":
        record["scores"] = [round(float(score), 6) for score in test]
        record["labels"] = labels.tolist()
        record["lines"] = module.test_data.samples.line.tolist()
    return record


# --------------------------------------------------------------------------------------------- report


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def render(results: dict, path: Path) -> None:
    """Write the Markdown table of the JSON results."""
    runs = results["runs"]
    names = sorted(dict.fromkeys(run["row"] for run in runs), key=row_order)
    lines = [
        "# ECG200: 1-D signal anomaly detection",
        "",
        f"Protocol: {PROTOCOL}",
        "",
        "Command:",
        "",
        "```",
        *results.get("commands", []),
        "```",
        "",
        "CV: 5-fold cross-validation over ECG200_TRAIN; Test: the official ECG200_TEST split. "
        "F1, accuracy and recall at the threshold set on held-out normal training series: the highest of about a "
        "dozen normal scores is a strict threshold (few false alarms, low recall) for every method alike, so AUROC is "
        "the comparison that does not depend on it. Per-series test scores of the official split are in the JSON "
        "(`scores`, `labels`, `lines`) for ROC curves.",
        "",
        "| method | input | runs (CV / test) | CV AUROC | CV F1 | CV accuracy | CV recall | "
        "Test AUROC | Test F1 | Test accuracy | Test recall | fit s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = [run for run in runs if run["row"] == name]
        cv = [run for run in mine if run["split"] != "test"]
        test = [run for run in mine if run["split"] == "test"]
        cells = [mean_std([run["metrics"][key] for run in cv]) for key in METRICS]
        cells += [mean_std([run["metrics"][key] for run in test]) for key in METRICS]
        epochs = mine[0]["epochs"]
        detail = f", {epochs} epochs" if epochs and epochs > 1 else ""
        seconds = statistics.median(run["fit_seconds"] for run in mine)
        lines.append(
            f"| {name} | {mine[0]['input']}{detail} | {len(cv)} / {len(test)} | "
            + " | ".join(cells)
            + f" | {seconds:.1f} |"
        )
    lines += ["", *ranking(runs, names), ""]
    if plot_rocs(runs, path.with_name(ROC_PNG)):
        lines += [
            f"![ROC curves of the official test split, one per seed (AUROC ± sample std over seeds)]({ROC_PNG})",
            "",
        ]
    lines += [*ROW_NOTES, ""]
    lines += [f"Machine: {results.get('machine', 'unknown')}. Fit time is wall-clock on a shared machine.", ""]
    path.write_text("\n".join(lines))


ROW_NOTES = (
    "Rows:",
    "",
    "- SignalKD + prior: kd_ext.models.signal_kd, defaults (conv + bidirectional GRU teacher pretrained 60 epochs by "
    "masked reconstruction on every series of the training partition, normal and abnormal, labels unused, never a "
    "test series; forward and reverse students 60 epochs on the normal training series, batch 16; distillation map "
    "of the two deeper levels fused with the normal-feature prior, a Gaussian of the teacher's two deeper levels at "
    "every time step fitted on the normal training series, both maps standardised on the normal training series and "
    "averaged; score = the map's mean; the reverse student rebuilds the teacher's levels from a code of 16 numbers "
    "per series). SignalKD no prior, no code: prior=False, bottleneck=None, the former defaults (the distillation "
    "map alone; the reverse student's embedding has 64 channels at a quarter of the resolution, no code). Those "
    "defaults (the prior, its levels, the code, the mean score, the map levels) were chosen on the same 5 folds of "
    "ECG200_TRAIN (seed 0; never on ECG200_TEST), so their CV figures are optimistic; their test figures are not.",
    "- Padim: anomalib Padim with the offline EfficientNet-Lite0 ImageNet teacher of benchmarks/accuracy.py (blocks "
    "1, 2, 4; 100 random feature dimensions), 256x256 after the pre-processor's resize of the 96x96 series image.",
    "- BiDirMSKD: kd_ext BiDirMSKD as in benchmarks/accuracy.py (EfficientNet-Lite0 teacher), few epochs.",
    "- Isolation Forest (100 trees) and one-class SVM (RBF, gamma 'scale', nu 0.1) from scikit-learn on the 96 "
    "z-normalised samples of each beat; score = the negated score_samples.",
)


def plot_rocs(runs: list[dict], path: Path) -> bool:
    """ROC curves of the official test split, one panel per row, one curve per seed; ``False`` without scores."""
    import signals_medical_report as medical

    title = "ECG200, official test split: ROC per method (abnormal = positive)"
    return medical.plot_rocs(medical.ecg_section(runs), title, path)


def ranking(runs: list[dict], names: list[str]) -> list[str]:
    """One sentence: the best cross-validated AUROC and the rows whose mean lies within its spread."""
    cv = {
        name: [run["metrics"]["auroc"] for run in runs if run["row"] == name and run["split"] != "test"]
        for name in names
    }
    cv = {name: values for name, values in cv.items() if values}
    if not cv:
        return []
    best = max(cv, key=lambda name: statistics.mean(cv[name]))
    mean, spread = statistics.mean(cv[best]), statistics.pstdev(cv[best])
    close = [name for name in cv if name != best and statistics.mean(cv[name]) >= mean - spread]
    tied = f"; within its spread (one std): {', '.join(close)}" if close else "; no other row is within its spread"
    return [f"Best cross-validated AUROC: {best} ({mean_std(cv[best])}){tied}. Smaller differences rank nothing."]


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def row_order(name: str) -> int:
    """Position of a row in the table (the order of :func:`rows`; unknown names last)."""
    names = list(rows(1, 1, 1))
    return names.index(name) if name in names else len(names)


def save(results: dict, json_path: Path, md_path: Path) -> None:
    results["runs"].sort(key=lambda run: (row_order(run["row"]), SPLITS.index(run["split"]), run["seed"]))
    partial = json_path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1))
    partial.replace(json_path)
    render(results, md_path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", help="rows to run (default: all)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--epochs", type=int, default=60, help="SignalKD student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=60, help="SignalKD teacher pretraining epochs")
    parser.add_argument("--image-epochs", type=int, default=3, help="BiDirMSKD epochs on images")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kd_ext_signals"))
    parser.add_argument("--results", type=Path, default=RESULTS / "signals.json")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the results")
    parser.add_argument("--render-only", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    md_path = args.results.with_suffix(".md")
    results = load(args.results)
    if args.render_only:
        render(results, md_path)
        return 0
    import accuracy
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    accuracy.quiet()
    table = rows(args.epochs, args.teacher_epochs, args.image_epochs)
    unknown = sorted(set(args.rows or []) - set(table))
    if unknown:
        print(f"unknown rows {unknown}; choose from {list(table)}", file=sys.stderr)
        return 2
    command = "python benchmarks/signals.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    results["date"] = datetime.date.today().isoformat()
    done = {(run["row"], run["split"], run["seed"]) for run in results["runs"]}
    for name in args.rows or list(table):
        row = table[name]
        for split in args.splits:
            for seed in args.seeds if row.seeded else [0]:
                if args.resume and (name, split, seed) in done:
                    continue
                record = run(name, row, split, seed, args.workdir)
                results["runs"] = [
                    run_
                    for run_ in results["runs"]
                    if (run_["row"], run_["split"], run_["seed"]) != (name, split, seed)
                ]
                results["runs"].append(record)
                save(results, args.results, md_path)
                summary = ", ".join(f"{key} {value:.3f}" for key, value in record["metrics"].items())
                print(f"{name} {split} seed {seed}: {summary} ({record['fit_seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
