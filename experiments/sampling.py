"""Per-worker sample indices for K simulated (or distributed) workers.

`WorkerSampler.epoch(e)` returns a LongTensor (steps, K, B_loc): entry [s, k] is the local
batch worker k uses at step s of epoch e.

- replacement=False, partition="iid": one uniform permutation of all N indices per epoch; its
  first steps x K x B_loc entries are laid out as (steps, K, B_loc). The workers' index sets
  are disjoint within an epoch and the split is redrawn every epoch (the authors'
  DistributedSampler, reshuffled by epoch). steps <= N // (K B_loc).
- replacement=True, partition="iid": every entry an i.i.d. uniform draw from {0, ..., N-1}
  (the authors' RandomSampler(replacement=True), used with --steps-per-epoch).
- partition="label_sorted" (non-IID): indices are sorted by label (stable) and cut into K
  contiguous shards of N // K, worker k owning shard k for the whole run; each epoch worker k
  draws from its own shard only, by a per-epoch permutation of the shard (without
  replacement) or i.i.d. (with replacement). With balanced labels and K = C every worker sees
  one class, with K = C / 2 two classes.

Determinism: epoch e uses a fresh CPU generator seeded with
``numpy.random.SeedSequence([generator_seed, e]).generate_state(1, uint64)[0] >> 1``, so the
indices depend only on (seed, epoch): a run resumed at epoch e reproduces them exactly, with
no generator state to checkpoint. Multi-process runs: process p of P holds workers
[p K / P, (p + 1) K / P) (`worker_range`) and slices them out of the same full tensor, so the
union over processes equals the single-process sampler exactly.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Partition = Literal["iid", "label_sorted"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch`` for run seed ``seed`` (see module docstring)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got {seed}, {epoch}")
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def worker_range(rank: int, world_size: int, workers: int) -> range:
    """Workers held by process ``rank`` of ``world_size``: [rank K / P, (rank + 1) K / P)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if workers % world_size:
        raise ValueError(f"{workers} workers cannot be split evenly over {world_size} processes")
    per = workers // world_size
    return range(rank * per, (rank + 1) * per)


class WorkerSampler:
    """Sample indices for ``workers`` workers with local batch ``local_batch`` (see module doc)."""

    def __init__(self, num_samples: int, *, workers: int, local_batch: int, replacement: bool,
                 steps_per_epoch: int | None = None, partition: Partition = "iid",
                 labels: torch.Tensor | None = None, generator_seed: int = 0):
        if num_samples < 1 or workers < 1 or local_batch < 1:
            raise ValueError("num_samples, workers and local_batch must be positive")
        if partition not in ("iid", "label_sorted"):
            raise ValueError(f"partition must be 'iid' or 'label_sorted', got {partition!r}")
        self.num_samples, self.workers, self.local_batch = num_samples, workers, local_batch
        self.replacement, self.partition, self.seed = bool(replacement), partition, int(generator_seed)
        if partition == "label_sorted":
            if labels is None or labels.shape != (num_samples,):
                raise ValueError(f"partition='label_sorted' needs labels of shape ({num_samples},)")
            shard = num_samples // workers
            if shard < 1:
                raise ValueError(f"{num_samples} samples cannot be sharded over {workers} workers")
            order = torch.sort(labels.detach().cpu().to(torch.int64), stable=True).indices
            self.shards = order[: shard * workers].reshape(workers, shard)   # (K, N // K)
            pool = shard
        else:
            self.shards = None
            pool = num_samples // workers
        max_steps = pool // local_batch
        if steps_per_epoch is None:
            steps_per_epoch = max_steps
        if steps_per_epoch < 1:
            raise ValueError(f"no full step fits: {num_samples} samples, {workers} workers x "
                             f"local batch {local_batch}; lower them or set steps_per_epoch")
        if not self.replacement and steps_per_epoch > max_steps:
            raise ValueError(f"without replacement at most {max_steps} steps fit in one epoch, "
                             f"got steps_per_epoch={steps_per_epoch}; use replacement=True")
        self.steps_per_epoch = int(steps_per_epoch)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.steps_per_epoch, self.workers, self.local_batch

    def epoch(self, epoch: int, *, workers: range | slice | None = None) -> torch.Tensor:
        """Indices (steps, K', B_loc) of epoch ``epoch``; ``workers`` selects a worker range."""
        g = epoch_generator(self.seed, epoch)
        s, k, b = self.shape
        if self.shards is None:
            if self.replacement:
                full = torch.randint(0, self.num_samples, (s, k, b), generator=g)
            else:
                full = torch.randperm(self.num_samples, generator=g)[: s * k * b].reshape(s, k, b)
        else:
            pool = self.shards.shape[1]
            if self.replacement:
                local = torch.randint(0, pool, (k, s * b), generator=g)
            else:
                local = torch.argsort(torch.rand(k, pool, generator=g), dim=1)[:, : s * b]
            full = self.shards.gather(1, local).reshape(k, s, b).transpose(0, 1).contiguous()
        if workers is None:
            return full
        if isinstance(workers, range):
            if workers.step != 1 or not 0 <= workers.start <= workers.stop <= k:
                raise ValueError(f"worker range {workers} is not a contiguous part of 0..{k}")
            workers = slice(workers.start, workers.stop)
        return full[:, workers].contiguous()
