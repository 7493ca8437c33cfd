"""Analysis helpers that compare discrete runs with slow-SDE predictions (notebooks 01 and 02).

Time unit: slow time t = eta^2 x steps per worker. What is already elsewhere is reused, not
repeated here: per-eigenvalue drift weights (`sde.label_noise.drift_weights`),
the least-squares extrapolation in eta (`sde.discrete.richardson`), H for beta or QSR
(`sde.discrete.local_steps_for_beta`, `qsr_local_steps`), slope fits over seeds
(`experiments.comparison.path.fit_slope`) and synchronization schedules (`experiments.schedules`).

- `effective_beta(eta, ...)`: the beta = eta H that enters psi for constant H, H = beta / eta
  and QSR H = (alpha / eta)^2 (Gu et al. 2023, 2024).
- `extrapolate_to_zero(etas, values, stderrs)`: Richardson (least-squares) extrapolation to
  eta -> 0 with the standard error of the extrapolated value.
- `trace_weighted_multiplier(eigenvalues, weights, rule)`: the drift multiplier of a rule
  relative to SGD with the same total batch, averaged over a Hessian spectrum.
- `spectrum_beta(eigenvalues)`: the beta with 2 beta lambda = 1 at the trace-weighted median eigenvalue.
- `sphere_cosine_density`, `sphere_cosine_cdf`: the law of cos(angle to the start) of Brownian
  motion on the 2-sphere (the slow SDE of `sde.toys.Sphere` with n = 3), in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sde.discrete import richardson
from sde.label_noise import drift_weights

__all__ = ["effective_beta", "Extrapolation", "extrapolate_to_zero", "trace_weighted_multiplier", "spectrum_beta",
           "sphere_cosine_density", "sphere_cosine_cdf"]


def effective_beta(eta: float, *, local_steps: float | None = None, beta: float | None = None,
                   alpha: float | None = None) -> float:
    """beta = eta H inside psi(2 beta lambda) for one of three synchronization regimes.

    Exactly one of: `local_steps` (constant H: beta = eta H -> 0 as eta -> 0), `beta`
    (H = beta / eta: beta stays fixed), `alpha` (QSR, H = (alpha / eta)^2 unrounded:
    beta = alpha^2 / eta -> inf). For a rounded QSR period pass `local_steps=qsr_local_steps(...)`.
    """
    given = [v for v in (local_steps, beta, alpha) if v is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of local_steps (constant H), beta (H = beta/eta) or alpha (QSR)")
    if not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be positive and finite, got {eta}")
    if not given[0] > 0:
        raise ValueError(f"the regime parameter must be positive, got {given[0]}")
    if local_steps is not None:
        return float(eta * local_steps)
    if beta is not None:
        return float(beta)
    return float(alpha ** 2 / eta)


@dataclass(frozen=True)
class Extrapolation:
    """value: the fitted value at eta = 0 (or where asked); stderr: its standard error propagated from the
    per-eta standard errors (independent runs); coefficients: (degree + 1,) from the constant up;
    residual_chi2: sum of squared weighted residuals of the fit (about len(etas) - degree - 1
    when the model and the standard errors are right)."""
    value: float
    stderr: float
    coefficients: np.ndarray
    residual_chi2: float


def extrapolate_to_zero(etas, values, stderrs, *, degree: int = 1, at: float = 0.0) -> Extrapolation:
    """Weighted least-squares fit value(eta) = r0 + c1 eta + ... + c_degree eta^degree.

    etas, values, stderrs: (n,) with n >= degree + 2 and stderrs > 0 (weights 1 / stderr).
    The fit is `sde.discrete.richardson`; r0 is linear in the values, r0 = a . values, so its
    standard error is sqrt(sum a_k^2 stderr_k^2). at: read the fit there instead of at eta = 0
    (value and stderr; e.g. to hold a fit against an eta it did not see).
    """
    etas, values, stderrs = (np.asarray(a, dtype=float) for a in (etas, values, stderrs))
    if not (etas.shape == values.shape == stderrs.shape and etas.ndim == 1):
        raise ValueError(f"etas, values, stderrs must be 1-D of equal length, got "
                         f"{etas.shape}, {values.shape}, {stderrs.shape}")
    if not bool(np.all(stderrs > 0)):
        raise ValueError("every standard error must be positive (they weight the fit)")
    if not bool(np.all(etas > 0)):
        raise ValueError("learning rates must be positive")
    weights = 1.0 / stderrs
    _, coef = richardson(etas, values, degree=degree, weights=weights)
    design = np.vander(etas, degree + 1, increasing=True) * weights[:, None]
    row = np.vander([float(at)], degree + 1, increasing=True)[0]
    linear_map = row @ np.linalg.pinv(design) * weights          # value(at) = linear_map . values
    stderr = float(np.sqrt(np.sum(linear_map ** 2 * stderrs ** 2)))
    value = float(row @ coef)
    fitted = np.vander(etas, degree + 1, increasing=True) @ coef
    chi2 = float(np.sum(((values - fitted) / stderrs) ** 2))
    return Extrapolation(value=value, stderr=stderr, coefficients=coef, residual_chi2=chi2)


def trace_weighted_multiplier(eigenvalues: Tensor, weights: Tensor, rule) -> float:
    """sum_j q_j lam_j w(lam_j) / sum_j q_j lam_j over a spectrum given as nodes lam_j with masses q_j.

    w is the label-noise drift weight of `rule` (`sde.label_noise.drift_weights`: 1 for SGD,
    1 + (K-1) psi(2 beta lam) for Local SGD, K for QSR). This is the factor by which the rule
    speeds up the decrease of its implicit regularizer relative to SGD with the same total
    batch when every eigenvalue shrinks by the same fraction; it lies in [1, K]. eigenvalues
    and weights: same shape (e.g. the (probes, m) nodes and weights of
    `dynamics.spectral_density`); negative eigenvalues (off Gamma) are clipped to 0.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q = torch.as_tensor(weights, dtype=torch.float64)
    if lam.shape != q.shape:
        raise ValueError(f"eigenvalues and weights must have the same shape, got {tuple(lam.shape)}, {tuple(q.shape)}")
    if bool((q < 0).any()):
        raise ValueError("spectral masses (weights) must be non-negative")
    lam = lam.clamp(min=0.0)
    mass = (q * lam).sum()
    if not float(mass) > 0:
        raise ValueError("the spectrum has no positive eigenvalue mass")
    return float((q * lam * drift_weights(rule, lam)).sum() / mass)


def spectrum_beta(eigenvalues, *, quantile: float = 0.5) -> float:
    """beta = 1 / (2 lambda*), lambda* the trace-weighted `quantile` of a Hessian spectrum (eigenvalues (n,) >= 0,
    zeros ignored): the smallest eigenvalue such that the eigenvalues <= it hold at least `quantile` of tr H.
    Then 2 beta lambda <= 1 (psi near its linear part, Local SGD ~ SGD) on that share of the trace and > 1 (psi
    toward 1, up to K x SGD) on the rest, so a Local SGD run at this beta tests both sides of 2 beta lambda = 1
    (issue 13: beta from the point's own spectrum)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    lam = lam[lam > 0].sort().values
    if lam.numel() == 0:
        raise ValueError("the spectrum has no positive eigenvalue")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    share = lam.cumsum(0) / lam.sum()
    index = int(torch.searchsorted(share, torch.tensor(quantile, dtype=torch.float64)))
    return float(1.0 / (2.0 * lam[min(index, lam.numel() - 1)]))


def _legendre_table(x: Tensor, degree: int) -> Tensor:
    """P_0..P_degree at x, shape (degree + 1, *x.shape), by Bonnet's recurrence."""
    rows = [torch.ones_like(x), x.clone()]
    for n in range(1, degree):
        rows.append(((2 * n + 1) * x * rows[n] - n * rows[n - 1]) / (n + 1))
    return torch.stack(rows[: degree + 1])


def _heat_terms(rate_t: float, max_degree: int | None) -> int:
    """Number of Legendre degrees so that exp(-l(l+1) rate_t / 2) < 1e-17 beyond them."""
    if not (rate_t > 0 and math.isfinite(rate_t)):
        raise ValueError(f"decay_rate x t must be positive and finite, got {rate_t}")
    needed = math.ceil(math.sqrt(2 * 40.0 / rate_t)) + 2
    if max_degree is not None:
        needed = min(needed, max_degree)
    if needed > 5000:
        raise ValueError(f"decay_rate x t = {rate_t:.2e} is too small for the Legendre series")
    return max(needed, 2)


def sphere_cosine_density(x, decay_rate_times_t: float, *, max_degree: int | None = None) -> Tensor:
    """Density of X = cos(angle between zeta(t) and zeta(0)) for Brownian motion on the 2-sphere.

    The slow SDE of `sde.toys.Sphere` (n = 3) has generator D Laplace-Beltrami (unit sphere
    scale) with E[X(t)] = exp(-2 D t) = exp(-kappa t), kappa = `Sphere.decay_rate(rule)`.
    Expanding the heat kernel in zonal harmonics:
        p(x) = sum_l (2l + 1)/2 P_l(x) exp(-l (l + 1) kappa t / 2),  x in [-1, 1].
    x: tensor or array of points; decay_rate_times_t: kappa t (> 0).
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    if bool((xt.abs() > 1).any()):
        raise ValueError("x = cos(angle) must lie in [-1, 1]")
    L = _heat_terms(decay_rate_times_t, max_degree)
    ls = torch.arange(L + 1, dtype=torch.float64)
    coef = (2 * ls + 1) / 2 * torch.exp(-ls * (ls + 1) * decay_rate_times_t / 2)
    table = _legendre_table(xt, L)
    return torch.tensordot(coef, table, dims=1)


def sphere_cosine_cdf(x, decay_rate_times_t: float, *, max_degree: int | None = None) -> Tensor:
    """P(X <= x) for the X of `sphere_cosine_density`, using int_{-1}^x P_l = (P_{l+1} - P_{l-1}) / (2l + 1):
        F(x) = (x + 1)/2 + sum_{l>=1} (P_{l+1}(x) - P_{l-1}(x))/2 exp(-l (l + 1) kappa t / 2)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    if bool((xt.abs() > 1).any()):
        raise ValueError("x = cos(angle) must lie in [-1, 1]")
    L = _heat_terms(decay_rate_times_t, max_degree)
    table = _legendre_table(xt, L + 1)
    ls = torch.arange(1, L + 1, dtype=torch.float64)
    decay = torch.exp(-ls * (ls + 1) * decay_rate_times_t / 2)
    diff = table[2: L + 2] - table[0: L]                       # P_{l+1} - P_{l-1}, l = 1..L
    return (xt + 1) / 2 + torch.tensordot(decay / 2, diff, dims=1)
