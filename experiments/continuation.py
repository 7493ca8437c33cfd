"""Noisy continuation runs from a point of Gamma, read at their projections onto Gamma.

From zeta on Gamma (see `experiments.manifold`), run SGD / Local SGD / QSR with Gaussian label
noise of std sigma on every target at every draw (squared loss 1/2 ||f - y||^2, batches drawn
with replacement), several seeds at once: all seeds x workers are one stacked parameter tensor
(S K, D) and one `torch.func.vmap`-ed gradient per step. At checkpoints (always at the end of
a communication round, when the workers have just been averaged) each seed's iterate is
projected onto Gamma and tr H = ||J||_F^2 / N and lambda_max (top eigenvalue of J J^T / N) are
read THERE, never at the iterate, whose off-manifold offset of order eta sigma^2 / B swamps the
drift (DESIGN.md, Known traps). Two readings: at Phi to second order (`correction=`, see
`experiments.phi_reading`: the Gauss-Newton projection alone is not Phi at second order and adds
a spurious drift), or the older one, a few gradient-descent steps then Gauss-Newton to
L <= 1e-10 (`project_to_manifold`).

Slow time t = eta^2 x steps per worker. H per round is the rule's own `local_steps(eta)`
(`sde.rules`: Local SGD H = round(beta / eta), QSR H = floor((alpha / eta)^2)).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from dynamics.objective import Objective
from experiments.manifold import GramPreconditioner, half_squared_error, project_to_manifold
from experiments.phi_reading import PhiCorrection, read_at_phi
from sde.label_noise import output_jacobian
from sde.rules import check_rule


class RegimeWarning(UserWarning):
    """A continuation run left the small-learning-rate / small-drift regime the theory covers."""


class RoundSchedule:
    """Rounds of a continuation config (fields rule, eta, rounds, checkpoint_every, seeds,
    steps_per_round_sgd): validation, H per round and the per-worker batch."""

    def _check_rounds(self) -> None:
        for name in ("rounds", "checkpoint_every", "seeds", "steps_per_round_sgd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.rule.local_steps(self.eta)      # QSR without alpha: ValueError now, not mid-run

    @property
    def local_steps(self) -> int:
        """H = `rule.local_steps(eta)`, the steps per worker between averagings; for a rule that
        never averages (SGD) the `steps_per_round_sgd` steps between checkpoints."""
        return self.rule.local_steps(self.eta) if self.rule.averages else self.steps_per_round_sgd

    @property
    def local_batch(self) -> int:
        return self.rule.local_batch

    @property
    def checkpoint_times(self) -> Tensor:
        """Slow times (n,) float64 of the readings, t = 0 first: every `checkpoint_every` rounds of
        H = local_steps steps per worker, t = eta^2 x steps (rounds past the last multiple are run, not read)."""
        every, n = self.checkpoint_every, self.rounds // self.checkpoint_every
        return torch.tensor([k * every * self.local_steps * self.eta ** 2 for k in range(n + 1)], dtype=torch.float64)


def run_schedule(rule, eta: float, *, slow_time: float, checkpoints: int, seeds: int) -> dict:
    """Rounds of one run: about slow_time / eta^2 steps per worker with `checkpoints` readings. A rule
    that averages runs max(checkpoints, steps // H) rounds of H = rule.local_steps(eta) steps, read
    every rounds // checkpoints; SGD runs `checkpoints` rounds of steps // checkpoints steps."""
    steps = max(1, round(slow_time / eta ** 2))
    if not rule.averages:
        return {"rounds": checkpoints, "steps_per_round_sgd": max(1, steps // checkpoints), "seeds": seeds}
    rounds = max(checkpoints, steps // rule.local_steps(eta))
    return {"rounds": rounds, "checkpoint_every": max(1, rounds // checkpoints), "seeds": seeds}


@dataclass(frozen=True)
class ContinuationConfig(RoundSchedule):
    """One continuation experiment: `rule` run for `rounds` rounds at step `eta`, label-noise std `sigma`.

    For SGD a "round" is `steps_per_round_sgd` steps (checkpoint spacing). `checkpoint_every`
    counts rounds between projections; QSR's H = floor((alpha / eta)^2) needs rule.alpha. `vectorize`:
    one vmap over all seeds x workers per step (None: only when the local batch is < 4, where
    it was faster here than a loop over models).
    """
    rule: object
    eta: float
    sigma: float
    rounds: int
    checkpoint_every: int = 1
    seeds: int = 4
    steps_per_round_sgd: int = 100
    gd_steps: int = 10
    vectorize: bool | None = None
    max_eta_lambda: float = 0.5
    max_relative_change: float = 0.2

    def __post_init__(self):
        check_rule(self.rule)
        for name in ("eta", "sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self._check_rounds()


@dataclass(frozen=True)
class ContinuationResult:
    """Projected sharpness along the run: times (n,) slow time; trace, lambda_max (n, seeds) at Phi
    (second-order corrected) or at the Gauss-Newton projection; raw_* always at the latter."""
    config: ContinuationConfig
    times: Tensor
    trace: Tensor
    lambda_max: Tensor
    projection_loss: Tensor
    projection_distance: Tensor
    raw_trace: Tensor
    raw_lambda_max: Tensor


def sharpness_on_manifold(obj: Objective, theta: Tensor, *,
                          reference: GramPreconditioner | None = None, k: int = 16) -> tuple[float, float]:
    """(tr H, lambda_max) at a point of Gamma from the exact Gauss-Newton Hessian J^T J / N.

    tr H = ||J||_F^2 / N. lambda_max: dense eigvalsh of J J^T / N, or, given a `reference` at a
    nearby point, Rayleigh-Ritz on span(U_k, G U_k, G^2 U_k) with U_k its top-k eigenvectors
    (accurate to ~1e-10 relative near the reference; avoids forming J J^T).
    """
    _, jac = output_jacobian(obj, theta)
    flat = jac.reshape(-1, obj.dim)
    n = jac.shape[0]
    trace = float(flat.pow(2).sum() / n)
    if reference is None:
        return trace, float(torch.linalg.eigvalsh(flat @ flat.T / n)[-1])
    block = reference.vectors[:, :k]
    g1 = flat @ (flat.T @ block)
    g2 = flat @ (flat.T @ g1)
    q, _ = torch.linalg.qr(torch.cat([block, g1, g2], dim=1))
    gq = flat @ (flat.T @ q) / n
    return trace, float(torch.linalg.eigvalsh(q.T @ gq)[-1])


def _stacked_data(obj: Objective) -> tuple[Tensor, Tensor]:
    """(x, targets (N, C)): integer labels one-hot over the network's C outputs, float targets as they are."""
    x = torch.cat([xb for xb, _ in obj.data])
    y = torch.cat([yb for _, yb in obj.data])
    if y.is_floating_point():
        return x, y.to(x.dtype)
    classes = obj.forward(obj.params, x[:1]).shape[-1]
    return x, torch.zeros(len(y), classes, dtype=x.dtype).scatter(-1, y[:, None], 1.0)


def run_continuation(obj: Objective, zeta: Tensor, config: ContinuationConfig, *,
                     generator: torch.Generator, correction: PhiCorrection | None = None,
                     preconditioner: GramPreconditioner | None = None,
                     progress: Callable[[str], None] | None = None) -> ContinuationResult:
    """Run `config` from zeta (on Gamma) and record projected tr H, lambda_max at checkpoints.

    With `correction` (a `PhiCorrection` at zeta) every reading is at Phi(iterate) to second order
    (`experiments.phi_reading.read_at_phi`: two Gauss-Newton projections, config.gd_steps
    ignored); without, at the projection after config.gd_steps gradient-descent steps.

    Guards: ValueError if L(zeta) > 1e-8 or eta lambda_max(zeta) > config.max_eta_lambda (before
    any step); RegimeWarning if the relative change of tr H exceeds config.max_relative_change
    or a projection moved farther than 10% of |zeta|. Projection failure raises RuntimeError.

    `preconditioner`: a `GramPreconditioner.at(obj, zeta)` built once per point and shared by every
    rule, eta and seed (built here when None: one Jacobian and one (N C)^2 eigendecomposition).
    `progress(line)`: called at every checkpoint (quiet when None).
    """
    zeta = zeta.detach()
    if obj.loss(zeta).item() > 1e-8:
        raise ValueError("zeta is not on Gamma (L > 1e-8): project it first")
    reference = preconditioner if preconditioner is not None else GramPreconditioner.at(obj, zeta)
    outputs = obj.num_samples * obj.forward(zeta, obj.data[0][0][:1]).shape[-1]      # N C
    if reference.vectors.shape[0] != outputs:
        raise ValueError(f"preconditioner has {reference.vectors.shape[0]} rows, the point has "
                         f"N C = {outputs}: build it at this zeta")
    trace0, lmax0 = sharpness_on_manifold(obj, zeta, reference=reference)
    cfg = config
    if cfg.eta * lmax0 > cfg.max_eta_lambda:
        raise ValueError(f"eta x lambda_max = {cfg.eta * lmax0:.3f} exceeds {cfg.max_eta_lambda}: "
                         "outside the small-learning-rate regime of the slow SDE")
    workers, b_loc, H = cfg.rule.workers, cfg.local_batch, cfg.local_steps
    x_all, y_all = _stacked_data(obj)
    n = len(x_all)
    models = cfg.seeds * workers
    theta = zeta.expand(models, -1).clone()

    def batch_loss(t: Tensor, xb: Tensor, tb: Tensor) -> Tensor:
        return half_squared_error(obj.forward(t, xb), tb)

    batched_grad = vmap(grad(batch_loss))
    single_grad = grad(batch_loss)
    vectorize = cfg.vectorize if cfg.vectorize is not None else b_loc < 4

    def step_gradients(t: Tensor, xb: Tensor, tb: Tensor) -> Tensor:
        if vectorize:
            return batched_grad(t, xb, tb)
        return torch.stack([single_grad(t[m], xb[m], tb[m]) for m in range(len(t))])
    traces, lmaxes, losses, dists = [[trace0] * cfg.seeds], [[lmax0] * cfg.seeds], [[0.0] * cfg.seeds], [[0.0] * cfg.seeds]
    raws = [[(trace0, lmax0)] * cfg.seeds]

    def project(t: Tensor) -> tuple[Tensor, float]:
        proj, report = project_to_manifold(obj, t, preconditioner=reference)
        return proj, report.loss

    def read(z: Tensor) -> tuple[float, float]:
        return sharpness_on_manifold(obj, z, reference=reference)
    for r in range(1, cfg.rounds + 1):
        for _ in range(H):
            idx = torch.randint(0, n, (models, b_loc), generator=generator)
            noise = torch.randn((models, b_loc, y_all.shape[1]), generator=generator, dtype=theta.dtype)
            theta = theta - cfg.eta * step_gradients(theta, x_all[idx], y_all[idx] + cfg.sigma * noise)
        if workers > 1:
            theta = theta.view(cfg.seeds, workers, -1).mean(1).repeat_interleave(workers, 0)
        if r % cfg.checkpoint_every:
            continue
        row_t, row_l, row_raw, row_loss, row_d = [], [], [], [], []
        for s in range(cfg.seeds):
            iterate = theta[s * workers]
            if correction is not None:
                reading = read_at_phi(iterate, correction, project, read)
                (tr, lm), raw, proj, loss = reading.corrected, reading.raw, reading.projection, reading.residual
            else:
                lr = 1.0 / _largest_lambda_seen(lmaxes)
                proj, report = project_to_manifold(obj, iterate, gd_steps=cfg.gd_steps, gd_lr=lr,
                                                   preconditioner=reference)
                tr, lm = raw = read(proj)
                loss = report.loss
            row_t.append(tr), row_l.append(lm), row_raw.append(raw), row_loss.append(loss)
            row_d.append((proj - zeta).norm().item())
        traces.append(row_t), lmaxes.append(row_l), raws.append(row_raw), losses.append(row_loss), dists.append(row_d)
        if progress is not None:
            progress(progress_line(cfg, r, row_t))
    f64 = lambda values: torch.tensor(values, dtype=torch.float64)   # readings differ by ~1e-3 of tr H
    raw = f64(raws)
    result = ContinuationResult(config=cfg, times=cfg.checkpoint_times, trace=f64(traces), lambda_max=f64(lmaxes),
                                projection_loss=f64(losses), projection_distance=f64(dists),
                                raw_trace=raw[..., 0], raw_lambda_max=raw[..., 1])
    check_regime(result, zeta)
    return result


def progress_line(cfg, r: int, traces: list[float]) -> str:
    """One checkpoint of a run: rule, eta, round r of cfg.rounds, slow time and the mean tr H reading."""
    t = r * cfg.local_steps * cfg.eta ** 2
    return (f"    {cfg.rule!r} eta={cfg.eta:g}: round {r}/{cfg.rounds} (t = {t:.4g}), "
            f"tr H = {sum(traces) / len(traces):.6g} (mean of {len(traces)} seeds)")


def _largest_lambda_seen(lmaxes: list) -> float:
    """Largest lambda_max seen so far (sets the gradient-descent step 1 / lambda_max of the projection)."""
    return max(max(row) for row in lmaxes)


def check_regime(result, zeta: Tensor) -> None:
    """RegimeWarning if tr H changed by more than max_relative_change or a projection moved > 10% of |zeta|."""
    cfg = result.config
    rel = ((result.trace - result.trace[0]).abs() / result.trace[0]).max().item()
    if rel > cfg.max_relative_change:
        warnings.warn(f"tr H changed by {rel:.1%} (> {cfg.max_relative_change:.0%}): beyond the "
                      "linear-in-time regime where one rate describes the run", RegimeWarning, stacklevel=3)
    if result.projection_distance.max().item() > 0.1 * zeta.norm().item():
        warnings.warn("the projected iterate moved more than 10% of |zeta|: far from the starting point",
                      RegimeWarning, stacklevel=3)


@dataclass(frozen=True)
class SlopeFit:
    """Least-squares slopes d/dt over seeds: mean, std over seeds, per-seed values (seeds,)."""
    mean: float
    std: float
    per_seed: Tensor


def fit_slope(times: Tensor, values: Tensor, *, skip: int = 1) -> SlopeFit:
    """Slope of values (n, seeds) against times (n,) with a free intercept, dropping the first `skip` rows.

    The free intercept absorbs the constant O(eta sigma^2 / B) bias of reading a projection of
    a noisy iterate; skipping t = 0 (the exact start) avoids mixing it in.
    """
    t, v = times[skip:].to(torch.float64), values[skip:].to(torch.float64)
    if len(t) < 2:
        raise ValueError(f"need at least 2 checkpoints after skipping {skip}, got {len(t)}")
    tc = t - t.mean()
    slopes = (tc[:, None] * (v - v.mean(0))).sum(0) / (tc ** 2).sum()
    std = slopes.std().item() if slopes.numel() > 1 else math.nan
    return SlopeFit(mean=slopes.mean().item(), std=std, per_seed=slopes)
