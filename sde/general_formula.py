"""The general-formula cross-check of the label-noise closed form (flipped labels, cross-entropy).

`sde.label_noise` predicts the drift from Sigma = c Hessian(L) on Gamma. This module checks that
assumption the long way, with THEORY.md's general formula and an ESTIMATED or enumerated Sigma
(slow time t = eta^2 x steps per worker):
- `sampled_noise_objective`: an `Objective` over M draws of SGD's noise process (sample i uniform,
  then one noisy target by the noise model's `draw`); its centred per-sample-gradient covariance is
  the Monte Carlo Sigma, the `noise_obj` of `sde.MatrixFreeProblem`; `general_rates` contracts that
  problem's drift with the tangent gradients of tr H and lambda_max (`GeneralRates`).
- `exact_noise_in_basis` / `dense_flip_problem`: the exact Sigma of one flipped-label draw,
  (1/N) sum_i sum_c q_ic g_ic g_ic^T - g g^T with g_ic = grad CE(f_i, e_c), by enumerating the C
  labels of every sample (in a basis; dense for tiny networks). On Gamma it equals the Hessian.
- the kernel route (cheap, with the Monte Carlo standard error): for normal noise the rate is
  linear in U^T Sigma U, d s/dt = <K, U^T Sigma U> with K from U^T (d_g Hessian) U
  (`hessian_derivative_in_basis`, `rate_kernel`), so the per-draw terms give a standard error
  (`noise_projections`, `monte_carlo_rate`).
The objectives here are expected-loss objectives over (x, targets (N, C)) batches, the soft targets
q_i of flipped labels for the exact routes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import jacrev

from dynamics.jacobian import output_jacobian
from dynamics.objective import Objective
from sde.label_noise import SharpnessGradients
from sde.problem import Problem
from sde.rules import check_rule
from sde.slow_sde import slow_sde

Draw = Callable[[Tensor, torch.Generator], Tensor]     # targets (M, C), generator -> one noisy draw (M, C)

__all__ = ["sampled_noise_objective", "labelled_gradients_in_basis", "exact_noise_in_basis", "GeneralRates",
           "general_rates", "hessian_derivative_in_basis", "rate_kernel", "noise_projections", "MonteCarloRate",
           "monte_carlo_rate", "dense_flip_problem"]


def _stacked(obj: Objective) -> tuple[Tensor, Tensor]:
    return torch.cat([xb for xb, _ in obj.data]), torch.cat([yb for _, yb in obj.data])


def sampled_noise_objective(obj: Objective, num_draws: int, *, draw: Draw, generator: torch.Generator,
                            batch_size: int = 1000) -> Objective:
    """`Objective` (obj's model and loss) over `num_draws` draws of SGD's noise process.

    obj: the expected-loss objective over (x, targets (N, C)); draws: indices i ~ U{0..N-1}, then
    draw(targets[i] (M, C), generator) -> noisy targets (M, C) (a label-noise model's `draw`).
    """
    if not (isinstance(num_draws, int) and num_draws >= 2):
        raise ValueError(f"num_draws must be an int >= 2, got {num_draws!r}")
    x, targets = _stacked(obj)
    idx = torch.randint(0, len(x), (num_draws,), generator=generator)
    drawn = draw(targets[idx.to(targets.device)], generator)
    xs = x[idx.to(x.device)]
    return Objective(obj.model, obj.loss_fn, list(zip(xs.split(batch_size), drawn.split(batch_size))))


def labelled_gradients_in_basis(jacobian: Tensor, outputs: Tensor, basis: Tensor) -> Tensor:
    """(N, C, k): U^T grad CE(f_i, e_c) = (J_i U)^T (softmax(f_i) - e_c) for every sample i and label c."""
    s = torch.softmax(outputs, -1)
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    return torch.einsum("nck,nlc->nlk", jacobian @ basis, s[:, None, :] - eye[None])


def exact_noise_in_basis(obj: Objective, theta: Tensor, basis: Tensor) -> Tensor:
    """Exact U^T Sigma U (k, k) of one flipped-label draw at theta, by enumerating all labels.

    obj: the soft-target objective (targets q (N, C)); basis U (D, k) (U = I gives the dense Sigma).
    """
    _, q = _stacked(obj)
    outputs, jac = output_jacobian(obj, theta)
    g = labelled_gradients_in_basis(jac, outputs, basis)        # (N, C, k)
    w = q / len(q)
    mean = torch.einsum("nc,nck->k", w, g)
    return torch.einsum("nc,nck,ncl->kl", w, g, g) - torch.outer(mean, mean)


@dataclass(frozen=True)
class GeneralRates:
    """Rates by the general formula (slow time) and the size of the terms assumed away.

    trace_rate, lambda_max_rate: grad s . (drift_I + drift_II + ito) with grad s the tangent
    gradient, so the (normal) Ito term enters only through its tangent leak. ito_norm, drift_norm;
    diffusion_sq = ||A||_F^2 = tr S_par / B: the diffusion term 1/2 <Hess s, A A^T> is bounded by
    ||Hess s|| diffusion_sq / 2 and reported, not added. terms: the `sde.SlowSDETerms`.
    """
    rule: object
    trace_rate: float
    lambda_max_rate: float
    ito_norm: float
    drift_norm: float
    diffusion_sq: float
    terms: object


def general_rates(problem, zeta: Tensor, rule, gradients: SharpnessGradients, *,
                  gradient_tol: float = 1e-6) -> GeneralRates:
    """General-formula rates at zeta for a (matrix-free or dense) problem and tangent gradients."""
    terms = slow_sde(problem, zeta, rule, gradient_tol=gradient_tol)
    return GeneralRates(rule=rule, trace_rate=float(gradients.trace @ terms.drift),
                        lambda_max_rate=float(gradients.lambda_max @ terms.drift),
                        ito_norm=float(terms.ito_correction.norm()), drift_norm=float(terms.drift.norm()),
                        diffusion_sq=float(terms.diffusion.pow(2).sum()), terms=terms)


def hessian_derivative_in_basis(obj: Objective, theta: Tensor, direction: Tensor, basis: Tensor, *,
                                rel_step: float = 1e-4) -> Tensor:
    """U^T (d/de Hessian(L)(theta + e v)) U at e = 0, (k, k), by central differences of HVPs.

    v = `direction` (D,), U = `basis` (D, k); step e = rel_step (1 + |theta|) / |v|, about 8 correct
    digits in float64. For a tangent v, v . d3L[M] = <U^T dH U, U^T M U> for M in span(U).
    """
    if direction.shape != theta.shape or basis.dim() != 2 or basis.shape[0] != theta.shape[0]:
        raise ValueError(f"direction must be (D,) and basis (D, k) with D = {theta.shape[0]}, got "
                         f"{tuple(direction.shape)} and {tuple(basis.shape)}")
    eps = rel_step * (1 + float(theta.norm())) / float(direction.norm())
    out = basis.T @ (obj.hvp(basis, theta + eps * direction) - obj.hvp(basis, theta - eps * direction)) / (2 * eps)
    return (out + out.T) / 2


def rate_kernel(rule, eigenvalues: Tensor, dH: Tensor, *, eta: float | None = None) -> Tensor:
    """K (k, k) with d s/dt = <K, U^T Sigma U> when Sigma's mixed block vanishes (normal noise).

    K_ij = -(1/(2B)) dH_ij w(lambda_i + lambda_j) / (lambda_i + lambda_j), w = c_I + c_II psi(beta x)
    (`rule.drift_weight`): drift-I and drift-II of THEORY.md contracted with g, dH = U^T (d_g H) U.
    """
    check_rule(rule)
    sums = eigenvalues[:, None] + eigenvalues[None, :]
    return -dH * rule.drift_weight(sums, eta=eta) / (2 * float(rule.total_batch) * sums)


def noise_projections(noise_obj: Objective, theta: Tensor, basis: Tensor, *, chunk_size: int = 256) -> Tensor:
    """c (M, k): U^T g_d for every draw d of a noise objective (`sampled_noise_objective`)."""
    return torch.cat([G @ basis for G in noise_obj.iter_per_sample_grads(theta, chunk_size=chunk_size)])


@dataclass(frozen=True)
class MonteCarloRate:
    """<K, Sigma_hat> over M draws with its standard error (per-draw terms), and <K, Sigma> exact."""
    estimate: float
    stderr: float
    exact: float
    num_draws: int


def monte_carlo_rate(kernel: Tensor, projections: Tensor, exact_cov: Tensor) -> MonteCarloRate:
    """Rate from the draws' projections c (M, k): (1/M) sum_d (c_d - c_bar)^T K (c_d - c_bar).

    Standard error: the per-draw terms' spread / sqrt(M) (the mean's O(1/M) part neglected);
    exact: <K, exact_cov>, exact_cov = U^T Sigma U (`exact_noise_in_basis`).
    """
    centred = projections - projections.mean(0)
    terms = ((centred @ kernel) * centred).sum(1)
    M = len(terms)
    return MonteCarloRate(estimate=float(terms.mean()), stderr=float(terms.std() / M ** 0.5),
                          exact=float((kernel * exact_cov).sum()), num_draws=M)


def dense_flip_problem(obj: Objective) -> Problem:
    """`sde.Problem` (dense) of a soft-target objective for a tiny network: its loss and the EXACT
    one-draw flipped-label noise covariance (every label of every sample enumerated)."""
    x, q = _stacked(obj)

    def noise_cov(theta: Tensor) -> Tensor:
        out = obj.forward(theta, x)
        jac = jacrev(lambda t: obj.forward(t, x))(theta)                      # (N, C, D)
        g = labelled_gradients_in_basis(jac, out, torch.eye(len(theta), dtype=theta.dtype, device=theta.device))
        w = q / len(q)
        mean = torch.einsum("nl,nld->d", w, g)
        return torch.einsum("nl,nld,nle->de", w, g, g) - torch.outer(mean, mean)

    return Problem(loss=lambda theta: obj.loss_fn(obj.forward(theta, x), q), noise_cov=noise_cov,
                   name="flipped-label cross-entropy (exact Sigma)")

