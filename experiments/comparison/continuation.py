"""Noisy continuation runs from a point of Gamma, read at Phi of the iterates: the one measurement engine.

From zeta on Gamma run SGD / Local SGD / QSR with the point's label noise (fresh noisy targets every draw,
`LabelNoise.draw`; batches with replacement), all seeds at once through `sde.discrete.run_local_sgd` (THE stacked
seeds x workers loop). At checkpoints (ends of rounds, just averaged) each seed's iterate is read at Phi to second
order (`read_at_phi` over `project` and `sharpness_at`), never at the iterate, whose off-manifold offset of order
eta c / B swamps the drift (DESIGN.md, Known traps); phi=False reads the projection after `gd_steps` of gradient
descent. Slow time t = eta^2 x steps per worker; H per round = `rule.local_steps(eta)` (`sde.rules`).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from experiments.comparison.path import fit_slope, predicted_path
from experiments.comparison.phi import read_at_phi
from experiments.comparison.point import Point, check_on_gamma
from experiments.comparison.projection import project, sharpness_at
from experiments.comparison.reading_mf import MatrixFreeReader, ReadingTolerances
from sde.discrete import run_local_sgd
from sde.rules import check_rule

__all__ = ["RegimeWarning", "ContinuationConfig", "ContinuationResult", "run_schedule", "gradient_sampler",
           "run_continuation", "check_regime", "progress_line", "extrapolate_to_zero_eta", "Measurement", "measure"]


class RegimeWarning(UserWarning):
    """A continuation run left the small-learning-rate / small-drift regime the theory covers."""


@dataclass(frozen=True)
class ContinuationConfig:
    """`rule` at step `eta` for `rounds` rounds of H = rule.local_steps(eta) steps per worker (SGD:
    `steps_per_round_sgd`), read every `checkpoint_every` rounds; gd_steps: the gradient-descent prefix of the
    projection when phi=False; vectorize: one vmap over seeds x workers (None: when the local batch is < 4);
    guards eta lambda_max <= max_eta_lambda, relative change of tr H <= max_relative_change; pass_dtype: the dtype
    of a matrix-free reading's Jacobian passes (`reading_mf.MatrixFreeReader`; None: the point's); tolerances: its
    `reading_mf.ReadingTolerances` (flow term, first CG step of a projection, the reflected reading);
    gradient_dtype: the dtype of the runs' stochastic gradients (e.g. torch.float32: 1.65-1.86x faster steps for the
    full-resolution CNN on CPU, BENCHMARKS.md bench_run_steps; None: the point's): the iterates, the averaging and
    the noise draws stay in the point's dtype, so the same draws are made and only each gradient is rounded
    (relative ~1e-7, against label noise of order one)."""
    rule: object
    eta: float
    rounds: int
    checkpoint_every: int = 1
    seeds: int = 4
    steps_per_round_sgd: int = 100
    gd_steps: int = 10
    vectorize: bool | None = None
    max_eta_lambda: float = 0.5
    max_relative_change: float = 0.2
    pass_dtype: torch.dtype | None = None
    tolerances: ReadingTolerances = ReadingTolerances()
    gradient_dtype: torch.dtype | None = None

    def __post_init__(self):
        check_rule(self.rule)
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        for name in ("rounds", "checkpoint_every", "seeds", "steps_per_round_sgd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gradient_dtype is not None and not self.gradient_dtype.is_floating_point:
            raise ValueError(f"gradient_dtype must be a floating dtype, got {self.gradient_dtype}")
        self.rule.local_steps(self.eta)      # QSR without alpha: ValueError now, not mid-run

    @property
    def local_steps(self) -> int:
        return self.rule.local_steps(self.eta) if self.rule.averages else self.steps_per_round_sgd

    @property
    def checkpoint_times(self) -> Tensor:
        """Slow times (n,) float64 of the readings, t = 0 first (rounds past the last multiple are run, not read)."""
        every, n = self.checkpoint_every, self.rounds // self.checkpoint_every
        return torch.tensor([k * every * self.local_steps * self.eta ** 2 for k in range(n + 1)], dtype=torch.float64)


def run_schedule(rule, eta: float, *, slow_time: float, checkpoints: int, seeds: int) -> dict:
    """`ContinuationConfig` kwargs for about slow_time / eta^2 steps per worker and `checkpoints` readings: a rule
    that averages runs max(checkpoints, steps // H) rounds, read every rounds // checkpoints; SGD `checkpoints`
    rounds of steps // checkpoints steps."""
    steps = max(1, round(slow_time / eta ** 2))
    if not rule.averages:
        return {"rounds": checkpoints, "steps_per_round_sgd": max(1, steps // checkpoints), "seeds": seeds}
    rounds = max(checkpoints, steps // rule.local_steps(eta))
    return {"rounds": rounds, "checkpoint_every": max(1, rounds // checkpoints), "seeds": seeds}


@dataclass(frozen=True)
class ContinuationResult:
    """times (n,) slow time; trace, lambda_max (n, seeds) at Phi (phi=False: at the projection); raw_* at the
    Gauss-Newton projection; projection_residual its distance to Gamma; projection_distance |Pi(theta) - zeta|;
    reading_cost: a matrix-free point's `MatrixFreeReader.cost` (per reading) and build seconds, else None."""
    config: ContinuationConfig
    times: Tensor
    trace: Tensor
    lambda_max: Tensor
    raw_trace: Tensor
    raw_lambda_max: Tensor
    projection_residual: Tensor
    projection_distance: Tensor
    reading_cost: dict | None = None


def gradient_sampler(obj, noise, targets: Tensor, config: ContinuationConfig) -> Callable:
    """The runs' stochastic gradients: sampler(theta (seeds, workers, D), b, generator) -> (seeds, workers, D), each
    model's gradient of noise.loss on b images drawn with replacement from obj's data with fresh noisy targets
    (drawn from `targets` (N, C) in their dtype), one vmap over all models or a loop (`config.vectorize`), in
    `config.gradient_dtype` (`sde.discrete.run_local_sgd`'s sampler)."""
    runs = obj if config.gradient_dtype is None else obj.to(config.gradient_dtype)
    x = torch.cat([xb for xb, _ in runs.data])
    loss = lambda t, xb, yb: noise.loss(runs.forward(t, xb), yb)                 # noqa: E731
    vectorize = config.vectorize if config.vectorize is not None else config.rule.local_batch < 4
    batched, single = vmap(grad(loss)), grad(loss)

    def sampler(theta: Tensor, b: int, gen: torch.Generator) -> Tensor:
        flat = theta.reshape(-1, theta.shape[-1]).to(runs.dtype)
        idx = torch.randint(0, len(x), (len(flat), b), generator=gen)
        xb, yb = x[idx], noise.draw(targets[idx], gen).to(runs.dtype)
        g = batched(flat, xb, yb) if vectorize else torch.stack([single(flat[m], xb[m], yb[m])
                                                                 for m in range(len(flat))])
        return g.to(theta.dtype).reshape(theta.shape)
    return sampler


def run_continuation(point: Point, config: ContinuationConfig, *, generator: torch.Generator, phi: bool = True,
                     progress: Callable[[str], None] | None = None) -> ContinuationResult:
    """Run `config` from point.zeta, reading tr H and lambda_max at every checkpoint (module docstring); a point
    built with method "cg" is read matrix-free (`reading_mf.MatrixFreeReader`, projections by CG).
    ValueError before any step if the point is not on Gamma, its dense preconditioner is another point's,
    or eta lambda_max > config.max_eta_lambda; RegimeWarning after the run; RuntimeError if a projection fails.
    progress(line) at every checkpoint (quiet when None)."""
    cfg, obj, noise, zeta = config, point.objective, point.noise, point.zeta
    check_on_gamma(obj, noise, zeta)
    targets = point.targets
    method = "dense" if point.geometry is not None else "cg"      # a matrix-free point: `reading_mf` (issue 13)
    if method == "dense" and point.reference.shape[0] != noise.equations(*targets.shape):
        raise ValueError(f"the preconditioner has {point.reference.shape[0]} rows, the point has "
                         f"{noise.equations(*targets.shape)} equations: build it at this zeta")
    if method == "dense" and cfg.tolerances != ReadingTolerances():
        raise ValueError(f"{cfg.tolerances} set matrix-free readings; this point is dense (build it with "
                         "method='cg' to read it matrix-free)")
    reader = MatrixFreeReader(point, pass_dtype=cfg.pass_dtype, tolerances=cfg.tolerances) \
        if method == "cg" else None
    read = reader.sharpness if reader else lambda z: sharpness_at(obj, noise, z, reference=point.reference)
    trace0, lmax0 = read(zeta)
    if cfg.eta * lmax0 > cfg.max_eta_lambda:
        raise ValueError(f"eta x lambda_max = {cfg.eta * lmax0:.3f} exceeds {cfg.max_eta_lambda}: "
                         "outside the small-learning-rate regime of the slow SDE")
    sampler = gradient_sampler(obj, noise, targets, cfg)
    def projection(theta: Tensor, **gd) -> tuple[Tensor, float]:
        z, report = project(obj, noise, theta, preconditioner=point.preconditioner, method=method, **gd)
        return z, report.distance
    largest, round_ = [lmax0], [0]

    def observe(avg: Tensor) -> Tensor:                                        # (seeds, D) -> (seeds, 6)
        if round_[0] == 0:
            round_[0] = cfg.checkpoint_every
            return torch.tensor([[trace0, lmax0, trace0, lmax0, 0.0, 0.0]] * cfg.seeds, dtype=torch.float64)
        rows = []
        for s, iterate in enumerate(avg):
            if phi:
                reading = (reader.reading(iterate, seed=s) if reader
                           else read_at_phi(iterate, point.correction, projection, read))
                (tr, lm), raw, proj, res = reading.corrected, reading.raw, reading.projection, reading.residual
            else:
                proj, res = projection(iterate, gd_steps=cfg.gd_steps, gd_lr=1.0 / max(largest))
                tr, lm = raw = read(proj)
            rows.append([tr, lm, *raw, res, float((proj - zeta).norm())])
        largest.extend(row[1] for row in rows)
        if progress is not None:
            progress(progress_line(cfg, round_[0], [row[0] for row in rows]))
        round_[0] += cfg.checkpoint_every
        return torch.tensor(rows, dtype=torch.float64)

    run = run_local_sgd(sampler, zeta, eta=cfg.eta, workers=cfg.rule.workers, local_batch=cfg.rule.local_batch,
                        local_steps=cfg.local_steps, n_rounds=cfg.rounds, n_seeds=cfg.seeds, generator=generator,
                        observe=observe, observe_every=cfg.checkpoint_every)
    v = run.values.unbind(-1)
    result = ContinuationResult(config=cfg, times=cfg.checkpoint_times, trace=v[0], lambda_max=v[1], raw_trace=v[2],
                                raw_lambda_max=v[3], projection_residual=v[4], projection_distance=v[5],
                                reading_cost=None if reader is None else dict(reader.cost,
                                                                              build_seconds=reader.build_seconds))
    check_regime(result, zeta)
    return result


def progress_line(cfg: ContinuationConfig, r: int, traces: list[float]) -> str:
    """One checkpoint of a run: rule, eta, round r of cfg.rounds, slow time and the mean tr H reading."""
    t = r * cfg.local_steps * cfg.eta ** 2
    return (f"    {cfg.rule!r} eta={cfg.eta:g}: round {r}/{cfg.rounds} (t = {t:.4g}), "
            f"tr H = {sum(traces) / len(traces):.6g} (mean of {len(traces)} seeds)")


def check_regime(result: ContinuationResult, zeta: Tensor) -> None:
    """RegimeWarning if tr H changed by more than max_relative_change or a projection moved > 10% of |zeta|."""
    cfg = result.config
    rel = ((result.trace - result.trace[0]).abs() / result.trace[0]).max().item()
    if rel > cfg.max_relative_change:
        warnings.warn(f"tr H changed by {rel:.1%} (> {cfg.max_relative_change:.0%}): beyond the "
                      "linear-in-time regime where one rate describes the run", RegimeWarning, stacklevel=3)
    if result.projection_distance.max().item() > 0.1 * zeta.norm().item():
        warnings.warn("the projected iterate moved more than 10% of |zeta|: far from the starting point",
                      RegimeWarning, stacklevel=3)


def extrapolate_to_zero_eta(etas, values) -> float:
    """Intercept at eta = 0 of the least-squares line through (eta, value) (Richardson with two points)."""
    eta = torch.as_tensor(etas, dtype=torch.float64)
    val = torch.as_tensor(values, dtype=torch.float64)
    if eta.numel() < 2 or eta.shape != val.shape:
        raise ValueError("need at least two (eta, value) pairs of equal length")
    ec = eta - eta.mean()
    slope = (ec * (val - val.mean())).sum() / (ec ** 2).sum()
    return float(val.mean() - slope * eta.mean())


@dataclass(frozen=True)
class Measurement:
    """One run fitted (`fit_slope`, slow time): slopes of tr H and lambda_max at Phi (mean, std over seeds, per seed)
    and of tr H at the Gauss-Newton projection (raw); checkpoint times and mean tr H per checkpoint; the predicted
    path of rule.at_eta(eta) fitted at the same times (NaN without path_dt); worst projection distance; seconds."""
    rule: str
    eta: float
    local_steps: int
    seeds: int
    slow_time: float
    trace_rate: float
    trace_rate_std: float
    trace_rate_per_seed: tuple
    lambda_max_rate: float
    lambda_max_rate_std: float
    lambda_max_rate_per_seed: tuple
    raw_trace_rate: float
    raw_trace_rate_std: float
    checkpoint_times: tuple
    trace_mean_per_checkpoint: tuple
    path_trace_rate: float
    path_lambda_max_rate: float
    max_projection_residual: float
    seconds: float


def measure(point: Point, config: ContinuationConfig, *, seed: int = 0, path_dt: float | None = None,
            progress: Callable[[str], None] | None = None) -> Measurement:
    """`run_continuation` (generator seeded by `seed`) fitted; with `path_dt` the predicted path too (Heun step)."""
    start = time.perf_counter()
    result = run_continuation(point, config, generator=torch.Generator().manual_seed(seed), progress=progress)
    fits = [fit_slope(result.times, v) for v in (result.trace, result.lambda_max, result.raw_trace)]
    path = (math.nan, math.nan)
    if path_dt is not None:
        p = predicted_path(point, config.rule.at_eta(config.eta), t1=float(result.times[-1]), dt=path_dt)
        path = (p.fitted_slope(result.times), p.fitted_slope(result.times, "lambda_max"))
    return Measurement(repr(config.rule), config.eta, config.local_steps, config.seeds, float(result.times[-1]),
                       fits[0].mean, fits[0].std, tuple(fits[0].per_seed.tolist()), fits[1].mean, fits[1].std,
                       tuple(fits[1].per_seed.tolist()), fits[2].mean, fits[2].std, tuple(result.times.tolist()),
                       tuple(result.trace.mean(1).tolist()), *path, float(result.projection_residual.max()),
                       time.perf_counter() - start)
