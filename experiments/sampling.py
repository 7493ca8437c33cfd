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
- partition="shards": worker k owns row k of a given (K, m) index tensor `shards` (for example
  from `node_shards`) for the whole run, drawn from as in "label_sorted".

`node_shards(labels, nodes, regime)` builds the fixed per-node data of Qin, Etesami & Uribe
(TMLR 2024, Sec. 6) for three data-similarity regimes:
- "iid": one uniform permutation of the N indices cut into `nodes` shards of m = N / nodes.
- "sorted": the paper's "sort the data by their label, then divide the dataset into 20 shards
  and assign each of 20 nodes 1 shard. In this way, ten nodes will have image examples of one
  label, and ten nodes will have image examples of two labels". Our reading: a contiguous cut of
  the sorted order cannot give that (10 classes have 9 class boundaries, so at most 9 shards
  hold two labels; on balanced CIFAR-10, 5,000 per class, every one of 20 shards of 2,500 holds
  one label). The sorted order is therefore read as a ring and cut starting half a shard in:
  with C classes of 2m samples each and nodes = 2 C, even nodes hold m samples of one class and
  odd nodes m / 2 of class c and m / 2 of class c + 1 (the last node: classes C - 1 and 0).
  This gives exactly ten one-label and ten two-label nodes on full CIFAR-10 and on any balanced
  subset with N / 20 even. Unbalanced classes or nodes != 2 C raise.
- "mixed": a fraction `similarity` = q / m of every node's data is i.i.d.: 2 q samples of every
  class (uniform, seeded) go to a pool that is shuffled and cut into `nodes` parts of q; the
  rest is cut like "sorted" (shards of m - q). Each node then holds its "sorted" labels
  (m - q samples) plus q samples of any class; similarity 0 is "sorted", 1 is i.i.d. over a
  class-stratified pool.
Every regime is a partition: each of the N indices belongs to exactly one node.

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

Partition = Literal["iid", "label_sorted", "shards"]
Regime = Literal["iid", "sorted", "mixed"]
REGIMES = ("iid", "sorted", "mixed")


def _ring_shards(order: torch.Tensor, nodes: int) -> torch.Tensor:
    """(nodes, m): the label-sorted ``order`` read as a ring, cut into nodes shards starting m / 2 in."""
    m = order.numel() // nodes
    return torch.roll(order, -(m // 2)).reshape(nodes, m)


def node_shards(labels: torch.Tensor, nodes: int, regime: Regime, *, similarity: float = 0.5,
                seed: int = 0) -> torch.Tensor:
    """Per-node sample indices (nodes, m = N / nodes) for ``regime`` (see the module docstring).

    labels: (N,) int64 class of every sample. ``similarity`` (only "mixed") is the fraction of
    each node's data drawn i.i.d.; it must make q = similarity m an integer and m - q even.
    ``seed`` fixes the random draws of "iid" and "mixed" ("sorted" draws nothing). Raises
    ValueError, naming the problem, when the labels cannot meet the scheme.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {REGIMES}")
    labels = labels.detach().cpu().to(torch.int64)
    n = labels.numel()
    if labels.dim() != 1 or n == 0:
        raise ValueError(f"labels must be a non-empty (N,) tensor, got shape {tuple(labels.shape)}")
    if nodes < 1 or n < nodes or n % nodes:
        raise ValueError(f"{n} samples cannot be split into {nodes} equal node shards "
                         f"(need N a positive multiple of nodes)")
    m = n // nodes
    g = torch.Generator().manual_seed(int(seed))
    if regime == "iid":
        return torch.randperm(n, generator=g).reshape(nodes, m)
    classes, counts = torch.unique(labels, return_counts=True)
    if nodes != 2 * classes.numel() or bool((counts != 2 * m).any()):
        raise ValueError(
            f"the {regime!r} scheme needs nodes = 2 x classes and every class holding 2 N / nodes "
            f"samples (two shards); got {nodes} nodes, {classes.numel()} classes with counts "
            f"{counts.tolist()} (need {2 * m} each): use a class-balanced subset")
    q = 0
    if regime == "mixed":
        if not 0.0 <= similarity <= 1.0:
            raise ValueError(f"similarity must be in [0, 1], got {similarity}")
        q = round(similarity * m)
        if abs(q - similarity * m) > 1e-9 or (m - q) % 2:
            raise ValueError(f"similarity {similarity} x {m} samples per node must give an integer "
                             f"q with m - q even (half shards of the sorted part)")
    pooled, kept = [], []
    for c in classes.tolist():
        where = torch.nonzero(labels == c).flatten()
        pick = torch.randperm(where.numel(), generator=g)[: 2 * q] if q else where[:0]
        mask = torch.ones(where.numel(), dtype=torch.bool)
        mask[pick] = False
        pooled.append(where[pick])
        kept.append(where[mask])                    # original order within the class
    sorted_part = _ring_shards(torch.cat(kept), nodes) if m > q else torch.empty(nodes, 0, dtype=torch.int64)
    if not q:
        return sorted_part
    pool = torch.cat(pooled)
    pool = pool[torch.randperm(pool.numel(), generator=g)].reshape(nodes, q)
    return torch.cat([sorted_part, pool], dim=1)


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
                 labels: torch.Tensor | None = None, generator_seed: int = 0,
                 shards: torch.Tensor | None = None):
        if num_samples < 1 or workers < 1 or local_batch < 1:
            raise ValueError("num_samples, workers and local_batch must be positive")
        if partition not in ("iid", "label_sorted", "shards"):
            raise ValueError(f"partition must be 'iid', 'label_sorted' or 'shards', got {partition!r}")
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
        elif partition == "shards":
            if shards is None or shards.dim() != 2 or shards.shape[0] != workers or shards.shape[1] < 1:
                raise ValueError(f"partition='shards' needs shards of shape ({workers}, m >= 1)")
            shards = shards.detach().cpu().to(torch.int64)
            if int(shards.min()) < 0 or int(shards.max()) >= num_samples:
                raise ValueError(f"shard indices must lie in [0, {num_samples})")
            self.shards, pool = shards.contiguous(), shards.shape[1]
        else:
            self.shards = None
            pool = num_samples // workers
        max_steps = pool // local_batch
        if steps_per_epoch is None:
            steps_per_epoch = max_steps
        if steps_per_epoch < 1:
            raise ValueError(f"no full step fits: {num_samples} samples, {workers} workers x "
                             f"local batch {local_batch} ({pool} samples per worker); lower them "
                             f"or set steps_per_epoch")
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
