"""Process-group setup for data-parallel training under ``torchrun`` (NCCL on GPU, gloo on CPU).

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs as a single process and the helpers
here are no-ops. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from usagg.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Position of this process in the job: rank, number of processes and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """Map ``auto`` / ``cpu`` / ``cuda`` to a device; ``auto`` takes the local GPU when there is one."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {preference!r} is invalid; use auto, cpu or cuda")
    if preference == "cpu":
        return torch.device("cpu")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference == "cuda":
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment, once per process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
        logger.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def all_true(env: DistEnv, flag: bool) -> bool:
    """Return whether ``flag`` is true on every rank (a logical AND across the process group)."""
    if not (env.distributed and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_across_ranks(env: DistEnv, value: float) -> float:
    """Return the mean of ``value`` over the ranks; every rank must call it at the same step."""
    if not (env.distributed and dist.is_initialized()):
        return value
    device = env.device if env.device.type == "cuda" else "cpu"
    total = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / env.world_size


def broadcast_object(env: DistEnv, obj):
    """Send ``obj`` from rank 0 to every rank and return it."""
    if not (env.distributed and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=env.device if env.device.type == "cuda" else None)
    return holder[0]


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
