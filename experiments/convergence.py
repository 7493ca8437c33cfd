"""Local SGD on fixed per-node shards: training loss per communication round, slopes, thresholds.

The study of Qin, Etesami & Uribe, "Faster Convergence of Local SGD for Over-Parameterized
Models" (TMLR 2024, Sec. 6): n nodes each own a fixed shard of the training set
(`experiments.sampling.node_shards`: "iid", "sorted", "mixed"); every communication round all
nodes start from the common model x_r, take K local SGD steps on local batches of B_loc samples
of their own shard (each node runs through its shard without replacement, reshuffled every
local epoch), and x_{r+1} is the plain average of the n local models. The quantity is the
training loss f(x_r) = (1/N) sum_i CE(x_r; sample i) over all N samples, read at the averaged
model on a log-spaced grid of rounds; a run stops at the first reading below `threshold`.
Their bounds (over-parameterized, i.e. interpolating, models): f = O(1/T) in T = R K total
steps for convex losses under a data-similarity assumption, O(K/T) = O(1/R) without it and for
non-convex losses; so log f against log R has slope -1 in both cases, and what K buys in
rounds depends on the data similarity.

The n nodes are simulated in one process: parameters stacked along a leading node axis,
one forward for all nodes (the model's own `forward_stacked` when it has one, as
`experiments.models.ResidualMLP` does with batched matrix products; otherwise
`torch.func.functional_call` vmapped over nodes), one backward pass for all (the per-node
losses are summed; nodes do not interact), an in-place SGD update, and an average over the node
axis every K steps. Measured on one idle CPU thread, 20 nodes x batch 8, res_mlp width 64,
depth 2, on 3 x 8 x 8 inputs: 2.5 ms per step with `forward_stacked`, 5.3-6.3 ms with vmap. Models with buffers (BatchNorm) are refused: use LayerNorm / GroupNorm
(`experiments.models`: "res_mlp", "ln_resnet18").
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from experiments.metrics import atomic_write_bytes
from experiments.sampling import REGIMES, WorkerSampler, node_shards


@dataclass(frozen=True)
class LocalSGDConfig:
    """One Local SGD run: K local steps of plain SGD (lr, batch B_loc per node) per round,
    at most ``max_rounds`` rounds, stopping at training loss < ``threshold``; the loss is read
    at ``eval_points`` log-spaced rounds (plus round 0)."""
    local_steps: int
    max_rounds: int
    lr: float = 0.1
    local_batch: int = 8
    threshold: float = 1e-4
    eval_points: int = 150

    def __post_init__(self):
        if self.local_steps < 1 or self.max_rounds < 1 or self.local_batch < 1 or self.eval_points < 2:
            raise ValueError("local_steps, max_rounds, local_batch must be >= 1 and eval_points >= 2")
        if not self.lr > 0 or not self.threshold > 0:
            raise ValueError(f"lr and threshold must be positive, got {self.lr}, {self.threshold}")


@dataclass
class Trajectory:
    """Training loss of the averaged model at rounds ``rounds`` (0 first); ``reached``: the
    round where the loss first fell below the threshold by log-log interpolation between two
    readings (NaN if never); ``wall_s``: seconds of training (readings included)."""
    rounds: np.ndarray
    loss: np.ndarray
    local_steps: int
    reached: float
    wall_s: float

    @property
    def steps(self) -> np.ndarray:
        """Total local SGD steps per node, T = R K, at each reading."""
        return self.rounds * self.local_steps


def eval_rounds(max_rounds: int, points: int) -> np.ndarray:
    """Round 0 and ~``points`` log-spaced distinct rounds in [1, max_rounds] (int64, increasing)."""
    grid = np.unique(np.round(np.geomspace(1, max_rounds, points)).astype(np.int64))
    return np.concatenate([[0], grid])


def crossing_round(rounds: np.ndarray, loss: np.ndarray, threshold: float) -> float:
    """First round where ``loss`` falls below ``threshold``, interpolating log loss linearly
    in log round between the last reading above and the first below (NaN if never below)."""
    below = np.nonzero(loss < threshold)[0]
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if i == 0 or rounds[i - 1] <= 0:
        return float(rounds[i])
    r0, r1, l0, l1 = math.log(rounds[i - 1]), math.log(rounds[i]), math.log(loss[i - 1]), math.log(loss[i])
    frac = (math.log(threshold) - l0) / (l1 - l0)
    return float(math.exp(r0 + frac * (r1 - r0)))


def _stacked(model: nn.Module, nodes: int) -> dict[str, torch.Tensor]:
    if any(True for _ in model.buffers()):
        raise ValueError("the model has buffers (BatchNorm?): the node simulation needs a "
                         "buffer-free model (LayerNorm / GroupNorm)")
    return {n: p.detach().unsqueeze(0).repeat(nodes, *([1] * p.dim())).requires_grad_()
            for n, p in model.named_parameters()}


def _summed_node_losses(model: nn.Module) -> Callable:
    """(params (n, ...), xb (n, B, ...), yb (n, B)) -> sum over nodes of each node's mean
    cross-entropy. Uses ``model.forward_stacked(params, xb)`` when the model has one (a
    batched-matmul forward, e.g. `ResidualMLP`), else vmap over `functional_call`."""
    stacked = getattr(model, "forward_stacked", None)
    if stacked is not None:
        def loss(params, xb, yb):
            logits = stacked(params, xb)
            return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum") / yb.shape[1]
        return loss

    def node_loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    per_node = vmap(node_loss)
    return lambda params, xb, yb: per_node(params, xb, yb).sum()


@torch.no_grad()
def full_loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              *, chunk: int = 2048) -> float:
    """Mean cross-entropy over all (x, y) at ``params`` (unbatched), in float64."""
    p64 = {n: t.double() for n, t in params.items()}
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        logits = functional_call(model, p64, (x[i:i + chunk].double(),))
        total += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
    return total / x.shape[0]


def run_local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shards: torch.Tensor,
                  cfg: LocalSGDConfig, *, seed: int = 0) -> Trajectory:
    """Local SGD from ``model``'s parameters (not modified) over n = shards.shape[0] nodes.

    x: (N, ...) inputs; y: (N,) int64 labels; shards: (n, m) node indices into x (a partition,
    e.g. `node_shards`). ``seed`` fixes the order in which nodes visit their shards.
    """
    if shards.dim() != 2:
        raise ValueError(f"shards must be (nodes, m), got shape {tuple(shards.shape)}")
    nodes, m = shards.shape
    if m < cfg.local_batch:
        raise ValueError(f"each node holds {m} samples, fewer than the local batch "
                         f"{cfg.local_batch}: use fewer nodes, more samples or a smaller batch")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples, y {y.shape[0]}")
    sampler = WorkerSampler(x.shape[0], workers=nodes, local_batch=cfg.local_batch,
                            replacement=False, partition="shards", shards=shards, generator_seed=seed)
    per_epoch = sampler.steps_per_epoch
    params = _stacked(model, nodes)
    leaves = list(params.values())

    batched_loss = _summed_node_losses(model)
    readings = eval_rounds(cfg.max_rounds, cfg.eval_points)
    rounds, losses = [], []
    epoch, idx = -1, None
    start = time.perf_counter()
    next_reading = 0
    for r in range(cfg.max_rounds + 1):
        if r == readings[next_reading]:
            value = full_loss(model, {n: t[0] for n, t in params.items()}, x, y)
            rounds.append(r)
            losses.append(value)
            next_reading += 1
            if value < cfg.threshold or not math.isfinite(value) or next_reading == len(readings):
                break
        for k in range(cfg.local_steps):
            t = r * cfg.local_steps + k
            if t // per_epoch != epoch:
                epoch = t // per_epoch
                idx = sampler.epoch(epoch)                      # (steps, n, B_loc)
            batch = idx[t % per_epoch]
            loss = batched_loss(params, x[batch], y[batch])
            grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():
                for p, g in zip(leaves, grads):
                    p.sub_(cfg.lr * g)
        with torch.no_grad():
            for p in leaves:
                p.copy_(p.mean(dim=0, keepdim=True).expand_as(p))
    rounds_a, loss_a = np.asarray(rounds, dtype=np.int64), np.asarray(losses, dtype=np.float64)
    return Trajectory(rounds_a, loss_a, cfg.local_steps, crossing_round(rounds_a, loss_a, cfg.threshold),
                      time.perf_counter() - start)


@dataclass(frozen=True)
class SlopeFit:
    """Least-squares slope of log loss on log round over readings [first, last] (rounds),
    with a ``level`` two-sided t-interval [lo, hi] from the fit's standard error."""
    slope: float
    lo: float
    hi: float
    intercept: float
    first: int
    last: int
    n: int
    level: float = 0.95


def fit_loglog_slope(rounds: np.ndarray, loss: np.ndarray, *, max_loss: float = 1e-2,
                     level: float = 0.95, min_points: int = 4) -> SlopeFit:
    """Fit log loss = a + slope log round on the tail: readings at round >= 1 whose loss and
    every later loss are <= ``max_loss`` (the interpolating phase). Raises if fewer than
    ``min_points`` readings qualify. The interval treats residuals as independent, which
    readings along one run are not: compare slopes across seeds for an honest spread."""
    from scipy import stats

    rounds, loss = np.asarray(rounds, dtype=float), np.asarray(loss, dtype=float)
    tail_ok = np.flip(np.minimum.accumulate(np.flip(loss <= max_loss)))   # this and all later below
    sel = tail_ok & (rounds >= 1) & (loss > 0)
    if sel.sum() < min_points:
        raise ValueError(f"only {int(sel.sum())} readings with loss <= {max_loss} to fit "
                         f"(need {min_points}): run longer or raise max_loss")
    lx, ly = np.log(rounds[sel]), np.log(loss[sel])
    res = stats.linregress(lx, ly)
    half = float(stats.t.ppf(0.5 + level / 2, sel.sum() - 2)) * res.stderr
    return SlopeFit(float(res.slope), float(res.slope - half), float(res.slope + half),
                    float(res.intercept), int(rounds[sel][0]), int(rounds[sel][-1]), int(sel.sum()), level)


# ---------------------------------------------------------------- data and the study grid

def cifar_subset(root, n: int, *, image_size: int = 8, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """`experiments.data.cifar_subset` in float32 (the trainer's dtype): the first n / 10 images of every
    class of CIFAR-10 ``split`` (record order), normalized, average-pooled to ``image_size`` (a divisor
    of 32): float32 (n, 3, S, S), int64 (n,)."""
    from experiments.data import cifar_subset as balanced_cifar

    x, labels = balanced_cifar(root, n, image_size=image_size, split=split, dtype=torch.float32)
    return x.contiguous(), labels


@dataclass(frozen=True)
class StudySpec:
    """One cell of the grid: regime, K, seed (initialization, shards and sampling order)."""
    regime: str
    local_steps: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.regime}-K{self.local_steps}-s{self.seed}"


def study_grid(regimes: Sequence[str], local_steps: Sequence[int], seeds: Sequence[int]) -> list[StudySpec]:
    """Every (regime, K, seed), checked before any training starts."""
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise ValueError(f"unknown regime(s) {bad}; choose from {REGIMES}")
    if not local_steps or any(int(k) < 1 for k in local_steps) or not seeds:
        raise ValueError("need at least one K >= 1 and one seed")
    return [StudySpec(r, int(k), int(s)) for r in regimes for k in local_steps for s in seeds]


def run_study(x: torch.Tensor, y: torch.Tensor, specs: Iterable[StudySpec], *,
              make_model: Callable[[], nn.Module], nodes: int, similarity: float,
              rounds_for: Callable[[StudySpec], int], lr: float, local_batch: int = 8,
              threshold: float = 1e-4, eval_points: int = 150, out: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Run every spec (resuming from the JSON file ``out`` if it exists; rewritten atomically
    after each run); return one dict per spec with the trajectory and settings ("reached" is
    None when the threshold was not met within the round budget).

    ``make_model()`` builds the network; it is called under ``torch.manual_seed(seed)`` inside
    a forked RNG, so the initialization depends on the seed only. ``rounds_for(spec)`` is the
    round budget of a cell. Every partition is built (and checked) before the first run.
    """
    specs = list(specs)
    shards = {}
    for s in specs:
        key = (s.regime, s.seed)
        if key not in shards:
            shards[key] = node_shards(y, nodes, s.regime, similarity=similarity, seed=s.seed)
            if shards[key].shape[1] < local_batch:
                raise ValueError(f"{nodes} nodes hold {shards[key].shape[1]} samples each, fewer "
                                 f"than the local batch {local_batch}")
    path = Path(out) if out is not None else None
    done = {}
    if path is not None and path.exists():
        done = {row["key"]: row for row in json.loads(path.read_text())}
    rows = []
    for s in specs:
        if s.key in done:
            rows.append(done[s.key])
            continue
        with torch.random.fork_rng():
            torch.manual_seed(s.seed)
            model = make_model()
        cfg = LocalSGDConfig(local_steps=s.local_steps, max_rounds=int(rounds_for(s)), lr=lr,
                             local_batch=local_batch, threshold=threshold, eval_points=eval_points)
        traj = run_local_sgd(model, x, y, shards[(s.regime, s.seed)], cfg, seed=s.seed)
        row = dict(key=s.key, regime=s.regime, local_steps=s.local_steps, seed=s.seed,
                   rounds=traj.rounds.tolist(), loss=traj.loss.tolist(),
                   reached=None if math.isnan(traj.reached) else traj.reached,
                   wall_s=traj.wall_s, config=asdict(cfg), nodes=nodes, similarity=similarity,
                   samples=int(x.shape[0]))
        rows.append(row)
        done[s.key] = row
        if path is not None:
            atomic_write_bytes(path, json.dumps(list(done.values())).encode())
        if log is not None:
            log(f"{s.key}: {len(traj.rounds)} readings, final loss {traj.loss[-1]:.2e} at round "
                f"{traj.rounds[-1]}, reached {traj.reached:.0f}, {traj.wall_s:.1f} s")
    return rows
