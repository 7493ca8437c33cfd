"""Sharpness along a training run: a series of saved networks, probed one by one.

The trainer keeps one full-state checkpoint (`checkpoints/last.pt`, overwritten) and a
`final.pt`; a resume must use the same config (so a run cannot be continued in legs of
growing length). `train_with_snapshots` therefore runs the trainer and, at every evaluation,
saves the network that evaluation used -- the average of the workers with BatchNorm statistics
re-estimated -- as `out/snapshots/eval_NNN.pt` in the `final.pt` format, so each snapshot
loads with `experiments.probe.load_model` and `python -m experiments.probe SNAPSHOT`.

`probe_series` measures, at each snapshot, on one fixed set of clean training images
(`experiments.probe.sharpness_data`, eval-mode BatchNorm): the top Hessian eigenvalues by
Lanczos from several random starts, the Hessian trace by Hutch++ with several seeds, optionally
the spectral density (SLQ) and the gradient-noise covariance in the basis of the top
eigenvectors (`dynamics.noise.noise_probe`: tangent/normal split and alignment with the Hessian).

`lanczos_history` and `power_history` record how the top-eigenvalue residual
||H u - theta u|| / |theta| falls with the number of Hessian-vector products, for the
"matvecs to reach a tolerance" comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from experiments.config import TrainConfig

SNAPSHOT_DIR = "snapshots"

__all__ = ["Snapshot", "train_with_snapshots", "list_snapshots", "SeriesPoint", "probe_series",
           "ConvergenceHistory", "lanczos_history", "power_history", "SNAPSHOT_DIR"]


@dataclass(frozen=True)
class Snapshot:
    """One saved network of a run: its file and when it was taken (steps per worker)."""
    path: Path
    evaluation: int
    step: int
    round: int
    epoch: float


def _save_snapshot(model: nn.Module, cfg: TrainConfig, path: Path, rec) -> None:
    """The network at one evaluation, in the final.pt format with its SHA-256 (atomic)."""
    from experiments.checkpoint import save_final
    save_final(path, model.state_dict(), cfg, step=rec.step, round=rec.round,
               epoch=float(rec.epoch), evaluation=rec.evaluation)


def train_with_snapshots(cfg: TrainConfig, *, dist=None, on_round: Callable | None = None,
                         on_eval: Callable | None = None):
    """Run `cfg` like `experiments.trainer.train`, saving a snapshot at every evaluation.

    Returns (RunResult, list[Snapshot] of the whole run, including snapshots written before a
    resume). A fresh (non-resumed) run first deletes stale `eval_*.pt` in the folder.
    """
    from experiments.trainer import Trainer
    trainer = Trainer(cfg, dist=dist, on_round=on_round)
    folder = Path(cfg.out) / SNAPSHOT_DIR
    is_main = trainer.dist.is_main
    if is_main and not cfg.resume and folder.is_dir():
        for stale in folder.glob("eval_*.pt"):
            stale.unlink()

    def save(rec):
        if is_main:
            _save_snapshot(trainer.eval_model, cfg, folder / f"eval_{rec.evaluation:03d}.pt", rec)
        if on_eval is not None:
            on_eval(rec)

    trainer.on_eval = save
    result = trainer.run()
    return result, (list_snapshots(cfg.out) if is_main else [])


def list_snapshots(run_dir) -> list[Snapshot]:
    """The snapshots of a run folder (or of its snapshots/ folder), in training order."""
    root = Path(run_dir)
    folder = root if root.name == SNAPSHOT_DIR else root / SNAPSHOT_DIR
    files = sorted(folder.glob("eval_*.pt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no snapshots (eval_*.pt) in {folder}: train the run with "
                                "experiments.sharpness.train_with_snapshots")
    out = []
    for f in files:
        s = torch.load(f, map_location="cpu", weights_only=False)
        out.append(Snapshot(f, int(s["evaluation"]), int(s["step"]), int(s["round"]), float(s["epoch"])))
    return sorted(out, key=lambda s: s.step)


# ---------------------------------------------------------------------------- probing a series
@dataclass(frozen=True)
class SeriesPoint:
    """Measurements at one snapshot (S seeds, k eigenpairs).

    eigenvalues (S, k): top-k Lanczos values from S random starts; eig_matvecs (S,) ints;
    eig_converged (S,) bools. trace (S,), trace_stderr (S,): Hutch++ per seed. loss: training
    loss on the probe data. density: `SpectralDensity` or None. noise: `NoiseProbe` in the basis
    of the first start's top-k eigenvectors (eigenvalues given, so `.alignment` is set) or None.
    """
    snapshot: Snapshot
    loss: float
    eigenvalues: Tensor
    eig_matvecs: Tensor
    eig_converged: Tensor
    trace: Tensor
    trace_stderr: Tensor
    density: object | None
    noise: object | None


def probe_series(snapshots: Sequence[Snapshot], data: list, *, top_k: int = 4, tol: float = 1e-3,
                 max_matvecs: int = 200, trace_matvecs: int = 30, seeds: Sequence[int] = (0, 1, 2),
                 density_probes: int = 0, density_steps: int = 20, noise: bool = True,
                 noise_chunk: int = 64, progress: Callable | None = None) -> list[SeriesPoint]:
    """Probe every snapshot on the fixed batches `data` (list of (x, y)); see SeriesPoint.

    Cost per snapshot: about len(seeds) x (Lanczos matvecs + trace_matvecs) + density_probes x
    density_steps Hessian-vector products, plus one per-sample-gradient pass for the noise probe.
    Seed s draws the Lanczos start from generator seed s, the trace probes from seed 1000 + s
    and the SLQ probes from seed 2000 + snapshot.evaluation. `progress(i, point)` after each.
    """
    from dynamics import Objective, hessian_trace, spectral_density, top_eigenpairs
    from dynamics.noise import noise_probe
    from experiments.probe import load_model
    if not snapshots:
        raise ValueError("no snapshots to probe")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if not data:
        raise ValueError("data must hold at least one (x, y) batch")
    points = []
    for i, snap in enumerate(snapshots):
        model, _ = load_model(str(snap.path))
        obj = Objective(model, nn.CrossEntropyLoss(), data, bn="eval")
        eigs = [top_eigenpairs(obj, k=top_k, tol=tol, max_matvecs=max_matvecs,
                               generator=torch.Generator().manual_seed(s)) for s in seeds]
        traces = [hessian_trace(obj, num_matvecs=trace_matvecs,
                                generator=torch.Generator().manual_seed(1000 + s)) for s in seeds]
        density = None
        if density_probes:
            density = spectral_density(obj, num_probes=density_probes, lanczos_steps=density_steps,
                                       generator=torch.Generator().manual_seed(2000 + snap.evaluation))
        probe = None
        if noise:
            values, vectors = eigs[0]
            probe = noise_probe(obj, vectors.detach(), eigenvalues=values.detach(),
                                chunk_size=noise_chunk, with_mixed=True)
        point = SeriesPoint(
            snapshot=snap, loss=float(obj.loss()),
            eigenvalues=torch.stack([e.values.detach().to(torch.float64) for e in eigs]),
            eig_matvecs=torch.tensor([e.matvecs for e in eigs]),
            eig_converged=torch.tensor([e.converged for e in eigs]),
            trace=torch.tensor([t.value for t in traces], dtype=torch.float64),
            trace_stderr=torch.tensor([t.stderr for t in traces], dtype=torch.float64),
            density=density, noise=probe)
        points.append(point)
        if progress is not None:
            progress(i, point)
    return points


# ---------------------------------------------------------------------------- solver histories
@dataclass(frozen=True)
class ConvergenceHistory:
    """Top-eigenvalue estimate and relative residual ||H u - theta u|| / |theta| after each
    recorded number of Hessian-vector products (matvecs (n,) ints, values and residuals (n,)
    float64)."""
    method: str
    matvecs: Tensor
    values: Tensor
    residuals: Tensor

    def matvecs_to(self, tol: float) -> int | None:
        """Fewest matvecs after which the relative residual was <= tol (None: never reached)."""
        hit = torch.nonzero(self.residuals <= tol)
        return int(self.matvecs[hit[0, 0]]) if len(hit) else None


def lanczos_history(obj, *, tol: float, max_matvecs: int,
                    generator: torch.Generator | None = None) -> ConvergenceHistory:
    """Lanczos (`dynamics.top_eigenpairs`, k = 1) run until the top Ritz pair's relative
    residual is <= tol or the budget is spent, recording it after every matvec."""
    from dynamics import top_eigenpairs
    rows = []

    def record(matvecs, values, residuals):
        theta = float(values[0])
        rows.append((matvecs, theta, float(residuals[0]) / max(abs(theta), 1e-300)))

    top_eigenpairs(obj, k=1, tol=tol, max_matvecs=max_matvecs, generator=generator, callback=record)
    return _history("lanczos", rows)


class _Recorder:
    """Wraps an operator; for every hvp(v) records the Rayleigh quotient of v and the relative
    residual ||Hv - theta v|| / (|theta| ||v||) -- power iteration's own stopping quantity."""

    def __init__(self, obj):
        self.obj, self.dim, self.dtype, self.device = obj, obj.dim, obj.dtype, obj.device
        self.rows = []

    def hvp(self, v: Tensor) -> Tensor:
        w = self.obj.hvp(v)
        vv = torch.dot(v, v)
        theta = float(torch.dot(v, w) / vv)
        resid = float(torch.linalg.vector_norm(w - theta * v) / torch.sqrt(vv))
        self.rows.append((len(self.rows) + 1, theta, resid / max(abs(theta), 1e-300)))
        return w


def power_history(obj, *, tol: float, max_matvecs: int,
                  generator: torch.Generator | None = None) -> ConvergenceHistory:
    """Power iteration (`dynamics.power_iteration`) with the same stopping rule, recording the
    relative residual after every matvec. Same generator seed -> same start vector as Lanczos."""
    from dynamics import power_iteration
    recorder = _Recorder(obj)
    power_iteration(recorder, tol=tol, max_matvecs=max_matvecs, generator=generator)
    return _history("power", recorder.rows)


def _history(method: str, rows: list) -> ConvergenceHistory:
    if not rows:
        raise ValueError(f"{method}: no matvec was recorded")
    m, v, r = zip(*rows)
    return ConvergenceHistory(method, torch.tensor(m), torch.tensor(v, dtype=torch.float64),
                              torch.tensor(r, dtype=torch.float64))
