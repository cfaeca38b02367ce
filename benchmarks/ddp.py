"""Per-epoch training time of BiDirMSKD with 1 process vs N DDP processes on this machine (CPU, gloo).

Each configuration trains on the same cores: one process with ``--threads`` threads, or N DDP processes with
``threads / N`` threads each and a per-process batch of ``batch / N`` (the same global batch); one process with one
thread shows how much of a difference is only the thread count (OpenMP threads wait on each other when the cores
are shared with other jobs). Validation is off;
the first epoch (start-up, allocator warm-up) is not counted; the time of an epoch is taken by rank 0 from the start
to the end of its training loop. Writes ``results/ddp.json`` and ``results/ddp.md``.

    python benchmarks/ddp.py --data ../shared/data --category hazelnut_toy --processes 2 --epochs 3
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> None:
    """Train once with ``args.processes`` processes; rank 0 writes the epoch times to ``args.out``."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from kd_ext.models import BiDirMSKD

    torch.set_num_threads(args.threads)

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.times.append(time.perf_counter() - self.start)

    seed_everything(0)
    timer = EpochTimer()
    engine = Engine(
        accelerator="cpu",
        devices=args.processes,
        strategy="ddp" if args.processes > 1 else "auto",
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=args.out.parent / f"run_{args.processes}",
        callbacks=[timer],
    )
    datamodule = MVTecAD(
        root=args.data,
        category=args.category,
        train_batch_size=args.batch // args.processes,
        eval_batch_size=args.batch,
        num_workers=0,
    )
    engine.fit(BiDirMSKD(epochs=args.epochs), datamodule=datamodule)
    if engine.trainer.global_rank == 0:
        args.out.write_text(json.dumps({"epoch_seconds": timer.times}))


def run(args: argparse.Namespace, processes: int, threads: int, out: Path) -> list[float]:
    """Epoch times (the first left out) of ``processes`` processes with ``threads`` threads each."""
    command = [sys.executable, __file__, "--worker", "--processes", str(processes), "--out", str(out)]
    command += ["--data", str(args.data), "--category", args.category, "--epochs", str(args.epochs)]
    command += ["--batch", str(args.batch), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())["epoch_seconds"][1:]  # the first epoch is warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default="hazelnut_toy")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by the processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="a line about the machine's state (other jobs running, ...)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.batch % args.processes:
        parser.error(f"--batch {args.batch} must be a multiple of --processes {args.processes}")
    scratch = Path(tempfile.mkdtemp(prefix="kd_ext_ddp_"))
    per_process = max(1, args.threads // args.processes)
    configurations = [(1, args.threads), (args.processes, per_process)]
    if args.threads > 1:
        configurations.append((1, 1))  # how much of the gain is only that one process ran single-threaded
    times = {
        (n, threads): run(args, n, threads, scratch / f"epochs_{n}x{threads}.json") for n, threads in configurations
    }
    medians = {key: statistics.median(values) for key, values in times.items()}
    baseline, distributed = (1, args.threads), (args.processes, per_process)
    record = {
        "command": shlex.join(["python", "benchmarks/ddp.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "note": args.note,
        "model": "BiDirMSKD (EfficientNet-Lite0 teacher, 256x256)",
        "data": f"{args.category}, global batch {args.batch}",
        "epoch_seconds": {f"{n}x{threads}": values for (n, threads), values in times.items()},
        "median_epoch_seconds": {f"{n}x{threads}": value for (n, threads), value in medians.items()},
        "speedup": medians[baseline] / medians[distributed],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# Training with several processes (DDP) on one machine",
        "",
        f"`{record['command']}`",
        "",
        f"{record['model']}, {record['data']}, {record['machine']}. Validation off; epoch 1 (warm-up) not counted.",
        "",
        "| processes x threads | per-process batch | median epoch (s) | epochs (s) |",
        "|---|---|---|---|",
    ]
    for (n, threads), values in times.items():
        row = f"| {n} x {threads} | {args.batch // n} | {medians[(n, threads)]:.1f} | "
        lines.append(row + ", ".join(f"{value:.1f}" for value in values) + " |")
    lines += [
        "",
        f"{args.processes} processes x {per_process} threads over 1 process x {args.threads} threads (the same cores): "
        f"**{record['speedup']:.2f}x**. Fastest: {min(medians, key=medians.get)[0]} process(es) x "
        f"{min(medians, key=medians.get)[1]} thread(s).",
    ]
    if args.note:
        lines += ["", args.note]
    (RESULTS / "ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
