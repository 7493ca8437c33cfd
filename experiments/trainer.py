"""The Local SGD training loop: rounds of H local steps on K workers, then an averaging.

`train(cfg)` runs one `TrainConfig` in this process (one of P under torchrun, holding workers
[p K / P, (p + 1) K / P)), writes the output folder and returns a `RunResult`:

    out/config.json        config + provenance (git revision, seed, torch, world size)
    out/metrics.jsonl      one line per evaluation (`EvalRecord` fields)
    out/checkpoints/last.pt  the last full-state checkpoint (experiments.checkpoint)
    out/final.pt           averaged parameters + buffers + config (loadable by probe.py)

An evaluation, at the end of a global round, loads the average of all workers into one
network, re-estimates its BatchNorm statistics on `bn_batches` training batches (cumulative
average, as the authors do), and measures the test loss and accuracy; the training loss and
accuracy are the running means over the workers' minibatches since the previous evaluation
(with the label noise they were trained on). The worker spread is (1/K) sum_k ||theta_k -
theta_bar||^2 just before that averaging. With `track_sharpness`, the top Hessian eigenvalue
and the Hessian trace of the training loss on a fixed clean subset are added (probe.py).

A non-finite loss or parameter stops the run at the end of its round with `DivergenceError`;
no checkpoint is written after the last good one. Library code: quiet; progress is reported
through the `on_round` and `on_eval` callbacks (train.py draws the bar and the table).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.averaging import AveragingPolicy, WorkerAverager
from experiments.checkpoint import LAST, load_checkpoint, save_checkpoint
from experiments.config import TrainConfig
from experiments.distributed import DistContext
from experiments.metrics import MetricsLog, atomic_write_bytes, atomic_write_json, provenance
from experiments.schedules import build_lr_schedule, build_sync_schedule, plan_rounds
from experiments.workers import SGDOptions, Workers, choose_backend

FINAL_FORMAT = "localsgd-final-v1"


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter."""


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
    if root.is_file():
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
        check_data_available(cfg)
        root = resolve_cifar10_dir(cfg.data_dir or None)
        if cfg.download:
            download_cifar10(root)
        train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
        if cfg.train_size:
            train = subset(*train, cfg.train_size, balanced=cfg.train_size % cfg.num_classes == 0,
                           num_classes=cfg.num_classes)
        if cfg.test_size:
            test = subset(*test, cfg.test_size, balanced=False)
    make = lambda pair: DeviceDataset(*pair, device=device, num_classes=cfg.num_classes, dtype=dtype)
    return make(train), make(test)


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
        self.cfg, self.dist = cfg, dist or DistContext()
        self.on_round, self.on_eval = on_round, on_eval
        d = self.dist
        if cfg.workers % d.world_size:
            raise ValueError(f"workers K={cfg.workers} cannot be split evenly over "
                             f"{d.world_size} processes")
        self.resume_state = None
        if cfg.resume:
            self.resume_state = load_checkpoint(cfg.resume, cfg)  # config check before any work
        check_data_available(cfg)
        from experiments.sampling import WorkerSampler, worker_range
        self.device = d.device
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
        self.lr = build_lr_schedule(cfg, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
        self.sync = build_sync_schedule(cfg, steps_per_epoch=self.steps_per_epoch)

        model = build_network(cfg, self.device, self.dtype)
        options = dict(sgd=SGDOptions(cfg.momentum, cfg.nesterov, cfg.wd, cfg.wd_norm_bias),
                       autocast_dtype=autocast, channels_last=cfg.channels_last)
        self.generators = [torch.Generator().manual_seed(_seed(cfg.seed, 1, k)) for k in self.my_workers]
        self.backend = cfg.backend
        if self.backend == "auto":
            gens = [torch.Generator().manual_seed(0) for _ in range(self.K_loc)]
            x, y = self._batches(self.sampler.epoch(0, workers=self.my_workers)[0], gens)
            self.backend = choose_backend(model, self.K_loc, x, y, **options)
        self.workers = Workers(model, self.K_loc, backend=self.backend, **options)
        self.eval_model = copy.deepcopy(model).eval()
        self.averager = WorkerAverager(AveragingPolicy(cfg.average_buffers, cfg.average_momentum),
                                       group=d if d.distributed else None)
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoints" / LAST
        self.log = MetricsLog(self.out / "metrics.jsonl")
        # progress counters (checkpointed)
        self.round, self.step, self.evaluations = 0, 0, 0
        self.accum = torch.zeros(3, dtype=torch.float64)   # train loss sum, correct, count
        self.last_checkpoint: Path | None = None
        self._broadcast_initial()
        if self.resume_state is not None:
            self._restore(self.resume_state)

    # ------------------------------------------------------------------ data
    def _batches(self, idx: torch.Tensor, generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-worker batches for indices (K_loc, B): each worker draws its augmentation and
        label noise from its own generator, so the data do not depend on the process layout."""
        from experiments.datasets import flip_labels
        xs, ys = [], []
        for k in range(idx.shape[0]):
            x, y = self.train_set.batch(idx[k], augment=self.cfg.aug, generator=generators[k])
            if self.cfg.label_noise:
                y = flip_labels(y, self.cfg.label_noise, self.cfg.num_classes, generators[k])
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

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
        return {"round": self.round, "step": self.step, "evaluations": self.evaluations,
                "params": self._gather(w.params), "momentum": self._gather(w.momentum),
                "buffers": self._gather(w.buffers), "counters": self._gather(w.counters),
                "generators": self._gather(gens), "train_accum": accum,
                "backend": self.backend, "world_size": self.dist.world_size}

    def _restore(self, s: dict) -> None:
        w, sl = self.workers, slice(self.my_workers.start, self.my_workers.stop)
        if s["params"].shape != (self.cfg.workers, w.dim):
            raise ValueError(f"checkpoint holds parameters {tuple(s['params'].shape)}, this run "
                             f"needs ({self.cfg.workers}, {w.dim})")
        with torch.no_grad():
            for name in ("params", "momentum", "buffers", "counters"):
                getattr(w, name).copy_(s[name][sl].to(self.device))
        for g, state in zip(self.generators, s["generators"][sl]):
            g.set_state(state.clone())
        self.round, self.step, self.evaluations = s["round"], s["step"], s["evaluations"]
        self.accum = s["train_accum"].clone() if self.dist.is_main else torch.zeros(3, dtype=torch.float64)
        self.last_checkpoint = Path(self.cfg.resume)

    def _write_checkpoint(self) -> None:
        state = self.checkpoint_state()
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, state, self.cfg)
        self.last_checkpoint = self.ckpt_path

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
        idx = torch.arange(d.rank, n, d.world_size)
        sums = torch.zeros(3, dtype=torch.float64)
        for chunk in torch.split(idx, self.cfg.eval_batch):
            x, y = self.test_set.batch(chunk, augment=False)
            with self.workers._autocast():
                logits = model(x)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            sums += torch.tensor([float(F.cross_entropy(logits, y, reduction="sum")),
                                  float((logits.argmax(-1) == y).sum()), len(y)], dtype=torch.float64)
        return sums

    def _evaluate(self, r: int, H: int, spread_sum: float, wall: float) -> EvalRecord:
        model = self._load_eval_model(self.evaluations)
        sums = torch.cat([self._test_sums(model), self.accum])
        self.dist.all_reduce_sum_(sums)
        test_loss, test_correct, test_n, tr_loss, tr_correct, tr_n = sums.tolist()
        self.accum.zero_()
        extra = {}
        if self.evaluations in self.cfg.track_sharpness and self.dist.is_main:
            from experiments.probe import measure_sharpness, sharpness_data
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
                              {**provenance(cfg.to_dict(), world_size=d.world_size), "backend": self.backend})
            if self.resume_state is not None:
                self.log.truncate_after(self.evaluations)
            elif self.log.path.exists():
                self.log.path.unlink()
        records, start = [], time.perf_counter()
        cached_epoch, epoch_idx = -1, None
        pending_eval = pending_ckpt = False
        for r, first, rnd in plan_rounds(self.sync, self.lr, self.total_steps,
                                         start_round=self.round, start_step=self.step):
            losses = []
            for t in range(first, first + rnd.steps):
                epoch, within = divmod(t, self.steps_per_epoch)
                if epoch != cached_epoch:
                    epoch_idx, cached_epoch = self.sampler.epoch(epoch, workers=self.my_workers), epoch
                x, y = self._batches(epoch_idx[within], self.generators)
                loss, correct = w.step(x, y, self.lr(t))
                losses.append(loss)
                self.accum += torch.tensor([float(loss.sum()) * y.shape[1], float(correct.sum()), y.numel()],
                                           dtype=torch.float64)
            end = first + rnd.steps
            crossed = lambda every: every and end // every > first // every
            pending_eval |= bool(crossed(cfg.eval_every)) or end == self.total_steps
            pending_ckpt |= bool(crossed(cfg.checkpoint_every)) or end == self.total_steps
            measure = pending_eval and rnd.is_global
            pre = w.params.detach().clone() if measure else None
            bad = (~torch.isfinite(torch.stack(losses))).sum() + (~torch.isfinite(w.params.detach())).sum()
            bad = self.averager.average_(w.params, w.buffers, w.momentum,
                                         initial_buffers=w.initial_buffers,
                                         extras=bad.reshape(1).to(torch.float64),
                                         across_processes=rnd.is_global)
            if float(bad.sum()) > 0:
                where = self.last_checkpoint or "none (no checkpoint had been written)"
                raise DivergenceError(
                    f"training diverged in round {r} (steps {first}-{end - 1}, lr {self.lr(first):.4g}): "
                    f"non-finite loss or parameters; stopped after this round. Last good checkpoint: {where}")
            self.round, self.step = r + 1, end
            if self.on_round is not None and d.is_main:
                self.on_round(r, end, self.total_steps, self.lr(first), rnd.steps)
            if measure:
                spread = torch.tensor([float((pre - w.params.detach()[0]).pow(2).sum())], dtype=torch.float64)
                d.all_reduce_sum_(spread)
                records.append(self._evaluate(r, rnd.steps, float(spread), time.perf_counter() - start))
                pending_eval = False
            if pending_ckpt and rnd.is_global:
                self._write_checkpoint()
                pending_ckpt = False
        final = self._write_final()
        return RunResult(self.out, records, final, self.backend)

    def _write_final(self) -> Path:
        # the network of the final evaluation (the last round always ends with one)
        model = self._load_eval_model(self.evaluations - 1)
        path = self.out / "final.pt"
        if self.dist.is_main:
            import io
            buf = io.BytesIO()
            torch.save({"format": FINAL_FORMAT, "config": self.cfg.to_dict(),
                        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "step": self.step, "round": self.round}, buf)
            atomic_write_bytes(path, buf.getvalue())
        return path


def train(cfg: TrainConfig, *, dist: DistContext | None = None, on_round: Callable | None = None,
          on_eval: Callable | None = None) -> RunResult:
    """Build a `Trainer` for `cfg` and run it (see the module docstring)."""
    return Trainer(cfg, dist=dist, on_round=on_round, on_eval=on_eval).run()
