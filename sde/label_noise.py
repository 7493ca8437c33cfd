"""Predicted sharpness drift under label noise at a point of Gamma, for any output metric (exact route).

Setting (THEORY.md, "Label noise: the closed form"). Both noise models have a minimizer manifold
Gamma = {r_i(theta) = 0} with a reduced, metric-weighted residual r_i = R_i Q^T (f_i - g(target_i))
in R^m (`OutputMetric`), and on Gamma

    Hessian(L) = Jt^T Jt / N,  Jt_i = R_i Q^T J_i,    one-draw noise covariance Sigma = c Hessian(L),

J_i the (C, D) output Jacobian, c = `noise_scale`:
- Gaussian label noise sigma on 1/2 ||f - y||^2: Q = I, R_i = I (m = C), c = sigma^2 (identity metric);
- flipped labels p, cross-entropy against soft targets q_i: Q (C, C-1) an orthonormal basis of
  {w: sum w = 0} (`centred_basis`), R_i = (Q^T A_i Q)^{1/2}, A_i = diag(q_i) - q_i q_i^T
  (`metric_roots`), m = C - 1, c = 1 (Fisher = Hessian on Gamma).
So S_par = 0 (no diffusion) and the slow drift (slow time t = eta^2 x steps per worker) is

    d zeta/dt = -(c / 4B) P d3L[w(H)],   w = 1 (SGD), 1 + (K-1) psi(2 beta lambda) (Local SGD,
    Gu et al. 2023), K (QSR, Gu et al. 2024);

a scalar s changes at d s/dt = grad s . drift, grad tr H = d3L[I], grad lambda_max = d3L[u u^T].
Differentiating <Hessian(L), M> at zero residual gives P d3L[M] = (2/N) P grad_theta <J(theta),
lift(Jt0 M)>_F (Jt0 at zeta held fixed; the derivatives of A_i and of the residual term lie in the
normal space, which P removes). With G = Jt Jt^T / N = U diag(lambda) U^T (its eigenvalues are the
nonzero Hessian eigenvalues), Jt w(H) = w(G) Jt and P = I - Jt^T (N G)^+ Jt. Cost: one Jacobian, one
eigendecomposition of size N m, one reverse pass of N C Jacobian-vector products per matrix M; a few
hundred images. The matrix-free route is `sde.label_noise_mf`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dynamics.jacobian import jacobian_pairing_grad, output_jacobian
from dynamics.objective import Objective
from sde.rules import check_rule

__all__ = ["OutputMetric", "centred_basis", "metric_roots", "GaussNewtonGeometry", "gauss_newton_geometry",
           "drift_weights", "SharpnessGradients", "sharpness_gradients", "label_noise_drift", "PredictedRates",
           "predict_rates"]


@dataclass(frozen=True)
class OutputMetric:
    """The reduction x_i -> R_i Q^T x_i of per-sample output-space quantities (module docstring).

    basis: (C, m) orthonormal columns Q, None for the identity (m = C); roots: (N, m, m) symmetric
    R_i, None for the identity. The default OutputMetric() is the squared loss's identity metric.
    """
    basis: Tensor | None = None
    roots: Tensor | None = None

    def reduce(self, x: Tensor) -> Tensor:
        """x (N, C, *rest) -> (N, m, *rest): R_i Q^T x_i."""
        if self.basis is not None:
            x = torch.einsum("cm,nc...->nm...", self.basis.to(x.dtype), x)
        return self._times_roots(x)

    def lift(self, y: Tensor) -> Tensor:
        """y (N, m, *rest) -> (N, C, *rest): Q R_i y_i, the adjoint of `reduce`."""
        y = self._times_roots(y)
        return y if self.basis is None else torch.einsum("cm,nm...->nc...", self.basis.to(y.dtype), y)

    def _times_roots(self, x: Tensor) -> Tensor:
        return x if self.roots is None else torch.einsum("nab,nb...->na...", self.roots.to(x.dtype), x)

    def reduce_blocks(self, blocks: Tensor) -> Tensor:
        """Per-sample Gram blocks J_i J_i^T (N, C, C) -> the reduced Jt_i Jt_i^T = R_i Q^T J_i J_i^T Q R_i (N, m, m)."""
        return self.reduce(self.reduce(blocks).mT)

    def part(self, start: int, stop: int) -> "OutputMetric":
        """The metric of samples start:stop."""
        return OutputMetric(self.basis, None if self.roots is None else self.roots[start:stop])

    def reduce_chunk(self, x: Tensor, start: int) -> Tensor:
        """`reduce` of the samples start:start + len(x) only, x (n, C, *rest): the per-chunk hook of
        `dynamics.jacobian`'s Jacobian passes."""
        return self.part(start, start + len(x)).reduce(x)

    def size(self, classes: int) -> int:
        """m, the reduced output dimension, for C = classes outputs."""
        return classes if self.basis is None else self.basis.shape[1]

    def check(self, num_samples: int, classes: int) -> None:
        """ValueError unless basis is (C, m) and roots (N, m, m) for N = num_samples, C = classes."""
        m = self.size(classes)
        if self.basis is not None and (self.basis.dim() != 2 or self.basis.shape[0] != classes):
            raise ValueError(f"metric basis must be (C = {classes}, m), got {tuple(self.basis.shape)}")
        if self.roots is not None and tuple(self.roots.shape) != (num_samples, m, m):
            raise ValueError(f"metric roots must be (N, m, m) = ({num_samples}, {m}, {m}), "
                             f"got {tuple(self.roots.shape)}")


def centred_basis(C: int, dtype, device) -> Tensor:
    """Q (C, C-1) with orthonormal columns spanning {w : sum w = 0}."""
    eye = torch.eye(C, dtype=dtype, device=device)
    Q, _ = torch.linalg.qr(eye - 1.0 / C)
    return Q[:, : C - 1]


def metric_roots(q: Tensor, Q: Tensor) -> Tensor:
    """R_i = (Q^T A_i Q)^{1/2}, (N, C-1, C-1), for probabilities q (N, C), A_i = diag(q_i) - q_i q_i^T
    and Q (C, C-1) from `centred_basis` (positive definite for q > 0)."""
    A = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    values, vectors = torch.linalg.eigh(Q.T @ A @ Q)
    return (vectors * values.clamp_min(0).sqrt()[:, None, :]) @ vectors.transpose(-1, -2)


@dataclass(frozen=True)
class GaussNewtonGeometry:
    """Exact second-order geometry of Gamma at theta under an output metric.

    jacobian (N, C, D); reduced (N m, D) the rows of Jt = metric.reduce(J), Hessian(L) =
    reduced^T reduced / N; eigenvalues (r,) the nonzero Hessian eigenvalues, descending; gram_vectors
    (N m, r) the unit eigenvectors of G = reduced reduced^T / N (Hessian eigenvector i is
    reduced^T U[:, i] / sqrt(N lambda_i)); residual: the caller's distance to Gamma at theta.
    """
    theta: Tensor
    jacobian: Tensor
    metric: OutputMetric
    reduced: Tensor
    eigenvalues: Tensor
    gram_vectors: Tensor
    residual: float = field(default=0.0)

    @property
    def num_samples(self) -> int:
        return self.jacobian.shape[0]

    @property
    def trace(self) -> float:
        """tr Hessian(L) = ||Jt||_F^2 / N."""
        return float(self.eigenvalues.sum())

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def hessian_eigenvectors(self, k: int) -> Tensor:
        """The top-k unit Hessian eigenvectors, (D, k)."""
        return self.reduced.T @ self.gram_vectors[:, :k] / (self.num_samples * self.eigenvalues[:k]).sqrt()

    def reduce(self, jac: Tensor) -> Tensor:
        """(N m, D) rows metric.reduce(jac) for jac (N, C, D) (J gives `reduced`; its derivative along a
        tangent direction gives reduced's derivative, the metric being constant on Gamma to first order)."""
        return self.metric.reduce(jac).reshape(-1, jac.shape[-1])

    def reduced_in_basis(self) -> Tensor:
        """Jt U (N m, r) for U the unit Hessian eigenvectors: V diag(sqrt(N lambda)) (no product with Jt)."""
        return self.gram_vectors * (self.num_samples * self.eigenvalues).sqrt()

    def tangent_project(self, v: Tensor) -> Tensor:
        """P v = v - Jt^T (N G)^+ Jt v for v (D,)."""
        coeff = self.gram_vectors.T @ (self.reduced @ v) / (self.num_samples * self.eigenvalues)
        return v - self.reduced.T @ (self.gram_vectors @ coeff)

    def pairing(self, weights: Tensor) -> Tensor:
        """lift(w(G) Jt) as (N, C, D), given w(lambda) on the nonzero eigenvalues (zero on the kernel);
        identity metric: w(G) J."""
        wj = self.gram_vectors @ (weights[:, None] * (self.gram_vectors.T @ self.reduced))
        return self.metric.lift(wj.reshape(self.num_samples, -1, self.reduced.shape[1]))

    def d3_pairing(self, obj: Objective, pairing: Tensor) -> Tensor:
        """P d3L[M] = (2/N) P grad_theta <J(theta), pairing>, (D,), for pairing = lift(Jt0 M) (N, C, D)."""
        return 2 / self.num_samples * self.tangent_project(jacobian_pairing_grad(obj, self.theta, pairing))


def gauss_newton_geometry(obj: Objective, theta: Tensor | None = None, *, metric: OutputMetric | None = None,
                          residual: float = 0.0, rank_tol: float = 1e-12) -> GaussNewtonGeometry:
    """Jacobian, reduced Jacobian and Gram eigendecomposition at theta (obj.params if None).

    No on-Gamma check: the caller checks and passes its distance as `residual`. Gram eigenvalues
    below rank_tol x the largest count as zero (the kernel of Jt^T).
    """
    theta = (obj.params if theta is None else theta).detach()
    metric = metric or OutputMetric()
    metric.check(obj.num_samples, obj.forward(theta, obj.data[0][0][:1]).shape[-1])
    _, jac = output_jacobian(obj, theta)
    reduced = metric.reduce(jac).reshape(-1, obj.dim)
    values, vectors = torch.linalg.eigh(reduced @ reduced.T / jac.shape[0])
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > rank_tol * values[0]
    return GaussNewtonGeometry(theta=theta, jacobian=jac, metric=metric, reduced=reduced,
                               eigenvalues=values[keep], gram_vectors=vectors[:, keep], residual=float(residual))


def drift_weights(rule, eigenvalues: Tensor, *, eta: float | None = None) -> Tensor:
    """w(lambda_i) weighting each Hessian eigen-direction in the label-noise drift.

    `rule.drift_weight(2 lambda, eta=eta)`: SGD 1; LocalSGD 1 + (K-1) psi(2 beta lambda); QSR K
    (the eta -> 0 limit), or, if `eta` is given, Local SGD's weights at beta = alpha^2 / eta.
    """
    check_rule(rule)
    return rule.drift_weight(2 * eigenvalues, eta=eta)


@dataclass(frozen=True)
class SharpnessGradients:
    """Tangent-projected gradients P grad tr H = P d3L[I] and P grad lambda_max = P d3L[u u^T], (D,)."""
    trace: Tensor
    lambda_max: Tensor


def sharpness_gradients(obj: Objective, geometry: GaussNewtonGeometry) -> SharpnessGradients:
    """Exact tangent gradients of tr H and lambda_max on Gamma (module docstring)."""
    jt = geometry.reduced.reshape(geometry.num_samples, -1, obj.dim)
    top = torch.zeros_like(geometry.eigenvalues)
    top[0] = 1
    return SharpnessGradients(trace=geometry.d3_pairing(obj, geometry.metric.lift(jt)),
                              lambda_max=geometry.d3_pairing(obj, geometry.pairing(top)))


def _check_scale(noise_scale: float) -> None:
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be positive (sigma^2, or 1 for flipped labels), got {noise_scale}")


def label_noise_drift(obj: Objective, geometry: GaussNewtonGeometry, rule, *, noise_scale: float,
                      eta: float | None = None) -> Tensor:
    """Slow drift -(c / 4B) P d3L[w(H)] at zeta = geometry.theta, (D,); c = noise_scale."""
    _check_scale(noise_scale)
    weights = drift_weights(rule, geometry.eigenvalues, eta=eta)
    return -noise_scale / (4 * rule.total_batch) * geometry.d3_pairing(obj, geometry.pairing(weights))


@dataclass(frozen=True)
class PredictedRates:
    """Predicted d/dt (slow time) of tr H and lambda_max at a point of Gamma, one rule, either route.

    drift: the (D,) drift, None where the route does not form it (matrix-free Local SGD); stderr: the
    standard errors of stochastic estimates (0 for exact ones).
    """
    rule: object
    noise_scale: float
    trace_rate: float
    lambda_max_rate: float
    trace: float
    lambda_max: float
    drift: Tensor | None
    trace_rate_stderr: float = 0.0
    lambda_max_rate_stderr: float = 0.0


def predict_rates(obj: Objective, geometry: GaussNewtonGeometry, rule, *, noise_scale: float,
                  eta: float | None = None, gradients: SharpnessGradients | None = None) -> PredictedRates:
    """d tr H/dt and d lambda_max/dt (slow time) under `rule`, Sigma = noise_scale x H (exact route)."""
    _check_scale(noise_scale)
    gradients = gradients or sharpness_gradients(obj, geometry)
    drift = label_noise_drift(obj, geometry, rule, noise_scale=noise_scale, eta=eta)
    return PredictedRates(rule=rule, noise_scale=float(noise_scale), trace_rate=float(gradients.trace @ drift),
                          lambda_max_rate=float(gradients.lambda_max @ drift), trace=geometry.trace,
                          lambda_max=geometry.lambda_max, drift=drift)
