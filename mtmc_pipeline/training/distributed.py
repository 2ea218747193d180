"""Data-parallel training across processes (``torch.distributed``), launched by ``torchrun``.

``torchrun --nproc-per-node N`` starts N copies of the training command and gives each its
place in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`from_env` joins the process group: NCCL when the process has a GPU
(one per local rank), gloo on the CPU. The training loop then differs from one process in
four places only, all here:

- **Batches.** Every rank draws the same seeded sequence of images as one process would (the
  same sampler on the same generator) and keeps its own contiguous share of each global batch
  (:class:`GlobalBatchShard`). ``train.batch_size`` stays the global batch.
- **Gradients.** :class:`~torch.nn.parallel.DistributedDataParallel` averages them over the
  ranks; with equal shares that is the gradient of the global batch's mean loss.
- **Augmentation.** The batch augmentation draws its random numbers for the whole global batch
  and each rank uses its columns, so image i is augmented as one process would augment it.
- **Writes.** Only rank 0 writes the checkpoint and the bundle; every rank reads the checkpoint
  when a killed run is resumed.

With the same seed and global batch the result is one process's, up to float noise (the order
of the gradient sum), for networks whose layers treat images independently (GroupNorm,
LayerNorm, no norm). Batch norm computes statistics per rank: on GPUs it is converted to
``SyncBatchNorm``, which in torch 2.x refuses CPU tensors (``SyncBatchNorm expected input
tensor to be on GPU``), so on the CPU each rank normalises its own share. Mixup/CutMix (timm's
batch mode pairs image i with image n-1-i) and RandAugment (per image, in the loader) draw
within each rank's share: they stay random, but not the same draws as one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from mtmc_pipeline.config import ConfigError


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (one process: rank 0 of 1).

    ``ddp``: launched by torchrun, in a process group (even of one process, which measures
    DDP's own cost on one GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ddp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and reports."""
        return self.rank == 0

    def global_batch(self, batch_size: int) -> int:
        """The largest global batch up to ``batch_size`` that splits into equal shares."""
        if batch_size < self.world_size:
            raise ConfigError(
                f"train.batch_size = {batch_size}: smaller than the {self.world_size} "
                "training processes; every process needs at least one image per step"
            )
        return batch_size - batch_size % self.world_size

    def shard(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> Sampler[int]:
        """This rank's view of ``sampler`` (the sampler itself for one process)."""
        if not self.ddp:
            return sampler
        return GlobalBatchShard(sampler, batch_size, self.rank, self.world_size, drop_last)

    def wrap(self, model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
        """The module to run forward passes through: DDP across ranks, else ``model``.

        ``find_unused``: some parameters get no gradient in some steps (a frozen backbone);
        DDP must then look for them after each backward instead of waiting for them.
        """
        if not self.ddp:
            return model
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (a copy; ``value`` itself for one process)."""
        if not self.ddp:
            return value
        total = value.clone()
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        return total

    def all_sum_int(self, value: int) -> int:
        """``value`` summed over the ranks."""
        if not self.ddp:
            return value
        return int(self.all_sum(_scalar(value, self.local_rank)).item())

    def from_main(self, value: int) -> int:
        """Rank 0's ``value`` on every rank: a decision (such as the epochs a time budget
        allows, from each rank's own timing) that all ranks must share."""
        if not self.ddp:
            return value
        shared = _scalar(value, self.local_rank)
        torch_dist.broadcast(shared, src=0)
        return int(shared.item())

    def barrier(self) -> None:
        if self.ddp:
            torch_dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache); the others then run it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = Distributed()


class GlobalBatchShard(Sampler[int]):
    """Rank ``rank``'s contiguous share of each global batch of ``sampler``'s indices.

    Every rank iterates the same seeded ``sampler``, so the global batches are the ones a single
    process draws; the shares of one global batch partition it. Only whole global batches are
    used (a last, incomplete one is dropped when ``drop_last``, and must not occur otherwise).
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, rank: int, world_size: int, drop_last: bool
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} does not split into {world_size} shares")
        self.sampler = sampler
        self.batch_size = batch_size
        self.share = batch_size // world_size
        self.rank = rank
        self.drop_last = drop_last

    def __len__(self) -> int:
        assert isinstance(self.sampler, Sized)
        batches, rest = divmod(len(self.sampler), self.batch_size)
        if rest and not self.drop_last:
            raise ValueError(
                f"{len(self.sampler)} samples do not fill batches of {self.batch_size}"
            )
        return batches * self.share

    def __iter__(self) -> Iterator[int]:
        batch: list[int] = []
        start = self.rank * self.share
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield from batch[start : start + self.share]
                batch = []


def _scalar(value: int, local_rank: int) -> torch.Tensor:
    """A one-element tensor where the process group's backend can reduce it (NCCL: this
    process's GPU)."""
    on_gpu = torch_dist.get_backend() == "nccl"
    return torch.tensor(value, device=torch.device("cuda", local_rank) if on_gpu else "cpu")


def from_env(device: torch.device) -> Distributed:
    """Join the process group torchrun describes in the environment (one process without it).

    ``device`` is this process's device (``cuda:LOCAL_RANK`` on GPUs): NCCL for CUDA, gloo
    otherwise.
    """
    if "RANK" not in os.environ:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch_dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    return Distributed(rank, world_size, local_rank, ddp=True)


def local_device(device: str) -> str:
    """The device setting for this process: under torchrun, ``auto``/``cuda`` on a GPU machine
    means ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if "LOCAL_RANK" in os.environ and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def shutdown() -> None:
    """Leave the process group (the end of a torchrun process)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
