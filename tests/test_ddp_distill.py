"""``kd-ext distill`` with 2 processes (Lightning's DDP, gloo on the CPU) equals one process with the same config.

Two tiny real tasks (64x64 hazelnut photos: 8 and 12 normal training images, one synthetic anomaly each, so 16 and 24
samples) and one anomalib Padim teacher trained here. The small trainable student (DWA, adaptive temperature, feature
distillation; global batch 4 per task, so 6 steps an epoch, 3 epochs) is distilled by 2 torchrun processes and by one
process. The teacher targets every process caches must equal one process's bit for bit; each process must have run
the teacher on its share of the images only and trained on half of each global batch; the first step's loss must
agree to 1e-5 and every step's to 1e-2; the final student's weights must agree to 1e-2 of how far training moved
them and its probabilities on the test images to 1e-3; rank 0 alone reports, and its checkpoint tests in one
process as the report says (to 1e-5: a student reloaded from its checkpoint scores pixels a few 1e-7 apart from the
in-memory one, in a one-process run too). A second setting (uncertainty weighting, fixed temperature, no feature
distillation, 32x32 training crops) is distilled by ``torchrun --no-python kd-ext distill`` itself and by
``kd-ext distill --training.devices 2`` (Lightning starts the second process): both must train as one process.

This file is also the worker script the tests start (``python tests/test_ddp_distill.py CONFIG --out DIR ...``).

Tolerances. Two processes sum each batch-norm statistic as two half-batch sums and oneDNN picks kernels by batch
size, so activations differ from one process's in the last bits (the first step's loss by about 2e-7). The students'
ReLU6 kinks and top-k scores turn a few of those into different gradients, which Adam's nearly sign-like first steps
and the few-sample class-balanced score loss amplify: one process run with 2 threads instead of 1 differs from itself
by as much (first gradient 0.4 % of its norm either way). Measured at the learning rate used here (1e-4): step losses
within 1.1e-3 (2 threads: 1.3e-4), weights within 4e-4 of the training update (2 threads: 3e-4), probabilities
within 8e-5 (2 threads: 7e-5). A missing global
statistic shows in the first step already (per-process batch norm or class balance) or in the epoch means.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ddp = pytest.mark.ddp  # with slow: run by .ci/run as `pytest -m ddp`; the checks at the end are fast
slow = pytest.mark.slow

SIZE = 64
FIRST_LOSS_RTOL = 1e-5
LOSS_RTOL = 1e-2
WEIGHT_RTOL = 1e-2
PROBABILITY_ATOL = 1e-3
TIMEOUT = 600
TASKS = {"a": (range(0, 8), range(0, 3), range(0, 2)), "b": (range(8, 20), range(3, 6), range(2, 4))}
"""Per task: the hazelnut_toy training, good test and colour test images it takes (by sorted position)."""


# ---------------------------------------------------------------------------------------------------------------
# Worker (runs in the started processes)
# ---------------------------------------------------------------------------------------------------------------


def work(config: Path, out: Path, extra: list[str]) -> int:
    """Run ``kd-ext distill CONFIG`` and record, per rank, the cached samples, the images the teacher saw and the
    trunk's training batches (``out/rank{R}.pt``); returns the command's exit status."""
    import torch

    from kd_ext import cli
    from kd_ext.distill import pipeline

    torch.set_num_threads(1)
    cache, fit = pipeline.cache_samples, pipeline.fit_student
    record: dict = {"teacher_images": 0, "trunk_batches": []}

    def cache_samples(tasks, student, config, device, log):
        def count(module, inputs):
            record["teacher_images"] += inputs[0].shape[0]

        hooks = [task.teacher.model.register_forward_pre_hook(count) for task in tasks]
        samples = cache(tasks, student, config, device, log)
        for hook in hooks:
            hook.remove()
        record["samples"] = {
            name: {
                "map_targets": task.map_targets,
                "score_targets": task.score_targets,
                "teacher_features": task.teacher_features,
                "images": task.images,
            }
            for name, task in samples.items()
        }
        return samples

    def fit_student(trainer, module, data):
        model = module.student.model
        record["initial"] = {name: value.clone() for name, value in model.state_dict().items()}

        def batch(module, inputs):
            if module.training:  # a training step's trunk pass (not a probe for the trunk's shapes)
                record["trunk_batches"].append(inputs[0].shape[0])

        hook = model.trunk.register_forward_pre_hook(batch)
        try:
            return fit(trainer, module, data)
        finally:
            hook.remove()

    pipeline.cache_samples, pipeline.fit_student = cache_samples, fit_student
    status = cli.main(["distill", str(config), *extra])
    torch.save(record, out / f"rank{os.environ.get('RANK', '0')}.pt")
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    arguments, extra = parser.parse_known_args(argv)
    sys.exit(work(arguments.config, arguments.out, extra))


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
    return completed


def torchrun(processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
            str(free_port())]  # fmt: skip


def tiny_tasks(root: Path, source: Path) -> Path:
    """Two MVTec-layout categories of 64x64 hazelnut photos (see :data:`TASKS`)."""
    from PIL import Image

    listing = {folder: sorted((source / folder).glob("*.png")) for folder in ("train/good", "test/good", "test/colour")}
    for name, picks in TASKS.items():
        category = root / f"nut_{name}"
        for (folder, images), chosen in zip(listing.items(), picks, strict=True):
            (category / folder).mkdir(parents=True)
            for index in chosen:
                Image.open(images[index]).convert("RGB").resize((SIZE, SIZE)).save(
                    category / folder / images[index].name
                )
        (category / "ground_truth" / "colour").mkdir(parents=True)
        for index in picks[2]:
            stem = listing["test/colour"][index].stem
            mask = Image.open(source / "ground_truth" / "colour" / f"{stem}_mask.png").resize((SIZE, SIZE), 0)
            mask.save(category / "ground_truth" / "colour" / f"{stem}_mask.png")
    return root


def padim_teacher(root: Path, workdir: Path) -> Path:
    """anomalib's Padim (random-initialised offline Lite0 backbone) fitted on task a: a teacher checkpoint."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim

    from kd_ext.backbones import no_pretrained_downloads
    from kd_ext.models.checkpoint import teacher_pre_processor

    with no_pretrained_downloads():
        model = Padim(
            backbone="tf_efficientnet_lite0",
            layers=["blocks.1", "blocks.2"],
            pre_trained=False,
            n_features=32,
            pre_processor=teacher_pre_processor("efficientnet_lite0", (SIZE, SIZE)),
        )
    engine = Engine(max_epochs=1, default_root_dir=workdir, logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=MVTecAD(root=root, category="nut_a", train_batch_size=8, num_workers=0))
    checkpoint = workdir / "padim.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return checkpoint


def write_config(path: Path, root: Path, teacher: Path, student: dict, training: dict) -> Path:
    import yaml

    tasks = [
        {
            "name": name,
            "checkpoint": str(teacher),
            "model": "Padim",
            "data": {"root": str(root), "category": f"nut_{name}"},
        }
        for name in TASKS
    ]
    settings = {"batch_size": 4, "synthetic_per_image": 1, "crop_size": 0, **training}  # crop 0: whole images
    config = {"output": "student", "tasks": tasks, "student": student, "training": settings}
    path.write_text(yaml.safe_dump({**config, "export": {"precision": "none"}}))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, hazelnut_root: Path) -> dict:
    base = tmp_path_factory.mktemp("ddp_distill")
    root = tiny_tasks(base / "data", hazelnut_root / "hazelnut_toy")
    teacher = padim_teacher(root, base / "teacher")
    training = {"epochs": 3, "task_weighting": "dwa", "temperature": "adaptive", "dwa_temperature": 0.5}
    small = write_config(
        base / "small.yaml", root, teacher, {"trunk": "small", "hidden_channels": 8}, training | {"learning_rate": 1e-4}
    )
    training = {
        "epochs": 2,
        "task_weighting": "uncertainty",
        "temperature": "fixed",
        "feature_distillation": False,
        "crop_size": 32,
        "learning_rate": 1e-4,
    }
    cropped = write_config(base / "cropped.yaml", root, teacher, {"hidden_channels": 8}, training)
    return {"base": base, "root": root, "small": small, "cropped": cropped}


@pytest.fixture(scope="module")
def small_runs(setup: dict) -> dict:
    """The small-trunk student distilled by 2 torchrun processes (exporting its IR) and by one process."""
    ddp, single = setup["base"] / "ddp", setup["base"] / "single"
    for folder in (ddp, single):
        folder.mkdir()
    worker = [__file__, str(setup["small"]), "--out"]
    ddp_run = run([*torchrun(), *worker, str(ddp), "--export.precision", "fp32"], ddp)
    run([sys.executable, *worker, str(single)], single)
    return {"ddp": ddp, "single": single, "stdout": ddp_run.stdout}


def report(folder: Path) -> dict:
    return json.loads((folder / "student" / "report.json").read_text())


def record(folder: Path, rank: int) -> dict:
    import torch

    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


@ddp
@slow
def test_every_process_caches_one_process_teacher_targets(small_runs: dict) -> None:
    import torch

    reference = record(small_runs["single"], 0)
    shares = [record(small_runs["ddp"], rank) for rank in (0, 1)]
    for share in shares:
        for task, expected in reference["samples"].items():
            actual = share["samples"][task]
            assert torch.equal(actual["map_targets"], expected["map_targets"])
            assert torch.equal(actual["score_targets"], expected["score_targets"])
            assert torch.equal(actual["images"], expected["images"])
            assert len(actual["teacher_features"]) == len(expected["teacher_features"]) == 2
            assert all(map(torch.equal, actual["teacher_features"], expected["teacher_features"]))
    # Sharded: each process ran the teacher on its chunks of 8 only (task a: 2 chunks, b: 3), together on all.
    assert [share["teacher_images"] for share in shares] == [8 + 16, 8 + 8]
    assert reference["teacher_images"] == 16 + 24


@ddp
@slow
def test_two_processes_train_as_one_with_the_global_batch(small_runs: dict) -> None:
    ddp, single = report(small_runs["ddp"]), report(small_runs["single"])
    assert ddp["processes"] == 2 and single["processes"] == 1
    ddp_steps = [loss for epoch in ddp["history"] for loss in epoch["steps"]]
    single_steps = [loss for epoch in single["history"] for loss in epoch["steps"]]
    assert len(ddp_steps) == len(single_steps) == 3 * 6
    assert ddp_steps[0] == pytest.approx(single_steps[0], rel=FIRST_LOSS_RTOL)
    assert ddp_steps == pytest.approx(single_steps, rel=LOSS_RTOL)
    for ours, theirs in zip(ddp["history"], single["history"], strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)  # DWA's inputs: the global epoch means
        assert ours["weight"] == pytest.approx(theirs["weight"], rel=LOSS_RTOL)
        assert ours["temperature"] == pytest.approx(theirs["temperature"], rel=LOSS_RTOL)
    assert ddp["history"][2]["weight"]["a"] != pytest.approx(1.0, abs=1e-4)  # DWA moved the weights
    # Each process's trunk saw half of every step's batches (2 of each task's 4), one process all of them.
    assert set(record(small_runs["ddp"], 1)["trunk_batches"]) == {4}
    assert set(record(small_runs["single"], 0)["trunk_batches"]) == {8}


@ddp
@slow
def test_ddp_student_weights_equal_one_process_within_rounding(small_runs: dict, setup: dict) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from kd_ext.models.cross_task import CrossTaskStudent

    students = [
        CrossTaskStudent.load_from_checkpoint(folder / "student" / "student.ckpt", weights_only=True).eval()
        for folder in (small_runs["ddp"], small_runs["single"])
    ]
    states = [student.model.state_dict() for student in students]
    assert report(small_runs["ddp"])["processes"] == 2  # trained together, not as two one-process runs
    initial = record(small_runs["single"], 0)["initial"]
    assert all(torch.equal(initial[name], record(small_runs["ddp"], 0)["initial"][name]) for name in initial)
    names = [name for name, value in initial.items() if value.is_floating_point()]
    ddp, single, start = (torch.cat([state[name].flatten() for name in names]) for state in (*states, initial))
    update = (single - start).norm()
    assert update > 0
    assert float((ddp - single).norm() / update) < WEIGHT_RTOL
    # The same function: probabilities on every test image of both tasks.
    files = sorted(setup["root"].glob("nut_*/test/*/*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(path).convert("RGB"))) for path in files])
    images = images.permute(0, 3, 1, 2).float() / 255
    for task in TASKS:
        outputs = []
        for student in students:
            student.select_task(task)
            with torch.no_grad():
                outputs.append(student(images))
        torch.testing.assert_close(outputs[0].anomaly_map, outputs[1].anomaly_map, atol=PROBABILITY_ATOL, rtol=0)
        torch.testing.assert_close(outputs[0].pred_score, outputs[1].pred_score, atol=PROBABILITY_ATOL, rtol=0)


@ddp
@slow
def test_only_rank_zero_reports_and_its_checkpoint_tests_in_one_process(small_runs: dict, setup: dict) -> None:
    from kd_ext.distill.config import DistillConfig
    from kd_ext.distill.pipeline import test_metrics
    from kd_ext.distill.tasks import PreparedTask
    from kd_ext.models.cross_task import CrossTaskStudent

    # stdout is rank 0's JSON summary alone (Lightning's progress bar and logs go to stderr, rank 1 prints nothing).
    summary = json.loads(small_runs["stdout"])
    result = report(small_runs["ddp"])
    assert summary["checkpoint"] == result["checkpoint"]
    assert Path(small_runs["ddp"] / result["openvino"]).is_file()
    student = CrossTaskStudent.load_from_checkpoint(small_runs["ddp"] / result["checkpoint"], weights_only=True).eval()
    config = DistillConfig.from_yaml(setup["small"])
    for task in config.tasks:
        student.select_task(task.name)
        metrics = test_metrics(student, PreparedTask(task, None, (SIZE, SIZE)))  # type: ignore[arg-type]
        # The reloaded student's maps differ from the in-memory one's in the last bits, as in one process.
        assert metrics == pytest.approx(result["tasks"][task.name]["student"], abs=1e-5)
    logged = sorted((small_runs["ddp"] / "student" / "lightning_logs").glob("version_*/metrics.csv"))
    assert len(logged) == 1  # Lightning's logger, on rank 0 only
    assert "loss/a" in logged[0].read_text().splitlines()[0]


def probabilities(folders: list[Path], root: Path) -> list:
    """Every test image's probabilities per task, of the students distilled into ``folders``."""
    import numpy as np
    import torch
    from PIL import Image

    from kd_ext.models.cross_task import CrossTaskStudent

    files = sorted(root.glob("nut_*/test/*/*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(path).convert("RGB"))) for path in files])
    images = images.permute(0, 3, 1, 2).float() / 255
    outputs = []
    for folder in folders:
        student = CrossTaskStudent.load_from_checkpoint(folder / "student" / "student.ckpt", weights_only=True).eval()
        per_task = {}
        for task in TASKS:
            student.select_task(task)
            with torch.no_grad():
                per_task[task] = student(images)
        outputs.append(per_task)
    return outputs


@ddp
@slow
def test_torchrun_no_python_and_lightning_devices_train_as_one_process(setup: dict) -> None:
    """``torchrun --no-python kd-ext distill CONFIG`` and ``kd-ext distill CONFIG --training.devices 2`` (Lightning
    starts the second process by running the command again), with uncertainty weights and training crops."""
    import torch

    folders = [setup["base"] / name for name in ("cropped_torchrun", "cropped_devices", "cropped_single")]
    for folder in folders:
        folder.mkdir()
    command = [str(Path(sys.executable).parent / "kd-ext"), "distill", str(setup["cropped"])]
    run([*torchrun(), "--no-python", *command], folders[0])
    run([*command, "--training.devices", "2"], folders[1])
    run(command, folders[2])
    reports = [report(folder) for folder in folders]
    assert [result["processes"] for result in reports] == [2, 2, 1]
    steps = [[loss for epoch in result["history"] for loss in epoch["steps"]] for result in reports]
    assert len(steps[2]) == 2 * 6
    for result, ours in zip(reports[:2], steps[:2], strict=True):
        assert ours[0] == pytest.approx(steps[2][0], rel=FIRST_LOSS_RTOL)
        assert ours == pytest.approx(steps[2], rel=LOSS_RTOL)
        for epoch, theirs in zip(result["history"], reports[2]["history"], strict=True):
            assert epoch["weight"] == pytest.approx(theirs["weight"], rel=LOSS_RTOL)  # learnt uncertainty weights
    assert reports[2]["history"][-1]["weight"]["a"] != pytest.approx(1.0, abs=1e-5)  # they moved
    *distributed, single = probabilities(folders, setup["root"])
    for outputs in distributed:
        for task in TASKS:
            torch.testing.assert_close(
                outputs[task].anomaly_map, single[task].anomaly_map, atol=PROBABILITY_ATOL, rtol=0
            )
            torch.testing.assert_close(outputs[task].pred_score, single[task].pred_score, atol=PROBABILITY_ATOL, rtol=0)


def torchrun_environment(rank: int, processes: int, port: int) -> dict[str, str]:
    """The environment torchrun gives process ``rank`` of ``processes`` on one node (what Lightning detects)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "TORCHELASTIC_RUN_ID": "kd_ext_test",
    }


@ddp
@slow
def test_a_stuck_process_does_not_hang_the_others(tmp_path: Path) -> None:
    """Rank 1 never joins the gather: rank 0 fails after ``training.distributed_timeout`` instead of waiting forever.

    The process group is the one ``kd-ext distill``'s trainer starts (``strategy.setup_environment()``, the first
    thing ``fit`` does), with the timeout Lightning's ``DDPStrategy`` got from the config.
    """
    script = (
        "import sys, time\n"
        "import torch\n"
        "from kd_ext.distill.config import TrainingConfig\n"
        "from kd_ext.distill.training import distillation_trainer\n"
        "from kd_ext.models.distributed import gather_chunks\n"
        "trainer = distillation_trainer(TrainingConfig(distributed_timeout=5 / 60), logger=False, progress_bar=False)\n"
        "trainer.strategy.setup_environment()\n"
        "if trainer.global_rank == 1:\n"
        "    time.sleep(60)\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    gather_chunks(lambda chunk: [chunk * 2], torch.arange(8.0), 2)\n"
        "except Exception as error:\n"
        "    print(f'failed after {time.monotonic() - start:.0f} s: {type(error).__name__}')\n"
        "    sys.exit(3)\n"
    )
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**os.environ, "OMP_NUM_THREADS": "1", **torchrun_environment(rank, 2, port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        output = processes[0].communicate(timeout=50)[0]
    finally:
        processes[1].kill()
        processes[1].wait()
        processes[0].kill()
    assert processes[0].returncode == 3, output[-3000:]
    assert "failed after" in output


# Fast checks of the sharing rules and the trainer (no process group).


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shares_are_equal_slices_whose_union_is_the_global_batch(processes: int) -> None:
    import torch

    from kd_ext.distill.data import check_process_shares, process_share

    batch = torch.randperm(16)[:8]
    check_process_shares(8, processes, {"a": 8, "b": 30})
    shares = [process_share(batch, rank, processes) for rank in range(processes)]
    assert [len(share) for share in shares] == [8 // processes] * processes
    assert torch.equal(torch.cat(shares), batch)  # in rank order: the one-process batch


@pytest.mark.parametrize("processes", [2, 4])
def test_every_process_loads_its_share_of_the_one_process_batches_across_epochs(processes: int) -> None:
    """The loaders of P processes, step by step and epoch after epoch, give the one-process batches in shares."""
    import torch

    from kd_ext.distill.data import DistillationData
    from kd_ext.distill.targets import TaskSamples

    def samples() -> dict[str, TaskSamples]:
        sizes = {"a": 12, "b": 30}  # a: fewer samples than an epoch's batches take, so it cycles (and reshuffles)
        return {
            task: TaskSamples(
                torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, 2, 2),
                torch.zeros(count, 1, 1, 1),
                torch.arange(count, dtype=torch.float32),
                [torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)],
            )
            for task, count in sizes.items()
        }

    class Trainer:
        def __init__(self, rank: int, world_size: int) -> None:
            self.global_rank, self.world_size = rank, world_size

    def epochs(rank: int, world_size: int) -> list[list[dict]]:
        data = DistillationData(batch_size=8, seed=3, samples=samples())
        data.trainer = Trainer(rank, world_size)  # type: ignore[assignment]
        loader = data.train_dataloader()  # built once, iterated per epoch (as Lightning does)
        return [[batch for batch, *_ in loader] for _ in range(3)]

    single = epochs(0, 1)
    shares = [epochs(rank, processes) for rank in range(processes)]
    assert [len(epoch) for epoch in single] == [4, 4, 4]  # ceil(30 / 8) steps, every epoch
    seen = set()
    for epoch, batches in enumerate(single):
        for step, batch in enumerate(batches):
            for task in ("a", "b"):
                union = torch.cat([share[epoch][step][task]["score_target"] for share in shares])
                assert torch.equal(union, batch[task]["score_target"])
                assert batch[task]["score_target"].shape == (8,)
                # the image and the teacher features of a sample come with it
                assert torch.equal(batch[task]["image"][:, 0, 0, 0], batch[task]["score_target"])
                assert torch.equal(batch[task]["teacher_features"][0][:, 0, 0, 0], batch[task]["score_target"])
            seen.update(batch["a"]["score_target"].tolist())
    assert seen == set(range(12))  # the small task cycles through all its samples


def test_batches_the_processes_cannot_share_are_refused_with_the_fix() -> None:
    from kd_ext.distill.data import check_process_shares

    with pytest.raises(ValueError, match=r"batch_size 6 is each task's global batch.*multiple of 4"):
        check_process_shares(6, 4)
    with pytest.raises(ValueError, match="task 'a' has 3 training samples for 4 processes: start 3 or fewer"):
        check_process_shares(8, 4, {"a": 3, "b": 40})
    with pytest.raises(ValueError, match=r"task 'b' has 6 .* set training.batch_size to at most 4"):
        check_process_shares(8, 4, {"a": 40, "b": 6})
    check_process_shares(8, 4, {"a": 4, "b": 12})  # a's batch is all of its 4 samples, one each


@pytest.mark.parametrize("launch", ["torchrun", "devices"])
def test_distill_refuses_an_indivisible_batch_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launch: str
) -> None:
    """The batch check comes before the tasks are read and before any process starts or waits for another."""
    import torch.distributed as dist

    from kd_ext.distill import DistillConfig, distill

    training: dict = {"batch_size": 6}
    if launch == "torchrun":
        for name, value in torchrun_environment(0, 4, free_port()).items():
            monkeypatch.setenv(name, value)
    else:
        training["devices"] = 4
    task = {"name": "a", "checkpoint": str(tmp_path / "missing.ckpt"), "data": {"root": str(tmp_path), "category": "x"}}
    config = DistillConfig.from_dict({"tasks": [task], "output": str(tmp_path / "out"), "training": training})
    with pytest.raises(ValueError, match="multiple of 4"):
        distill(config, log=lambda line: None)
    assert not dist.is_initialized()
    assert not (tmp_path / "out").exists()


def test_trainer_follows_torchrun_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from kd_ext.distill.config import TrainingConfig
    from kd_ext.distill.training import distillation_trainer

    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    one = distillation_trainer(TrainingConfig(accelerator="cpu"), logger=False, progress_bar=False)
    assert one.world_size == 1 and not isinstance(one.strategy, DDPStrategy)
    two = distillation_trainer(TrainingConfig(accelerator="cpu", devices=2), logger=False, progress_bar=False)
    assert two.world_size == 2 and isinstance(two.strategy, DDPStrategy)
    for name, value in torchrun_environment(1, 3, free_port()).items():
        monkeypatch.setenv(name, value)
    torchrun = distillation_trainer(TrainingConfig(accelerator="cpu"), logger=False, progress_bar=False)
    assert (torchrun.world_size, torchrun.global_rank) == (3, 1)  # torchrun's processes, whatever devices says
    assert isinstance(torchrun.strategy, DDPStrategy)


def test_gather_chunks_in_one_process_computes_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.distributed as dist

    from kd_ext.models.distributed import gather_chunks

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gathered = gather_chunks(lambda chunk: [chunk * 2, chunk.sum(dim=1)], torch.arange(10.0).reshape(5, 2), 2)
    assert not dist.is_initialized()
    assert torch.equal(gathered[0], torch.arange(10.0).reshape(5, 2) * 2)
    assert torch.equal(gathered[1], torch.tensor([1.0, 5.0, 9.0, 13.0, 17.0]))


def test_distributed_settings_are_checked() -> None:
    from kd_ext.distill.config import TrainingConfig

    with pytest.raises(ValueError, match=r"training\.distributed_timeout must be > 0 and finite, got 0"):
        TrainingConfig(distributed_timeout=0)
    with pytest.raises(ValueError, match=r"training\.devices must be a whole number >= 1"):
        TrainingConfig(devices=0)


if __name__ == "__main__":
    main()
