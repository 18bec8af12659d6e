"""Process-group set-up from torchrun's environment, and the few collectives the engine needs.

``torchrun --nproc_per_node N train.py`` (or ``--nnodes M --rdzv_endpoint host:port`` across
machines) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_distributed`` joins the group through ``env://``. A plain ``python train.py`` (or
torchrun with one process) runs as a single process with no process group, and every helper
here degrades to the obvious single-process answer.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# how long cleanup() releases the GIL after destroying a gloo group (see cleanup)
GLOO_DRAIN_SECONDS = 0.2


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group (single process)


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this node, from torchrun's ``LOCAL_RANK`` (0 when absent)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files and logs (global rank 0)."""
    return rank() == 0


def select_device(local: int | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        index = local_rank() if local is None else local
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> NCCL for GPUs, gloo for the CPU; explicit names are checked."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"train.distributed_backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("train.distributed_backend=nccl needs GPUs; use gloo (or auto) on CPU")
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> DistributedInfo:
    """Join the process group described by torchrun's env vars; single process otherwise.

    Safe to call twice (the second call reports the existing group).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(rank(), world_size(), local_rank(), device, dist.get_backend())
    if world <= 1:
        return DistributedInfo(0, 1, 0, device, None)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
                           "torchrun (e.g. `torchrun --nproc_per_node 2 ...`)")
    name = resolve_backend(backend, device)
    dist.init_process_group(name, init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    log.info("joined process group: rank %d of %d, backend %s, device %s",
             rank(), world, name, device)
    return DistributedInfo(rank(), world, local_rank(), device, name)


def cleanup() -> None:
    """Leave the process group at the end of a run (no-op without one): wait for every rank,
    destroy the group, then give gloo's worker threads a moment to finish.

    The pause is for gloo: a worker thread wakes the waiting rank before it drops its own
    reference to the finished collective, and when that is the last reference to a tensor
    Python created, freeing it needs the GIL. A thread that asks for the GIL after the
    interpreter has begun to finalize is killed inside that destructor (Python < 3.14), which
    aborts the process ("terminate called without an active exception") after all its work
    is done, and torchrun reports the run as failed. Sleeping releases the GIL so the workers
    finish while the interpreter is still alive (docs/training.md, "Multi-GPU and multi-node").
    """
    if dist.is_available() and dist.is_initialized():
        barrier()
        _leave_group()


def abort() -> None:
    """Leave the process group after this rank failed (no-op without one): destroy it at once,
    without the barrier of ``cleanup``, since the other ranks may be waiting in a collective
    this rank will never join (torchrun's agent stops them when this process exits with an
    error), then give gloo's workers the same pause."""
    if dist.is_available() and dist.is_initialized():
        _leave_group()


def _leave_group() -> None:
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo:
        time.sleep(GLOO_DRAIN_SECONDS)


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, indexed by rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) with ``seed + rank``.

    Ranks get different streams (dropout, masking) on purpose; DDP makes the initial weights
    equal by broadcasting rank 0's.
    """
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
