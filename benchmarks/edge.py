"""Edge benchmark: PyTorch eager vs OpenVINO FP32 / FP16 / INT8 for BiDirMSKD, anomalib Stfpm and Padim.

One run measures, side by side on the same machine and data (MVTec AD bottle, 256x256):
- latency at batch 1 (median ms) and throughput at batch 8 (images/s) for torch eager and the OpenVINO IRs
  (``INFERENCE_PRECISION_HINT=f32``; INT8 calibrated on normal training images, its maps held within 0.02 of
  FP32 on held-out training images), interleaved in rounds so
  that load from other jobs hits all rows alike;
- accuracy of the IRs vs torch for BiDirMSKD: max |map difference| and image / pixel AUROC on the 83 test images;
- peak memory (max RSS of the whole process, ``/usr/bin/time -v``) of ``kd-ext infer`` vs anomalib's
  ``OpenVINOInferencer`` scoring the same 83 files with the same IR;
- where the anomaly-map tail should run: inside the IR (OpenVINO) vs the fused C++ kernel on raw features.

Run:
    python benchmarks/edge.py --ckpt kd_ext_runs/edge/bottle.ckpt
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import LAYERS, TIMM_TEACHER, common, load_teacher_weights, stfpm
from anomalib.models import Padim

from kd_ext.backbones import no_pretrained_downloads
from kd_ext.edge import EdgeModel
from kd_ext.export import export_openvino
from kd_ext.export.quantization import HOLDOUT_EVERY, MAX_MAP_ERROR
from kd_ext.models import BiDirMSKD

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KD_EXT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
PRECISIONS = ("fp32", "fp16", "int8")


def datamodule() -> MVTecAD:
    return MVTecAD(root=DATA / "mvtec_ad", category="bottle", train_batch_size=8, eval_batch_size=8, num_workers=0)


def padim():
    """accuracy.py's Padim with n_features given (anomalib has no default for this backbone): 100 of 176."""
    with no_pretrained_downloads():
        model = Padim(backbone=TIMM_TEACHER, layers=LAYERS, pre_trained=False, n_features=100, **common())
    load_teacher_weights(model.model.feature_extractor.feature_extractor)
    return model


def fit(model, epochs: int, workdir: Path):
    if epochs == 0:  # speed rows only: finite placeholder normalisation (NaN stats break INT8 compilation)
        post = model.post_processor
        for name, value in [("image_min", 0.0), ("image_max", 1.0), ("pixel_min", 0.0), ("pixel_max", 1.0)]:
            getattr(post, name).fill_(value)
        post._image_threshold.fill_(0.5)
        post._pixel_threshold.fill_(0.5)
        return model.eval()
    seed_everything(0, workers=True)
    engine = Engine(max_epochs=epochs, default_root_dir=workdir, logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule())
    return model.eval()


def test_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm = datamodule()
    dm.setup("test")
    images, labels, masks = [], [], []
    for batch in dm.test_dataloader():
        images.append(batch.image)
        labels.append(batch.gt_label)
        masks.append(batch.gt_mask)
    return torch.cat(images), torch.cat(labels), torch.cat(masks)


def torch_runner(model):
    @torch.no_grad()
    def run(x: np.ndarray) -> None:
        model(torch.from_numpy(x))

    return run


def ov_latency_runner(xml: Path):
    edge = EdgeModel(xml, precision_hint="f32", mode="latency")
    return edge.predict


def ov_throughput_runner(xml: Path):
    edge = EdgeModel(xml, precision_hint="f32", mode="throughput")

    def run(x: np.ndarray) -> None:
        for _ in edge.iter_predict([(i, x[i : i + 8]) for i in range(0, len(x), 8)]):
            pass

    return edge, run


def timed(run, x: np.ndarray, repeats: int) -> float:
    run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def max_rss_mib(command: list[str], cwd: Path) -> tuple[float, float]:
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return kib / 1024, seconds


INFERENCER = """
import sys
from pathlib import Path
from anomalib.deploy import OpenVINOInferencer
inferencer = OpenVINOInferencer(sys.argv[1], device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
files = sorted(p for p in Path(sys.argv[2]).rglob("*.png"))
for path in files:
    inferencer.predict(path)
print(len(files))
"""


def tail_placement(model: BiDirMSKD, images: torch.Tensor, workdir: Path) -> dict:
    """ms/image at batch 8 of the anomaly-map tail: in an IR (OpenVINO f32), torch, and the C++ kernel."""
    inner = model.model
    x = model.pre_processor(images[:8])
    with torch.no_grad():
        teacher, forward, reverse = inner.distill(x)
    features = [*teacher, *forward, *reverse]

    class Tail(torch.nn.Module):
        def forward(self, *feats: torch.Tensor) -> torch.Tensor:
            t, f, r = feats[0:3], feats[3:6], feats[6:9]
            anomaly_map = inner.anomaly_map_generator(t, [f, r], (256, 256))
            return anomaly_map, anomaly_map.flatten(1).amax(dim=1)

    tail = Tail().eval()
    onnx_path = workdir / "tail.onnx"
    torch.onnx.export(tail, tuple(features), str(onnx_path), dynamo=True, opset_version=18)
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    arrays = [np.ascontiguousarray(f.numpy()) for f in features]
    request = compiled.create_infer_request()
    result = {
        "raw_feature_bytes_per_image": int(sum(a[0].nbytes for a in arrays)),
        "in_ir_output_bytes_per_image": 256 * 256 * 4 + 256 * 256 + 8,
        "openvino_tail_ms_per_image": 1000 * timed(lambda _: request.infer(arrays), None, 10) / 8,
    }
    with torch.no_grad():
        ref_map, _ = tail(*features)
        result["torch_tail_ms_per_image"] = 1000 * timed(lambda _: tail(*features), None, 10) / 8
    try:
        from kd_ext import _native

        def kernel(_: object) -> tuple:
            return _native.anomaly_map(arrays[0:3] * 2, arrays[3:9], 256, 256, fusion="mean", sigma=4.0, score="max")

        kernel_map, _ = kernel(None)
        result["cpp_kernel_ms_per_image"] = 1000 * timed(kernel, None, 10) / 8
        result["cpp_kernel_max_abs_diff_vs_torch"] = float(np.abs(kernel_map - ref_map.numpy()).max())
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        result["cpp_kernel"] = f"not available: {error}"
    return result


def tail_or_error(model: BiDirMSKD, images: torch.Tensor, workdir: Path) -> dict:
    try:
        return tail_placement(model, images, workdir)
    except Exception as error:  # keep the other sections of the report
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def render(report: dict) -> str:
    lines = [
        "# Edge deployment: PyTorch eager vs OpenVINO",
        "",
        f"Command: `{report['command']}`",
        "",
        report["machine"],
        "",
        "## Speed (MVTec bottle images, 256x256; OpenVINO with `INFERENCE_PRECISION_HINT=f32`)",
        "",
        "| model | runtime | batch-1 latency ms | batch-8 throughput img/s | speed-up vs eager (throughput) |",
        "|---|---|---:|---:|---:|",
    ]
    for model, rows in report["speed"].items():
        eager = rows["torch eager"]["throughput_img_s"]
        for runtime, row in rows.items():
            lines.append(
                f"| {model} | {runtime} | {row['latency_ms']:.1f} | {row['throughput_img_s']:.1f} | "
                f"{row['throughput_img_s'] / eager:.2f}x |"
            )
    acc = report["accuracy"]
    lines += [
        "",
        f"## Accuracy of the BiDirMSKD IRs vs torch (bottle test set, {acc['images']} images, "
        f"model trained {acc['epochs']} epochs)",
        "",
        "| runtime | image AUROC | pixel AUROC | max abs map diff vs torch (normalised) | labels differing |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in acc["rows"].items():
        lines.append(
            f"| {name} | {row['image_AUROC']:.4f} | {row['pixel_AUROC']:.4f} | "
            f"{row.get('max_map_diff', 0):.2e} | {row.get('labels_differing', 0)} |"
        )
    lines += [
        "",
        f"INT8: NNCF post-training quantisation calibrated on normal training images (every {HOLDOUT_EVERY}th held "
        "out), anomaly-map tail in float; NNCF accuracy control reverts ops to float until the INT8 maps of the "
        f"held-out images are within {MAX_MAP_ERROR} (mean, normalised) of FP32 "
        "(`kd_ext.export.quantize_on_training_images`).",
    ]
    mem = report["memory"]
    inferencer = next(row for name, row in mem.items() if "OpenVINOInferencer" in name)
    lines += [
        "",
        "## Peak memory scoring the 83 test files from disk (whole process, max RSS, `/usr/bin/time -v`), FP32 IR",
        "",
        "| runner | max RSS MiB | vs OpenVINOInferencer | wall s |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {row['max_rss_mib']:.0f} | {row['max_rss_mib'] / inferencer['max_rss_mib']:.2f}x | "
            f"{row['seconds']:.1f} |"
            for name, row in mem.items()
        ],
        "",
        "## Where the anomaly-map tail runs (BiDirMSKD, batch 8)",
        "",
    ]
    tail = report["tail"]
    if "error" in tail or "cpp_kernel_ms_per_image" not in tail:
        lines += ["```json", json.dumps(tail, indent=2), "```", ""]
    else:
        lines += [
            "| tail (cosine maps, upsampling, fusion, blur, score) | ms / image | bytes out of the IR per image |",
            "|---|---:|---:|",
            f"| inside the IR (OpenVINO f32) | {tail['openvino_tail_ms_per_image']:.2f} | "
            f"{tail['in_ir_output_bytes_per_image']:,} |",
            f"| torch reference | {tail['torch_tail_ms_per_image']:.2f} | - |",
            f"| C++ kernel on the IR's raw per-scale features | {tail['cpp_kernel_ms_per_image']:.2f} | "
            f"{tail['raw_feature_bytes_per_image']:,} |",
            "",
            f"C++ kernel vs torch reference: max |map difference| {tail['cpp_kernel_max_abs_diff_vs_torch']:.1e}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="trained BiDirMSKD checkpoint (else trained --epochs here)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--baseline-epochs", type=int, default=0, help="Stfpm epochs (speed rows only; 0: untrained, same graph)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="reuse IRs already exported into --workdir")
    parser.add_argument("--workdir", type=Path, default=REPO / "kd_ext_runs" / "edge_bench")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()  # the memory runs start in a temporary directory
    torch.set_num_threads(os.cpu_count() or 1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/edge.py " + " ".join(sys.argv[1:])

    if args.ckpt:
        bidir = BiDirMSKD.load_from_checkpoint(args.ckpt).eval()
        epochs = torch.load(args.ckpt, map_location="cpu", weights_only=True).get("epoch", -1) + 1
    else:
        epochs = args.epochs
        bidir = fit(BiDirMSKD(visualizer=False, epochs=epochs), epochs, args.workdir / "bidir")
    models = {
        "BiDirMSKD": bidir,
        "anomalib Stfpm": fit(stfpm(), args.baseline_epochs, args.workdir / "stfpm"),
        "anomalib Padim": fit(padim(), 1, args.workdir / "padim"),
    }
    irs: dict[str, dict[str, Path]] = {}
    export_seconds: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        irs[name], export_seconds[name] = {}, {}
        for precision in PRECISIONS:
            start = time.perf_counter()
            root = args.workdir / "ir" / name.replace(" ", "_") / precision
            existing = root / "weights" / "openvino" / "model.xml"
            if args.reuse and existing.is_file():
                irs[name][precision] = existing
                continue
            irs[name][precision] = export_openvino(model, root, precision, calibration=datamodule())
            export_seconds[name][precision] = round(time.perf_counter() - start, 1)
            print(name, precision, irs[name][precision], export_seconds[name][precision], flush=True)

    images, labels, masks = test_images()
    x1, x8 = images[:1].numpy(), images[:32].numpy()
    speed: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, model in models.items():
        runners = {"torch eager": (torch_runner(model), torch_runner(model))}
        for precision in PRECISIONS:
            _, throughput = ov_throughput_runner(irs[name][precision])
            runners[f"OpenVINO {precision.upper()}"] = (ov_latency_runner(irs[name][precision]), throughput)
        speed[name] = {runtime: {"latency": [], "throughput": []} for runtime in runners}
        for _ in range(args.rounds):
            for runtime, (latency, throughput) in runners.items():
                speed[name][runtime]["latency"].append(timed(latency, x1, 5) * 1000)
                speed[name][runtime]["throughput"].append(len(x8) / timed(throughput, x8, 2))
        print(name, {k: (np.median(v["latency"]), np.median(v["throughput"])) for k, v in speed[name].items()})
    speed_rows = {
        name: {
            runtime: {
                "latency_ms": float(np.median(v["latency"])),
                "throughput_img_s": float(np.median(v["throughput"])),
                "latency_ms_rounds": [round(t, 2) for t in v["latency"]],
                "throughput_rounds": [round(t, 2) for t in v["throughput"]],
            }
            for runtime, v in rows.items()
        }
        for name, rows in speed.items()
    }

    # Accuracy of BiDirMSKD: torch vs IRs on the same test images.
    with torch.no_grad():
        ref = [bidir(images[i : i + 8]) for i in range(0, len(images), 8)]
    ref_map = torch.cat([r.anomaly_map for r in ref]).reshape(len(images), 256, 256)
    ref_score = torch.cat([r.pred_score for r in ref])
    ref_label = torch.cat([r.pred_label for r in ref])
    gt_mask = masks.reshape(len(images), 256, 256).int()

    def aurocs(score: torch.Tensor, amap: torch.Tensor) -> dict:
        return {
            "image_AUROC": float(binary_auroc(score, labels.int())),
            "pixel_AUROC": float(binary_auroc(amap.flatten(), gt_mask.flatten())),
        }

    accuracy = {"torch eager": aurocs(ref_score, ref_map)}
    for precision in PRECISIONS:
        edge = EdgeModel(irs["BiDirMSKD"][precision], precision_hint="f32")
        preds = [edge.predict(images[i : i + 8].numpy()) for i in range(0, len(images), 8)]
        amap = torch.from_numpy(np.concatenate([p.anomaly_map for p in preds]))
        score = torch.from_numpy(np.concatenate([p.pred_score for p in preds]))
        label = torch.from_numpy(np.concatenate([p.pred_label for p in preds]))
        accuracy[f"OpenVINO {precision.upper()}"] = {
            **aurocs(score, amap),
            "max_map_diff": float((amap - ref_map).abs().max()),
            "max_score_diff": float((score - ref_score).abs().max()),
            "labels_differing": int((label != ref_label).sum()),
        }
    print(json.dumps(accuracy, indent=1), flush=True)

    # Peak memory: kd-ext infer vs anomalib's OpenVINOInferencer on the FP32 IR, 83 files.
    test_dir = DATA / "mvtec_ad" / "bottle" / "test"
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        kd_ext_cli = [sys.executable, "-m", "kd_ext.cli", "infer", str(irs["BiDirMSKD"]["fp32"]), str(test_dir)]
        for batch_size in (1, 8):
            out = Path(tmp) / f"out{batch_size}"
            rss, seconds = max_rss_mib(
                [*kd_ext_cli, "--out", str(out), "--recursive", "--quiet", "--batch-size", str(batch_size)], REPO
            )
            memory[f"kd-ext infer --batch-size {batch_size} (openvino + numpy + PIL), masks + overlays written"] = {
                "max_rss_mib": rss,
                "seconds": seconds,
            }
        script = Path(tmp) / "inferencer.py"
        script.write_text(INFERENCER)
        rss, seconds = max_rss_mib([sys.executable, str(script), str(irs["BiDirMSKD"]["fp32"]), str(test_dir)], tmp)
        memory["anomalib OpenVINOInferencer (predict per file)"] = {"max_rss_mib": rss, "seconds": seconds}
    print(json.dumps(memory), flush=True)

    report = {
        "command": command,
        "machine": (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
            f"{os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, OpenVINO {ov.get_version()}. "
            "Medians over interleaved rounds; latency: 5 runs per round, batch 1; throughput: 32 images in "
            "batches of 8 (OpenVINO: AsyncInferQueue, THROUGHPUT hint; torch: sequential batches)."
        ),
        "export_seconds": export_seconds,
        "speed": speed_rows,
        "accuracy": {"images": len(images), "epochs": epochs, "rows": accuracy},
        "memory": memory,
        "tail": tail_or_error(bidir, images, args.workdir),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "edge.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / "edge.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
