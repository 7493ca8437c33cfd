"""Studies over many runs: a grid of configs x seeds through the trainer, its metrics.jsonl
files read back into per-seed arrays, and mean +/- std tables over seeds (DESIGN.md: results
are reported as mean +/- std over seeds, never one lucky run).

    specs = grid(base, {"SGD": {}, "QSR": {"sync": "qsr", "qsr_alpha": 0.05}}, seeds=(0, 1, 2),
                 root="runs/study", group="main")
    run_grid(specs)                          # skips runs already finished with the same config
    curves = load_curves(specs)              # {("main", "SGD"): Curves, ...}
    rows = summarize(curves, ["test_acc"])   # final values, mean / std (ddof=1) / n over seeds

Continuations (Gu et al., ICLR 2023: Local SGD started from a point SGD has reached): every run of
a seed starts from that seed's pre-trained network, `grid(..., init={seed: ".../final.pt"})`;
`train_from` loads it into every worker before the first step (fresh momentum, same schedules as
a run from scratch), and the run folder records the checkpoint's SHA-256 in `init.json`.

A run's folder is `root/group/method/seed{seed}`. Each `Curves` holds the evaluation epochs
and steps (identical for every seed of one method, since the synchronization and learning-rate
schedules are deterministic) and one (n_seeds, T) array per metrics field, NaN where a record
has no value (sharpness is measured only at the `track_sharpness` evaluations).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from experiments.config import TrainConfig
from experiments.metrics import read_metrics

FIELDS = ("lr", "H", "train_loss", "train_acc", "test_loss", "test_acc", "worker_spread",
          "top_eigenvalue", "hessian_trace", "hessian_trace_stderr", "wall_time")


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its group (a setting such as "main" or "large_lr"), the method
    name, the seed, the full config (whose `out` is the run's folder) and, for a
    continuation, `init`: the final.pt whose network the run starts from."""
    group: str
    method: str
    seed: int
    config: TrainConfig
    init: str | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def grid(base: TrainConfig, methods: Mapping[str, Mapping], *, seeds: Sequence[int],
         root: str | Path, group: str = "main", sharpness_points: int = 0,
         init: Mapping[int, str | Path] | None = None, **shared) -> list[RunSpec]:
    """Every method x seed: `base` with `shared` overrides, then the method's overrides, the
    seed and out = root/group/method/seed{seed}; with `sharpness_points`, sharpness tracked at
    that many evaluations (`track_sharpness_evenly`); with `init` ({seed: final.pt}), each run
    continues from its seed's checkpoint (`train_from`). Invalid combinations raise ValueError
    here, before any training."""
    if not methods:
        raise ValueError("grid needs at least one method")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    for name in methods:
        if not name or "/" in name:
            raise ValueError(f"method names become folder names; got {name!r}")
    if init is not None:
        missing = [s for s in seeds if s not in init]
        if missing:
            raise ValueError(f"init names no checkpoint for seeds {missing}")
    specs = []
    for name, overrides in methods.items():
        for seed in seeds:
            out = Path(root) / group / name / f"seed{seed}"
            cfg = base.replace(**{**shared, **overrides, "seed": int(seed), "out": str(out)})
            if sharpness_points:
                cfg = track_sharpness_evenly(cfg, sharpness_points)
            start = None if init is None else str(init[seed])
            specs.append(RunSpec(group, name, int(seed), cfg, start))
    return specs


def steps_per_epoch(cfg: TrainConfig) -> int:
    """Steps per epoch the trainer will use: cfg.steps_per_epoch, else (N // K) // B_loc for
    N training images (as `experiments.sampling.WorkerSampler` computes it)."""
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    n = cfg.synthetic_size if cfg.data == "synthetic" else (cfg.train_size or 50_000)
    return (n // cfg.workers) // cfg.local_batch


def evaluation_steps(cfg: TrainConfig) -> list[int]:
    """The steps at which the trainer will evaluate `cfg`: the end of the first global round
    at or after every multiple of eval_every, and the last step (replays the schedules)."""
    from experiments.schedules import build_lr_schedule, build_sync_schedule, plan_rounds
    spe = steps_per_epoch(cfg)
    if spe < 1:
        raise ValueError(f"{cfg.workers} workers x local batch {cfg.local_batch} exceed the training set")
    total = max(1, round(cfg.epochs * spe))
    lr = build_lr_schedule(cfg, steps_per_epoch=spe, total_steps=total)
    steps, pending = [], False
    for _, first, rnd in plan_rounds(build_sync_schedule(cfg, steps_per_epoch=spe), lr, total):
        end = first + rnd.steps
        every = cfg.eval_every
        pending |= bool(every and end // every > first // every) or end == total
        if pending and rnd.is_global:
            steps.append(end)
            pending = False
    return steps


def track_sharpness_evenly(cfg: TrainConfig, count: int) -> TrainConfig:
    """`cfg` with sharpness tracked at `count` evaluations evenly spread over its evaluations,
    always including the first and the last (so every method has a final sharpness)."""
    n = len(evaluation_steps(cfg))
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    picks = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(count, n))} | {n - 1})
    return cfg.replace(track_sharpness=tuple(picks))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


INIT_RECORD = "init.json"


def is_finished(spec: RunSpec) -> bool:
    """True if spec's folder holds a final.pt and metrics written by the same computation
    (config fingerprint equal; fields such as `out` or `backend` may differ) and, for a
    continuation, started from a checkpoint with the same SHA-256 as `spec.init` now."""
    out = spec.out
    if not (out / "final.pt").exists() or not (out / "metrics.jsonl").exists():
        return False
    try:
        saved = json.loads((out / "config.json").read_text())["config"]
        if TrainConfig.from_dict(saved).fingerprint() != spec.config.fingerprint():
            return False
        if spec.init is None:
            return not (out / INIT_RECORD).exists()
        record = json.loads((out / INIT_RECORD).read_text())
        return record["sha256"] == file_sha256(spec.init)
    except (OSError, KeyError, ValueError):
        return False


def load_final(path: str | Path) -> dict:
    """The payload of a trainer's final.pt ({"format", "config", "state_dict", ...}), read by
    `experiments.checkpoint.load_verified`: tensors only (no code runs), format and SHA-256
    checked; CheckpointFileError (a ValueError) naming the file otherwise."""
    from experiments.checkpoint import FINAL_FORMAT, load_verified
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pre-trained checkpoint at {path}")
    return load_verified(path, formats=(FINAL_FORMAT,))


def load_init_state(path: str | Path, cfg: TrainConfig) -> dict:
    """The network state_dict saved in a trainer's final.pt at `path`, after checking that it
    was trained with the same architecture as `cfg` (model, width, norm, num_classes);
    ValueError naming the difference otherwise."""
    state = load_final(path)
    saved = state["config"]
    differ = [k for k in ("model", "width", "norm", "num_classes") if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"{path} holds another network than the run's config: "
                         + ", ".join(f"{k} {saved.get(k)!r} != {getattr(cfg, k)!r}" for k in differ))
    return state["state_dict"]


def train_from(cfg: TrainConfig, init: str | Path | None = None, **kwargs):
    """`experiments.trainer.train(cfg)`, but with every worker starting from the network saved
    in `init` (a final.pt: parameters and BatchNorm statistics) instead of cfg's random
    initialization; momentum starts at zero and the schedules at step 0. Writes
    out/init.json (path and SHA-256 of the checkpoint) after the run. `kwargs` go to
    the `Trainer` (on_round, on_eval). Returns the trainer's RunResult."""
    from experiments.trainer import Trainer
    if init is None:
        return Trainer(cfg, **kwargs).run()
    state = load_init_state(init, cfg)
    sha = file_sha256(init)
    trainer = Trainer(cfg, **kwargs)
    workers = trainer.workers
    names = set(workers.named_views(0))
    if names != set(state):
        raise ValueError(f"{init} does not fit the network of the run: missing "
                         f"{sorted(names - set(state))[:3]}, unexpected {sorted(set(state) - names)[:3]}")
    for k in range(workers.K):
        workers.load_row_(k, state)
    result = trainer.run()
    from experiments.metrics import atomic_write_json
    atomic_write_json(Path(cfg.out) / INIT_RECORD, {"init": str(init), "sha256": sha})
    return result


def _run_one(spec: RunSpec, train_fn: Callable | None) -> float:
    import torch
    start = time.perf_counter()
    if train_fn is None:
        torch.set_num_threads(1)   # one thread per run (the notebooks' convention on shared CPUs)
        train_from(spec.config, spec.init)
    elif spec.init is None:
        train_fn(spec.config)
    else:
        train_fn(spec.config, init=spec.init)
    return time.perf_counter() - start


def run_grid(specs: Iterable[RunSpec], *, train_fn: Callable | None = None,
             skip_finished: bool = True, processes: int = 1,
             on_run: Callable[[RunSpec, bool, float], None] | None = None) -> list[RunSpec]:
    """Train every spec (`train_from`, i.e. the trainer with one torch thread, unless
    `train_fn(config)` / `train_fn(config, init=...)` is given); with `skip_finished` a run
    whose folder already holds the same computation's results is not repeated. `processes`
    > 1 trains that many specs at a time in child processes (spawned; `train_fn` must then be
    picklable). `on_run(spec, skipped, seconds)` is called after each. Returns the specs
    that were trained, in the order given."""
    specs = list(specs)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if len({s.out for s in specs}) != len(specs):
        raise ValueError("two specs share one run folder")
    todo = []
    for spec in specs:
        if skip_finished and is_finished(spec):
            if on_run is not None:
                on_run(spec, True, 0.0)
        else:
            todo.append(spec)
    if processes == 1:
        for spec in todo:
            seconds = _run_one(spec, train_fn)
            if on_run is not None:
                on_run(spec, False, seconds)
        return todo
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(_run_one, spec, train_fn): spec for spec in todo}
        for fut in as_completed(futures):
            seconds = fut.result()          # a failed run raises here, naming its error
            if on_run is not None:
                on_run(futures[fut], False, seconds)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)   # after a failure: start nothing more
    return todo


def clean_accuracy(paths: Sequence[str | Path], *, split: str = "train",
                   data_dir: str | None = None) -> np.ndarray:
    """(n,) accuracy of the network saved in each final.pt on its run's whole `split` ("train"
    or "test") set: clean labels, no augmentation, eval-mode BatchNorm (the statistics the
    trainer re-estimated). Unlike a record's train_acc (a running mean over the minibatches
    since the previous evaluation, with their label noise), this is the accuracy of the final
    network itself. Data sets are loaded once per distinct data config."""
    import torch
    from experiments.trainer import build_network, dtypes, load_datasets
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache, out = {}, []
    for path in paths:
        state = load_final(path)
        cfg = TrainConfig.from_dict(state["config"])
        model = build_network(cfg, torch.device("cpu"), dtypes(cfg)[0])
        model.load_state_dict(state["state_dict"])
        model.eval()
        if data_dir:
            cfg = cfg.replace(data_dir=data_dir)
        key = (cfg.data, cfg.data_dir, cfg.train_size, cfg.test_size, cfg.synthetic_size, cfg.precision)
        if key not in cache:
            cache[key] = load_datasets(cfg, torch.device("cpu"), dtypes(cfg)[0])
        data = cache[key][0 if split == "train" else 1]
        correct = 0
        with torch.no_grad():
            for chunk in torch.split(torch.arange(len(data)), cfg.eval_batch):
                x, y = data.batch(chunk, augment=False)
                correct += int((model(x).argmax(-1) == y).sum())
        out.append(correct / len(data))
    return np.array(out)


# ---------------------------------------------------------------------------- reading results
@dataclass(frozen=True)
class Curves:
    """The evaluations of one method over seeds: `epochs`, `steps` (T,), `values[field]`
    (n_seeds, T) with NaN where a record lacks the field, `seeds` in row order."""
    epochs: np.ndarray
    steps: np.ndarray
    values: dict
    seeds: tuple

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in self.values:
            raise KeyError(f"no field {field!r}; have {sorted(self.values)}")
        return self.values[field]

    def tracked(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs (T',), values (n_seeds, T')) of the evaluations where every seed has `field`."""
        v = self[field]
        keep = np.isfinite(v).all(axis=0)
        return self.epochs[keep], v[:, keep]

    def final(self, field: str) -> np.ndarray:
        """(n_seeds,) the last value of `field` each seed has (NaN if it has none)."""
        v = self[field]
        out = np.full(v.shape[0], np.nan)
        for i, row in enumerate(v):
            finite = np.flatnonzero(np.isfinite(row))
            if finite.size:
                out[i] = row[finite[-1]]
        return out


def _as_float(value) -> float:
    if value is None:
        return math.nan
    return float(value)  # non-finite values are stored as strings ("nan", "inf")


def curves_from_records(records_by_seed: Mapping[int, list], fields: Sequence[str] = FIELDS) -> Curves:
    """`Curves` from {seed: list of metrics records}; every seed must have been evaluated at
    the same steps (ValueError otherwise)."""
    if not records_by_seed:
        raise ValueError("no runs to read")
    seeds = tuple(sorted(records_by_seed))
    steps = [tuple(r["step"] for r in records_by_seed[s]) for s in seeds]
    if any(st != steps[0] for st in steps) or not steps[0]:
        raise ValueError(f"seeds {seeds} were evaluated at different steps (or not at all): "
                         f"{[len(st) for st in steps]} evaluations")
    first = records_by_seed[seeds[0]]
    values = {f: np.array([[_as_float(r.get(f)) for r in records_by_seed[s]] for s in seeds])
              for f in fields}
    return Curves(epochs=np.array([float(r["epoch"]) for r in first]),
                  steps=np.array(steps[0], dtype=np.int64), values=values, seeds=seeds)


def load_curves(specs: Iterable[RunSpec], fields: Sequence[str] = FIELDS) -> dict:
    """{(group, method): Curves} from the metrics.jsonl of every spec (FileNotFoundError
    naming the first missing run)."""
    by_key: dict = {}
    for spec in specs:
        path = spec.out / "metrics.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"run {spec.group}/{spec.method}/seed{spec.seed} has no results at {path}")
        by_key.setdefault((spec.group, spec.method), {})[spec.seed] = read_metrics(path)
    return {key: curves_from_records(runs, fields) for key, runs in by_key.items()}


# ---------------------------------------------------------------------------- tables
def mean_std(samples) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN for one sample), n) over the finite entries."""
    x = np.asarray(samples, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size)


def paired_difference(curves: Curves, reference: Curves, field: str) -> np.ndarray:
    """(n,) final value of `field` minus the reference's, seed by seed, over the seeds both
    have (same seed: same initialization and data order in the trainer)."""
    common = [s for s in curves.seeds if s in reference.seeds]
    if not common:
        raise ValueError("the two methods share no seed")
    a, b = curves.final(field), reference.final(field)
    return np.array([a[curves.seeds.index(s)] - b[reference.seeds.index(s)] for s in common])


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval [lo, hi] from n samples."""
    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)


def confidence_interval(samples, level: float = 0.95) -> Interval:
    """Student-t interval for the mean of the finite `samples`: mean +/- t_{n-1,(1+level)/2}
    std / sqrt(n) (std with ddof=1); for paired differences, the paired t-interval. NaN
    bounds with fewer than 2 samples."""
    from scipy.stats import t as student_t
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean, std, n = mean_std(samples)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def summarize(curves: Mapping, fields: Sequence[str], *, reference: str | None = None,
              level: float = 0.95) -> list[dict]:
    """One row per key of `curves` (keys (group, method)): for every field the mean, std and n
    over seeds of its final value; with `reference` (a method name), also `delta_<field>`: the
    paired difference to that method of the same group (mean, std, n), and `ci_<field>`: its
    `level` confidence interval (`Interval`, paired t)."""
    rows = []
    for key, c in curves.items():
        group, method = key
        row = {"group": group, "method": method, "n_seeds": len(c.seeds)}
        for f in fields:
            row[f] = mean_std(c.final(f))
            ref = curves.get((group, reference)) if reference is not None else None
            if ref is not None and method != reference:
                diff = paired_difference(c, ref, f)
                row["delta_" + f] = mean_std(diff)
                row["ci_" + f] = confidence_interval(diff, level)
        rows.append(row)
    return rows


def format_mean_std(stat: tuple, fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    if n == 1:
        return fmt.format(mean * scale) + " (1 seed)"
    return f"{fmt.format(mean * scale)} ± {fmt.replace('+', '').format(std * scale)}"


def format_interval(iv: Interval, fmt: str = "{:+.2f}", scale: float = 1.0) -> str:
    """"mean [lo, hi]" (bounds without a forced sign)."""
    if iv.n == 0:
        return "n/a"
    plain = fmt.replace("+", "")
    if iv.n == 1:
        return fmt.format(iv.mean * scale) + " (1 seed)"
    return f"{fmt.format(iv.mean * scale)} [{plain.format(iv.lo * scale)}, {plain.format(iv.hi * scale)}]"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """A markdown table: `columns` are (header, key, fmt, scale); entries of a row that are
    (mean, std, n) tuples print as "mean ± std", `Interval`s as "mean [lo, hi]", missing
    ones as "-"."""
    lines = ["| " + " | ".join(h for h, *_ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt, scale in columns:
            v = row.get(key)
            if v is None:
                cells.append("-")
            elif isinstance(v, Interval):
                cells.append(format_interval(v, fmt, scale))
            elif isinstance(v, tuple):
                cells.append(format_mean_std(v, fmt, scale))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
