"""Training through Lightning: the trainer (DDP, progress bar, loggers) and the distillation module for a config.

One process trains on the configured accelerator. Several processes train together through Lightning's
``DDPStrategy``: ``training.devices`` processes on this machine (Lightning starts the others by running the same
command again), or the processes of ``torchrun`` (``torchrun --nproc-per-node P --no-python kd-ext distill
CONFIG``; Lightning reads torchrun's environment). ``training.distributed_timeout`` is the strategy's timeout of
every collective operation. What DDP would do differently from one process with the global batch is arranged by
:class:`~kd_ext.models.cross_task.CrossTaskDistillation` and :class:`~.data.DistillationData` (equal shares of
every global batch, global batch statistics, averaged losses), so any number of processes trains the same student.
"""

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import distributed as dist

from kd_ext.models.cross_task import CrossTaskDistillation, CrossTaskStudent

from .config import TargetKind, TrainingConfig
from .data import DistillationData
from .targets import TaskSamples


class StderrProgressBar(TQDMProgressBar):
    """Lightning's progress bar on stderr: ``kd-ext distill`` keeps stdout for its JSON summary."""

    def init_train_tqdm(self):  # noqa: ANN201 (Lightning's Tqdm)
        """The training bar, written to stderr."""
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()


def process_layout(devices: int) -> tuple[int, int]:
    """``(devices, num_nodes)`` for Lightning: torchrun's processes when it started this one, else ``devices`` here.

    Args:
        devices: ``training.devices``.

    Returns:
        tuple[int, int]: Processes per node and nodes.
    """
    if dist.is_available() and dist.is_torchelastic_launched():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return local, max(int(os.environ.get("WORLD_SIZE", str(local))) // local, 1)
    return devices, 1


def distillation_trainer(
    config: TrainingConfig,
    root: Path | None = None,
    logger: bool = True,
    progress_bar: bool = True,
) -> Trainer:
    """The Lightning trainer of a distillation (nothing starts before ``fit``).

    Args:
        config: Training settings (epochs, accelerator, devices, distributed timeout).
        root: Lightning's ``default_root_dir`` (the working directory when ``None``).
        logger: Log the training metrics (every step's loss; every epoch's per-task losses, weights and temperatures)
            with Lightning's ``CSVLogger`` into ``ROOT/lightning_logs/version_N/metrics.csv``.
        progress_bar: Show Lightning's progress bar and model summary (both on stderr).

    Returns:
        Trainer: The trainer; its ``world_size`` is the number of processes that will train.
    """
    devices, nodes = process_layout(config.devices)
    strategy: DDPStrategy | str = "auto"
    if devices * nodes > 1:
        # Buffers need no broadcast: the batch-norm statistics are the global batch's on every process already.
        strategy = DDPStrategy(timeout=timedelta(minutes=config.distributed_timeout), broadcast_buffers=False)
    return Trainer(
        accelerator=config.accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        max_epochs=config.epochs,
        use_distributed_sampler=False,  # DistillationData deals each process its share of every global batch
        enable_checkpointing=False,  # the student's checkpoint is written once it is trained and evaluated
        num_sanity_val_steps=0,
        logger=CSVLogger(root if root is not None else Path.cwd()) if logger else False,
        log_every_n_steps=1,
        enable_progress_bar=progress_bar,
        enable_model_summary=progress_bar,
        # Lightning's logging summary (its rich one would print the table to stdout)
        callbacks=[StderrProgressBar(), ModelSummary()] if progress_bar else [],
        default_root_dir=root,
    )


def distillation_module(
    student: CrossTaskStudent, config: TrainingConfig, teacher_channels: dict[str, list[int]]
) -> CrossTaskDistillation:
    """The LightningModule that trains ``student`` with ``config``'s losses.

    Args:
        student: The student.
        config: Training settings.
        teacher_channels: Per task, the teacher's feature channels per level (used with feature distillation of
            teacher targets only).

    Returns:
        CrossTaskDistillation: The module (training-only modules initialised from ``config.seed``).
    """
    distilled = config.targets == TargetKind.teacher and config.feature_distillation
    return CrossTaskDistillation(
        student,
        teacher_channels=teacher_channels if distilled else {},
        learning_rate=config.learning_rate,
        task_weighting=str(config.task_weighting),  # plain strings in the logged hyper-parameters
        dwa_temperature=config.dwa_temperature,
        temperature=str(config.temperature),
        initial_temperature=config.initial_temperature,
        imbalance=str(config.imbalance),
        score_weight=config.score_weight,
        feature_weight=config.feature_weight,
        crop_size=config.crop_size,
        seed=config.seed,
    )


def fit_student(trainer: Trainer, module: CrossTaskDistillation, data: DistillationData) -> list[dict]:
    """``trainer.fit`` of the distillation; the student ends on the CPU in eval mode.

    Returns:
        list[dict]: The training history (:attr:`CrossTaskDistillation.history`).
    """
    trainer.fit(module, datamodule=data)
    return module.history


def train_student(
    student: CrossTaskStudent,
    samples: dict[str, TaskSamples],
    config: TrainingConfig,
    progress_bar: bool = False,
) -> list[dict]:
    """Train the student on given samples, without logger or checkpoints (tests, benchmarks).

    Args:
        student: The student.
        samples: Samples per task, in the student's task order.
        config: Training settings: task weighting (fixed / DWA / uncertainty), temperature (fixed / adaptive),
            feature distillation, imbalance handling, accelerator, devices.
        progress_bar: Show Lightning's progress bar.

    Returns:
        list[dict]: Per epoch: each task's mean unweighted loss and its parts, weight and temperature, and the
        weighted total loss of every step.
    """
    channels = {task: task_samples.teacher_channels() for task, task_samples in samples.items()}
    module = distillation_module(student, config, channels)
    data = DistillationData(config.batch_size, config.seed, samples=samples)
    return fit_student(distillation_trainer(config, logger=False, progress_bar=progress_bar), module, data)
