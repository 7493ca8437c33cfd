"""The Local SGD training loop: rounds of H local steps on K workers, then an averaging.

`train(cfg)` runs one `TrainConfig` in this process (one of P under torchrun, holding workers
[p K / P, (p + 1) K / P)), writes the output folder and returns a `RunResult`:

    out/config.json        config + provenance (git revision, seed, torch, world size, backend)
    out/metrics.jsonl      one line per evaluation (`EvalRecord` fields)
    out/checkpoints/last.pt  the last good full-state checkpoint (experiments.checkpoint)
    out/final.pt           averaged parameters + buffers + config (loadable by probe.py)

A folder that already holds a run (any of config.json, metrics.jsonl, final.pt, checkpoints/)
is never written over: the run is refused unless it resumes that run (`resume`) or
`overwrite` is set, which renames the old folder to OUT.replaced-<UTC time> (nothing is
deleted). Temporary files left by an interrupted atomic write are removed at the start.

An evaluation, at the end of a global round, loads the average of all workers into one
network, re-estimates its BatchNorm statistics on `bn_batches` training batches (cumulative
average, as the authors do), and measures the test loss and accuracy; the training loss and
accuracy are the running means over the workers' minibatches since the previous evaluation
(with the label noise they were trained on). The worker spread is (1/K) sum_k ||theta_k -
theta_bar||^2 just before that averaging. With `track_sharpness`, the top Hessian eigenvalue
and the Hessian trace of the training loss on a fixed clean subset are added (probe.py).

Divergence (`experiments.divergence`): every step folds non-finite or blown-up losses and
parameter norms into a device flag; one process stops at the first bad step (a GPU: within a
step or two, the flag is read asynchronously), P processes agree every `AGREE_EVERY` steps and
at each round end. A state is good only if it is finite and its evaluation (or, for a
checkpoint between evaluations, the loss of the averaged network on one test batch) is finite;
only good states are checkpointed, so the last good checkpoint is never overwritten by a bad
one. `DivergenceError` names it.

Stopping: `request_stop(signum)` (train.py calls it from its SIGINT / SIGTERM handlers) makes
the run stop after the current step (P processes: at the next agreement point, the same step
in every rank), write a checkpoint atomically, mid-round if need be (it records where the
round began, so a resume continues the same round bit for bit), and raise `Interrupted`.

`--backend auto` is a fixed rule, the same in every rank and run: serial on the CPU (measured
faster there, BENCHMARKS.md), vmap (the stacked workers) on a GPU or with `compile`. It is
written to config.json.

The device: `cfg.device` ("auto": the GPU if there is one), or the DistContext's under
torchrun. Every per-step operation stays there: each worker's augmentation and label noise
are drawn by its own generator on the data's device (so a checkpoint resumes on the device
type that wrote it), the epoch's indices are copied once per epoch, the training sums
accumulate on the device, and nothing is read back to the host inside the step loop (one
read of the divergence flag per round; evaluations and checkpoints read what they report).

Library code: quiet; progress is reported through the `on_round` and `on_eval` callbacks
(train.py draws the bar and the table).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.averaging import AveragingPolicy, WorkerAverager
from experiments.checkpoint import (FINAL_FORMAT, LAST, load_checkpoint, resolve_checkpoint,
                                    save_checkpoint, save_final)
from experiments.config import TrainConfig
from experiments.distributed import DistContext, resolve_device
from experiments.divergence import DivergenceError, DivergenceWatch, Interrupted, describe
from experiments.metrics import MetricsLog, atomic_write_json, provenance, remove_stale_temp_files
from experiments.schedules import build_lr_schedule, build_sync_schedule, plan_rounds
from experiments.workers import SGDOptions, Workers

__all__ = ["Trainer", "train", "TrainConfig", "RunResult", "EvalRecord", "DivergenceError",
           "Interrupted", "RunFolderError", "FINAL_FORMAT", "auto_backend", "plan_run"]

RUN_FILES = ("config.json", "metrics.jsonl", "final.pt", "checkpoints", "init.json")
AGREE_EVERY = 16     # steps between the stop / divergence agreements of P > 1 processes
SIGNAL_NAMES = {2: "SIGINT", 15: "SIGTERM"}


class RunFolderError(ValueError):
    """The output folder cannot be used: it is a file, or it holds another run."""


@dataclass(frozen=True)
class EvalRecord:
    round: int
    step: int
    epoch: float
    lr: float
    H: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    worker_spread: float
    evaluation: int
    wall_time: float
    top_eigenvalue: float | None = None
    hessian_trace: float | None = None
    hessian_trace_stderr: float | None = None


@dataclass(frozen=True)
class RunResult:
    out: Path
    records: list
    final_path: Path
    backend: str


# ---------------------------------------------------------------------------- set-up helpers
def dtypes(cfg: TrainConfig) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None)."""
    if cfg.precision == "fp64":
        return torch.float64, None
    return torch.float32, (torch.bfloat16 if cfg.precision == "bf16" else None)


def check_data_available(cfg: TrainConfig) -> None:
    """Raise FileNotFoundError now if the CIFAR-10 files are missing (and no --download)."""
    if cfg.data != "cifar10" or cfg.download:
        return
    from experiments.data import BINARY_DIR, BINARY_TAR, PYTHON_DIR, PYTHON_TAR, resolve_cifar10_dir
    root = resolve_cifar10_dir(cfg.data_dir or None)
    from experiments.datasets import is_pack
    if root.is_file() or is_pack(root):
        return
    if not any((root / n).exists() for n in (BINARY_DIR, BINARY_TAR, PYTHON_DIR, PYTHON_TAR)):
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root.resolve()}: expected {BINARY_TAR}, {BINARY_DIR}/, "
            f"{PYTHON_TAR} or {PYTHON_DIR}/ there; pass --data-dir, set CIFAR10_DIR, or add --download")


def load_datasets(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """(train, test) `DeviceDataset`s as the config describes."""
    from experiments.datasets import DeviceDataset, subset, synthetic_cifar
    if cfg.data == "synthetic":
        n_test = cfg.test_size or max(256, cfg.synthetic_size // 4)
        images, labels = synthetic_cifar(cfg.synthetic_size + n_test, seed=10_007,
                                         num_classes=cfg.num_classes)
        train = (images[:cfg.synthetic_size], labels[:cfg.synthetic_size])
        test = (images[cfg.synthetic_size:], labels[cfg.synthetic_size:])
    else:
        from experiments.data import download_cifar10, load_cifar10, resolve_cifar10_dir
        from experiments.datasets import is_pack, read_pack
        check_data_available(cfg)
        root = resolve_cifar10_dir(cfg.data_dir or None)
        if is_pack(root):   # a packed real subset (benchmarks/pack_cifar_subset.py), checksums checked
            train, test = read_pack(root)
        else:
            if cfg.download:
                download_cifar10(root)
            train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
        if cfg.train_size:
            from experiments.data import balanced_subset
            train = balanced_subset(*train, cfg.train_size, num_classes=cfg.num_classes)
        if cfg.test_size:
            test = subset(*test, cfg.test_size, balanced=False)
    make = lambda pair: DeviceDataset(*pair, device=device, num_classes=cfg.num_classes, dtype=dtype)
    return make(train), make(test)


@dataclass(frozen=True)
class RunPlan:
    """What a config will do, known without data: steps per epoch, total steps and the
    number of evaluations."""
    steps_per_epoch: int
    total_steps: int
    evaluations: int


def _full_train_size(cfg: TrainConfig) -> int:
    """Training images of the real data: a pack's count (from its manifest), else 50,000."""
    if cfg.data_dir:
        from experiments.datasets import is_pack, pack_train_size
        if is_pack(cfg.data_dir):
            return pack_train_size(cfg.data_dir)
    return 50_000


def plan_run(cfg: TrainConfig) -> RunPlan:
    """The `RunPlan` of `cfg` (replays the schedules; ValueError if no step fits)."""
    n = cfg.synthetic_size if cfg.data == "synthetic" else (cfg.train_size or _full_train_size(cfg))
    spe = cfg.steps_per_epoch or (n // cfg.workers) // cfg.local_batch
    if spe < 1:
        raise ValueError(f"no full step fits: {n} training images over {cfg.workers} workers x "
                         f"local batch {cfg.local_batch}; lower them or set steps_per_epoch")
    most = (n // cfg.workers) // cfg.local_batch
    if cfg.steps_per_epoch and not cfg.replacement and cfg.steps_per_epoch > most:
        raise ValueError(f"without replacement at most {most} steps fit in one epoch of {n} images "
                         f"({cfg.workers} workers x local batch {cfg.local_batch}), got "
                         f"steps_per_epoch={cfg.steps_per_epoch}; use replacement=True")
    total = max(1, round(cfg.epochs * spe))
    lr = build_lr_schedule(cfg, steps_per_epoch=spe, total_steps=total)
    count, pending = 0, False
    for _, first, rnd in plan_rounds(build_sync_schedule(cfg, steps_per_epoch=spe), lr, total):
        end = first + rnd.steps
        pending |= bool(cfg.eval_every and end // cfg.eval_every > first // cfg.eval_every) or end == total
        if pending and rnd.is_global:
            count, pending = count + 1, False
    return RunPlan(spe, total, count)


def check_plan(cfg: TrainConfig, plan: RunPlan) -> None:
    """Refuse settings that would silently do nothing (ValueError naming them)."""
    late = [i for i in cfg.track_sharpness if i >= plan.evaluations]
    if late:
        raise ValueError(f"track_sharpness index {late[0]} is never reached: the run makes "
                         f"{plan.evaluations} evaluations (indices 0-{plan.evaluations - 1})")
    if cfg.sync == "post-local" and round(cfg.switch_epoch * plan.steps_per_epoch) >= plan.total_steps:
        raise ValueError(f"switch_epoch {cfg.switch_epoch} is at or after the end of the run "
                         f"(epochs {cfg.epochs}): it would be plain minibatch SGD throughout")


def configure_numerics(cfg: TrainConfig, device: torch.device) -> dict:
    """Set the process-wide numerics the config asks for, explicitly, and return them (for
    config.json): TF32 for fp32 matmuls / convolutions on a GPU (`cfg.tf32`, off by default, so
    "fp32" is true fp32; PyTorch's own default lets cuDNN use TF32), and with
    `cfg.deterministic` deterministic algorithms and no cuDNN autotuning (cuBLAS then also
    needs CUBLAS_WORKSPACE_CONFIG, set here if absent)."""
    import os
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    if cfg.deterministic:
        if torch.device(device).type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return {"tf32": bool(cfg.tf32), "deterministic": bool(cfg.deterministic),
            "device": str(device)}


def auto_backend(device: torch.device, compile: bool = False) -> tuple[str, str]:
    """(backend, reason) of backend='auto': a fixed rule of the device type, so every rank and
    every run of a config (1 process or P) chooses the same."""
    if torch.device(device).type == "cuda":
        return "vmap", "auto: vmap on a GPU (one batched kernel for all workers)"
    if compile:
        return "vmap", "auto: vmap with compile (torch.compile applies to the stacked workers)"
    return "serial", "auto: serial on the CPU (faster there, BENCHMARKS.md bench_trainer)"


def run_files(out: Path) -> list[str]:
    """The names in `out` that mark it as holding a run."""
    return [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []


def prepare_run_folder(cfg: TrainConfig, dist: DistContext) -> Path | None:
    """Check `cfg.out` before any work (see the module docstring); with `overwrite`, move the
    old run aside (returns where to). Every rank checks the same folder before rank 0 moves it."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is an existing file, not a folder")
    held = run_files(out)
    moved = None
    if held:
        here = False
        if cfg.resume:
            ckpt = resolve_checkpoint(cfg.resume).resolve()
            here = out.resolve() in ckpt.parents
        if cfg.resume and not here:
            raise RunFolderError(f"--out {out} already holds another run ({', '.join(held)}); "
                                 f"resume into the checkpoint's own folder or into an empty --out")
        if not cfg.resume and not cfg.overwrite:
            raise RunFolderError(
                f"--out {out} already holds a run ({', '.join(held)}); continue it with --resume "
                f"{out}, or pass --overwrite to move it aside to {out.name}.replaced-<time> "
                "(nothing is deleted)")
    dist.barrier()
    if dist.is_main:
        if held and cfg.overwrite:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            moved = out.with_name(f"{out.name}.replaced-{stamp}")
            n = 1
            while moved.exists():
                moved, n = out.with_name(f"{out.name}.replaced-{stamp}-{n}"), n + 1
            out.rename(moved)
        for folder in (out, out / "checkpoints"):
            remove_stale_temp_files(folder)
    dist.barrier()
    return moved


def build_network(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of `cfg`, initialized from `cfg.seed` (global RNG forked, so nothing leaks)."""
    from experiments.models import build_model
    kwargs = {"num_classes": cfg.num_classes}
    if cfg.norm != "default":
        kwargs["norm"] = cfg.norm
    if cfg.width:
        kwargs["width"] = cfg.width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, **kwargs)
    return model.to(device=device, dtype=dtype)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches) -> None:
    """Reset BatchNorm running statistics and recompute them as the plain average over `batches`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    """One run of `cfg` in this process; see the module docstring. Build, then `.run()`."""

    def __init__(self, cfg: TrainConfig, *, dist: DistContext | None = None,
                 on_round: Callable | None = None, on_eval: Callable | None = None):
        # one process without a given context: the device cfg.device names ("auto": the GPU if any)
        self.cfg, self.dist = cfg, dist or DistContext(device=resolve_device(cfg.device))
        self.on_round, self.on_eval = on_round, on_eval
        self.stop_signal: int | None = None
        d = self.dist
        if cfg.workers % d.world_size:
            raise ValueError(f"workers K={cfg.workers} cannot be split evenly over "
                             f"{d.world_size} processes")
        # every check that needs no data and no model comes first
        self.plan = plan_run(cfg)
        check_plan(cfg, self.plan)
        self.resume_state = None
        if cfg.resume:
            self.resume_state = load_checkpoint(cfg.resume, cfg)  # SHA-256 and config check
            done = int(self.resume_state["step"])
            if done >= self.plan.total_steps:
                raise ValueError(f"{resolve_checkpoint(cfg.resume)} is at step {done}, the end of a "
                                 f"run of {self.plan.total_steps} steps: nothing to do (pass a larger "
                                 "--epochs to extend the run)")
        self.moved_aside = prepare_run_folder(cfg, d)
        check_data_available(cfg)
        from experiments.sampling import WorkerSampler, worker_range
        self.device = d.device
        self.numerics = configure_numerics(cfg, self.device)
        self.dtype, autocast = dtypes(cfg)
        self.train_set, self.test_set = load_datasets(cfg, self.device, self.dtype)
        self.sampler = WorkerSampler(len(self.train_set), workers=cfg.workers,
                                     local_batch=cfg.local_batch, replacement=cfg.replacement,
                                     steps_per_epoch=cfg.steps_per_epoch or None,
                                     partition=cfg.partition, labels=self.train_set.labels.cpu(),
                                     generator_seed=cfg.seed)
        self.my_workers = worker_range(d.rank, d.world_size, cfg.workers)
        self.K_loc = len(self.my_workers)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))
        assert self.total_steps == self.plan.total_steps, "plan_run disagrees with the sampler"
        self.lr = build_lr_schedule(cfg, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
        self.sync = build_sync_schedule(cfg, steps_per_epoch=self.steps_per_epoch)

        model = build_network(cfg, self.device, self.dtype)
        options = dict(sgd=SGDOptions(cfg.momentum, cfg.nesterov, cfg.wd, cfg.wd_norm_bias),
                       autocast_dtype=autocast, channels_last=cfg.channels_last, compile=cfg.compile)
        # per-worker data generators on the data's device: the augmentation and label-noise
        # draws are made where the data live, nothing is drawn on the host and copied per step
        self.generators = [torch.Generator(device=self.device).manual_seed(_seed(cfg.seed, 1, k))
                           for k in self.my_workers]
        self.backend, self.backend_rule = cfg.backend, "given"
        if self.backend == "auto":
            self.backend, self.backend_rule = auto_backend(self.device, cfg.compile)
        if cfg.compile and self.backend != "vmap":
            raise ValueError("compile applies to the stacked workers: it needs backend vmap (or auto), "
                             f"got backend {self.backend!r}")
        self.workers = Workers(model, self.K_loc, backend=self.backend, **options)
        self.eval_model = copy.deepcopy(model).eval()
        self.averager = WorkerAverager(AveragingPolicy(cfg.average_buffers, cfg.average_momentum),
                                       group=d if d.distributed else None)
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoints" / LAST
        self.log = MetricsLog(self.out / "metrics.jsonl")
        # progress counters (checkpointed); round_first: first step of round `round`
        self.round, self.round_first, self.step, self.evaluations = 0, 0, 0, 0
        self.pending_eval = self.pending_ckpt = False
        # train loss sum, correct, count, on the device (read at evaluations only)
        self.accum = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.watch = DivergenceWatch(self.device, factor=cfg.blowup_factor, num_classes=cfg.num_classes)
        self.last_checkpoint: Path | None = None
        self._broadcast_initial()
        if self.resume_state is not None:
            self._restore(self.resume_state)

    # ------------------------------------------------------------------ data
    def _batches(self, idx: torch.Tensor, generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-worker batches for indices (K_loc, B): each worker draws its augmentation and
        label noise from its own generator, so the data do not depend on the process layout."""
        from experiments.datasets import flip_labels
        # one gather + crop for all workers; worker k's draws come from generators[k] in the
        # order augmentation, then label noise (the same streams as one batch per worker)
        x, y = self.train_set.batch(idx, augment=self.cfg.aug, generator=list(generators))
        if self.cfg.label_noise:
            y = torch.stack([flip_labels(y[k], self.cfg.label_noise, self.cfg.num_classes, g)
                             for k, g in enumerate(generators)])
        return x, y

    # ------------------------------------------------------------------ state
    def _broadcast_initial(self) -> None:
        """Rank 0's initial weights and buffers to every process and worker."""
        w = self.workers
        if not self.dist.distributed:
            return
        flat = torch.cat([w.params[0].detach(), w.buffers[0].to(w.params.dtype)])
        self.dist.broadcast_(flat, src=0)
        D = w.dim
        with torch.no_grad():
            w.params.copy_(flat[:D].expand_as(w.params))
            w.buffers.copy_(flat[D:].to(w.buffers.dtype).expand_as(w.buffers))

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.all_gather_rows(t.detach().contiguous()).cpu()

    def checkpoint_state(self) -> dict:
        """The full state (all K workers gathered); call on every process."""
        gens = torch.stack([g.get_state() for g in self.generators])
        accum = self.accum.clone()
        self.dist.all_reduce_sum_(accum)
        w = self.workers
        return {"round": self.round, "round_first": self.round_first, "step": self.step,
                "evaluations": self.evaluations, "pending_eval": self.pending_eval,
                "pending_ckpt": self.pending_ckpt,
                "params": self._gather(w.params), "momentum": self._gather(w.momentum),
                "buffers": self._gather(w.buffers), "counters": self._gather(w.counters),
                "generators": self._gather(gens), "train_accum": accum.cpu(),
                "backend": self.backend, "world_size": self.dist.world_size}

    def _restore(self, s: dict) -> None:
        w, sl = self.workers, slice(self.my_workers.start, self.my_workers.stop)
        if s["params"].shape != (self.cfg.workers, w.dim):
            raise ValueError(f"checkpoint holds parameters {tuple(s['params'].shape)}, this run "
                             f"needs ({self.cfg.workers}, {w.dim})")
        with torch.no_grad():
            for name in ("params", "momentum", "buffers", "counters"):
                getattr(w, name).copy_(s[name][sl].to(self.device))
        states = s["generators"][sl]
        mine = self.generators[0].get_state()
        if states.shape[1:] != mine.shape:
            raise ValueError(f"the checkpoint's data generators hold {states.shape[1]}-byte states, this "
                             f"run's ({self.device.type}) {mine.numel()}-byte ones: the data streams "
                             "live on the device, so resume on the device type that wrote the checkpoint")
        for g, state in zip(self.generators, states):
            g.set_state(state.clone())
        self.round, self.step, self.evaluations = int(s["round"]), int(s["step"]), int(s["evaluations"])
        self.round_first = int(s.get("round_first", self.step))
        self.pending_eval = bool(s.get("pending_eval", False))
        self.pending_ckpt = bool(s.get("pending_ckpt", False))
        self.accum = (s["train_accum"].clone() if self.dist.is_main else
                      torch.zeros(3, dtype=torch.float64)).to(self.device)
        self.last_checkpoint = resolve_checkpoint(self.cfg.resume)

    def _write_checkpoint(self) -> None:
        state = self.checkpoint_state()
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, state, self.cfg)
        self.last_checkpoint = self.ckpt_path

    def request_stop(self, signum: int = 2) -> None:
        """Stop after the current step with a resumable checkpoint (see the module docstring)."""
        self.stop_signal = int(signum)

    @torch.no_grad()
    def _state_is_finite(self) -> bool:
        """Whether every worker's state is finite and the network of their mean (running BN
        statistics, no re-estimation) has a finite loss on the first test batch; agreed over
        all processes. The check made before a checkpoint written between evaluations."""
        w = self.workers
        ok = bool(torch.isfinite(w.params).all() and torch.isfinite(w.buffers).all()
                  and torch.isfinite(w.momentum).all())
        if ok:
            self.eval_model.load_state_dict(w.mean_state())
            self.eval_model.eval()
            x, y = self.test_set.batch(torch.arange(min(self.cfg.eval_batch, len(self.test_set))),
                                       augment=False)
            with self.workers._autocast():
                logits = self.eval_model(x)
            ok = bool(torch.isfinite(F.cross_entropy(logits.float(), y)))
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
        self.dist.all_reduce_sum_(flag)
        return float(flag) == 0.0

    def _diverged(self, message: str) -> DivergenceError:
        where = self.last_checkpoint or "none (no checkpoint had been written)"
        return DivergenceError(f"{message}; stopped. Last good checkpoint: {where}")

    # ------------------------------------------------------------------ evaluation
    def _averaged_buffers(self) -> torch.Tensor:
        b = self.workers.buffers.mean(0)
        if self.dist.distributed and self.cfg.average_buffers != "average" and b.numel():
            self.dist.all_reduce_sum_(b)
            b /= self.dist.world_size
        return b

    def _load_eval_model(self, evaluation: int) -> nn.Module:
        """The averaged network with BN statistics re-estimated on bn_batches training batches
        (drawn from a generator seeded by the run seed and the evaluation index)."""
        w = self.workers
        state = w.mean_state(w.params[0].detach(), self._averaged_buffers())
        self.eval_model.load_state_dict(state)
        if self.cfg.bn_batches and has_batchnorm(self.eval_model):
            g = torch.Generator().manual_seed(_seed(self.cfg.seed, 2, evaluation))
            n = len(self.train_set)
            batches = (self.train_set.batch(torch.randint(0, n, (self.cfg.local_batch,), generator=g),
                                            augment=self.cfg.aug, generator=g)[0]
                       for _ in range(self.cfg.bn_batches))
            with self.workers._autocast():
                reestimate_bn(self.eval_model, batches)
        self.eval_model.eval()
        return self.eval_model

    @torch.no_grad()
    def _test_sums(self, model: nn.Module) -> torch.Tensor:
        d, n = self.dist, len(self.test_set)
        idx = torch.arange(d.rank, n, d.world_size, device=self.test_set.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.test_set.device)   # read once, by the caller
        for chunk in torch.split(idx, self.cfg.eval_batch):
            x, y = self.test_set.batch(chunk, augment=False)
            with self.workers._autocast():
                logits = model(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            sums[0] += F.cross_entropy(logits, y, reduction="sum").to(torch.float64)
            sums[1] += (logits.argmax(-1) == y).sum().to(torch.float64)
            sums[2] += len(y)
        return sums

    def _evaluate(self, r: int, H: int, spread_sum: float, wall: float) -> EvalRecord:
        model = self._load_eval_model(self.evaluations)
        sums = torch.cat([self._test_sums(model), self.accum]).cpu()
        self.dist.all_reduce_sum_(sums)
        test_loss, test_correct, test_n, tr_loss, tr_correct, tr_n = sums.tolist()
        if not (math.isfinite(test_loss) and math.isfinite(tr_loss)):
            raise self._diverged(f"the evaluation at step {self.step} (round {r}) is not finite "
                                 f"(test loss {test_loss / test_n:.4g}, training loss "
                                 f"{tr_loss / max(tr_n, 1):.4g}): the state is not good")
        self.accum.zero_()
        extra = {}
        if self.evaluations in self.cfg.track_sharpness and self.dist.is_main:
            from experiments.tracking import measure_sharpness, sharpness_data
            extra = measure_sharpness(model, sharpness_data(self.cfg, self.train_set),
                                      matvecs=self.cfg.sharpness_matvecs, seed=self.cfg.seed)
        last = self.step - 1
        rec = EvalRecord(round=r, step=self.step, epoch=self.step / self.steps_per_epoch,
                         lr=self.lr(last), H=H, train_loss=tr_loss / max(tr_n, 1),
                         train_acc=tr_correct / max(tr_n, 1), test_loss=test_loss / test_n,
                         test_acc=test_correct / test_n, worker_spread=spread_sum / self.cfg.workers,
                         evaluation=self.evaluations, wall_time=wall, **extra)
        self.evaluations += 1
        if self.dist.is_main:
            self.log.append(dataclasses.asdict(rec))
        if self.on_eval is not None and self.dist.is_main:
            self.on_eval(rec)
        return rec

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunResult:
        cfg, d, w = self.cfg, self.dist, self.workers
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json",
                              {**provenance(cfg.to_dict(), world_size=d.world_size),
                               "backend": self.backend, "backend_rule": self.backend_rule,
                               "numerics": self.numerics})
            if self.resume_state is not None:
                self.log.truncate_after(self.evaluations)
            elif self.log.path.exists():
                self.log.path.unlink()
        records, start = [], time.perf_counter()
        cached_epoch, epoch_idx = -1, None
        for r, first, rnd in plan_rounds(self.sync, self.lr, self.total_steps,
                                         start_round=self.round, start_step=self.round_first):
            end = first + rnd.steps
            self.round, self.round_first = r, first
            self.watch.start_round(w.params)
            stop = bad = False
            for t in range(max(first, self.step), end):
                if self.stop_signal is not None and not d.distributed:
                    stop = True
                    break
                epoch, within = divmod(t, self.steps_per_epoch)
                if epoch != cached_epoch:
                    # one host-to-device copy of the epoch's indices, none per step
                    epoch_idx = self.sampler.epoch(epoch, workers=self.my_workers).to(self.device)
                    cached_epoch = epoch
                x, y = self._batches(epoch_idx[within], self.generators)
                loss, correct = w.step(x, y, self.lr(t))
                # on the device, no host synchronization (nor a host-to-device copy) per step
                self.accum[:2] += torch.stack([loss.sum().to(torch.float64) * y.shape[1],
                                               correct.sum().to(torch.float64)])
                self.accum[2] += y.numel()
                self.watch.update(loss, w.params, t)
                self.step = t + 1
                if d.distributed:
                    if (t + 1 - first) % AGREE_EVERY == 0 or t + 1 == end:
                        bad, stop = self._agree()
                        if bad or stop:
                            break
                elif self.watch.tripped():
                    bad = True
                    break
            if not bad and not stop and self.stop_signal is not None and not d.distributed:
                stop = True
            if bad or (not d.distributed and self.watch.verdict()[0]):
                reasons, at = self._verdict_everywhere()
                raise self._diverged(
                    f"training diverged at step {at} in round {r} (steps {first}-{end - 1}, lr "
                    f"{self.lr(max(at, first)):.4g}): {describe(reasons)}")
            if stop:
                self._stop_now()
            self.pending_eval |= self._crossed(cfg.eval_every, first, end) or end == self.total_steps
            self.pending_ckpt |= self._crossed(cfg.checkpoint_every, first, end) or end == self.total_steps
            measure = self.pending_eval and rnd.is_global
            pre = w.params.detach().clone() if measure else None
            self.averager.average_(w.params, w.buffers, w.momentum, initial_buffers=w.initial_buffers,
                                   across_processes=rnd.is_global)
            self.round, self.round_first = r + 1, end
            if self.on_round is not None and d.is_main:
                self.on_round(r, end, self.total_steps, self.lr(first), rnd.steps)
            if measure:
                spread = torch.tensor([float((pre - w.params.detach()[0]).pow(2).sum())], dtype=torch.float64)
                d.all_reduce_sum_(spread)
                records.append(self._evaluate(r, rnd.steps, float(spread), time.perf_counter() - start))
                self.pending_eval = False
            if self.pending_ckpt and rnd.is_global:
                if not measure and not self._state_is_finite():
                    raise self._diverged(f"the state after step {end} (round {r}) is not finite")
                self.pending_ckpt = False
                self._write_checkpoint()
        final = self._write_final()
        return RunResult(self.out, records, final, self.backend)

    @staticmethod
    def _crossed(every: int, first: int, end: int) -> bool:
        return bool(every and end // every > first // every)

    def _agree(self) -> tuple[bool, bool]:
        """P processes: (any diverged, any asked to stop), one all-reduce."""
        flags = torch.tensor([float(self.watch.verdict()[0] > 0), float(self.stop_signal is not None)],
                             dtype=torch.float64)
        self.dist.all_reduce_sum_(flags)
        if flags[1] > 0 and self.stop_signal is None:
            self.stop_signal = 15   # a peer was signalled (torchrun forwards SIGTERM)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _verdict_everywhere(self) -> tuple[int, int]:
        reasons, at = self.watch.verdict()
        if self.dist.distributed:   # the reasons and earliest bad step over all processes
            v = torch.tensor([[float(reasons), float(at)]], dtype=torch.float64)
            parts = self.dist.all_gather_rows(v).tolist()
            reasons, firsts = 0, [int(a) for _, a in parts if a >= 0]
            for bits, _ in parts:
                reasons |= int(bits)
            at = min(firsts) if firsts else -1
        return reasons, at

    def _stop_now(self) -> None:
        """Write a resumable checkpoint of the current (possibly mid-round) state and raise
        `Interrupted` (on every process)."""
        name = SIGNAL_NAMES.get(self.stop_signal, f"signal {self.stop_signal}")
        if self._state_is_finite():
            self._write_checkpoint()
            raise Interrupted(f"stopped by {name} at step {self.step} of {self.total_steps}; wrote "
                              f"{self.ckpt_path}; resume with --resume {self.out}",
                              signum=self.stop_signal, checkpoint=self.ckpt_path)
        raise Interrupted(f"stopped by {name} at step {self.step}; the state was not finite, nothing "
                          f"written; last good checkpoint: {self.last_checkpoint or 'none'}",
                          signum=self.stop_signal, checkpoint=self.last_checkpoint)

    def _write_final(self) -> Path:
        # the network of the final evaluation (the last round always ends with one)
        model = self._load_eval_model(self.evaluations - 1)
        path = self.out / "final.pt"
        if self.dist.is_main:
            save_final(path, model.state_dict(), self.cfg, step=self.step, round=self.round)
        return path


def train(cfg: TrainConfig, *, dist: DistContext | None = None, on_round: Callable | None = None,
          on_eval: Callable | None = None) -> RunResult:
    """Build a `Trainer` for `cfg` and run it (see the module docstring)."""
    return Trainer(cfg, dist=dist, on_round=on_round, on_eval=on_eval).run()
