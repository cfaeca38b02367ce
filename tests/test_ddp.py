"""Distributed data-parallel training (Lightning DDP, gloo on CPU) equals one process with the same global batch.

Every model variant is trained for 2 epochs on a tiny real set (8 normal training images, global batch 4, so 2 steps
an epoch) twice: by Lightning's own DDP launcher with 2 processes of batch 2 each, and by one process of batch 4
that reads the training images in the order the distributed sampler gives the two processes together (same seed).
The per-step loss of the global batch, the epoch loss kd_ext logs and the test metrics must agree; the test set has
an odd number of images (5), each scored exactly once. The DDP checkpoints are then tested in one process (same
metrics exactly) and one is exported to OpenVINO. Two "nodes" of one process each, started by ``torchrun`` over the
loopback address, train the same way.

This file is also the worker script the tests start (``python tests/test_ddp.py CASE ... --out DIR``).

Tolerances. Two processes sum each batch statistic as two half-batch sums and oneDNN picks kernels by batch size,
so activations differ from one process's in the last bits; the students' ReLU6 kinks turn a few of those into
different gradients (float64 removes it), and Adam's first steps are nearly sign-like. So: the first step's loss
agrees to 1e-5 (same images, same initial model, global batch-norm statistics), every step's loss and the epoch loss
to 1e-3, the first step's gradient (after DDP's averaging) to 0.2 of its norm (measured 0.00-0.10; per-process
batch norm, or DDP buckets made before the channels-last switch, give 1.2-1.3), pixel AUROC to 0.02 and image AUROC
to one of its 6 good/defective pairs. The learning rate is 1e-4 so that rounding stays small over the 4 steps. The
same weights give exactly the same metrics with 2 processes as with one.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ddp, pytest.mark.slow]  # minutes: run by .ci/run as `pytest -m ddp`, once

REPO = Path(__file__).resolve().parents[1]
SEED = 0
GLOBAL_BATCH = 4
EPOCHS = 2
SIZE = 64
TRAIN_IMAGES = 8
TEST_GOOD, TEST_BAD = 3, 2  # odd: Lightning's padded sampler would score one image twice on 2 processes
FIRST_LOSS_RTOL = 1e-5
LOSS_RTOL = 1e-3
GRADIENT_RTOL = 0.2
PIXEL_AUROC_ATOL = 0.02
IMAGE_AUROC_ATOL = 1 / 6 + 1e-6
TIMEOUT = 900
LEARNING_RATE = 1e-4

CASES: dict[str, tuple[str, dict[str, object]]] = {
    "bidirmskd": ("BiDirMSKD", {}),
    "forward_only": ("BiDirMSKD", {"reverse_student": False, "fusion": False}),
    "reverse_only": ("BiDirMSKD", {"forward_student": False, "attention": False, "fusion": False}),
    "no_fusion": ("BiDirMSKD", {"fusion": False}),
    "no_attention": ("BiDirMSKD", {"attention": False}),
    "prior": ("BiDirMSKD", {"prior": True}),
    "mthf": ("MTHF", {}),
}


# ---------------------------------------------------------------------------------------------------------------
# Worker (runs in the started processes)
# ---------------------------------------------------------------------------------------------------------------


def tiny_set(root: Path, source: Path) -> Path:
    """An MVTec-layout copy of real hazelnut images at 64x64: 8 normal training images, 3 normal + 2 defective test."""
    from PIL import Image

    category = root / "hazelnut_ddp"
    if category.is_dir():
        return root
    train = sorted((source / "train" / "good").glob("*.png"))[:TRAIN_IMAGES]
    good = sorted((source / "test" / "good").glob("*.png"))[:TEST_GOOD]
    bad = sorted((source / "test" / "colour").glob("*.png"))[:TEST_BAD]
    for folder, images in (("train/good", train), ("test/good", good), ("test/colour", bad)):
        (category / folder).mkdir(parents=True)
        for image in images:
            Image.open(image).convert("RGB").resize((SIZE, SIZE)).save(category / folder / image.name)
    (category / "ground_truth" / "colour").mkdir(parents=True)
    for image in bad:
        mask = Image.open(source / "ground_truth" / "colour" / f"{image.stem}_mask.png").resize((SIZE, SIZE), 0)
        mask.save(category / "ground_truth" / "colour" / f"{image.stem}_mask.png")
    return root


def datamodule(root: Path, processes: int):
    """The tiny set; with one process, training images come in the order the distributed sampler gives them."""
    from anomalib.data import MVTecAD
    from torch.utils.data import DataLoader, DistributedSampler

    class DistributedOrder(MVTecAD):
        def train_dataloader(self) -> DataLoader:
            # Lightning's DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED) over 2 processes gives process r the
            # positions r, r + 2, ... of one permutation, so global batch k is positions 4k..4k+3 of it: exactly
            # what one replica of the same sampler gives in batches of 4.
            loader = super().train_dataloader()
            sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
            return DataLoader(
                loader.dataset, batch_size=GLOBAL_BATCH, sampler=sampler, collate_fn=loader.collate_fn, num_workers=0
            )

    cls = MVTecAD if processes > 1 else DistributedOrder
    return cls(
        root=root,
        category="hazelnut_ddp",
        train_batch_size=GLOBAL_BATCH // processes,
        eval_batch_size=2,
        num_workers=0,
    )


def build(case: str):
    from kd_ext import models

    name, options = CASES[case]
    cls = getattr(models, name)
    return cls(
        pre_processor=cls.configure_pre_processor((SIZE, SIZE)),
        epochs=EPOCHS,
        learning_rate=LEARNING_RATE,
        visualizer=False,
        **options,
    )


def recorder():
    """A callback recording the global batch's loss per step and which test images were scored."""
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Callback

    def gathered(values: list) -> list:
        if not (dist.is_available() and dist.is_initialized()):
            return values
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, values)
        return [value for part in parts for value in part]

    class Recorder(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.gradient: torch.Tensor | None = None
            self.scored: list[str] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"].detach().clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            self.losses.append(float(loss))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if self.gradient is None:  # the first step's gradient, averaged over the processes by DDP
                gradients = [p.grad.reshape(-1) for p in pl_module.model.parameters() if p.grad is not None]
                self.gradient = torch.cat(gradients).detach().clone()

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.scored.extend(Path(path).name + ":" + Path(path).parent.name for path in batch.image_path)

        def on_test_epoch_end(self, trainer, pl_module) -> None:
            self.scored = gathered(self.scored)

    return Recorder()


def work(cases: list[str], root: Path, out: Path, devices: int, num_nodes: int) -> None:
    """Fit and test each case on ``devices * num_nodes`` processes; rank 0 writes ``out/CASE.json``."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    torch.set_num_threads(1)
    processes = devices * num_nodes
    for case in cases:
        seed_everything(SEED, workers=True)
        model = build(case)
        record = recorder()
        engine = Engine(
            accelerator="cpu",
            devices=devices,
            num_nodes=num_nodes,
            strategy="ddp" if processes > 1 else "auto",
            default_root_dir=out / case,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record],
        )
        engine.fit(model, datamodule=datamodule(root, processes))
        epoch_loss = float(engine.trainer.callback_metrics["train_loss_epoch"])
        metrics = engine.test(model, datamodule=datamodule(root, processes), verbose=False)[0]
        checkpoint = out / case / "model.ckpt"
        engine.trainer.save_checkpoint(checkpoint)
        if engine.trainer.global_rank == 0:
            result = {
                "losses": record.losses,
                "epoch_loss": epoch_loss,
                "metrics": {name: float(value) for name, value in metrics.items()},
                "scored": record.scored,
                "checkpoint": str(checkpoint),
                "world_size": engine.trainer.world_size,
            }
            (out / f"{case}.json").write_text(json.dumps(result, indent=1))
            torch.save(record.gradient, out / f"{case}.gradient.pt")


def retest(cases: list[str], root: Path, out: Path, export: str | None) -> None:
    """Test each case's DDP checkpoint in one process (``out/CASE.retest.json``); export one to OpenVINO."""
    import torch
    from anomalib.engine import Engine

    torch.set_num_threads(1)
    for case in cases:
        result = json.loads((out / f"{case}.json").read_text())
        engine = Engine(accelerator="cpu", devices=1, default_root_dir=out / "retest" / case, logger=False)
        metrics = engine.test(
            build(case), datamodule=datamodule(root, 1), ckpt_path=result["checkpoint"], verbose=False
        )[0]
        (out / f"{case}.retest.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
    if export is not None:
        import numpy as np

        from kd_ext.edge import EdgeModel
        from kd_ext.export import export_openvino

        result = json.loads((out / f"{export}.json").read_text())
        name, _ = CASES[export]
        from kd_ext import models

        model = getattr(models, name).load_from_checkpoint(result["checkpoint"], weights_only=True).eval()
        images = torch.rand(2, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = model(images)
        ir = export_openvino(model, out / "ir", "fp32", input_size=(SIZE, SIZE))
        predicted = EdgeModel(ir).predict(images.numpy())
        np.testing.assert_allclose(predicted.pred_score, expected.pred_score.numpy(), atol=1e-3)
        (out / "export.json").write_text(json.dumps({"ir": str(ir)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    parser.add_argument("--root", type=Path, required=True, help="folder holding the tiny set (made if absent)")
    parser.add_argument("--source", type=Path, help="the real hazelnut_toy category to copy the tiny set from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--retest", action="store_true", help="test the DDP checkpoints in one process")
    parser.add_argument("--export", choices=sorted(CASES), help="with --retest: export this case to OpenVINO")
    args = parser.parse_args(argv)
    if args.source is not None:
        tiny_set(args.root, args.source)
    if args.retest:
        retest(args.cases, args.root, args.out, args.export)
    else:
        work(args.cases, args.root, args.out, args.devices, args.num_nodes)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def launch(arguments: list[str], out: Path, launcher: list[str] | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    command = [*(launcher or [sys.executable]), __file__, *arguments]
    completed = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, hazelnut_root: Path) -> tuple[Path, Path]:
    """Every case trained by 2 DDP processes and by one process; the DDP checkpoints retested in one process."""
    base = tmp_path_factory.mktemp("ddp")
    root, ddp, single = base / "data", base / "ddp", base / "single"
    for folder in (ddp, single):
        folder.mkdir()
    source = ["--source", str(hazelnut_root / "hazelnut_toy")]
    launch([*CASES, "--root", str(root), *source, "--out", str(ddp), "--devices", "2"], ddp)
    launch([*CASES, "--root", str(root), "--out", str(single), "--devices", "1"], single)
    launch([*CASES, "--root", str(root), "--out", str(ddp), "--retest", "--export", "bidirmskd"], ddp)
    return ddp, single


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_as_one_with_the_global_batch(runs: tuple[Path, Path], case: str) -> None:
    import torch

    ddp, single = (load(folder, case) for folder in runs)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert len(ddp["losses"]) == len(single["losses"]) == EPOCHS * TRAIN_IMAGES // GLOBAL_BATCH
    assert ddp["losses"][0] == pytest.approx(single["losses"][0], rel=FIRST_LOSS_RTOL)  # same images, same init
    assert ddp["losses"] == pytest.approx(single["losses"], rel=LOSS_RTOL)
    assert ddp["epoch_loss"] == pytest.approx(single["epoch_loss"], rel=LOSS_RTOL)  # logged with sync_dist
    gradients = [torch.load(folder / f"{case}.gradient.pt", weights_only=True) for folder in runs]
    assert float((gradients[0] - gradients[1]).norm() / gradients[1].norm()) < GRADIENT_RTOL
    assert ddp["metrics"].keys() == single["metrics"].keys()
    assert ddp["metrics"]["pixel_AUROC"] == pytest.approx(single["metrics"]["pixel_AUROC"], abs=PIXEL_AUROC_ATOL)
    assert ddp["metrics"]["image_AUROC"] == pytest.approx(single["metrics"]["image_AUROC"], abs=IMAGE_AUROC_ATOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_test_image_is_scored_once_under_ddp(runs: tuple[Path, Path], case: str) -> None:
    ddp, single = (load(folder, case) for folder in runs)
    assert sorted(single["scored"]) == sorted(ddp["scored"])
    assert len(ddp["scored"]) == TEST_GOOD + TEST_BAD == len(set(ddp["scored"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_checkpoint_tests_identically_in_one_process(runs: tuple[Path, Path], case: str) -> None:
    ddp, _ = runs
    metrics, retested = load(ddp, case)["metrics"], load(ddp, f"{case}.retest")
    assert retested["image_AUROC"] == metrics["image_AUROC"]  # the same images, each once: the same AUROC
    assert retested == pytest.approx(metrics, abs=1e-6)


def test_ddp_checkpoint_exports_to_openvino(runs: tuple[Path, Path]) -> None:
    ddp, _ = runs
    assert Path(load(ddp, "export")["ir"]).is_file()


def test_sync_batchnorm_is_refused_with_the_fix() -> None:
    """torch's conversion would drop the activations fused into timm's BatchNormAct2d layers of the students."""
    from types import SimpleNamespace

    from kd_ext.models import BiDirMSKD
    from kd_ext.models.distributed import setup_distributed

    model = BiDirMSKD(pre_trained=False, epochs=1).model
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(_layer_sync=object()))
    with pytest.raises(ValueError, match="leave sync_batchnorm off"):
        setup_distributed(trainer, model, "fit")  # type: ignore[arg-type]


def test_global_batch_norm_equals_batch_norm_of_the_whole_batch_in_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one process the global statistics are the batch's own: same output, gradients and running statistics."""
    import torch
    import torch.distributed as dist
    from timm.layers import BatchNormAct2d

    from kd_ext.models.distributed import global_batch_norm

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = BatchNormAct2d(6, act_layer=torch.nn.ReLU6).train()
        reference.weight.data.uniform_(0.5, 1.5)
        ours = BatchNormAct2d(6, act_layer=torch.nn.ReLU6).train()
        ours.load_state_dict(reference.state_dict())
        inputs = torch.randn(3, 6, 5, 7) * 3 + 1
        first, second = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
        expected = reference(first)
        actual = ours.act(global_batch_norm(ours, second))
        torch.testing.assert_close(actual, expected)
        expected.square().sum().backward()
        actual.square().sum().backward()
        torch.testing.assert_close(second.grad, first.grad)
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
        torch.testing.assert_close(ours.running_var, reference.running_var)
        torch.testing.assert_close(ours.running_mean, reference.running_mean)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_over_loopback_train_as_one(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Two torchrun "nodes" of one process each (c10d rendezvous on 127.0.0.1), as a multi-node job is started."""
    _, single = runs
    root = single.parent / "data"
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "kd-ext-ddp"]
    arguments = ["bidirmskd", "--root", str(root), "--out", str(tmp_path), "--devices", "1", "--num-nodes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    nodes = [
        subprocess.Popen(
            [*torchrun, __file__, *arguments],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(output[-6000:] for output in outputs)
    nodes_result, reference = load(tmp_path, "bidirmskd"), load(single, "bidirmskd")
    assert nodes_result["world_size"] == 2
    assert nodes_result["losses"][0] == pytest.approx(reference["losses"][0], rel=FIRST_LOSS_RTOL)
    assert nodes_result["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    assert len(nodes_result["scored"]) == TEST_GOOD + TEST_BAD == len(set(nodes_result["scored"]))


if __name__ == "__main__":
    main()
