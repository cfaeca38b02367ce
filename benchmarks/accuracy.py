"""Accuracy benchmark: kd_ext models, their ablations and anomalib baselines on real data.

Every row trains and tests with the same teacher weights (offline EfficientNet-Lite0 ImageNet
weights, same normalisation), data, image size (256x256) and epochs, through anomalib's ``Engine``.
Results are merged into ``benchmarks/results/accuracy.json`` after each row (so partial runs keep
what finished) and rendered to ``benchmarks/results/accuracy.md``.

Run (about an hour on 2 CPU cores):
    python benchmarks/accuracy.py --epochs 20
One row, one category:
    python benchmarks/accuracy.py --rows BiDirMSKD --categories hazelnut_toy --epochs 2
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.models import AnomalibModule, Padim, Patchcore, Stfpm
from lightning.pytorch import seed_everything

from kd_ext.backbones import create_backbone, no_pretrained_downloads
from kd_ext.models import MTHF, BiDirMSKD
from kd_ext.models.checkpoint import teacher_pre_processor

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KD_EXT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
TEACHER = "efficientnet_lite0"
TIMM_TEACHER = "tf_efficientnet_lite0"
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
CATEGORIES = {"bottle": DATA / "mvtec_ad", "hazelnut_toy": DATA}


def evaluator() -> Evaluator:
    """Image AUROC, pixel AUROC and AUPRO up to 30 % FPR."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3),
        ],
    )


def load_teacher_weights(extractor: torch.nn.Module) -> None:
    """Load the offline ImageNet weights into a timm ``features_only`` EfficientNet-Lite0 and freeze it.

    No row trains its teacher; frozen, it also does not count as trainable parameters (built with
    ``pre_trained=False``, anomalib's Padim and Patchcore extractors would otherwise require gradients).
    """
    source = create_backbone(TEACHER, pre_trained=True).state_dict()
    missing, _ = extractor.load_state_dict(source, strict=False)
    if missing:
        msg = f"Teacher weights do not cover {missing[:5]}"
        raise RuntimeError(msg)
    extractor.requires_grad_(False)


def common() -> dict:
    return {"pre_processor": teacher_pre_processor(TEACHER), "evaluator": evaluator(), "visualizer": False}


def stfpm() -> AnomalibModule:
    with no_pretrained_downloads():
        model = Stfpm(backbone=TIMM_TEACHER, layers=LAYERS, **common())
    load_teacher_weights(model.model.teacher_model.feature_extractor)
    return model


def padim() -> AnomalibModule:
    with no_pretrained_downloads():
        # anomalib knows the feature count only of its listed backbones; 100 random dims as for ResNet18.
        model = Padim(backbone=TIMM_TEACHER, layers=LAYERS, pre_trained=False, n_features=100, **common())
    load_teacher_weights(model.model.feature_extractor.feature_extractor)
    return model


def fixed_mmap_threshold(threshold_bytes: int = 1 << 20) -> None:
    """Have glibc return every allocation above ``threshold_bytes`` to the system as soon as it is freed.

    anomalib's k-center-greedy coreset selection allocates one (patches x projected dims) temporary per
    iteration (29 MB for hazelnut_toy). With glibc's default, adaptive mmap threshold these temporaries come
    from the heap and are not reused: the process grew to 12 GB within 30 s and was OOM-killed (measured,
    hazelnut_toy). With a fixed threshold its peak is 1.2 GB. Setting the threshold disables the adaptation for
    the rest of the process. No-op outside glibc.
    """
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or libc_name is None:
        return
    m_mmap_threshold = -3  # from <malloc.h>
    ctypes.CDLL(libc_name).mallopt(m_mmap_threshold, threshold_bytes)


def patchcore() -> AnomalibModule:
    fixed_mmap_threshold()
    with no_pretrained_downloads():
        model = Patchcore(backbone=TIMM_TEACHER, layers=["blocks.2", "blocks.4"], pre_trained=False, **common())
    load_teacher_weights(model.model.feature_extractor.feature_extractor)
    return model


ROWS: dict[str, Callable[[], AnomalibModule]] = {
    "BiDirMSKD": lambda: BiDirMSKD(backbone=TEACHER, **common()),
    "BiDirMSKD forward-only": lambda: BiDirMSKD(backbone=TEACHER, reverse_student=False, fusion=False, **common()),
    "BiDirMSKD reverse-only": lambda: BiDirMSKD(
        backbone=TEACHER, forward_student=False, attention=False, fusion=False, **common()
    ),
    "BiDirMSKD no-attention": lambda: BiDirMSKD(backbone=TEACHER, attention=False, **common()),
    "BiDirMSKD no-fusion": lambda: BiDirMSKD(backbone=TEACHER, fusion=False, **common()),
    "MTHF": lambda: MTHF(backbone=TEACHER, **common()),
    "MTHF one-group": lambda: MTHF(backbone=TEACHER, groups=("A",), **common()),
    "MTHF one-stage": lambda: MTHF(backbone=TEACHER, fusion_stages=1, **common()),
    "MTHF no-fusion-modules": lambda: MTHF(backbone=TEACHER, fusion_modules=False, **common()),
    "anomalib Stfpm": stfpm,
    "anomalib Padim": padim,
    "anomalib Patchcore": patchcore,
}
TRAINED_ROWS = {"anomalib Padim", "anomalib Patchcore"}  # one pass over the data: epochs do not apply


def trainable_parameters(model: AnomalibModule) -> int:
    """Parameters updated by training (memory banks and Gaussian statistics are not parameters)."""
    return sum(parameter.numel() for parameter in model.model.parameters() if parameter.requires_grad)


@torch.no_grad()
def inference_ms_per_image(model: AnomalibModule, datamodule: MVTecAD, batch_size: int = 8) -> float:
    """Mean wall time of pre-processing + model forward per test image (batch 8, after one warm-up)."""
    model.eval()
    images = [batch.image for batch in datamodule.test_dataloader()]
    images = torch.cat(images)[: 8 * batch_size]
    model(images[:batch_size])
    start = time.perf_counter()
    for index in range(0, len(images), batch_size):
        model(images[index : index + batch_size])
    return 1000 * (time.perf_counter() - start) / len(images)


def run_row(name: str, category: str, epochs: int, workdir: Path) -> dict:
    seed_everything(0, workers=True)
    datamodule = MVTecAD(
        root=CATEGORIES[category], category=category, train_batch_size=8, eval_batch_size=8, num_workers=0
    )
    model = ROWS[name]()
    engine = Engine(
        max_epochs=1 if name in TRAINED_ROWS else epochs,
        default_root_dir=workdir / name.replace(" ", "_") / category,
        logger=False,
        accelerator="cpu",
        devices=1,
        # Validation only sets the post-processor's thresholds: once, after the last epoch, is enough.
        check_val_every_n_epoch=1 if name in TRAINED_ROWS else epochs,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    return {
        "model": name,
        "category": category,
        "epochs": 1 if name in TRAINED_ROWS else epochs,
        "image_AUROC": metrics["image_AUROC"],
        "pixel_AUROC": metrics["pixel_AUROC"],
        "pixel_AUPRO": metrics["pixel_AUPRO"],
        "train_seconds": round(train_seconds, 1),
        "inference_ms_per_image": round(inference_ms_per_image(model, datamodule), 2),
        "trainable_parameters": trainable_parameters(model),
    }


def row_order(row: dict) -> tuple[str, int]:
    return row["category"], list(ROWS).index(row["model"]) if row["model"] in ROWS else len(ROWS)


def render(results: list[dict], command: str) -> str:
    lines = [
        "# Accuracy on real data",
        "",
        "Commands (each row's own is in accuracy.json):",
        "",
        *[f"- `{line}`" for line in command.split(" ; ")],
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        "CPU only. Teacher: EfficientNet-Lite0 with the offline ImageNet weights for every row (mean = std = 0.5 "
        "normalisation), 256x256 images, batch 8, seed 0. Padim and Patchcore fit in one pass (no epochs); their "
        "teacher is frozen, so they train 0 parameters. Patchcore's train time is mostly anomalib's k-center-greedy "
        "coreset selection (10 % of 214k patches on bottle), run with glibc's mmap threshold fixed (see "
        "`fixed_mmap_threshold`). "
        "AUPRO is integrated up to FPR 0.3 and normalised. Inference: pre-processing + forward, batch 8, CPU. "
        "Timings (train s, ms / image) depend on what else ran on the 2 cores at the time (several rows shared them "
        "with other jobs, and rows trained after the switch to channels-last training run ~3x faster): compare "
        "the accuracy columns across rows, not the timings.",
        "",
        "| data | model | epochs | image AUROC | pixel AUROC | AUPRO@0.3 | train s | ms / image | trainable params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['category']} | {r['model']} | {r['epochs']} | {r['image_AUROC']:.4f} | {r['pixel_AUROC']:.4f} | "
        f"{r['pixel_AUPRO']:.4f} | {r['train_seconds']:.0f} | {r['inference_ms_per_image']:.1f} | "
        f"{r['trainable_parameters']:,} |"
        for r in sorted(
            results, key=lambda r: (r["category"], list(ROWS).index(r["model"]) if r["model"] in ROWS else 99)
        )
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=REPO / "kd_ext_runs" / "accuracy")
    args = parser.parse_args()
    for category in args.categories:
        if not (CATEGORIES[category] / category).is_dir():
            sys.exit(f"Data for '{category}' not found under {CATEGORIES[category]}; see ../shared/data/README.md.")
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "accuracy.json"
    command = shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])
    for category in args.categories:
        for name in args.rows:
            try:
                row = run_row(name, category, args.epochs, args.workdir)
            except Exception as error:  # one broken row must not lose the others
                print(f"ROW FAILED: {name} on {category}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                continue
            row["command"] = command
            print(json.dumps(row), flush=True)
            # Re-read right before merging: other accuracy.py processes may have written rows meanwhile.
            stored = json.loads(json_path.read_text()) if json_path.exists() else {"results": []}
            stored["results"] = [r for r in stored["results"] if (r["model"], r["category"]) != (name, category)] + [
                row
            ]
            json_path.write_text(json.dumps(stored, indent=2) + "\n")
            commands = sorted({r["command"] for r in stored["results"]})
            (args.results / "accuracy.md").write_text(render(stored["results"], " ; ".join(commands)))


if __name__ == "__main__":
    main()
