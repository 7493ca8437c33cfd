"""torch.distributed helpers: one process per device, K / P simulated workers in each.

`init_from_env(timeout=...)` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and starts a process group: gloo on CPU, NCCL on GPU (or the
`backend` asked for: "gloo" lets several ranks share one GPU, e.g. to test on a one-GPU
machine). Each rank takes cuda:LOCAL_RANK; more ranks per node than GPUs is refused with a
clear error under NCCL (which cannot put two ranks on one device). Without those variables it
returns a single-process context that never touches torch.distributed, so the same trainer
code runs on one CPU, one GPU and under torchrun.

Every collective runs on the process group's device (`comm_device`: the GPU for NCCL, the CPU
for gloo): a tensor on another device is copied there and back, so callers may pass CPU
counters or GPU states alike.

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
    comm_device: torch.device | None = None   # None: the tensors' own device (single process)

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

    def _on_comm(self, t: Tensor) -> Tensor:
        """`t` itself if it already lives on the group's device, else a copy there."""
        if self.comm_device is None or t.device == self.comm_device:
            return t
        return t.to(self.comm_device)

    def all_reduce_sum_(self, flat: Tensor) -> None:
        """Sum `flat` over all processes, in place (one collective on `comm_device`)."""
        if self.distributed:
            work = self._on_comm(flat)
            self._run("all-reduce", dist.all_reduce, work, op=dist.ReduceOp.SUM)
            if work is not flat:
                flat.copy_(work)

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite `tensor` with rank `src`'s copy."""
        if self.distributed:
            work = self._on_comm(tensor)
            self._run("broadcast", dist.broadcast, work, src=src)
            if work is not tensor:
                tensor.copy_(work)

    def all_gather_rows(self, local: Tensor) -> Tensor:
        """Concatenate every process's `local` (n, ...) along dim 0, in rank order (on the
        device of `local`)."""
        if not self.distributed:
            return local
        work = self._on_comm(local.contiguous())
        parts = [torch.empty_like(work) for _ in range(self.world_size)]
        self._run("all-gather", dist.all_gather, parts, work)
        return torch.cat(parts).to(local.device)

    def barrier(self) -> None:
        if self.distributed:
            self._run("barrier", dist.barrier)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def resolve_device(name: str, local_rank: int = 0, *, share_gpus: bool = False) -> torch.device:
    """"auto" picks cuda:LOCAL_RANK when CUDA is available, else the CPU. A local rank beyond
    the GPUs of the node is refused (ValueError) unless `share_gpus` (gloo), which wraps around."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available")
        count = max(torch.cuda.device_count(), 1)
        if local_rank >= count and not share_gpus:
            raise ValueError(f"local rank {local_rank} has no GPU of its own: this node has {count} "
                             f"GPU(s); start at most {count} process(es) per node (torchrun "
                             "--nproc_per_node), or pass --dist-backend gloo to share GPUs, or --device cpu")
        return torch.device("cuda", local_rank % count)
    return torch.device("cpu")


def process_group_backend(device: torch.device, asked: str = "auto") -> str:
    """"nccl" for a GPU and "gloo" for the CPU, unless `asked` names one; NCCL needs a GPU."""
    if asked not in ("auto", "gloo", "nccl"):
        raise ValueError(f"dist_backend must be 'auto', 'gloo' or 'nccl', got {asked!r}")
    if asked == "nccl" and device.type != "cuda":
        raise ValueError("dist_backend='nccl' needs a GPU device")
    if asked != "auto":
        return asked
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(*, device: str = "auto", timeout: float = 300.0, backend: str = "auto") -> DistContext:
    """A `DistContext` from torchrun's environment variables (single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, share_gpus=backend == "gloo")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, timeout=timeout)
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {missing} not set; launch with torchrun")
        pg = process_group_backend(dev, backend)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=pg, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        ctx.initialized_here = True
        ctx.comm_device = dev if pg == "nccl" else torch.device("cpu")
    return ctx
