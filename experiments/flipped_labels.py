"""Cross-entropy with flipped labels on real CIFAR-10: the manifold point and continuation runs.

The noise model and predictions are `sde.flipped_labels`; this module builds a point of the
soft-target minimizer manifold Gamma = {softmax(f_i) = q_i} and measures the sharpness drift of
flipped-label SGD / Local SGD / QSR from it (issue 6, the cross-entropy half):

- `project_to_flip_manifold`: optional gradient descent on the expected loss, then Gauss-Newton
  minimum-norm steps on the metric-weighted reduced residual R_i Q^T (f_i - log q_i) (Q (C, C-1)
  orthonormal, orthogonal to 1: the centred residual in C - 1 coordinates) until
  ||centred(f - log q)|| <= tol, float64; the Gram systems reuse `experiments.manifold`'s solver
  and preconditioner.
- `phi_reading`: the Gauss-Newton projection is not Phi at second order (twice Phi's term along
  Hessian eigenvectors); the reading is corrected to s(Phi(theta)) + O(|x|^3) (`experiments.phi_reading`).
- `prepare_flip_point`: balanced real CIFAR-10 subset, small GELU MLP, Adam on the soft-target
  cross-entropy, then the projection.
- `run_flip_continuation`: seeds x workers stacked and vmapped; each step draws B_loc samples
  with replacement per worker and flips every drawn label with probability p to a uniform other
  class (fresh each draw); checkpoints at the end of rounds read tr H and lambda_max of the
  EXPECTED loss at Phi of each seed's iterate (`phi_reading`, `flip_sharpness_on_manifold`).
- `compare_flip_rule`: closed-form prediction (Sigma = H on Gamma) beside the measured slopes;
  `flip_drift_path`: the predicted path (no diffusion on Gamma: an ODE), fitted like the measurement;
  `general_formula_predictions`: the general formula with a Monte Carlo Sigma (three routes).

Slow time t = eta^2 x steps per worker; H = `rule.local_steps(eta)` (Local SGD round(beta / eta),
QSR floor((alpha / eta)^2), `sde.rules`).
Run as `OMP_NUM_THREADS=1 python -m experiments.flipped_labels --out rows.jsonl` (1 torch thread).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.func import grad, vmap

from dynamics.objective import Objective
from experiments.continuation import (RegimeWarning, RoundSchedule, check_regime, fit_slope,  # noqa: F401
                                      progress_line, run_schedule)           # (RegimeWarning re-exported)
from experiments.drift_path import NodeRates, PredictedPath, integrate_drift_path
from experiments.data import resolve_cifar10_dir
from experiments.manifold import GramPreconditioner, build_small_mlp, cifar_subset, gram_solve
from experiments.phi_reading import PhiCorrection, read_at_phi  # noqa: F401 (PhiCorrection re-exported)
from sde.flipped_labels import (centred_basis, check_flip_probability, closed_form_drift, closed_form_rates,
                                flip_geometry, flip_labels, flip_sharpness_gradients, metric_roots,
                                soft_cross_entropy, soft_target_objective)
from sde.label_noise import output_jacobian
from sde.rules import QSR, SGD, LocalSGD, check_rule


def _targets(obj: Objective) -> Tensor:
    q = torch.cat([yb for _, yb in obj.data])
    if q.dim() != 2 or not q.is_floating_point():
        raise ValueError("obj must be a soft-target objective (sde.flipped_labels.soft_target_objective)")
    return q


def _outputs(obj: Objective, theta: Tensor) -> Tensor:
    return torch.cat([obj.forward(theta, xb) for xb, _ in obj.data])


def weighted_residual(obj: Objective, theta: Tensor, outputs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(rt (N (C-1),), r (N, C-1)): rt_i = R_i Q^T (f_i - log q_i) with R_i the metric root of
    `sde.flipped_labels.FlipGeometry` (constant: it depends on q only), and the unweighted r_i = Q^T (f_i - log q_i)
    (||r|| = ||centred(f - log q)||)."""
    q = _targets(obj)
    out = _outputs(obj, theta) if outputs is None else outputs
    Q = centred_basis(q.shape[1], out.dtype, out.device)
    r = (out - q.log()) @ Q
    return torch.einsum("nab,nb->na", metric_roots(q.to(out.dtype), Q), r).reshape(-1), r


def weighted_jacobian(obj: Objective, theta: Tensor) -> Tensor:
    """Jt (N (C-1), D), rows R_i Q^T J_i: Hessian(L) = Jt^T Jt / N on Gamma."""
    q = _targets(obj)
    _, jac = output_jacobian(obj, theta)
    Q = centred_basis(q.shape[1], jac.dtype, jac.device)
    return torch.einsum("nab,cb,ncd->nad", metric_roots(q.to(jac.dtype), Q), Q, jac).reshape(-1, obj.dim)


def flip_preconditioner(obj: Objective, theta: Tensor) -> GramPreconditioner:
    """`GramPreconditioner` of Jt Jt^T at a point of Gamma (for repeated projections near it)."""
    jt = weighted_jacobian(obj, theta.detach())
    values, vectors = torch.linalg.eigh(jt @ jt.T)
    return GramPreconditioner(values=values.flip(0).clamp_min(values[-1].abs() * 1e-13 + 1e-300),
                              vectors=vectors.flip(1))


@dataclass(frozen=True)
class FlipProjectionReport:
    """How `project_to_flip_manifold` ended: ||centred(f - log q)|| before/after, steps, distance, success."""
    residual: float
    initial_residual: float
    gd_steps: int
    gauss_newton_steps: int
    jacobians: int
    distance: float
    converged: bool


def project_to_flip_manifold(obj: Objective, theta: Tensor | None = None, *, tol: float = 1e-10,
                             gd_steps: int = 0, gd_lr: float | None = None, max_gauss_newton: int = 30,
                             preconditioner: GramPreconditioner | None = None,
                             raise_on_failure: bool = True) -> tuple[Tensor, FlipProjectionReport]:
    """Project theta onto Gamma = {softmax(f_i) = q_i} (a stand-in for Phi, the gradient-flow limit).

    `gd_steps` of gradient descent (step gd_lr) on the expected loss, then Gauss-Newton
    minimum-norm steps delta = -Jt^T (Jt Jt^T)^-1 rt on the METRIC-WEIGHTED residual rt
    (`weighted_residual`) until ||centred(f - log q)|| <= tol. The weighting makes the step's
    second-order term equal Phi's, -P d3L[Lyap^-1(x x^T)] for x along a Hessian eigenvector,
    as plain Gauss-Newton does for squared loss (with the unweighted residual the two differ,
    which biases sharpness read after long runs). The Jacobian is computed once and reused
    (chord steps; refreshed when the residual stops falling by 10x): the end point differs
    from full Gauss-Newton by O(|offset|^3). Needs N (C-1) <= D.
    """
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if gd_steps and (gd_lr is None or gd_lr <= 0):
        raise ValueError("gd_steps > 0 needs a positive gd_lr")
    theta0 = (obj.params if theta is None else theta).detach().clone()
    theta = theta0.clone()
    initial = float(weighted_residual(obj, theta)[1].norm())
    for _ in range(gd_steps):
        theta = theta - gd_lr * obj.grad(theta)
    rt, r = weighted_residual(obj, theta)
    res, steps, jt, jacobians = float(r.norm()), 0, None, 0
    while res > tol and steps < max_gauss_newton:
        if jt is None:
            jt, jacobians = weighted_jacobian(obj, theta), jacobians + 1
            if jt.shape[0] > jt.shape[1]:
                raise ValueError(f"N (C-1) = {jt.shape[0]} equations exceed D = {jt.shape[1]} parameters: "
                                 "Gamma is not a manifold here")
        a = gram_solve(jt, rt, preconditioner)
        candidate = theta - jt.T @ a
        rt_new, r_new = weighted_residual(obj, candidate)
        new = float(r_new.norm())
        if new > res:  # damped step when the full one overshoots (far from Gamma)
            candidate = theta - 0.5 * jt.T @ a
            rt_new, r_new = weighted_residual(obj, candidate)
            new = float(r_new.norm())
        if new > 0.1 * res:
            jt = None  # slow contraction: refresh the Jacobian (a plain Gauss-Newton step)
        theta, rt, res, steps = candidate, rt_new, new, steps + 1
    report = FlipProjectionReport(residual=res, initial_residual=initial, gd_steps=gd_steps,
                                  gauss_newton_steps=steps, jacobians=jacobians,
                                  distance=float((theta - theta0).norm()), converged=res <= tol)
    if raise_on_failure and not report.converged:
        raise RuntimeError(f"projection onto Gamma failed: ||r|| = {res:.3e} > tol {tol:.1e} after {steps} "
                           f"Gauss-Newton steps (start {initial:.3e})")
    return theta, report


def flip_sharpness_on_manifold(obj: Objective, theta: Tensor, *, reference: Tensor | None = None) -> tuple[float, float]:
    """(tr H, lambda_max) of the expected loss at a point of Gamma: H = Jt^T Jt / N (exact there).

    lambda_max: dense eigvalsh of Jt Jt^T / N, or, given `reference` (N(C-1), k) top Gram
    eigenvectors at a nearby point, Rayleigh-Ritz on span(V, G V, G^2 V).
    """
    jt = weighted_jacobian(obj, theta)
    N = len(_targets(obj))
    trace = float(jt.pow(2).sum() / N)
    if reference is None:
        return trace, float(torch.linalg.eigvalsh(jt @ jt.T / N)[-1])
    g1 = jt @ (jt.T @ reference)
    g2 = jt @ (jt.T @ g1)
    basis, _ = torch.linalg.qr(torch.cat([reference, g1, g2], dim=1))
    return trace, float(torch.linalg.eigvalsh(basis.T @ (jt @ (jt.T @ basis)) / N)[-1])


# ---------------------------------------------------------------------- the point
@dataclass(frozen=True)
class FlipSetup:
    """n real images (n/10 per class) at image_size, GELU MLP (hidden widths), flip probability p."""
    n: int = 100
    image_size: int = 8
    hidden: tuple[int, ...] = (32, 32)
    p: float = 0.1
    model_seed: int = 0
    adam_steps: int = 4000
    adam_lr: float = 3e-3


def train_to_soft_targets(obj: Objective, *, steps: int = 4000, lr: float = 3e-3, gap: float = 1e-7) -> Tensor:
    """Full-batch Adam on the soft-target objective from its model's parameters until the loss is within
    `gap` of its minimum (the targets' mean entropy) or `steps`; the flat parameters reached. Deterministic."""
    q = _targets(obj)
    entropy = float(-(q * q.log()).sum(1).mean())
    theta = obj.params.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        loss, g = obj.loss_and_grad(theta.detach())
        if loss.item() - entropy <= gap:
            break
        theta.grad = g
        opt.step()
    return theta.detach()


def prepare_flip_point(root: str | Path, setup: FlipSetup = FlipSetup(), *, cache: str | Path | None = None
                       ) -> tuple[Objective, Tensor, Tensor, FlipProjectionReport | None]:
    """(soft-target objective, labels (N,), zeta on Gamma with ||r|| <= 1e-10, report or None if cached)."""
    x, y = cifar_subset(root, setup.n, image_size=setup.image_size)
    model = build_small_mlp(image_size=setup.image_size, hidden=tuple(setup.hidden),
                            generator=torch.Generator().manual_seed(setup.model_seed))
    obj = soft_target_objective(model, x, y, setup.p)
    key = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(setup).items()}
    if cache is not None and Path(cache).exists():
        saved = torch.load(cache)
        if saved.get("setup") == key:
            return obj, y, saved["zeta"], None
    theta = train_to_soft_targets(obj, steps=setup.adam_steps, lr=setup.adam_lr)
    zeta, report = project_to_flip_manifold(obj, theta, tol=1e-10)
    if cache is not None:
        tmp = Path(str(cache) + ".tmp")
        torch.save({"setup": key, "zeta": zeta}, tmp)
        os.replace(tmp, cache)
    return obj, y, zeta, report


# ---------------------------------------------------------------------- continuation
@dataclass(frozen=True)
class FlipContinuationConfig(RoundSchedule):
    """`rule` run for `rounds` rounds at step `eta` with flip probability `p`.

    For SGD a round is `steps_per_round_sgd` steps; `checkpoint_every` rounds between projections;
    H = `rule.local_steps(eta)` (QSR needs rule.alpha). Guards as `experiments.continuation`;
    p < (C-1)/C for C = `classes`, the targets' class count (None: p < 0.9 here, checked against the
    targets' C when run).
    """
    rule: object
    eta: float
    p: float
    rounds: int
    checkpoint_every: int = 1
    seeds: int = 4
    steps_per_round_sgd: int = 100
    gd_steps: int = 10
    max_eta_lambda: float = 0.5
    max_relative_change: float = 0.2
    classes: int | None = None

    def __post_init__(self):
        check_rule(self.rule)
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if self.classes is None and not 0 < self.p < 0.9:
            raise ValueError(f"p must be in (0, 0.9) (C = 10), got {self.p}")
        if self.classes is not None:
            if not self.p > 0:
                raise ValueError(f"p must be positive, got {self.p}")
            check_flip_probability(self.p, self.classes)
        self._check_rounds()


@dataclass(frozen=True)
class FlipContinuationResult:
    """Readings along a run: times (n,) slow time; trace, lambda_max (n, seeds) at Phi(theta)
    (second-order corrected, `phi_reading`) or at the Gauss-Newton projection if the run was made
    without the correction; raw_trace, raw_lambda_max (n, seeds) at the Gauss-Newton projection;
    projection_residual (n, seeds) ||centred(f - log q)||; projection_distance |Pi(theta) - zeta|."""
    config: object
    times: Tensor
    trace: Tensor
    lambda_max: Tensor
    raw_trace: Tensor
    raw_lambda_max: Tensor
    projection_residual: Tensor
    projection_distance: Tensor

    @property
    def projection_loss(self) -> Tensor:  # the name `experiments.continuation.check_regime` reads
        return self.projection_residual


def phi_reading(obj: Objective, theta: Tensor, correction: PhiCorrection, *, preconditioner=None,
                reference: Tensor | None = None) -> tuple[tuple[float, float], tuple[float, float], Tensor, float]:
    """(tr H, lambda_max) at Phi(theta) to second order in the normal offset, the same at the
    Gauss-Newton projection z = Pi(theta), z, and the final residual (`experiments.phi_reading`
    with the soft-target projection and sharpness)."""
    def project(t: Tensor) -> tuple[Tensor, float]:
        z, report = project_to_flip_manifold(obj, t, preconditioner=preconditioner)
        return z, report.residual

    reading = read_at_phi(theta, correction, project, lambda z: flip_sharpness_on_manifold(obj, z, reference=reference))
    return reading.corrected, reading.raw, reading.projection, reading.residual


def run_flip_continuation(obj: Objective, labels: Tensor, zeta: Tensor, config: FlipContinuationConfig, *,
                          generator: torch.Generator, correction: PhiCorrection | None = None,
                          geometry=None, preconditioner=None,
                          progress: Callable[[str], None] | None = None) -> FlipContinuationResult:
    """Run `config` from zeta (on Gamma) with flipped labels; read tr H, lambda_max at checkpoints.

    With `correction` (a `PhiCorrection` at zeta) the readings are at Phi(theta) to second order
    (`phi_reading`; config.gd_steps is then ignored); without, at the Gauss-Newton projection
    after config.gd_steps gradient-descent steps. ValueError if zeta is off Gamma or
    eta lambda_max > config.max_eta_lambda; RegimeWarning as `experiments.continuation`.
    `geometry` and `preconditioner` (`flip_geometry`, `flip_preconditioner` at zeta): built once per
    point and passed to every rule, eta and seed (built here when None). `progress(line)`: called at
    every checkpoint (quiet when None).
    """
    cfg = config
    zeta = zeta.detach()
    r0 = float(weighted_residual(obj, zeta)[1].norm())
    if r0 > 1e-8:
        raise ValueError(f"zeta is not on Gamma (||r|| = {r0:.2e} > 1e-8): project it first")
    geometry = geometry or flip_geometry(obj, zeta, max_residual=1e-8)
    pre = preconditioner if preconditioner is not None else flip_preconditioner(obj, zeta)
    reference = geometry.gram_vectors[:, :16]
    trace0, lmax0 = geometry.trace, geometry.lambda_max
    if cfg.eta * lmax0 > cfg.max_eta_lambda:
        raise ValueError(f"eta x lambda_max = {cfg.eta * lmax0:.3f} exceeds {cfg.max_eta_lambda}")
    C = _targets(obj).shape[1]
    if cfg.classes not in (None, C):
        raise ValueError(f"the config is for C = {cfg.classes} classes, the targets have C = {C}")
    check_flip_probability(cfg.p, C)
    workers, b_loc, H = cfg.rule.workers, cfg.local_batch, cfg.local_steps
    x_all = torch.cat([xb for xb, _ in obj.data])
    n = len(x_all)
    models = cfg.seeds * workers
    theta = zeta.expand(models, -1).clone()

    def batch_loss(t: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return soft_cross_entropy(obj.forward(t, xb), yb)

    batched_grad = vmap(grad(batch_loss))
    first = [[trace0] * cfg.seeds, [lmax0] * cfg.seeds, [trace0] * cfg.seeds, [lmax0] * cfg.seeds,
             [0.0] * cfg.seeds, [0.0] * cfg.seeds]
    rows = [[row] for row in first]
    for r in range(1, cfg.rounds + 1):
        for _ in range(H):
            idx = torch.randint(0, n, (models, b_loc), generator=generator)
            drawn = flip_labels(labels[idx], cfg.p, C, generator=generator)
            theta = theta - cfg.eta * batched_grad(theta, x_all[idx], drawn)
        if workers > 1:
            theta = theta.view(cfg.seeds, workers, -1).mean(1).repeat_interleave(workers, 0)
        if r % cfg.checkpoint_every:
            continue
        new = [[] for _ in rows]
        lr = 1.0 / max(max(row) for row in rows[1])
        for s in range(cfg.seeds):
            iterate = theta[s * workers]
            if correction is not None:
                (tr, lm), (raw_tr, raw_lm), proj, res = phi_reading(obj, iterate, correction, preconditioner=pre,
                                                                    reference=reference)
            else:
                proj, report = project_to_flip_manifold(obj, iterate, gd_steps=cfg.gd_steps, gd_lr=lr,
                                                        preconditioner=pre)
                tr, lm = raw_tr, raw_lm = flip_sharpness_on_manifold(obj, proj, reference=reference)
                res = report.residual
            for row, value in zip(new, (tr, lm, raw_tr, raw_lm, res, float((proj - zeta).norm()))):
                row.append(value)
        for row, value in zip(rows, new):
            row.append(value)
        if progress is not None:
            progress(progress_line(cfg, r, new[0]))
    t = lambda values: torch.tensor(values, dtype=torch.float64)
    result = FlipContinuationResult(config=cfg, times=cfg.checkpoint_times, trace=t(rows[0]), lambda_max=t(rows[1]),
                                    raw_trace=t(rows[2]), raw_lambda_max=t(rows[3]),
                                    projection_residual=t(rows[4]), projection_distance=t(rows[5]))
    check_regime(result, zeta)
    return result


# ---------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class FlipComparison:
    """One rule at one (eta, p): closed-form predicted and measured slopes (slow time)."""
    rule: str
    eta: float
    p: float
    local_steps: int
    seeds: int
    slow_time: float
    trace: float
    lambda_max: float
    predicted_trace_rate: float            # at the beta = eta H actually run (QSR: finite beta)
    predicted_lambda_max_rate: float
    predicted_trace_rate_limit: float      # eta -> 0 limit (differs only for QSR)
    predicted_lambda_max_rate_limit: float
    measured_trace_rate: float
    measured_trace_rate_std: float
    measured_lambda_max_rate: float
    measured_lambda_max_rate_std: float
    raw_trace_rate: float                  # read at the Gauss-Newton projection (no Phi correction)
    raw_trace_rate_std: float
    trace_per_seed: list
    lambda_max_per_seed: list
    max_projection_residual: float
    seconds: float
    checkpoint_times: list | None = None    # slow times of the readings (n,), t = 0 first
    trace_mean_per_checkpoint: list | None = None
    predicted_trace_rate_path: float = float("nan")       # the fitted slope of the predicted path
    predicted_lambda_max_rate_path: float = float("nan")  # (`flip_drift_path`) over the same checkpoints

    @property
    def trace_ratio(self) -> float:
        return self.measured_trace_rate / self.predicted_trace_rate

    @property
    def trace_ratio_path(self) -> float:
        """Measured slope / the same fit of the predicted path (NaN without `path_dt`)."""
        return self.measured_trace_rate / self.predicted_trace_rate_path


def compare_flip_rule(obj: Objective, labels: Tensor, zeta: Tensor, config: FlipContinuationConfig, *,
                      seed: int = 0, geometry=None, gradients=None,
                      correction: PhiCorrection | None = None, path_dt: float | None = None,
                      preconditioner=None, progress: Callable[[str], None] | None = None) -> FlipComparison:
    """Closed-form prediction (Sigma = H on Gamma; equal to the general formula there) and measurement
    (readings at Phi to second order when `correction` is given).

    The predicted rates are at zeta; the measured slope is a fit over the run, along which the rates
    change (tr H's rate by 10-20% per 0.1 of slow time on the CIFAR-10 point). With `path_dt` the
    predicted path (`flip_drift_path`, Heun step path_dt) is fitted at the same checkpoints in the
    same way: predicted_*_rate_path is the prediction to compare with the measured slope."""
    start = time.perf_counter()
    geometry = geometry or flip_geometry(obj, zeta)
    gradients = gradients or flip_sharpness_gradients(obj, geometry)
    rule = config.rule
    limit = closed_form_rates(obj, geometry, rule, gradients=gradients)
    run_rule = rule.at_eta(config.eta)        # the rule actually run (QSR: Local SGD with beta = eta H)
    pred = limit if run_rule == rule else closed_form_rates(obj, geometry, run_rule, gradients=gradients)
    result = run_flip_continuation(obj, labels, zeta, config, generator=torch.Generator().manual_seed(seed),
                                   correction=correction, geometry=geometry, preconditioner=preconditioner,
                                   progress=progress)
    tr, lm = fit_slope(result.times, result.trace), fit_slope(result.times, result.lambda_max)
    raw = fit_slope(result.times, result.raw_trace)
    path_rates = (float("nan"), float("nan"))
    if path_dt is not None:
        path = flip_drift_path(obj, zeta, run_rule, t1=float(result.times[-1]),
                               dt=path_dt)
        path_rates = (path.fitted_slope(result.times, "trace"), path.fitted_slope(result.times, "lambda_max"))
    return FlipComparison(
        rule=repr(rule), eta=config.eta, p=config.p, local_steps=config.local_steps, seeds=config.seeds,
        slow_time=float(result.times[-1]), trace=geometry.trace, lambda_max=geometry.lambda_max,
        predicted_trace_rate=pred.trace_rate, predicted_lambda_max_rate=pred.lambda_max_rate,
        predicted_trace_rate_limit=limit.trace_rate, predicted_lambda_max_rate_limit=limit.lambda_max_rate,
        measured_trace_rate=tr.mean, measured_trace_rate_std=tr.std, measured_lambda_max_rate=lm.mean,
        measured_lambda_max_rate_std=lm.std, raw_trace_rate=raw.mean, raw_trace_rate_std=raw.std,
        trace_per_seed=tr.per_seed.tolist(),
        lambda_max_per_seed=lm.per_seed.tolist(),
        max_projection_residual=float(result.projection_residual.max()), seconds=time.perf_counter() - start,
        checkpoint_times=result.times.tolist(), trace_mean_per_checkpoint=result.trace.mean(1).tolist(),
        predicted_trace_rate_path=path_rates[0], predicted_lambda_max_rate_path=path_rates[1])


# ---------------------------------------------------------------------- the predicted path
# On Gamma Sigma = H, so the slow SDE has no diffusion and is the ODE d zeta/dt = drift(zeta): the predicted
# path (`experiments.drift_path.PredictedPath`; its max_residual is the worst ||centred(f - log q)|| of the nodes).


def flip_drift_path(obj: Objective, zeta: Tensor, rule, *, t1: float, dt: float = 0.025,
                    eta: float | None = None, preconditioner: GramPreconditioner | None = None) -> PredictedPath:
    """Integrate d zeta/dt = `closed_form_drift` (rule, eta as there) from zeta to slow time t1 by Heun's
    method with steps of at most dt, projecting onto Gamma after each stage (`project_to_flip_manifold`;
    the drift is tangent, so the projection moves the point by O(dt^2)); `experiments.drift_path.
    integrate_drift_path`. Costs about 3 Jacobians and 4 third-order contractions per step."""
    if not t1 > 0 or not dt > 0:
        raise ValueError(f"t1 and dt must be positive, got t1={t1}, dt={dt}")
    pre = preconditioner or flip_preconditioner(obj, zeta)

    def evaluate(z: Tensor) -> NodeRates:
        geo = flip_geometry(obj, z, max_residual=1e-8)
        rates = closed_form_rates(obj, geo, rule, eta=eta)
        return NodeRates(trace=rates.trace, lambda_max=rates.lambda_max, trace_rate=rates.trace_rate,
                         lambda_max_rate=rates.lambda_max_rate, drift=rates.drift, residual=geo.residual)

    def drift(z: Tensor) -> Tensor:
        return closed_form_drift(obj, flip_geometry(obj, z, max_residual=1e-8), rule, eta=eta)

    def project(z: Tensor) -> Tensor:
        return project_to_flip_manifold(obj, z, preconditioner=pre)[0]

    return integrate_drift_path(zeta.detach(), evaluate, project, t1=t1, dt=dt, drift=drift, rule=rule)


@dataclass(frozen=True)
class GeneralPrediction:
    """One rule: predicted d tr H/dt and d lambda_max/dt (slow time) by three routes.

    closed_*: Sigma = H on Gamma (`closed_form_rates`); general_*: the general formula with the
    Monte Carlo Sigma through `sde.MatrixFreeProblem(noise_obj=...)`; mc_*: the same Sigma_hat
    contracted with the exact kernel (`rate_kernel`), with standard error over draws, and
    exact_*: that kernel on the exactly enumerated Sigma. Shared noise diagnostics in `noise`.
    """
    rule: str
    closed_trace: float
    closed_lambda_max: float
    general_trace: float
    general_lambda_max: float
    mc_trace: float
    mc_trace_stderr: float
    mc_lambda_max: float
    mc_lambda_max_stderr: float
    exact_trace: float
    exact_lambda_max: float
    ito_norm: float
    diffusion_sq: float
    seconds: float


def general_formula_predictions(obj: Objective, labels: Tensor, zeta: Tensor, p: float, rules, *,
                                num_draws: int = 20000, seed: int = 0, geometry=None, gradients=None,
                                noise_samples: int = 4, max_matvecs: int = 4000,
                                matrix_free_rules=None) -> tuple[list[GeneralPrediction], dict]:
    """The general formula with Sigma estimated from `num_draws` sampled flipped-label gradients.

    Returns (one `GeneralPrediction` per rule, noise diagnostics): relative Frobenius errors of
    U^T Sigma_hat U against the exact U^T Sigma U and of U^T Sigma U against diag(lambda) (the
    claim Sigma = H on Gamma), tr(P Sigma_hat P) / tr Sigma_hat, ||P Sigma_hat U||_F / ||U^T Sigma_hat U||_F.
    U: the exact Hessian eigenvectors (all N (C-1) of them) from `flip_geometry`.
    `matrix_free_rules`: the rules (default all) also run through `MatrixFreeProblem` (each call
    repeats its Lanczos and noise pass: minutes at N (C-1) = 900); the others get NaN general_*.
    """
    from dynamics.noise import noise_probe
    from sde.flipped_labels import (exact_noise_in_basis, general_rates, hessian_derivative_in_basis,
                                    monte_carlo_rate, noise_projections, rate_kernel, sampled_noise_objective)
    from sde.matrix_free import MatrixFreeProblem
    geometry = geometry or flip_geometry(obj, zeta)
    gradients = gradients or flip_sharpness_gradients(obj, geometry)
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([xb for xb, _ in obj.data])
    noise_obj = sampled_noise_objective(obj.model, x, labels, p, num_draws, generator=gen)
    r = len(geometry.eigenvalues)
    U = geometry.hessian_eigenvectors(r)
    lam = geometry.eigenvalues
    proj = noise_projections(noise_obj, zeta, U)
    exact = exact_noise_in_basis(obj, zeta, U)
    probe = noise_probe(noise_obj, U, theta=zeta, chunk_size=256)
    cov_hat = probe.cov_in_basis
    noise = {
        "num_draws": num_draws, "rank": r,
        "rel_error_sigma_hat": float((cov_hat - exact).norm() / exact.norm()),
        "rel_error_exact_sigma_vs_hessian": float((exact - torch.diag(lam)).norm() / lam.norm()),
        "tangent_fraction_sigma_hat": probe.trace_tangent / probe.trace_sigma,
        "trace_sigma_hat": probe.trace_sigma, "trace_hessian": float(lam.sum()),
    }
    dH_tr = hessian_derivative_in_basis(obj, zeta, gradients.trace, U)
    dH_lm = hessian_derivative_in_basis(obj, zeta, gradients.lambda_max, U)
    problem = MatrixFreeProblem(obj, rank=r, noise_obj=noise_obj, noise_samples=noise_samples,
                                max_matvecs=max_matvecs, chunk_size=256, generator=torch.Generator().manual_seed(seed))
    rows = []
    for rule in rules:
        start = time.perf_counter()
        closed = closed_form_rates(obj, geometry, rule, gradients=gradients)
        if matrix_free_rules is None or rule in matrix_free_rules:
            general = general_rates(problem, zeta, rule, gradients)
        else:
            general = None
        nan = float("nan")
        k_tr, k_lm = rate_kernel(rule, lam, dH_tr), rate_kernel(rule, lam, dH_lm)
        mc_tr, mc_lm = monte_carlo_rate(k_tr, proj, exact), monte_carlo_rate(k_lm, proj, exact)
        rows.append(GeneralPrediction(
            rule=repr(rule), closed_trace=closed.trace_rate, closed_lambda_max=closed.lambda_max_rate,
            general_trace=general.trace_rate if general else nan,
            general_lambda_max=general.lambda_max_rate if general else nan,
            mc_trace=mc_tr.estimate, mc_trace_stderr=mc_tr.stderr, mc_lambda_max=mc_lm.estimate,
            mc_lambda_max_stderr=mc_lm.stderr, exact_trace=mc_tr.exact, exact_lambda_max=mc_lm.exact,
            ito_norm=general.ito_norm if general else nan, diffusion_sq=general.diffusion_sq if general else nan,
            seconds=time.perf_counter() - start))
    return rows, noise


DEFAULT_SLOW_TIMES = {"sgd": 0.2, "local": 0.1, "qsr": 0.06}


def flip_configs(eta: float, p: float, *, seeds: int, checkpoints: int, slow_times: dict | None = None,
                 batch: int = 8, workers: int = 4, beta: float = 0.4,
                 qsr_alpha: float = 0.08) -> dict[str, FlipContinuationConfig]:
    """SGD (B = batch), Local SGD (K = workers, B_loc = batch / K, beta) and QSR (alpha).

    Each rule runs for about slow_times[rule] of slow time (steps = T / eta^2 per worker; default
    `DEFAULT_SLOW_TIMES`, chosen so tr H changes by about 7% in every run) with `checkpoints` readings,
    scheduled by `experiments.continuation.run_schedule` (as `experiments.compare`).
    """
    if batch % workers:
        raise ValueError(f"batch {batch} must be divisible by workers {workers}")
    T = {**DEFAULT_SLOW_TIMES, **(slow_times or {})}
    b_loc = batch // workers
    rules = {"sgd": SGD(batch), "local": LocalSGD(workers, b_loc, beta), "qsr": QSR(workers, b_loc, alpha=qsr_alpha)}
    return {name: FlipContinuationConfig(rule, eta, p, **run_schedule(rule, eta, slow_time=T[name],
                                                                      checkpoints=checkpoints, seeds=seeds))
            for name, rule in rules.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search)")
    parser.add_argument("--cache", default=None, help="file to keep zeta in between runs")
    parser.add_argument("--out", required=True, help="JSON lines file to append rows to")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--eta", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--rules", nargs="+", default=["sgd", "local", "qsr"])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="generator seed of the runs (0, 1, ...: disjoint seed sets)")
    parser.add_argument("--slow-time", type=float, nargs=3, default=None, metavar=("SGD", "LOCAL", "QSR"),
                        help="slow time of each rule's run (default 0.2 0.1 0.06)")
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--qsr-alpha", type=float, default=0.08)
    parser.add_argument("--path-dt", type=float, default=None,
                        help="also fit the predicted path (`flip_drift_path`, Heun step in slow time, e.g. 0.025)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = resolve_cifar10_dir(args.data, search=True)
    obj, labels, zeta, _ = prepare_flip_point(root, FlipSetup(n=args.n, p=args.p), cache=args.cache)
    geometry = flip_geometry(obj, zeta)
    gradients = flip_sharpness_gradients(obj, geometry)
    correction = PhiCorrection.at(obj, geometry, gradients)    # readings at Phi (rows also keep the raw reading)
    pre = flip_preconditioner(obj, zeta)                     # once per point, shared by every rule and eta
    say = lambda line: print(line, flush=True)               # noqa: E731
    say(f"point: N={args.n}, D={obj.dim}, tr H={geometry.trace:.4f}, lambda_max={geometry.lambda_max:.4f}")
    for eta in args.eta:
        slow = None if args.slow_time is None else dict(zip(("sgd", "local", "qsr"), args.slow_time))
        configs = flip_configs(eta, args.p, seeds=args.seeds, checkpoints=args.checkpoints, beta=args.beta,
                               qsr_alpha=args.qsr_alpha, slow_times=slow)
        for name in args.rules:
            row = compare_flip_rule(obj, labels, zeta, configs[name], geometry=geometry, gradients=gradients,
                                    correction=correction, seed=args.seed, path_dt=args.path_dt,
                                    preconditioner=pre, progress=say)
            with open(args.out, "a") as f:
                f.write(json.dumps({**asdict(row), "seed": args.seed, "date": time.strftime("%Y-%m-%d")}) + "\n")
            print(f"{row.rule:45s} eta={eta} p={args.p} pred={row.predicted_trace_rate:.4g} "
                  f"meas={row.measured_trace_rate:.4g}+-{row.measured_trace_rate_std:.2g} "
                  f"ratio={row.trace_ratio:.3f} raw={row.raw_trace_rate / row.predicted_trace_rate:.3f} "
                  f"lmax pred={row.predicted_lambda_max_rate:.4g} meas={row.measured_lambda_max_rate:.4g}"
                  f"+-{row.measured_lambda_max_rate_std:.2g} path pred={row.predicted_trace_rate_path:.4g} "
                  f"ratio_path={row.trace_ratio_path:.3f} ({row.seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
