"""torch.distributed helpers: one process per device, K / P simulated workers in each.

`init_from_env(timeout=...)` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and starts a process group: gloo on CPU, NCCL on GPU. Without
those variables it returns a single-process context that never touches torch.distributed,
so the same trainer code runs on one CPU, one GPU and under torchrun.

Every collective goes through `DistContext`, which turns a failure (a peer that died, a
timeout) into a `PeerFailure` naming the operation and the rank, instead of a hang: the process
group is created with `timeout`, after which a collective with a missing peer raises.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class PeerFailure(RuntimeError):
    """A collective failed: a peer process died or did not answer within the timeout."""


@dataclass
class DistContext:
    """Rank, world size and device of this process, with the few collectives the trainer uses."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout: float = 300.0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # gloo raises RuntimeError/DistBackendError, NCCL its own
            raise PeerFailure(
                f"rank {self.rank}/{self.world_size}: {what} failed - a peer process died or did not "
                f"answer within the {self.timeout:.0f} s timeout ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc

    def all_reduce_sum_(self, flat: Tensor) -> None:
        """Sum `flat` over all processes, in place (one collective)."""
        if self.distributed:
            self._run("all-reduce", dist.all_reduce, flat, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite `tensor` with rank `src`'s copy."""
        if self.distributed:
            self._run("broadcast", dist.broadcast, tensor, src=src)

    def all_gather_rows(self, local: Tensor) -> Tensor:
        """Concatenate every process's `local` (n, ...) along dim 0, in rank order."""
        if not self.distributed:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._run("all-gather", dist.all_gather, parts, local.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.distributed:
            self._run("barrier", dist.barrier)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" picks cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_from_env(*, device: str = "auto", timeout: float = 300.0) -> DistContext:
    """A `DistContext` from torchrun's environment variables (single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, timeout=timeout)
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {missing} not set; launch with torchrun")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        ctx.initialized_here = True
    return ctx
