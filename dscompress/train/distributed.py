"""Processes under ``torchrun``: which one this is, joining the group, and summing across it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dscompress.core.util import resolve_device


@dataclass
class World:
    """This process's rank and the number of processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes checkpoints, artifacts and output."""
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def launched(cls) -> World:
        """The world torchrun started this process in (from its environment, so also before the
        process group is joined and after it is left)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def init_distributed(device: str = "auto") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); False when there is none.

    The backend is NCCL for CUDA and gloo for CPU; each process uses GPU ``LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return True


def process_device(name: str) -> torch.device:
    """The device this process computes on: under torchrun, GPU ``LOCAL_RANK`` for ``cuda``."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def sum_across(values: list[float], device: torch.device, world: World) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, so counts stay exact)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast_buffers(model: torch.nn.Module, world: World) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics are per process)."""
    if world.size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def destroy() -> None:
    dist.destroy_process_group()
