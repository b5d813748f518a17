"""Training in many processes (torchrun): the process group, and the two places where the
released losses couple the images of a batch (docs/training.md#many-processes).

Each of ``N`` processes takes ``1/N`` of every global batch and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients. That alone equals one
process on the global batch only where the loss is a mean of per-image terms. Two parts of
CrossFuse are not: stage 1's MS-SSIM takes batch means of SSIM and contrast at each scale (and a
dynamic range from the batch's maximum) before their weighted product, and stage 2's decoder
normalises with BatchNorm's batch statistics. :class:`Ranks` gives the losses sums and maxima over
all processes, differentiable where they must be, and :class:`GlobalBatchNorm2d` takes its
statistics over all processes; with both, ``N`` processes compute the loss, gradients and running
statistics of one process on the global batch, up to the order of float additions.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import Tensor, nn

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another launcher setting its
    environment: ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ...) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Within it, this process is in torchrun's process group (NCCL for CUDA devices, gloo for the
    CPU) if it is one of several, the group destroyed on leaving; yields the device this process
    trains on (``cuda:LOCAL_RANK`` for a CUDA device, one GPU per process)."""
    if not launched_by_torchrun():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: ``rank`` of ``world``. Its reductions
    are the identity in one process (``world == 1``)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> Ranks:
        """The default process group's ranks, or one process where there is none."""
        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and logs (rank 0)."""
        return self.rank == 0

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes, differentiable: its gradient is the sum of the
        processes' gradients, so that with DDP's averaging a loss of the sum gets the gradient
        one process would."""
        return dist_autograd.all_reduce(tensor) if self.world > 1 else tensor

    def max(self, tensor: Tensor) -> Tensor:
        """The maximum of ``tensor`` over the processes (no gradient)."""
        if self.world == 1:
            return tensor
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def min(self, tensor: Tensor) -> Tensor:
        """The minimum of ``tensor`` over the processes (no gradient)."""
        return -self.max(-tensor)

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each value averaged over the processes (the logged loss terms of the global batch)."""
        if self.world == 1:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world).tolist()))

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds in any process (so that all stop at the same step)."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def wait(self) -> None:
        """Returns when every process has called it."""
        if self.world > 1:
            dist.barrier()

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run in rank 0 only and its result (or its ``ValueError``/``OSError``) sent to
        every process, so that they agree, and files need to be seen by rank 0 only."""
        if self.world == 1:
            return make()
        outcome: list = [None]
        if self.main:
            try:
                outcome[0] = ("value", make())
            except (ValueError, OSError) as error:
                outcome[0] = ("error", error)
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch: the
    per-channel mean and biased variance over every process's images (two differentiable
    all-reduces), the running statistics updated with them as ``BatchNorm2d`` updates its own.
    Outside a multi-process group, or in eval mode, it is ``BatchNorm2d``. (PyTorch's
    ``SyncBatchNorm`` does this for GPUs only; this one also runs on the CPU, under gloo.)"""

    def forward(self, x: Tensor) -> Tensor:
        ranks = Ranks.current()
        if not (self.training and ranks.world > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1] * ranks.world
        mean = ranks.sum(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        variance = ranks.sum((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(variance.detach() * (count / (count - 1)), factor)
        normalised = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            return normalised * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return normalised


def with_global_batch_norms(module: nn.Module) -> nn.Module:
    """Replaces each ``BatchNorm2d`` in ``module`` by a :class:`GlobalBatchNorm2d` holding the same
    parameter and buffer tensors (the same state dict, the same optimiser parameters); returns
    ``module``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            for key, value in list(child._parameters.items()) + list(child._buffers.items()):
                setattr(replacement, key, value)
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            with_global_batch_norms(child)
    return module


