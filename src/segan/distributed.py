"""Multi-process (DDP) helpers: process-group setup from ``torchrun`` variables,
deterministic batch sharding and the few collectives the training loop needs.

Everything here degrades to a no-op for a single process, so the training loop calls
these helpers unconditionally and one code path serves both cases.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The ``torchrun`` environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def env_info() -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun`` (defaults: one process)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment, if any.

    Backend: NCCL when training on CUDA, Gloo on CPU. Safe to call when a group already
    exists (e.g. a test that initialised it itself) or when running as one process.
    """
    info = env_info()
    if not info.enabled:
        return info
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise DistributedError(
                f"WORLD_SIZE={info.world_size} but {', '.join(missing)} unset: launch with "
                f"`torchrun --nproc-per-node={info.world_size} -m segan.train ...`")
        backend = "nccl" if use_cuda else "gloo"
        log.info("rank %d/%d: init process group (%s)", info.rank, info.world_size, backend)
        dist.init_process_group(backend=backend, init_method="env://",
                                rank=info.rank, world_size=info.world_size)
    elif dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise DistributedError(
            f"existing process group (rank {dist.get_rank()}/{dist.get_world_size()}) does not match "
            f"RANK={info.rank} WORLD_SIZE={info.world_size}")
    return info


def cleanup(info: DistInfo) -> None:
    """Leave the process group (only if :func:`init_distributed` joined one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_flag(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks, so every rank takes the same branch
    (stop on a signal, stop on a diverged loss) and none is left waiting in a collective."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run (or another rank) recomputes exactly the same order."""
    return np.random.default_rng([seed, epoch, 0x0DA7A]).permutation(num_items)


def batches_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Full global batches per epoch (the ragged tail is dropped, as DistributedSampler(drop_last))."""
    return num_items // (batch_size * world_size)


def rank_batch(order: np.ndarray, batch_index: int, batch_size: int, info: DistInfo) -> list[int]:
    """Indices this rank trains on in global batch ``batch_index`` of an epoch.

    Global batch ``b`` is ``order[b*B*W:(b+1)*B*W]``; rank ``r`` takes its ``r``-th slice
    of ``B``. With one process this is just consecutive batches of the permutation.
    """
    start = (batch_index * info.world_size + info.rank) * batch_size
    chunk = order[start:start + batch_size]
    if len(chunk) != batch_size:
        raise IndexError(f"batch {batch_index} is past the end of the epoch ({len(order)} items)")
    return [int(i) for i in chunk]
