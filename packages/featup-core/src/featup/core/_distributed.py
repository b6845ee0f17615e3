"""torchrun support for training: the process group, rank-aware sharding, and rank-0-only writes.

Training code asks :func:`setup` for a :class:`DistContext`. Outside torchrun (no ``WORLD_SIZE``/``RANK``
in the environment and no process group already initialized) it is a single-process context and every
helper here is a no-op, so one training loop serves both cases.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "any_true",
    "barrier",
    "default_device",
    "launched_by_torchrun",
    "setup",
    "shard_indices",
    "teardown",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 outside a distributed run).
        world_size: number of processes (1 outside a distributed run).
        local_rank: rank on this machine; picks the CUDA device under torchrun.
        owns_group: True when :func:`setup` created the process group (so :func:`teardown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """Whether gradients and decisions must be synchronized with other processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and shows the progress bar."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torch.distributed environment variables (set by torchrun) are present."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def default_device() -> torch.device:
    """The device a torchrun worker should use when the caller gave none: its local CUDA device, or CPU."""
    if torch.cuda.is_available() and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup(device: torch.device) -> DistContext:
    """Join (or create) the process group when running under torchrun.

    An already initialized group is reused and left alone. Otherwise, when torchrun's environment says
    ``WORLD_SIZE > 1``, the group is initialized with NCCL for a CUDA device and gloo otherwise.

    Args:
        device: the device training runs on; decides the backend.

    Returns:
        The process's :class:`DistContext` (a single-process one outside a distributed run).
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 is set but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_group=True
    )


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it (a caller's own group is left alone)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.enabled:
        dist.barrier()


def any_true(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks stop at the same step)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard_indices(n: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of one epoch for one rank, like ``DistributedSampler(shuffle=True, drop_last=False)``.

    Every epoch is a permutation seeded with ``seed + epoch`` (identical on all ranks), padded by
    wrapping around to a multiple of ``world_size`` and dealt out round-robin, so ranks see disjoint
    images (up to the padding) and the order is a pure function of ``(seed, epoch, rank)``.

    Shape:
        - output: (ceil(n / world_size),) int64
    """
    if n < 1:
        raise ValueError(f"expected a non-empty image corpus, got {n} images")
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        perm = torch.cat([perm, perm.repeat(math.ceil((total - n) / n))[: total - n]])
    return perm[rank:total:world_size]


def wrap_ddp(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """Wrap ``module`` in DistributedDataParallel in a distributed run; return it unchanged otherwise."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # a JBU stack uses only the stages its upsampling ratio needs (4x: up1, up2), so some parameters get
    # no gradient in a given step; DDP must look for them instead of waiting forever
    if device.type == "cuda":
        return DistributedDataParallel(
            module, device_ids=[device], output_device=device, find_unused_parameters=True
        )
    return DistributedDataParallel(module, find_unused_parameters=True)
