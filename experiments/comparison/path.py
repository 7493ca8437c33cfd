"""The predicted sharpness path: the slow drift integrated along Gamma, fitted like a measurement.

Rates predicted at zeta are not a slope fitted over a window (`fit_slope`) in which they change. Under label
noise Sigma = c H on Gamma is normal, so the slow SDE is the ODE d zeta/dt = drift(zeta) on Gamma (THEORY.md,
"Label noise"), THE eta -> 0 prediction over the whole window; `PredictedPath.fitted_slope` reads it at a run's
checkpoints with the measurement's fit. `integrate_drift_path`: Heun in slow time (t = eta^2 x steps per worker),
each stage projected onto Gamma; `predicted_path(point, rule, ...)`: the one instance, any noise model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from experiments.comparison.point import Point
from experiments.comparison.projection import outputs_and_targets, project
from sde.label_noise import gauss_newton_geometry, label_noise_drift, predict_rates
from sde.rules import check_rule

__all__ = ["SlopeFit", "fit_slope", "NodeRates", "PredictedPath", "integrate_drift_path", "predicted_path"]

KEYS = ("trace", "lambda_max")


@dataclass(frozen=True)
class SlopeFit:
    """Least-squares slopes d/dt over seeds: mean, std over seeds, per-seed values (seeds,)."""
    mean: float
    std: float
    per_seed: Tensor


def fit_slope(times: Tensor, values: Tensor, *, skip: int = 1) -> SlopeFit:
    """Slope of values (n, seeds) against times (n,) with a free intercept (it absorbs the O(eta c / B) bias of
    reading a projection of a noisy iterate), dropping the first `skip` rows (t = 0, the exact start)."""
    t, v = times[skip:].to(torch.float64), values[skip:].to(torch.float64)
    if len(t) < 2:
        raise ValueError(f"need at least 2 checkpoints after skipping {skip}, got {len(t)}")
    tc = t - t.mean()
    slopes = (tc[:, None] * (v - v.mean(0))).sum(0) / (tc ** 2).sum()
    std = slopes.std().item() if slopes.numel() > 1 else math.nan
    return SlopeFit(mean=slopes.mean().item(), std=std, per_seed=slopes)


@dataclass(frozen=True)
class NodeRates:
    """At a point of Gamma: tr H, lambda_max, their rates d/dt, the drift (D,) and the distance to Gamma."""
    trace: float
    lambda_max: float
    trace_rate: float
    lambda_max_rate: float
    drift: Tensor
    residual: float

    @classmethod
    def of(cls, rates, residual: float) -> "NodeRates":
        """From a `PredictedRates` (either route) and the node's distance to Gamma."""
        return cls(trace=rates.trace, lambda_max=rates.lambda_max, trace_rate=rates.trace_rate,
                   lambda_max_rate=rates.lambda_max_rate, drift=rates.drift, residual=residual)


@dataclass(frozen=True)
class PredictedPath:
    """times (n,) slow time from 0 (float64, increasing); trace, lambda_max and their rates (n,) at the nodes;
    max_residual the worst distance to Gamma of the nodes; end (D,) the last node."""
    rule: object
    times: Tensor
    trace: Tensor
    lambda_max: Tensor
    trace_rate: Tensor
    lambda_max_rate: Tensor
    max_residual: float
    end: Tensor | None = None

    def __post_init__(self):
        if self.times.numel() < 2:
            raise ValueError(f"a path needs at least 2 nodes, got {self.times.numel()}")
        for name in KEYS + ("trace_rate", "lambda_max_rate"):
            if getattr(self, name).shape != self.times.shape:
                raise ValueError(f"{name} must have shape {tuple(self.times.shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if not bool((self.times[1:] > self.times[:-1]).all()):
            raise ValueError("times must be strictly increasing")

    def at(self, times, key: str = "trace") -> Tensor:
        """`key` ("trace" or "lambda_max") at `times` (m,) in [0, times[-1]]: cubic Hermite on values and rates."""
        if key not in KEYS:
            raise ValueError(f"key must be 'trace' or 'lambda_max', got {key!r}")
        t = torch.as_tensor(times, dtype=torch.float64)
        nodes, y, m = self.times, getattr(self, key), getattr(self, key + "_rate")
        if t.min() < nodes[0] - 1e-12 or t.max() > nodes[-1] + 1e-9:
            raise ValueError(f"times must lie in [{float(nodes[0]):.4g}, {float(nodes[-1]):.4g}], got "
                             f"[{float(t.min()):.4g}, {float(t.max()):.4g}]")
        k = (torch.searchsorted(nodes, t, right=True) - 1).clamp(0, len(nodes) - 2)
        h = nodes[k + 1] - nodes[k]
        s = (t - nodes[k]) / h
        return ((2 * s ** 3 - 3 * s ** 2 + 1) * y[k] + (s ** 3 - 2 * s ** 2 + s) * h * m[k]
                + (-2 * s ** 3 + 3 * s ** 2) * y[k + 1] + (s ** 3 - s ** 2) * h * m[k + 1])

    def fitted_slope(self, times, key: str = "trace", *, skip: int = 1) -> float:
        """The slope `fit_slope` would report for the path read at `times`."""
        t = torch.as_tensor(times, dtype=torch.float64)
        return fit_slope(t, self.at(t, key)[:, None], skip=skip).mean


def integrate_drift_path(zeta: Tensor, evaluate: Callable[[Tensor], NodeRates],
                         project: Callable[[Tensor], Tensor], *, t1: float, dt: float,
                         drift: Callable[[Tensor], Tensor] | None = None, rule=None) -> PredictedPath:
    """Heun's method for d zeta/dt = drift(zeta) on Gamma to slow time t1, ceil(t1 / dt) steps h: z1 =
    project(z + h d(z)), z' = project(z + h/2 (d(z) + d(z1))); the drift is tangent, so each projection moves the
    point by O(h^2) (global error O(dt^2)). evaluate(z) -> `NodeRates`; drift(z) (D,) at the predictor (default
    evaluate(z).drift); project(z) -> the point of Gamma near z."""
    if not (t1 > 0 and math.isfinite(t1)) or not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"t1 and dt must be positive and finite, got t1={t1}, dt={dt}")
    drift = drift or (lambda z: evaluate(z).drift)
    steps = max(1, math.ceil(t1 / dt - 1e-9))
    h = t1 / steps
    z = zeta.detach()
    rows, worst = [], 0.0
    for k in range(steps + 1):
        node = evaluate(z)
        worst = max(worst, node.residual)
        rows.append((k * h, node.trace, node.lambda_max, node.trace_rate, node.lambda_max_rate))
        if k == steps:
            break
        z1 = project(z + h * node.drift)
        z = project(z + 0.5 * h * (node.drift + drift(z1)))
    cols = torch.tensor(rows, dtype=torch.float64).T.contiguous()
    return PredictedPath(rule=rule, times=cols[0], trace=cols[1], lambda_max=cols[2], trace_rate=cols[3],
                         lambda_max_rate=cols[4], max_residual=worst, end=z)


def predicted_path(point: Point, rule, *, t1: float, dt: float = 0.016, eta: float | None = None,
                   tol: float = 1e-12) -> PredictedPath:
    """The path of `rule` from point.zeta under the point's noise (drift -(c/4B) P d3L[w(H)], `sde.label_noise`;
    `eta` as in `drift_weights`), stages projected by `project` (distance <= tol, preconditioned at zeta).

    At a matrix-free point (no geometry) the projections are CG ones, and a rule whose drift vector is exact
    matrix-free (no psi term: SGD, QSR's eta -> 0 limit) gets its rates and drift from `predict_rates_matrix_free`
    (tangent projector preconditioned by the point's preconditioner): no (N m, D) Jacobian. A rule with a psi term
    (Local SGD, QSR at finite eta) has only a stochastic trace there, no drift vector, so its nodes are evaluated
    on the dense Jacobian (8 N m D bytes per node)."""
    check_rule(rule)
    obj, noise, c = point.objective, point.noise, point.noise.noise_scale
    metric = noise.metric(point.targets)
    method = "dense" if point.geometry is not None else "cg"

    def on_gamma(z: Tensor) -> float:
        distance = noise.distance(*outputs_and_targets(obj, z))
        if not distance <= 1e-8:
            raise ValueError(f"a path node left Gamma ({noise}: distance {distance:.2e} > 1e-8)")
        return distance

    def geometry(z: Tensor):
        return gauss_newton_geometry(obj, z, metric=metric, residual=on_gamma(z))

    def evaluate(z: Tensor) -> NodeRates:
        geo = geometry(z)
        return NodeRates.of(predict_rates(obj, geo, rule, noise_scale=c, eta=eta), geo.residual)

    def to_gamma(z: Tensor) -> Tensor:
        return project(obj, noise, z, tol=tol, method=method, preconditioner=point.preconditioner,
                       **({"cg_rtol": 1e-10, "refresh_after": None} if method == "cg" else {}))[0]

    if method == "cg" and rule.drift_coefficients(eta)[2] is None:
        return integrate_drift_path(point.zeta, _matrix_free_evaluate(point, rule, eta, on_gamma), to_gamma, t1=t1,
                                    dt=dt, rule=rule)
    return integrate_drift_path(point.zeta, evaluate, to_gamma, t1=t1, dt=dt, rule=rule,
                                drift=lambda z: label_noise_drift(obj, geometry(z), rule, noise_scale=c, eta=eta))


def _matrix_free_evaluate(point: Point, rule, eta: float | None, on_gamma: Callable[[Tensor], float]):
    """evaluate(z) -> `NodeRates` at a matrix-free point for a rule without a psi term (`predicted_path`)."""
    from sde.label_noise_mf import TangentProjector, predict_rates_matrix_free
    obj, noise = point.objective, point.noise
    metric = noise.metric(point.targets)

    def evaluate(z: Tensor) -> NodeRates:
        residual = on_gamma(z)
        projector = TangentProjector(obj, z, point.preconditioner, metric=metric, rtol=1e-10)
        (rates,) = predict_rates_matrix_free(obj, z, [rule], noise_scale=noise.noise_scale, metric=metric, eta=eta,
                                             projector=projector, loss_on_gamma=noise.minimum_loss(point.targets),
                                             generator=torch.Generator().manual_seed(0))
        return NodeRates.of(rates, residual)

    return evaluate
