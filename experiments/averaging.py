"""Model averaging of K simulated workers, inside one process and across processes.

In the spirit of PyTorch's `PeriodicModelAverager`, the averager holds only what it needs to
average (its policy and its process group) and takes the tensors at each call; WHEN to average
is the business of `experiments.schedules`. The state of the K_loc workers of one process is
stacked, one row per worker:

- parameters (K_loc, D): always averaged (that is what Local SGD is);
- floating-point buffers (K_loc, D_b), e.g. BatchNorm running mean and variance: per
  `buffers` policy, "average" (the authors' choice), "local" (each worker keeps its own) or
  "reset" (back to their initial values, e.g. mean 0, variance 1);
- momentum buffers (K_loc, D): per `momentum` policy, "local" (the authors' choice: the
  momentum of a worker is never communicated), "average" or "reset" (zeroed).

Integer buffers (BatchNorm's num_batches_tracked) are equal on every worker and never touched.

A global averaging packs every averaged row mean into ONE flat buffer, plus optional extra
scalars that are summed (e.g. a count of non-finite losses), and makes one all-reduce.
All processes must hold the same number of workers, so the mean of the process means is the
mean over all K workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

POLICIES = ("average", "local", "reset")


class ProcessGroup(Protocol):
    world_size: int

    def all_reduce_sum_(self, flat: Tensor) -> None: ...


@dataclass(frozen=True)
class AveragingPolicy:
    """What an averaging does to buffers and momentum (parameters are always averaged)."""
    buffers: str = "average"
    momentum: str = "local"

    def __post_init__(self):
        for name in ("buffers", "momentum"):
            if getattr(self, name) not in POLICIES:
                raise ValueError(f"{name} policy must be one of {POLICIES}, got {getattr(self, name)!r}")


class WorkerAverager:
    """Average stacked worker states in place.

    Args:
        policy: an `AveragingPolicy`.
        group: an object with `world_size` and `all_reduce_sum_(flat)` (an
            `experiments.distributed.DistContext`), or None for a single process.
    """

    def __init__(self, policy: AveragingPolicy = AveragingPolicy(), group: ProcessGroup | None = None):
        self.policy = policy
        self.group = group

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else self.group.world_size

    def average_(self, params: Tensor, buffers: Tensor | None = None, momentum: Tensor | None = None,
                 *, initial_buffers: Tensor | None = None, extras: Tensor | None = None,
                 across_processes: bool = True) -> Tensor | None:
        """Average `params` (K_loc, D) over all workers in place; buffers and momentum per policy.

        `initial_buffers` (D_b,) is needed for the "reset" buffer policy. `extras` (E,) is
        summed over processes (not averaged) in the same all-reduce and returned; with
        `across_processes=False` only the workers of this process are averaged.
        """
        if params.dim() != 2:
            raise ValueError(f"params must be stacked (K_loc, D), got shape {tuple(params.shape)}")
        avg_buffers = buffers is not None and buffers.shape[1] > 0 and self.policy.buffers == "average"
        avg_momentum = momentum is not None and self.policy.momentum == "average"
        parts = [params]
        if avg_buffers:
            parts.append(buffers)
        if avg_momentum:
            parts.append(momentum)
        with torch.no_grad():
            means = [p.mean(dim=0) for p in parts]
            world = self.world_size if across_processes else 1
            if world > 1:
                extra = [] if extras is None else [extras.to(params.dtype).reshape(-1)]
                flat = torch.cat(means + extra)
                self.group.all_reduce_sum_(flat)
                n = sum(m.numel() for m in means)
                means = list(torch.split(flat[:n] / world, [m.numel() for m in means]))
                if extras is not None:
                    extras = flat[n:].to(extras.dtype)
            for target, mean in zip(parts, means):
                target.copy_(mean.expand_as(target))
            if buffers is not None and buffers.shape[1] > 0 and self.policy.buffers == "reset":
                if initial_buffers is None:
                    raise ValueError("the 'reset' buffer policy needs initial_buffers")
                buffers.copy_(initial_buffers.expand_as(buffers))
            if momentum is not None and self.policy.momentum == "reset":
                momentum.zero_()
        return extras


def worker_spread(params: Tensor, mean: Tensor) -> Tensor:
    """(1/K_loc) sum_k ||theta_k - mean||^2 over the rows of `params` (K_loc, D), a 0-dim tensor."""
    return (params - mean).pow(2).sum(dim=1).mean()
