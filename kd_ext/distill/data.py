"""The tasks' training loaders: one loader per task, combined so that every step takes one batch of every task.

An epoch has ``ceil(max_k M_k / batch_size)`` steps (one pass over the largest task's samples). Each task's global
batch is ``min(batch_size, M_k)`` of its samples, drawn from a seeded shuffled order that is drawn anew when fewer
samples than a batch are left, and that carries on across epochs, so a smaller task cycles through its samples
as often as needed (every loader has the same number of steps; Lightning's ``CombinedLoader`` joins them).

With ``P`` processes (Lightning's DDP) every process draws the same global batches and takes its equal contiguous
share of each (:func:`process_share`): the shares of all processes, in rank order, are the one-process batch, so
the training equals one process's (Lightning's own distributed sampler, which deals whole epochs out in strides,
is not used).
"""

import math
import time
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from .targets import TaskSamples


def check_process_shares(batch_size: int, processes: int, samples: dict[str, int] | None = None) -> None:
    """Check that every task's global batch splits into equal shares, one per process.

    A task's global batch is ``min(batch_size, samples)`` (a task with fewer samples than ``batch_size`` takes all of
    them at each step); each of the ``processes`` takes ``1 / processes`` of it (:func:`process_share`).

    Args:
        batch_size: ``training.batch_size``, each task's global batch.
        processes: Number of processes (Lightning's world size).
        samples: Training samples per task (clean and synthetic); ``None`` checks ``batch_size`` alone.

    Raises:
        ValueError: Naming the fix, if ``processes`` does not divide ``batch_size`` or a task's batch, or a task has
            fewer samples than processes.
    """
    if batch_size % processes:
        msg = (
            f"training.batch_size {batch_size} is each task's global batch, shared equally by the {processes} "
            f"processes: set it to a multiple of {processes}, or start a number of processes that divides it."
        )
        raise ValueError(msg)
    problems = []
    for task, count in (samples or {}).items():
        if count < processes:
            problems.append(
                f"task '{task}' has {count} training samples for {processes} processes: start {count} or fewer"
            )
        elif min(batch_size, count) % processes:
            problems.append(
                f"task '{task}' has {count} training samples, fewer than training.batch_size {batch_size}, so its "
                f"batch is all {count}, which {processes} processes cannot share equally: set training.batch_size to "
                f"at most {count - count % processes}"
            )
    if problems:
        msg = "Cannot share the batches among the processes:\n  - " + "\n  - ".join(problems)
        raise ValueError(msg)


def process_share(batch: torch.Tensor, rank: int, processes: int) -> torch.Tensor:
    """Process ``rank``'s share of a global batch: its ``rank``-th contiguous slice of ``len(batch) / processes``.

    The shares of all processes, in rank order, are the global batch (see :func:`check_process_shares`).
    """
    share = batch.shape[0] // processes
    return batch[rank * share : (rank + 1) * share]


class GlobalBatchShares(Sampler[list[int]]):
    """One task's batches of sample indices: each step's global batch, and this process's share of it.

    Args:
        size: The task's number of samples.
        batch_size: Global batch (``min(batch_size, size)`` is taken).
        steps: Batches per epoch.
        seed: Seed of the shuffled order (the same on every process).
        rank: This process's rank.
        processes: Number of processes.
    """

    def __init__(self, size: int, batch_size: int, steps: int, seed: int, rank: int = 0, processes: int = 1) -> None:
        super().__init__()
        self.size = size
        self.batch_size = min(batch_size, size)
        self.steps = steps
        self.rank = rank
        self.processes = processes
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.position = 0

    def __len__(self) -> int:
        return self.steps

    def global_batch(self) -> torch.Tensor:
        """The next global batch (a new shuffled order when fewer samples than a batch are left)."""
        if self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield process_share(self.global_batch(), self.rank, self.processes).tolist()


class TaskDataset(Dataset):
    """One task's samples; a batch of indices gives one batched ``TaskBatch`` (see ``CrossTaskDistillation``).

    Args:
        samples: The task's samples.
    """

    def __init__(self, samples: TaskSamples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> dict[str, object]:
        """The batch of ``indices`` (tensors indexed at once, already batched)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            "image": self.samples.images[index],
            "map_target": self.samples.map_targets[index],
            "score_target": self.samples.score_targets[index],
            "teacher_features": [level[index] for level in self.samples.teacher_features],
        }

    def __getitem__(self, index: int) -> dict[str, object]:
        """Sample ``index`` (unbatched)."""
        return {
            "image": self.samples.images[index],
            "map_target": self.samples.map_targets[index],
            "score_target": self.samples.score_targets[index],
            "teacher_features": [level[index] for level in self.samples.teacher_features],
        }


def _batched(batch: dict[str, object]) -> dict[str, object]:
    """Collate function of :class:`TaskDataset` loaders: its batches are batched already."""
    return batch


class DistillationData(LightningDataModule):
    """Every task's training samples as one ``CombinedLoader`` of per-task loaders (see the module's description).

    The samples are given, or built in :meth:`setup` by ``build`` (called with this process's device once Lightning
    has started the processes, so that a build can share work among them).

    Args:
        batch_size: Each task's global batch.
        seed: Seed of the tasks' shuffled orders.
        samples: The samples per task (in the student's task order), or ``None`` to build them.
        build: Builds the samples from this process's device (required without ``samples``).

    Raises:
        ValueError: If neither ``samples`` nor ``build`` is given.
    """

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        samples: dict[str, TaskSamples] | None = None,
        build: Callable[[torch.device], dict[str, TaskSamples]] | None = None,
    ) -> None:
        super().__init__()
        if samples is None and build is None:
            msg = "DistillationData needs the samples or a function that builds them."
            raise ValueError(msg)
        self.batch_size = batch_size
        self.seed = seed
        self.samples = samples
        self.build = build
        self.build_seconds = 0.0
        """Seconds :meth:`setup` took to build the samples (0 when they were given)."""

    def setup(self, stage: str) -> None:
        """Build the samples (once) on this process's device."""
        del stage
        if self.samples is not None:
            return
        start = time.perf_counter()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.samples = self.build(device)  # type: ignore[misc]
        self.build_seconds = time.perf_counter() - start

    def train_dataloader(self) -> CombinedLoader:
        """One loader per task, this process's shares of the global batches, combined.

        Raises:
            ValueError: If the processes cannot share a task's batches (:func:`check_process_shares`).
        """
        if self.samples is None:
            msg = "DistillationData.setup() builds the samples before the loaders: call it first."
            raise ValueError(msg)
        rank, processes = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        check_process_shares(self.batch_size, processes, {task: len(samples) for task, samples in self.samples.items()})
        steps = math.ceil(max(len(samples) for samples in self.samples.values()) / self.batch_size)
        loaders = {
            task: DataLoader(
                TaskDataset(samples),
                batch_sampler=GlobalBatchShares(
                    len(samples), self.batch_size, steps, self.seed + index, rank, processes
                ),
                collate_fn=_batched,
                num_workers=0,
            )
            for index, (task, samples) in enumerate(self.samples.items())
        }
        return CombinedLoader(loaders, mode="max_size_cycle")
