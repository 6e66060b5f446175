"""Where a training process runs: its device, its rank in torchrun's process group, its RNG.

Under ``torchrun`` (``WORLD_SIZE`` set) :func:`distributed` starts a process group (NCCL on
GPU, gloo on CPU); each rank trains on its shard of every epoch with ``data.batch_size /
world`` images per step (the global batch is unchanged), gradients are averaged by
DistributedDataParallel (:func:`wrap_ddp`), and rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process trains: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # a torch.distributed process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over all ranks (every rank gets the same float)."""
        value = value.detach().float().reshape(1)
        if self.enabled:
            torch.distributed.all_reduce(value)
            value = value / self.world
        return float(value.item())


def default_device() -> torch.device:
    """``EXITNAS_DEVICE`` if set (e.g. ``cpu``), else CUDA when available, else CPU."""
    name = os.environ.get("EXITNAS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def distributed() -> Iterator[Dist]:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` set), else yield a
    single-process :class:`Dist`. The group is torn down on exit."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        yield Dist(device=default_device())
        return
    dist = torch.distributed
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = default_device()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(rank=rank, world=world, device=device, enabled=True)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(module: nn.Module, dist: Dist) -> nn.Module:
    """DistributedDataParallel around ``module`` when a process group is up."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def per_rank_batch(batch_size: int, dist: Dist) -> int:
    if batch_size % dist.world:
        raise ConfigError(f"{batch_size} is not divisible by the {dist.world} training processes",
                          path="data.batch_size")
    return batch_size // dist.world


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
