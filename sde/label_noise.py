"""Predicted sharpness drift under label noise, at a point of Gamma of a squared-loss network.

Setting (THEORY.md, "Label noise: the closed form"): L(theta) = (1/N) sum_i 1/2 ||f_i - y_i||^2
(mean over samples, half the sum over the C outputs), Gaussian label noise of std sigma added to
every target at every draw, so on Gamma (all residuals zero) the one-sample gradient noise is
Sigma = sigma^2 Hessian(L), S_par = 0 (no diffusion) and the slow drift is

    d zeta/dt = -(sigma^2 / (4B)) P d3L[W],  W = sum_i w(lambda_i) v_i v_i^T  (normal eigenpairs)

with w = 1 (SGD, batch B), w = 1 + (K-1) psi(2 beta lambda) (Local SGD, Gu et al. 2023), w = K
(QSR, Gu et al. 2024). Slow time t = eta^2 x steps per worker. A scalar s changes at the rate
d s/dt = grad s . drift; grad tr H = d3L[I], grad lambda_max = d3L[u u^T].

Exact path (this module): on Gamma H = J^T J / N with J the (N C, D) output Jacobian, and
differentiating <Hessian(L), M> at zero residual gives

    P d3L[M] = (2/N) P grad_theta <J(theta), J0 M>_F      (J0 = J at zeta, held fixed)

because the residual term's gradient lies in the row space of J, which P removes. With the
Gram matrix G = J0 J0^T / N = U diag(lambda) U^T (its eigenvalues are the nonzero Hessian
eigenvalues), J0 w(H) = w(G) J0 and P = I - J0^T (N G)^+ J0. Cost: one Jacobian, one
eigendecomposition of size N C, and one reverse pass through N C Jacobian-vector products per
matrix M; practical for a few hundred images. The matrix-free path is `sde.label_noise_mf`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vmap

from dynamics.objective import Objective
from sde.rules import check_rule


def output_jacobian(obj: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs (N, C), Jacobian (N, C, D)) of the network at theta over all samples of obj."""
    def single(t: Tensor, x: Tensor):
        out = obj.forward(t, x.unsqueeze(0))[0]
        return out, out

    outs, jacs = [], []
    for x, _ in obj.data:
        jac, out = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(theta, x)
        outs.append(out)
        jacs.append(jac)
    return torch.cat(outs), torch.cat(jacs)


def output_jacobian_derivative(obj: Objective, theta: Tensor, direction: Tensor) -> Tensor:
    """d/de J(theta + e v) at e = 0, (N, C, D): the Jacobian's derivative along v = `direction` (D,).

    Exact (forward-mode `jvp` over the reverse-mode Jacobian of each sample), one pass over the data
    costing a few Jacobian passes; no finite differences."""
    if direction.shape != theta.shape:
        raise ValueError(f"direction must have shape {tuple(theta.shape)}, got {tuple(direction.shape)}")
    theta, direction = theta.detach(), direction.detach().to(theta.dtype)

    def single(t: Tensor, x: Tensor) -> Tensor:
        return obj.forward(t, x.unsqueeze(0))[0]

    out = []
    for x, _ in obj.data:
        jac = lambda t: vmap(jacrev(single), in_dims=(None, 0))(t, x)    # noqa: E731 (closes over the batch)
        out.append(jvp(jac, (theta,), (direction,))[1])
    return torch.cat(out)


def jacobian_pairing_grad(obj: Objective, theta: Tensor, pairing: Tensor, *, chunk_size: int = 64) -> Tensor:
    """grad_theta sum_{i,c} <grad f_ic(theta), pairing[i, c]>, shape (D,); pairing (N, C, D) is held fixed.

    Evaluated as the reverse pass of N C Jacobian-vector products, `chunk_size` samples at a time.
    """
    theta = theta.detach()
    inputs = torch.cat([x for x, _ in obj.data])
    if pairing.shape[0] != len(inputs) or pairing.shape[-1] != obj.dim:
        raise ValueError(f"pairing must have shape (N={len(inputs)}, C, D={obj.dim}), got {tuple(pairing.shape)}")

    def chunk_value(t: Tensor, xs: Tensor, rs: Tensor) -> Tensor:
        def per_sample(x: Tensor, r: Tensor) -> Tensor:
            f = lambda tt: obj.forward(tt, x.unsqueeze(0))[0]
            tangents = vmap(lambda v: jvp(f, (t,), (v,))[1])(r)       # (C, C): row c = J r_c
            return tangents.diagonal().sum()
        return vmap(per_sample)(xs, rs).sum()

    total = torch.zeros_like(theta)
    for start in range(0, len(inputs), chunk_size):
        total += grad(chunk_value)(theta, inputs[start:start + chunk_size], pairing[start:start + chunk_size])
    return total


@dataclass(frozen=True)
class GaussNewtonGeometry:
    """Exact second-order geometry of Gamma at theta (squared loss, zero residual).

    jacobian: (N, C, D); eigenvalues: (r,) the nonzero Hessian eigenvalues, descending;
    gram_vectors: (N C, r) the matching unit eigenvectors of G = J J^T / N (Hessian eigenvector
    i is J^T U[:, i] / sqrt(N lambda_i)); loss: L(theta), which should be ~0.
    """
    theta: Tensor
    jacobian: Tensor
    eigenvalues: Tensor
    gram_vectors: Tensor
    loss: float

    @property
    def num_samples(self) -> int:
        return self.jacobian.shape[0]

    @property
    def trace(self) -> float:
        """tr Hessian(L) = ||J||_F^2 / N."""
        return float(self.eigenvalues.sum())

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def hessian_eigenvectors(self, k: int) -> Tensor:
        """The top-k unit Hessian eigenvectors, shape (D, k)."""
        flat = self.jacobian.reshape(-1, self.jacobian.shape[-1])
        return flat.T @ self.gram_vectors[:, :k] / (self.num_samples * self.eigenvalues[:k]).sqrt()

    def reduce(self, jac: Tensor) -> Tensor:
        """(N C, D) rows M with Hessian = M^T M / N when M is built from J (N, C, D): here M = J."""
        return jac.reshape(-1, jac.shape[-1])

    def reduced_in_basis(self) -> Tensor:
        """J U (N C, r) for U the unit Hessian eigenvectors: V diag(sqrt(N lambda)) (no product with J)."""
        return self.gram_vectors * (self.num_samples * self.eigenvalues).sqrt()

    def tangent_project(self, v: Tensor) -> Tensor:
        """P v = v - J^T (N G)^+ J v for v of shape (D,)."""
        flat = self.jacobian.reshape(-1, v.shape[0])
        coeff = self.gram_vectors.T @ (flat @ v) / (self.num_samples * self.eigenvalues)
        return v - flat.T @ (self.gram_vectors @ coeff)

    def gram_function_times_jacobian(self, weights: Tensor) -> Tensor:
        """w(G) J as (N, C, D), given w(lambda_i) for every nonzero eigenvalue (zero on the kernel)."""
        flat = self.jacobian.reshape(-1, self.jacobian.shape[-1])
        out = self.gram_vectors @ (weights[:, None] * (self.gram_vectors.T @ flat))
        return out.reshape(self.jacobian.shape)


def gauss_newton_geometry(obj: Objective, theta: Tensor | None = None, *, rank_tol: float = 1e-12,
                          max_loss: float = 1e-8) -> GaussNewtonGeometry:
    """Jacobian and Gram eigendecomposition at theta; ValueError if L(theta) > max_loss (not on Gamma).

    Gram eigenvalues below rank_tol x the largest are treated as zero (kernel of J^T).
    """
    theta = (obj.params if theta is None else theta).detach()
    loss = obj.loss(theta).item()
    if loss > max_loss:
        raise ValueError(f"theta is not on Gamma: L = {loss:.3e} > max_loss = {max_loss:.1e}; "
                         "project it first (experiments.manifold.project_to_manifold)")
    _, jac = output_jacobian(obj, theta)
    flat = jac.reshape(-1, obj.dim)
    n = jac.shape[0]
    values, vectors = torch.linalg.eigh(flat @ flat.T / n)
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > rank_tol * values[0]
    return GaussNewtonGeometry(theta=theta, jacobian=jac, eigenvalues=values[keep],
                               gram_vectors=vectors[:, keep], loss=loss)


def drift_weights(rule, eigenvalues: Tensor, *, eta: float | None = None) -> Tensor:
    """w(lambda_i) weighting each Hessian eigen-direction in the label-noise drift.

    `rule.drift_weight(2 lambda, eta=eta)`: SGD 1; LocalSGD 1 + (K-1) psi(2 beta lambda); QSR K
    (the eta -> 0 limit), or, if `eta` is given, Local SGD's weights at beta = alpha^2 / eta.
    """
    check_rule(rule)
    return rule.drift_weight(2 * eigenvalues, eta=eta)


@dataclass(frozen=True)
class PredictedRates:
    """Predicted d/dt (slow time) of tr H and lambda_max at a point of Gamma, and the drift (D,)."""
    rule: object
    sigma: float
    trace_rate: float
    lambda_max_rate: float
    trace: float
    lambda_max: float
    drift: Tensor


@dataclass(frozen=True)
class SharpnessGradients:
    """Tangent-projected gradients P grad tr H = P d3L[I] and P grad lambda_max = P d3L[u u^T], (D,)."""
    trace: Tensor
    lambda_max: Tensor


def sharpness_gradients(obj: Objective, geometry: GaussNewtonGeometry) -> SharpnessGradients:
    """Exact tangent gradients of tr H and lambda_max on Gamma (module docstring)."""
    n, theta = geometry.num_samples, geometry.theta
    g_trace = 2 / n * geometry.tangent_project(jacobian_pairing_grad(obj, theta, geometry.jacobian))
    top = torch.zeros_like(geometry.eigenvalues)
    top[0] = 1
    g_lmax = 2 / n * geometry.tangent_project(
        jacobian_pairing_grad(obj, theta, geometry.gram_function_times_jacobian(top)))
    return SharpnessGradients(trace=g_trace, lambda_max=g_lmax)


def label_noise_drift(obj: Objective, geometry: GaussNewtonGeometry, rule, *, sigma: float,
                      eta: float | None = None) -> Tensor:
    """Slow drift -(sigma^2 / 4B) P d3L[w(H)] at zeta = geometry.theta, shape (D,)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    check_rule(rule)
    weights = drift_weights(rule, geometry.eigenvalues, eta=eta)
    pairing = geometry.gram_function_times_jacobian(weights)
    d3 = 2 / geometry.num_samples * geometry.tangent_project(jacobian_pairing_grad(obj, geometry.theta, pairing))
    return -(sigma ** 2) / (4 * rule.total_batch) * d3


def predict_label_noise_rates(obj: Objective, geometry: GaussNewtonGeometry, rule, *, sigma: float,
                              eta: float | None = None,
                              gradients: SharpnessGradients | None = None) -> PredictedRates:
    """d tr H/dt and d lambda_max/dt (slow time) under `rule` with label-noise std sigma (exact path)."""
    gradients = gradients or sharpness_gradients(obj, geometry)
    drift = label_noise_drift(obj, geometry, rule, sigma=sigma, eta=eta)
    return PredictedRates(rule=rule, sigma=float(sigma), trace_rate=float(gradients.trace @ drift),
                          lambda_max_rate=float(gradients.lambda_max @ drift), trace=geometry.trace,
                          lambda_max=geometry.lambda_max, drift=drift)
