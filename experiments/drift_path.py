"""The predicted sharpness path: the slow drift integrated along Gamma, fitted like a measurement (issue #6).

Predicted rates d tr H/dt and d lambda_max/dt are rates at zeta (slow time t = 0); a measured slope is
a least-squares fit (free intercept, checkpoints after t = 0; `experiments.continuation.fit_slope`)
over a window of slow time t = eta^2 x steps per worker. When the rates change within the window the
two are not comparable. Under label noise the slow SDE on Gamma has no diffusion (the one-sample
noise covariance lies in the normal space, so S_par = P Sigma P = 0; THEORY.md "Label noise", checked
in tests/sde/test_slow_sde.py), i.e. it is the ODE

    d zeta/dt = drift(zeta),  zeta(0) = zeta,  zeta(t) on Gamma,

and its solution is THE prediction for the eta -> 0 limit of the run over the whole window, not
only its mean to first order. `PredictedPath` holds tr H, lambda_max and their rates at the nodes
of that path; `PredictedPath.fitted_slope` reads it at a run's checkpoint times and applies the
measurement's fit, which is the number to compare with the measured slope.

Generic part: `integrate_drift_path(zeta, evaluate, project, ...)` (Heun's method in slow time,
each stage projected back onto Gamma; loss-agnostic, the caller supplies the rates at a point of
Gamma and the projection). Squared-loss instance: `label_noise_drift_path` (Gaussian label noise of
std sigma on one-hot targets; rates and drift from `sde.label_noise`, exact Jacobian path;
projection `experiments.manifold.project_to_manifold`). The cross-entropy instance is
`experiments.flipped_labels.flip_drift_path`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dynamics.objective import Objective
from experiments.continuation import fit_slope
from experiments.manifold import GramPreconditioner, project_to_manifold
from sde.label_noise import gauss_newton_geometry, label_noise_drift, predict_label_noise_rates
from sde.rules import check_rule

KEYS = ("trace", "lambda_max")


@dataclass(frozen=True)
class NodeRates:
    """What the integrator needs at a point of Gamma: tr H, lambda_max, their rates d/dt (slow time),
    the drift (D,) and how far the point is from Gamma (the instance's measure: squared loss L,
    or a residual norm for cross-entropy)."""
    trace: float
    lambda_max: float
    trace_rate: float
    lambda_max_rate: float
    drift: Tensor
    residual: float


@dataclass(frozen=True)
class PredictedPath:
    """The predicted path from zeta. times (n,) slow time from 0 (float64, increasing); trace,
    lambda_max, trace_rate, lambda_max_rate (n,) at the nodes; max_residual the worst off-manifold
    measure of the nodes; end (D,) the last node (None if not kept)."""
    rule: object
    times: Tensor
    trace: Tensor
    lambda_max: Tensor
    trace_rate: Tensor
    lambda_max_rate: Tensor
    max_residual: float
    end: Tensor | None = None

    def __post_init__(self):
        n = self.times.numel()
        if n < 2:
            raise ValueError(f"a path needs at least 2 nodes, got {n}")
        for name in KEYS + ("trace_rate", "lambda_max_rate"):
            if getattr(self, name).shape != self.times.shape:
                raise ValueError(f"{name} must have shape {tuple(self.times.shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if not bool((self.times[1:] > self.times[:-1]).all()):
            raise ValueError("times must be strictly increasing")

    def at(self, times, key: str = "trace") -> Tensor:
        """`key` ("trace" or "lambda_max") at `times` (m,) in [0, times[-1]], by cubic Hermite
        interpolation of the node values and rates (error O(dt^4) for a smooth path)."""
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
        """The slope `experiments.continuation.fit_slope` would report for the path read at `times`."""
        t = torch.as_tensor(times, dtype=torch.float64)
        return fit_slope(t, self.at(t, key)[:, None], skip=skip).mean


def integrate_drift_path(zeta: Tensor, evaluate: Callable[[Tensor], NodeRates],
                         project: Callable[[Tensor], Tensor], *, t1: float, dt: float,
                         drift: Callable[[Tensor], Tensor] | None = None, rule=None) -> PredictedPath:
    """Integrate d zeta/dt = drift(zeta) on Gamma from zeta (on Gamma) to slow time t1 by Heun's method.

    steps = ceil(t1 / dt) equal steps h <= dt. Each step: predictor z1 = project(z + h d(z)), corrector
    z' = project(z + h/2 (d(z) + d(z1))); the drift is tangent, so each projection moves the point by
    O(h^2) and the scheme stays second order. evaluate(z) -> `NodeRates` at a node; drift(z) -> (D,)
    at the predictor (default evaluate(z).drift; pass a cheaper callable when the rates cost more
    than the drift); project(z) -> the point of Gamma near z. Global error O(dt^2).
    """
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


# ---------------------------------------------------------------------- squared loss, Gaussian label noise
def label_noise_drift_path(obj: Objective, zeta: Tensor, rule, *, sigma: float, t1: float, dt: float = 0.016,
                           eta: float | None = None, tol: float = 1e-12,
                           preconditioner: GramPreconditioner | None = None) -> PredictedPath:
    """The predicted path of `rule` under Gaussian label noise of std sigma on a squared-loss objective.

    Drift and rates at each node: `sde.label_noise` (exact Jacobian path, Sigma = sigma^2 H on Gamma;
    `eta` as in `drift_weights`: QSR's finite-eta weights). Projection: Gauss-Newton
    (`experiments.manifold.project_to_manifold`, loss <= tol, Gram systems preconditioned at zeta).
    Time in slow units t = eta^2 x steps. Cost per step: 2 Jacobians + eigendecompositions of the
    (N C) Gram matrix, 4 third-order passes (`jacobian_pairing_grad`) and 2 projections.
    """
    check_rule(rule)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if obj.loss(zeta.detach()).item() > 1e-8:
        raise ValueError("zeta is not on Gamma (L > 1e-8): project it first (project_to_manifold)")
    pre = preconditioner or GramPreconditioner.at(obj, zeta.detach())

    def evaluate(z: Tensor) -> NodeRates:
        geo = gauss_newton_geometry(obj, z)
        rates = predict_label_noise_rates(obj, geo, rule, sigma=sigma, eta=eta)
        return NodeRates(trace=rates.trace, lambda_max=rates.lambda_max, trace_rate=rates.trace_rate,
                         lambda_max_rate=rates.lambda_max_rate, drift=rates.drift, residual=geo.loss)

    def drift(z: Tensor) -> Tensor:
        return label_noise_drift(obj, gauss_newton_geometry(obj, z), rule, sigma=sigma, eta=eta)

    def project(z: Tensor) -> Tensor:
        return project_to_manifold(obj, z, tol=tol, preconditioner=pre)[0]

    return integrate_drift_path(zeta, evaluate, project, t1=t1, dt=dt, drift=drift, rule=rule)

