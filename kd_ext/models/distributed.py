"""Distributed data-parallel training of kd_ext models: each process's share is a slice of one global batch.

Lightning's DDP strategies (``--trainer.strategy ddp --trainer.devices N --trainer.num_nodes M``) give every process
its own slice of each batch and average the gradients. For a kd_ext model that is the same training as one process
with the global batch once three things hold, which :class:`~kd_ext.models.base.KDExtModelMixin` arranges through
the functions here:

* **Batch statistics are global.** The students' batch-norm layers normalise with the mean and variance of the whole
  global batch (:func:`use_global_batch_norm`), on any device and backend (gloo on CPU included; torch's
  ``SyncBatchNorm`` runs on GPUs only), and the models' other moving statistics (MTHF's group-map statistics) are
  averaged over the processes after every step (:func:`average_moving_statistics`).
* **Every process starts from the same model.** After the optional teacher fine-tuning, which each process runs on
  all training images, rank 0's model is copied to the others (:func:`broadcast_from_rank_zero`).
* **Each validation and test image is scored once.** Lightning's distributed sampler pads the evaluation set by
  repeating images so that every process gets as many; kd_ext's models evaluate with an unrepeated sampler
  instead (:func:`evaluate_each_image_once`): the processes get uneven shares and the metrics, which gather their
  states across processes, see each image exactly once.

Calibration on normal training images (the prior, map statistics) reads the full training set on every process
(:func:`undistributed_loader`), so it is identical everywhere and equals the single-process one.

``kd-ext distill`` (:class:`~kd_ext.models.cross_task.CrossTaskDistillation`, also under Lightning's DDP) uses the
same batch-norm variants and two helpers that work inside any process group: :func:`gather_chunks` (a batched
computation shared among the processes, every result on every process: the teachers' targets) and
:func:`reduce_sum` (the global batch's class-balance fractions inside the loss).
"""

import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

logger = logging.getLogger(__name__)

EVALUATION_STAGES = (RunningStage.VALIDATING, RunningStage.TESTING, RunningStage.SANITY_CHECKING)


def world_size() -> int:
    """Number of processes in the default process group (1 when torch.distributed is not running)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_rank() -> int:
    """This process's rank in the default process group (0 when torch.distributed is not running)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def gather_chunks(
    function: Callable[[torch.Tensor], Sequence[torch.Tensor]], inputs: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """``function`` over consecutive chunks of ``inputs``, the chunks shared among the processes, results gathered.

    Chunk ``k`` (samples ``k * batch_size`` onwards) is computed by process ``k mod world_size``, exactly as one
    process computes it (the same samples together), and every process receives every chunk's results in order:
    the results equal one process's bit for bit. In a single process the chunks are simply computed in turn.

    Args:
        function: Maps a chunk ``[n, ...]`` to tensors whose first dimension is ``n`` (the same number and trailing
            shapes for every chunk).
        inputs: Samples ``[N, ...]``.
        batch_size: Chunk size.

    Returns:
        list[torch.Tensor]: Each of ``function``'s results over all samples ``[N, ...]``, on the device of
        ``inputs`` (empty when ``function`` returns no tensors).
    """
    starts = list(range(0, inputs.shape[0], batch_size))
    size, rank = world_size(), global_rank()
    if size == 1:
        chunks = [list(function(inputs[start : start + batch_size])) for start in starts]
        return [torch.cat(parts) for parts in zip(*chunks, strict=True)]
    mine = [list(function(inputs[start : start + batch_size])) for start in starts[rank::size]]
    layout = [[(tuple(tensor.shape[1:]), tensor.dtype) for tensor in mine[0]] if rank == 0 else None]
    dist.broadcast_object_list(layout, src=0)  # rank 0 always has chunk 0
    slots = math.ceil(len(starts) / size)
    device = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = []
    for index, (shape, dtype) in enumerate(layout[0]):
        local = torch.zeros(slots * batch_size, *shape, dtype=dtype, device=device)
        for slot, outputs in enumerate(mine):
            local[slot * batch_size : slot * batch_size + outputs[index].shape[0]] = outputs[index]
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local)
        pieces = [
            parts[chunk % size][(chunk // size) * batch_size :][: min(batch_size, inputs.shape[0] - start)]
            for chunk, start in enumerate(starts)
        ]
        gathered.append(torch.cat(pieces).to(inputs.device))
    return gathered


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes: batch statistics and losses of the global batch.

    Itself in a single process; not differentiable (see :func:`sum_over_processes`).
    """
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


class _SumOverProcesses(torch.autograd.Function):
    """Sum of a tensor over the processes; the gradient of each process's input is the sum of the gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gradient: torch.Tensor) -> torch.Tensor:
        total = gradient.clone()
        dist.all_reduce(total)
        return total


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over every process of the default group."""
    return _SumOverProcesses.apply(tensor)


def global_batch_norm(module: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor) -> torch.Tensor:
    """Batch normalisation of ``inputs`` with the statistics of the batch across every process.

    Exactly what ``F.batch_norm`` computes on the concatenation of all processes' batches (mean first, then the
    centred variance), differentiable through the all-reduces, and the running statistics updated as a single
    process would update them (unbiased variance, ``momentum`` or a cumulative average when it is ``None``).

    Args:
        module: The batch-norm layer (its affine parameters, running statistics, ``eps`` and ``momentum``).
        inputs: This process's activations ``[B, C, ...]``.

    Returns:
        torch.Tensor: The normalised activations.
    """
    dims = [dim for dim in range(inputs.ndim) if dim != 1]
    shape = [1, -1] + [1] * (inputs.ndim - 2)
    count = inputs.new_full((1,), inputs.numel() / inputs.shape[1])
    totals = sum_over_processes(torch.cat([inputs.sum(dims), count]))
    total = totals[-1]
    mean = totals[:-1] / total
    centred = inputs - mean.view(shape)
    variance = sum_over_processes(centred.square().sum(dims)) / total
    outputs = centred * torch.rsqrt(variance + module.eps).view(shape)
    if module.affine:
        outputs = outputs * module.weight.view(shape) + module.bias.view(shape)
    if module.track_running_stats and module.running_mean is not None and module.running_var is not None:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)
            momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            unbiased = variance.detach() * (total / (total - 1)).clamp_min(0)
            module.running_mean.lerp_(mean.detach(), momentum)
            module.running_var.lerp_(unbiased, momentum)
    return outputs


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global batch statistics while training under torch.distributed (see above)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalise with the global batch's statistics when training with several processes, else as usual."""
        if not self.training or world_size() == 1:
            return super().forward(inputs)
        return global_batch_norm(self, inputs)


class GlobalBatchNormAct2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (batch norm, dropout, activation) with global batch statistics (see above)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalise with the global batch's statistics when training with several processes, else as usual."""
        if not self.training or world_size() == 1:
            return super().forward(inputs)
        return self.act(self.drop(global_batch_norm(self, inputs)))


GLOBAL_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm2d: GlobalBatchNorm2d,
    BatchNormAct2d: GlobalBatchNormAct2d,
}
"""Batch-norm classes and their global-statistics variants (same attributes, so a layer's class can be swapped)."""


def use_global_batch_norm(model: nn.Module) -> int:
    """Let every trainable batch-norm layer of ``model`` normalise with global batch statistics.

    Layers without trainable parameters (a frozen teacher's, which stay in eval mode) are left as they are. Each
    switched layer keeps its parameters, buffers and identity (optimisers and the DDP wrapper see the same
    tensors); only its class becomes the global variant, which behaves as before in eval mode and in one process.

    Args:
        model: The torch model.

    Returns:
        int: How many layers were switched.
    """
    switched = 0
    for module in model.modules():
        variant = GLOBAL_VARIANTS.get(type(module))
        if variant is not None and any(parameter.requires_grad for parameter in module.parameters(recurse=False)):
            module.__class__ = variant
            switched += 1
    return switched


def restore_batch_norm(model: nn.Module) -> None:
    """Undo :func:`use_global_batch_norm` (the layers become plain ``BatchNorm2d`` / ``BatchNormAct2d`` again)."""
    originals = {variant: original for original, variant in GLOBAL_VARIANTS.items()}
    for module in model.modules():
        original = originals.get(type(module))
        if original is not None:
            module.__class__ = original


@torch.no_grad()
def average_moving_statistics(model: nn.Module) -> None:
    """Average the moving statistics of ``model`` over the processes (no-op in a single process).

    Moving statistics are the floating-point buffers of modules with a ``momentum`` (batch norm, MTHF's group-map
    statistics). Those updated from each process's share of the batch then follow the average of the shares'
    statistics, which is the global batch's for a mean; those already equal on every process (global batch-norm
    statistics, a frozen teacher's) stay as they are.

    Args:
        model: The torch model.
    """
    size = world_size()
    if size == 1:
        return
    buffers = [
        buffer
        for module in model.modules()
        if hasattr(module, "momentum")
        for buffer in module.buffers(recurse=False)
        if buffer.is_floating_point()
    ]
    if not buffers:
        return
    flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


@torch.no_grad()
def broadcast_from_rank_zero(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every other process (no-op in a single process)."""
    if world_size() == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _unrepeated(dataloader: object, stage: RunningStage) -> object:
    """``dataloader`` with Lightning's padded distributed sampler replaced by an unrepeated one."""
    if not isinstance(dataloader, DataLoader):
        return dataloader
    sampler = dataloader.sampler
    if not isinstance(sampler, DistributedSampler) or isinstance(sampler, UnrepeatedDistributedSamplerWrapper):
        return dataloader
    inner = getattr(sampler.dataset, "_sampler", None)  # DistributedSamplerWrapper wraps the loader's own sampler
    base = inner if inner is not None else SequentialSampler(sampler.dataset)
    if len(base) < sampler.num_replicas:  # type: ignore[arg-type]
        logger.warning(
            "%d %s images for %d processes: some process would have none, so Lightning's padded sampler stays "
            "and images are repeated; evaluate with fewer processes to score each image once.",
            len(base),  # type: ignore[arg-type]
            stage.value,
            sampler.num_replicas,
        )
        return dataloader
    unrepeated = UnrepeatedDistributedSamplerWrapper(
        base, num_replicas=sampler.num_replicas, rank=sampler.rank, shuffle=sampler.shuffle, seed=sampler.seed
    )
    return _update_dataloader(dataloader, unrepeated, mode=stage)


def evaluate_each_image_once(trainer: Trainer) -> None:
    """Make the trainer give each validation and test image to exactly one process.

    Lightning injects a ``DistributedSampler`` into evaluation loaders, which pads the set by repeating images so
    that every process gets as many; the repeated images would count twice in the metrics. The trainer's
    strategy is wrapped (once) so that evaluation loaders get Lightning's ``UnrepeatedDistributedSamplerWrapper``
    instead (the one it uses for prediction). No-op in a single process.

    Args:
        trainer: The trainer, after its strategy has been chosen.
    """
    strategy = trainer.strategy
    if trainer.world_size == 1 or getattr(strategy, "_kd_ext_evaluates_once", False):
        return
    process = strategy.process_dataloader

    def process_dataloader(dataloader: object) -> object:
        dataloader = process(dataloader)
        stage = trainer.state.stage
        return _unrepeated(dataloader, stage) if stage in EVALUATION_STAGES else dataloader

    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
    # Lightning warns that its padded sampler repeats evaluation images: not so for these loaders.
    warnings.filterwarnings(
        "ignore", message="Using `DistributedSampler` with the dataloaders", category=PossibleUserWarning
    )
    strategy._kd_ext_evaluates_once = True  # type: ignore[attr-defined]


def undistributed_loader(loader: DataLoader) -> DataLoader:
    """``loader`` over its whole dataset in dataset order (unless it already reads it so, then itself).

    Calibration reads every normal training image on every process, so that all processes fit the same statistics,
    and in the same order on every pass (a shuffled or distributed sampler is replaced by a sequential one).
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, SequentialSampler):
        return loader
    if not isinstance(loader.sampler, DistributedSampler | RandomSampler):
        return loader  # a custom sampler: its order is the user's
    return _update_dataloader(loader, SequentialSampler(loader.dataset))


def setup_distributed(trainer: Trainer, model: nn.Module, stage: str) -> None:
    """Prepare a kd_ext model for the trainer's processes (no-op in a single process).

    Evaluation loaders score each image once (:func:`evaluate_each_image_once`) and, when fitting, the trainable
    batch-norm layers use global batch statistics (:func:`use_global_batch_norm`).

    Args:
        trainer: The trainer.
        model: The torch model.
        stage: Lightning's stage (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``).

    Raises:
        ValueError: If the trainer was asked for torch's ``SyncBatchNorm`` (``sync_batchnorm=True``).
    """
    if trainer.world_size == 1:
        return
    if stage == "fit" and getattr(trainer.strategy, "_layer_sync", None) is not None:
        msg = (
            "sync_batchnorm=True would turn the students' timm BatchNormAct2d layers into torch SyncBatchNorm layers "
            "without their activations. kd_ext models already normalise with the global batch's statistics under "
            "DDP: leave sync_batchnorm off (--trainer.sync_batchnorm false)."
        )
        raise ValueError(msg)
    evaluate_each_image_once(trainer)
    if stage == "fit":
        use_global_batch_norm(model)
