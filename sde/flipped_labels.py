"""Cross-entropy with flipped labels: the noise model and its slow-SDE predictions (issue 6).

Setting (the papers' label-noise runs, Gu et al. 2023 Fig. 7): every time sample i is drawn
its label y_i is replaced, with probability p, by a uniformly random OTHER class (fresh at
every draw). The expected loss is the cross-entropy against the soft target

    q_i = (1 - p) e_{y_i} + p / (C - 1) (1 - e_{y_i}),      L(theta) = (1/N) sum_i CE(f_i, q_i),

(`soft_targets`, `soft_cross_entropy`), with p in [0, (C-1)/C) so that the true class stays the
most likely one. Its minimizer manifold is Gamma = {softmax(f_i) = q_i for all i}: logits are
fixed up to a per-sample constant, codimension N (C - 1).

On Gamma, with J_i the (C, D) output Jacobian and A_i = diag(q_i) - q_i q_i^T (constant on Gamma):
- Hessian(L) = (1/N) sum_i J_i^T A_i J_i = Jt^T Jt / N, Jt_i = A_i^{1/2} J_i (the residual term
  sum_c (s_ic - q_ic) grad^2 f_ic vanishes);
- one draw (i, label y~) has gradient J_i^T (q_i - e_y~), mean zero, so the single-draw noise
  covariance is Sigma = (1/N) sum_i J_i^T E[(q_i - e_y~)(q_i - e_y~)^T] J_i = Hessian(L):
  Fisher = Hessian at the minimizer. Every draw's gradient lies in span{J_i^T w : w perp 1}, the
  normal space, so S_par = 0 (no diffusion) and S_hat = Lyap^-1(H) = P_perp / 2.
  Off Gamma, Sigma gains (1/N) sum_i J_i^T (s_i - q_i)(s_i - q_i)^T J_i minus the mean's outer
  product, and Hessian(L) gains the residual term: the two differ (tests check both statements).
So on Gamma the squared-loss closed form applies with sigma^2 = 1 (THEORY.md): drift
-(1/(4B)) P d3L[w(H)], w = 1, 1 + (K-1) psi(2 beta lambda), K (SGD, Local SGD, QSR).

Two prediction paths, both in slow time t = eta^2 x steps per worker:
- `closed_form_rates`: the formula above by the exact Jacobian path of `sde.label_noise`,
  P d3L[M] = (2/N) P grad_theta sum_i <J_i(theta), A_i J_i0 M> (the derivative of A_i and of the
  residual term lie in the normal space, which P removes);
- `general_rates`: THEORY.md's general formula with an ESTIMATED Sigma: a `MatrixFreeProblem`
  whose Hessian is the soft-target loss and whose noise is the per-sample-gradient covariance of
  M sampled (x_i, flipped label) draws (`sampled_noise_objective`, the `noise_obj` hook),
  contracted with the tangent gradients of tr H and lambda_max. `exact_noise_in_basis` gives
  the exact Sigma in a basis by enumerating the C labels of every sample (the estimation error).
- the kernel route (cheap, and the Monte Carlo standard error): for normal noise the rate is
  linear in U^T Sigma U, d s/dt = <K, U^T Sigma U> with K from U^T (d_g Hessian) U
  (`hessian_derivative_in_basis`, `rate_kernel`), so the per-draw terms give a standard error
  (`monte_carlo_rate`); it equals the matrix-free path to the finite-difference accuracy (~1e-7).
- `dense_flip_problem`: an `sde.Problem` with the exact enumerated Sigma (tiny networks, tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynamics.objective import Objective
from sde.label_noise import (PredictedRates, SharpnessGradients, drift_weights, jacobian_pairing_grad,
                             output_jacobian)
from sde.rules import check_rule


# ---------------------------------------------------------------------- the noise model
def check_flip_probability(p: float, num_classes: int) -> None:
    """ValueError unless num_classes >= 2 and 0 <= p < (C-1)/C (the true label stays most likely)."""
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    bound = (num_classes - 1) / num_classes
    if not (isinstance(p, (int, float)) and 0 <= p < bound):
        raise ValueError(f"flip probability p must be in [0, (C-1)/C) = [0, {bound:.4g}) for C = "
                         f"{num_classes}, got {p!r}")


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D integer tensor (N,), got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")


def soft_targets(labels: Tensor, p: float, num_classes: int = 10, *, dtype=torch.float64) -> Tensor:
    """q (N, C): 1 - p on the label, p / (C - 1) on every other class (rows sum to 1)."""
    check_flip_probability(p, num_classes)
    _check_labels(labels, num_classes)
    q = torch.full((len(labels), num_classes), p / (num_classes - 1), dtype=dtype, device=labels.device)
    return q.scatter(1, labels.long()[:, None], 1.0 - p)


def flip_labels(labels: Tensor, p: float, num_classes: int, *, generator: torch.Generator) -> Tensor:
    """A fresh draw: each label independently replaced with probability p by a uniform OTHER class.

    labels: integer tensor of any shape; returns int64 of the same shape.
    """
    check_flip_probability(p, num_classes)
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError("labels must be an integer tensor")
    flip = torch.rand(labels.shape, generator=generator) < p
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return torch.where(flip.to(labels.device), (labels.long() + shift.to(labels.device)) % num_classes,
                       labels.long())


def soft_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_c targets_c log softmax(outputs)_c.

    targets: (n, C) probabilities (soft targets) or (n,) integer labels (hard, one-hot).
    """
    logp = torch.log_softmax(outputs, dim=-1)
    if targets.dtype in (torch.int64, torch.int32):
        # gather instead of F.cross_entropy's checks: vmap-compatible per-sample gradients
        return -logp.gather(-1, targets.long().unsqueeze(-1)).mean()
    return -(targets * logp).sum(-1).mean()


def soft_target_objective(model: nn.Module, x: Tensor, labels: Tensor, p: float, *,
                          num_classes: int = 10, batch_size: int | None = None) -> Objective:
    """`Objective` of the expected loss (1/N) sum_i CE(f_i, q_i), data list of (x, q) batches."""
    if len(x) != len(labels):
        raise ValueError(f"x has {len(x)} samples but labels has {len(labels)}")
    q = soft_targets(labels, p, num_classes, dtype=x.dtype)
    size = batch_size or len(x)
    return Objective(model, soft_cross_entropy, list(zip(x.split(size), q.split(size))))


def sampled_noise_objective(model: nn.Module, x: Tensor, labels: Tensor, p: float, num_draws: int, *,
                            generator: torch.Generator, num_classes: int = 10,
                            batch_size: int = 1000) -> Objective:
    """`Objective` over `num_draws` draws of SGD's noise process: sample i uniform, label flipped.

    Its per-sample-gradient covariance (centred by its own mean) is the Monte Carlo estimate of
    the single-draw noise covariance Sigma of flipped-label SGD; pass it as `noise_obj` to
    `sde.MatrixFreeProblem`. Draws: indices i ~ U{0..N-1}, then `flip_labels`, from `generator`.
    """
    if len(x) != len(labels):
        raise ValueError(f"x has {len(x)} samples but labels has {len(labels)}")
    if not (isinstance(num_draws, int) and num_draws >= 2):
        raise ValueError(f"num_draws must be an int >= 2, got {num_draws!r}")
    _check_labels(labels, num_classes)
    idx = torch.randint(0, len(x), (num_draws,), generator=generator)
    drawn = flip_labels(labels.cpu()[idx], p, num_classes, generator=generator).to(labels.device)
    xs = x[idx.to(x.device)]
    return Objective(model, soft_cross_entropy, list(zip(xs.split(batch_size), drawn.split(batch_size))))


def _stacked(obj: Objective) -> tuple[Tensor, Tensor]:
    return torch.cat([xb for xb, _ in obj.data]), torch.cat([yb for _, yb in obj.data])


def soft_target_residuals(obj: Objective, outputs: Tensor | None = None, theta: Tensor | None = None) -> Tensor:
    """r (N, C) = centred(f_i - log q_i) (centred over classes): zero exactly on Gamma."""
    _, q = _stacked(obj)
    if outputs is None:
        theta = obj.params if theta is None else theta
        outputs = torch.cat([obj.forward(theta, xb) for xb, _ in obj.data])
    r = outputs - q.log()
    return r - r.mean(-1, keepdim=True)


def labelled_gradients_in_basis(jacobian: Tensor, outputs: Tensor, basis: Tensor) -> Tensor:
    """(N, C, k): U^T grad CE(f_i, c) = (J_i U)^T (softmax(f_i) - e_c) for every sample i and label c."""
    ju = jacobian @ basis                                 # (N, C, k)
    s = torch.softmax(outputs, -1)                        # (N, C)
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    return torch.einsum("nck,nlc->nlk", ju, s[:, None, :] - eye[None])


def exact_noise_in_basis(obj: Objective, theta: Tensor, basis: Tensor) -> Tensor:
    """Exact U^T Sigma U (k, k) of one flipped-label draw at theta, by enumerating all labels.

    obj: the soft-target objective (its targets are the label probabilities q_i). Sigma is
    (1/N) sum_i sum_c q_ic g_ic g_ic^T - g g^T with g_ic = grad CE(f_i, c), g = grad L. With
    basis = I (D, D) this is the dense Sigma (small problems).
    """
    _, q = _stacked(obj)
    outputs, jac = output_jacobian(obj, theta)
    g = labelled_gradients_in_basis(jac, outputs, basis)        # (N, C, k)
    w = q / len(q)
    mean = torch.einsum("nc,nck->k", w, g)
    second = torch.einsum("nc,nck,ncl->kl", w, g, g)
    return second - torch.outer(mean, mean)


# ---------------------------------------------------------------------- geometry of Gamma
def centred_basis(C: int, dtype, device) -> Tensor:
    """Q (C, C-1) with orthonormal columns spanning {w : sum w = 0}."""
    eye = torch.eye(C, dtype=dtype, device=device)
    Q, _ = torch.linalg.qr(eye - 1.0 / C)
    return Q[:, : C - 1]


@dataclass(frozen=True)
class FlipGeometry:
    """Exact second-order geometry of Gamma at theta (soft-target CE on Gamma).

    jacobian (N, C, D); metric_roots (N, C-1, C-1) R_i = (Q^T A_i Q)^{1/2} with Q (C, C-1)
    `centred` orthonormal; reduced (N (C-1), D) the rows of Jt_i = R_i Q^T J_i, so
    Hessian(L) = reduced^T reduced / N; eigenvalues (r,) descending and gram_vectors (N(C-1), r)
    of G = reduced reduced^T / N; residual ||centred(f - log q)||; loss: L(theta).
    """
    theta: Tensor
    jacobian: Tensor
    centred: Tensor
    metric_roots: Tensor
    reduced: Tensor
    eigenvalues: Tensor
    gram_vectors: Tensor
    residual: float
    loss: float

    @property
    def num_samples(self) -> int:
        return self.jacobian.shape[0]

    @property
    def trace(self) -> float:
        return float(self.eigenvalues.sum())

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def hessian_eigenvectors(self, k: int) -> Tensor:
        """The top-k unit Hessian eigenvectors (D, k)."""
        return self.reduced.T @ self.gram_vectors[:, :k] / (self.num_samples * self.eigenvalues[:k]).sqrt()

    def reduce(self, jac: Tensor) -> Tensor:
        """(N (C-1), D) rows R_i Q^T jac_i for jac (N, C, D) (J gives `reduced`; its derivative along a
        tangent direction gives reduced's derivative, since softmax(f) = q is unchanged to first order)."""
        N, C, D = jac.shape
        return torch.einsum("nab,cb,ncd->nad", self.metric_roots, self.centred, jac).reshape(N * (C - 1), D)

    def reduced_in_basis(self) -> Tensor:
        """Jt U (N (C-1), r) for U the unit Hessian eigenvectors: V diag(sqrt(N lambda))."""
        return self.gram_vectors * (self.num_samples * self.eigenvalues).sqrt()

    def tangent_project(self, v: Tensor) -> Tensor:
        """P v = v - Jt^T (N G)^+ Jt v for v (D,)."""
        coeff = self.gram_vectors.T @ (self.reduced @ v) / (self.num_samples * self.eigenvalues)
        return v - self.reduced.T @ (self.gram_vectors @ coeff)

    def pairing(self, weights: Tensor) -> Tensor:
        """A_i J_i w(H) as (N, C, D) = Q R_i [w(G) Jt]_i, given w(lambda) on the nonzero eigenvalues."""
        wj = self.gram_vectors @ (weights[:, None] * (self.gram_vectors.T @ self.reduced))
        wj = wj.reshape(self.num_samples, -1, self.reduced.shape[1])          # (N, C-1, D)
        return torch.einsum("ca,nab,nbd->ncd", self.centred, self.metric_roots, wj)


def metric_roots(q: Tensor, Q: Tensor) -> Tensor:
    """R_i = (Q^T A_i Q)^{1/2} (N, C-1, C-1) for probabilities q (N, C), A_i = diag(q_i) - q_i q_i^T and
    Q (C, C-1) from `centred_basis`."""
    A = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    small = Q.T @ A @ Q                                    # (N, C-1, C-1), positive definite for q > 0
    values, vectors = torch.linalg.eigh(small)
    return (vectors * values.clamp_min(0).sqrt()[:, None, :]) @ vectors.transpose(-1, -2)


def flip_geometry(obj: Objective, theta: Tensor | None = None, *, max_residual: float = 1e-7,
                  rank_tol: float = 1e-12) -> FlipGeometry:
    """Jacobian, metric and Gram eigendecomposition at theta; ValueError if theta is not on Gamma.

    obj: soft-target objective (`soft_target_objective`). max_residual bounds
    ||centred(f - log q)||; Gram eigenvalues below rank_tol x the largest count as zero.
    """
    theta = (obj.params if theta is None else theta).detach()
    _, q = _stacked(obj)
    if q.dim() != 2 or q.dtype not in (torch.float32, torch.float64):
        raise ValueError("obj must be a soft-target objective: targets (N, C) of probabilities")
    outputs, jac = output_jacobian(obj, theta)
    residual = float(soft_target_residuals(obj, outputs).norm())
    if not residual <= max_residual:
        raise ValueError(f"theta is not on Gamma: ||centred(f - log q)|| = {residual:.3e} > {max_residual:.1e}; "
                         "project it first (experiments.flipped_labels.project_to_flip_manifold)")
    N, C, D = jac.shape
    Q = centred_basis(C, jac.dtype, jac.device)
    R = metric_roots(q.to(jac.dtype), Q)
    reduced = torch.einsum("nab,cb,ncd->nad", R, Q, jac).reshape(N * (C - 1), D)
    values, vectors = torch.linalg.eigh(reduced @ reduced.T / N)
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > rank_tol * values[0]
    return FlipGeometry(theta=theta, jacobian=jac, centred=Q, metric_roots=R, reduced=reduced,
                        eigenvalues=values[keep], gram_vectors=vectors[:, keep], residual=residual,
                        loss=float(obj.loss(theta)))


def flip_sharpness_gradients(obj: Objective, geometry: FlipGeometry) -> SharpnessGradients:
    """Exact tangent gradients P d3L[I] (of tr H) and P d3L[u u^T] (of lambda_max) on Gamma, (D,)."""
    n, theta = geometry.num_samples, geometry.theta
    ones = torch.ones_like(geometry.eigenvalues)
    top = torch.zeros_like(ones)
    top[0] = 1
    g = [2 / n * geometry.tangent_project(jacobian_pairing_grad(obj, theta, geometry.pairing(w)))
         for w in (ones, top)]
    return SharpnessGradients(trace=g[0], lambda_max=g[1])


def closed_form_drift(obj: Objective, geometry: FlipGeometry, rule, *, eta: float | None = None) -> Tensor:
    """-(1/(4B)) P d3L[w(H)] (Sigma = H on Gamma), shape (D,); w from `sde.label_noise.drift_weights`."""
    check_rule(rule)
    weights = drift_weights(rule, geometry.eigenvalues, eta=eta)
    d3 = 2 / geometry.num_samples * geometry.tangent_project(
        jacobian_pairing_grad(obj, geometry.theta, geometry.pairing(weights)))
    return -d3 / (4 * rule.total_batch)


def closed_form_rates(obj: Objective, geometry: FlipGeometry, rule, *, eta: float | None = None,
                      gradients: SharpnessGradients | None = None) -> PredictedRates:
    """d tr H/dt and d lambda_max/dt (slow time) assuming Sigma = Hessian on Gamma (sigma = 1)."""
    gradients = gradients or flip_sharpness_gradients(obj, geometry)
    drift = closed_form_drift(obj, geometry, rule, eta=eta)
    return PredictedRates(rule=rule, sigma=1.0, trace_rate=float(gradients.trace @ drift),
                          lambda_max_rate=float(gradients.lambda_max @ drift), trace=geometry.trace,
                          lambda_max=geometry.lambda_max, drift=drift)


# ---------------------------------------------------------------------- the general formula
@dataclass(frozen=True)
class GeneralRates:
    """Rates by the general formula (slow time) and the size of the terms assumed away.

    trace_rate, lambda_max_rate: grad s . (drift_I + drift_II + ito); grad s is the tangent
    gradient, so the (normal) Ito term enters only through its tangent leak. ito_norm,
    diffusion_sq = ||A||_F^2 = tr S_par / B, noise_normal_trace = tr S_perp / B: the diffusion
    term 1/2 <Hess s, A A^T> is bounded by ||Hess s|| diffusion_sq / 2 and reported, not added.
    terms: the `sde.SlowSDETerms`.
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
    from sde.slow_sde import slow_sde
    terms = slow_sde(problem, zeta, rule, gradient_tol=gradient_tol)
    drift = terms.drift
    return GeneralRates(rule=rule, trace_rate=float(gradients.trace @ drift),
                        lambda_max_rate=float(gradients.lambda_max @ drift),
                        ito_norm=float(terms.ito_correction.norm()), drift_norm=float(drift.norm()),
                        diffusion_sq=float(terms.diffusion.pow(2).sum()),
                        terms=terms)


# ---------------------------------------------------------------------- Monte Carlo error of the rate
def hessian_derivative_in_basis(obj: Objective, theta: Tensor, direction: Tensor, basis: Tensor, *,
                                rel_step: float = 1e-4) -> Tensor:
    """U^T (d/de Hessian(L)(theta + e v)) U at e = 0, (k, k), by central differences of HVPs.

    v = `direction` (D,), U = `basis` (D, k). Step e = rel_step x (1 + |theta|) / |v|; float64
    gives about 8 correct digits. For a tangent v, v . d3L[M] = <U^T dH U, U^T M U> for M in span(U).
    """
    if direction.shape != theta.shape or basis.dim() != 2 or basis.shape[0] != theta.shape[0]:
        raise ValueError(f"direction must be (D,) and basis (D, k) with D = {theta.shape[0]}, got "
                         f"{tuple(direction.shape)} and {tuple(basis.shape)}")
    eps = rel_step * (1 + float(theta.norm())) / float(direction.norm())
    plus = obj.hvp(basis, theta + eps * direction)
    minus = obj.hvp(basis, theta - eps * direction)
    out = basis.T @ (plus - minus) / (2 * eps)
    return (out + out.T) / 2


def rate_kernel(rule, eigenvalues: Tensor, dH: Tensor, *, eta: float | None = None) -> Tensor:
    """K (k, k) with d s/dt = <K, U^T Sigma U> when Sigma's mixed block vanishes (normal noise).

    K_ij = -(1/(2B)) dH_ij (c_I + c_II psi(beta (lambda_i + lambda_j))) / (lambda_i + lambda_j),
    dH = U^T (d_g Hessian) U for g the tangent gradient of s (`hessian_derivative_in_basis`):
    drift-I and drift-II of THEORY.md contracted with g. QSR with `eta` and rule.alpha uses the
    Local SGD kernel at beta = alpha^2 / eta.
    """
    check_rule(rule)
    sums = eigenvalues[:, None] + eigenvalues[None, :]
    weight = rule.drift_weight(sums, eta=eta)
    return -dH * weight / (2 * float(rule.total_batch) * sums)


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

    Standard error from the spread of the per-draw terms / sqrt(M) (the mean's own O(1/M) part is
    neglected); exact: <K, exact_cov> with exact_cov = U^T Sigma U (`exact_noise_in_basis`).
    """
    centred = projections - projections.mean(0)
    terms = ((centred @ kernel) * centred).sum(1)
    M = len(terms)
    return MonteCarloRate(estimate=float(terms.mean()), stderr=float(terms.std() / M ** 0.5),
                          exact=float((kernel * exact_cov).sum()), num_draws=M)


def dense_flip_problem(obj: Objective):
    """`sde.Problem` (float64, dense) for a tiny network: the expected loss and the EXACT single-draw
    noise covariance by enumerating every label of every sample (test reference, D small)."""
    from torch.func import jacrev
    from sde.problem import Problem
    x, q = _stacked(obj)

    def loss(theta: Tensor) -> Tensor:
        return soft_cross_entropy(obj.forward(theta, x), q)

    def noise_cov(theta: Tensor) -> Tensor:
        out = obj.forward(theta, x)
        jac = jacrev(lambda t: obj.forward(t, x))(theta)                      # (N, C, D)
        s = torch.softmax(out, -1)
        eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
        g = torch.einsum("ncd,nlc->nld", jac, s[:, None, :] - eye[None])      # g[n, label] (D,)
        w = q / len(q)
        mean = torch.einsum("nl,nld->d", w, g)
        return torch.einsum("nl,nld,nle->de", w, g, g) - torch.outer(mean, mean)

    return Problem(loss=loss, noise_cov=noise_cov, name="flipped-label cross-entropy (exact Sigma)")
