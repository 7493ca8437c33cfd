"""Toy problems whose slow SDEs have closed forms, each giving an `sde.Problem` plus formulas.

Time unit: slow time t = eta^2 x steps per worker. B is the TOTAL batch (K x B_loc).
Label noise: squared loss 1/2 (f(x) - y)^2 with Gaussian label noise of variance sigma^2, so on
Gamma (all residuals zero) Sigma = sigma^2 Hessian(L) and the drifts follow THEORY.md's
label-noise closed form (each Hessian eigen-direction lambda_i weighted by
w(lambda_i) = 1 for SGD, 1 + (K-1) psi(2 beta lambda_i) for Local SGD, K for QSR).

- `DiagonalNet`: f(x) = x . (u*u - v*v); conserved p_i = u_i v_i; log-rates of p_i.
- `Sphere`: Gamma = {|theta| = r}, isotropic noise; Brownian motion on the sphere.
- `RankOneFactorization`: f_ab = (u v^T)_ab, all entries observed; d tr H / dt and the rate of
  the conserved balance |u|^2 - |v|^2; no analytic Phi given.

Each toy also has `sample_gradient(theta (..., D), batch_size, generator) -> (..., D)`, the
mean stochastic gradient of a minibatch drawn with replacement, for `sde.discrete`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sde.label_noise import drift_weights
from sde.problem import Problem
from sde.rules import check_rule

__all__ = ["DiagonalNet", "Sphere", "RankOneFactorization"]


def _label_noise_cov(per_sample_jac: Tensor, residuals: Tensor, sigma: float) -> Tensor:
    """Sigma = Cov_j(r_j grad f_j) + sigma^2 mean_j grad f_j grad f_j^T, jac (N, D), residuals (N,)."""
    g = residuals[:, None] * per_sample_jac
    centred = g - g.mean(0)
    n = per_sample_jac.shape[0]
    return (centred.T @ centred + sigma ** 2 * per_sample_jac.T @ per_sample_jac) / n


class DiagonalNet:
    """Diagonal linear network f(x) = x . (u*u - v*v), theta = (u, v) in R^{2d}.

    L = 1/(2n) sum_j (f(x_j) - y_j)^2 with labels y = X w*. The design X (n, d) must have
    orthogonal columns (X^T X diagonal; e.g. one datum per coordinate): then
    L = 1/2 sum_i m_i (w_i - w*_i)^2 with w = u*u - v*v and m_i = mean_j x_ji^2, and Gamma =
    {w = w*}. Under gradient flow du_i/dt = -g_i u_i, dv_i/dt = +g_i v_i (g = 2 m (w - w*)), so
    p_i = u_i v_i is conserved and the signs of u_i, v_i are kept: Phi sets w_i = w*_i and keeps
    p_i, u_i^2 = (w*_i + s_i)/2, v_i^2 = (s_i - w*_i)/2, s_i = sqrt(w*_i^2 + 4 p_i^2) = u_i^2 + v_i^2.

    On Gamma, Hessian eigenvalues lambda_i = 4 m_i s_i (eigenvector ~ (u_i, -v_i) in block i), and
    the label-noise drift is, in block i,
        d(u_i, v_i)/dt = -4 sigma^2 m_i p_i w(lambda_i) / (B s_i) (v_i, u_i),
    so d log p_i/dt = -4 sigma^2 m_i w(lambda_i) / B exactly (for SGD: -4 sigma^2 m_i / B).
    Without orthogonal columns the coordinates couple and none of this holds.
    """

    def __init__(self, X: Tensor, w_star: Tensor, sigma: float):
        if X.dim() != 2 or w_star.shape != (X.shape[1],):
            raise ValueError(f"X must be (n, d) and w_star (d,), got {tuple(X.shape)}, {tuple(w_star.shape)}")
        gram = X.T @ X
        off = gram - torch.diag(torch.diagonal(gram))
        if float(off.abs().max()) > 1e-12 * float(gram.abs().max()):
            raise ValueError("DiagonalNet needs a design with orthogonal columns (X^T X diagonal)")
        if bool((torch.diagonal(gram) <= 0).any()):
            raise ValueError("every coordinate must appear in some datum (m_i > 0)")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.X, self.w_star, self.sigma = X, w_star, float(sigma)
        self.y = X @ w_star
        self.d = X.shape[1]
        self.m = (X ** 2).mean(0)
        self.problem = Problem(self.loss, self.noise_cov, project=self.project, name="diagonal-net")

    @property
    def dim(self) -> int:
        return 2 * self.d

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        return theta[..., : self.d], theta[..., self.d:]

    def products(self, theta: Tensor) -> Tensor:
        """p = u * v, shape (..., d); conserved by gradient flow, so p(Phi(theta)) = p(theta)."""
        u, v = self.split(theta)
        return u * v

    def loss(self, theta: Tensor) -> Tensor:
        u, v = self.split(theta)
        return 0.5 * ((self.X @ (u * u - v * v) - self.y) ** 2).mean()

    def noise_cov(self, theta: Tensor) -> Tensor:
        u, v = self.split(theta)
        jac = torch.cat([2 * self.X * u, -2 * self.X * v], dim=1)
        return _label_noise_cov(jac, self.X @ (u * u - v * v) - self.y, self.sigma)

    def project(self, theta: Tensor) -> Tensor:
        """Analytic Phi (class docstring); theta (..., 2d)."""
        u, v = self.split(theta)
        p = u * v
        s = torch.sqrt(self.w_star ** 2 + 4 * p ** 2)
        sign_u = torch.where(u < 0, -1.0, 1.0).to(theta.dtype)
        sign_v = torch.where(v < 0, -1.0, 1.0).to(theta.dtype)
        return torch.cat([sign_u * torch.sqrt((s + self.w_star) / 2),
                          sign_v * torch.sqrt((s - self.w_star) / 2)], dim=-1)

    def point_on_gamma(self, p: Tensor) -> Tensor:
        """The point of Gamma with products p (u_i > 0, sign v_i = sign p_i)."""
        s = torch.sqrt(self.w_star ** 2 + 4 * p ** 2)
        return torch.cat([torch.sqrt((s + self.w_star) / 2),
                          torch.sign(p) * torch.sqrt((s - self.w_star) / 2)], dim=-1)

    def eigenvalues(self, zeta: Tensor) -> Tensor:
        """lambda_i = 4 m_i (u_i^2 + v_i^2) on Gamma, shape (..., d)."""
        u, v = self.split(zeta)
        return 4 * self.m * (u * u + v * v)

    def log_rate(self, zeta: Tensor, rule) -> Tensor:
        """d log p_i / dt = -4 sigma^2 m_i w(lambda_i) / B at zeta on Gamma, shape (..., d)."""
        return -4 * self.sigma ** 2 * self.m * drift_weights(rule, self.eigenvalues(zeta)) / rule.total_batch

    def drift(self, zeta: Tensor, rule) -> Tensor:
        """Closed-form total drift (2d,) of the slow SDE at zeta on Gamma (no diffusion)."""
        u, v = self.split(zeta)
        coef = self.log_rate(zeta, rule) * u * v / (u * u + v * v)
        return torch.cat([coef * v, coef * u], dim=-1)

    def sample_gradient(self, theta: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
        """Mean label-noise gradient of a batch drawn with replacement; theta (..., 2d)."""
        u, v = self.split(theta)
        shape = theta.shape[:-1] + (batch_size,)
        idx = torch.randint(self.X.shape[0], shape, generator=generator, device=theta.device)
        noise = torch.randn(shape, generator=generator, dtype=theta.dtype, device=theta.device)
        x = self.X[idx]                                                    # (..., B, d)
        r = (x @ (u * u - v * v).unsqueeze(-1)).squeeze(-1) - self.y[idx] - self.sigma * noise
        g = (r.unsqueeze(-2) @ x).squeeze(-2) / batch_size                 # (..., d)
        return torch.cat([2 * g * u, -2 * g * v], dim=-1)


class Sphere:
    """Gamma = sphere {|theta| = r} in R^n, loss (|theta|^2 - r^2)^2 / 4, noise Sigma = c I.

    Phi(theta) = r theta / |theta| (gradient flow is radial). On Gamma the Hessian is 2 theta
    theta^T (one normal eigenvalue 2 r^2), S_par = c P, and the normal terms d3L[.] are radial,
    so P removes drift-I and drift-II: for SGD, Local SGD and QSR alike the slow SDE is Brownian
    motion on the sphere with generator (c / 2B) Laplace-Beltrami,
        d zeta = sqrt(c/B) P dW - (n-1) c / (2 B r^2) zeta dt,
    (the drift keeps d|zeta|^2 = 2 zeta.d zeta + (c/B) tr P dt = 0), hence
        E[zeta(t)] = zeta0 exp(-(n-1) c t / (2 B r^2)).
    Sigma = c I has no mixed tangent/normal block (S_par_perp = 0).
    """

    def __init__(self, radius: float = 1.0, noise: float = 1.0, dim: int = 3):
        if not (radius > 0 and noise > 0 and dim >= 2):
            raise ValueError(f"need radius > 0, noise > 0, dim >= 2; got {radius}, {noise}, {dim}")
        self.radius, self.noise, self.dim = float(radius), float(noise), int(dim)
        self.problem = Problem(self.loss, self.noise_cov, project=self.project, name="sphere")

    def loss(self, theta: Tensor) -> Tensor:
        return ((theta * theta).sum(-1) - self.radius ** 2) ** 2 / 4

    def noise_cov(self, theta: Tensor) -> Tensor:
        return self.noise * torch.eye(self.dim, dtype=theta.dtype, device=theta.device)

    def project(self, theta: Tensor) -> Tensor:
        return self.radius * theta / torch.linalg.vector_norm(theta, dim=-1, keepdim=True)

    def decay_rate(self, rule) -> float:
        """kappa in E[zeta(t)] = zeta0 exp(-kappa t): (n-1) c / (2 B r^2)."""
        check_rule(rule)
        return (self.dim - 1) * self.noise / (2 * rule.total_batch * self.radius ** 2)

    def mean(self, zeta0: Tensor, t: float, rule) -> Tensor:
        return zeta0 * math.exp(-self.decay_rate(rule) * t)

    def drift(self, zeta: Tensor, rule) -> Tensor:
        return -self.decay_rate(rule) * zeta

    def diffusion_covariance(self, zeta: Tensor, rule) -> Tensor:
        """A A^T = (c / B) P."""
        n = zeta / torch.linalg.vector_norm(zeta)
        P = torch.eye(self.dim, dtype=zeta.dtype, device=zeta.device) - torch.outer(n, n)
        return self.noise / rule.total_batch * P


class RankOneFactorization:
    """Rank-one matrix factorization with label noise: theta = (u in R^m, v in R^q),
    samples = the N = m q entries, f_ab = u_a v_b, y_ab = u*_a v*_b,
    L = 1/(2N) sum_ab (u_a v_b - y_ab)^2. Gamma = {u v^T = u* v*^T}, a curve {(c u*, v*/c)}.

    On Gamma the Hessian (1/N)[[|v|^2 I, u v^T], [v u^T, |u|^2 I]] has eigenvalues |v|^2/N
    (m-1 times), |u|^2/N (q-1 times), (|u|^2+|v|^2)/N (once) and tangent direction
    tau = (u, -v)/sqrt(|u|^2+|v|^2); tr H = (q |u|^2 + m |v|^2)/N = |u|^2/m + |v|^2/q. The
    label-noise drift is -(sigma^2/(4B)) grad_Gamma sum_k G(lam_k) with G' = w (`sde.label_noise.drift_weights`):
        g.tau = (2/N) [|u|^2 ((q-1) w(|u|^2/N) + w_c) - |v|^2 ((m-1) w(|v|^2/N) + w_c)] / |theta|,
    w_c = w((|u|^2+|v|^2)/N), the drift is -(sigma^2/(4B)) (g.tau) tau, and
        d tr H / dt = -(sigma^2/(4B)) (g.tau) (grad trH . tau);
    for SGD this is -(sigma^2/B) (|u|^2/m - |v|^2/q)^2 / (|u|^2 + |v|^2).
    Gradient flow conserves the balance Delta = |u|^2 - |v|^2 (slow rate: `balance_rate`), which
    fixes the point of Gamma up to the sign branch; `problem.project` is left None on purpose so
    that this toy exercises the gradient-flow projection of `sde.project`.
    """

    def __init__(self, u_star: Tensor, v_star: Tensor, sigma: float):
        if u_star.dim() != 1 or v_star.dim() != 1 or not sigma > 0:
            raise ValueError("u_star, v_star must be vectors and sigma > 0")
        self.u_star, self.v_star, self.sigma = u_star, v_star, float(sigma)
        self.m, self.q = len(u_star), len(v_star)
        self.N = self.m * self.q
        self.target = torch.outer(u_star, v_star)
        self.problem = Problem(self.loss, self.noise_cov, project=None, name="rank-one-factorization")

    @property
    def dim(self) -> int:
        return self.m + self.q

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        return theta[..., : self.m], theta[..., self.m:]

    def loss(self, theta: Tensor) -> Tensor:
        u, v = self.split(theta)
        return 0.5 * ((torch.outer(u, v) - self.target) ** 2).mean()

    def noise_cov(self, theta: Tensor) -> Tensor:
        u, v = self.split(theta)
        eye_m = torch.eye(self.m, dtype=theta.dtype, device=theta.device)
        eye_q = torch.eye(self.q, dtype=theta.dtype, device=theta.device)
        # Row (a, b) of the Jacobian: v_b e_a in the u block, u_a e_b in the v block.
        jac = torch.cat([(eye_m[:, None, :] * v[None, :, None]).reshape(self.N, self.m),
                         (u[:, None, None] * eye_q[None, :, :]).reshape(self.N, self.q)], dim=1)
        residuals = (torch.outer(u, v) - self.target).reshape(-1)
        return _label_noise_cov(jac, residuals, self.sigma)

    def point_on_gamma(self, scale: float) -> Tensor:
        return torch.cat([scale * self.u_star, self.v_star / scale])

    def hessian_trace(self, theta: Tensor) -> Tensor:
        """tr Hessian(L) on Gamma = (q |u|^2 + m |v|^2) / N."""
        u, v = self.split(theta)
        return (self.q * (u * u).sum(-1) + self.m * (v * v).sum(-1)) / self.N

    def _tangent_terms(self, zeta: Tensor, rule):
        u, v = self.split(zeta)
        nu, nv = (u * u).sum(-1), (v * v).sum(-1)
        norm = torch.sqrt(nu + nv)
        w = lambda lam: drift_weights(rule, lam)
        wc = w((nu + nv) / self.N)
        g_tau = 2 / self.N * (nu * ((self.q - 1) * w(nu / self.N) + wc)
                              - nv * ((self.m - 1) * w(nv / self.N) + wc)) / norm
        trace_tau = 2 * (nu / self.m - nv / self.q) / norm
        tau = torch.cat([u, -v], dim=-1) / norm
        return g_tau, trace_tau, tau

    def balance(self, theta: Tensor) -> Tensor:
        """Delta = |u|^2 - |v|^2, conserved by gradient flow, so Delta(Phi(theta)) = Delta(theta)."""
        u, v = self.split(theta)
        return (u * u).sum(-1) - (v * v).sum(-1)

    def point_with_balance(self, delta: Tensor) -> Tensor:
        """The point (c u*, v*/c), c > 0, of Gamma with balance delta:
        c^2 = (delta + sqrt(delta^2 + 4 |u*|^2 |v*|^2)) / (2 |u*|^2)."""
        nu, nv = (self.u_star ** 2).sum(), (self.v_star ** 2).sum()
        c = torch.sqrt((delta + torch.sqrt(delta ** 2 + 4 * nu * nv)) / (2 * nu))
        return torch.cat([c[..., None] * self.u_star, self.v_star / c[..., None]], dim=-1)

    def balance_rate(self, zeta: Tensor, rule) -> Tensor:
        """d Delta / dt = grad Delta . drift = -(sigma^2/(2B)) (g.tau) |zeta| at zeta on Gamma."""
        g_tau, _, _ = self._tangent_terms(zeta, rule)
        return -(self.sigma ** 2 / (2 * rule.total_batch)) * g_tau * torch.linalg.vector_norm(zeta, dim=-1)

    def drift(self, zeta: Tensor, rule) -> Tensor:
        """Closed-form total drift (m+q,) at zeta on Gamma: -(sigma^2/(4B)) (g.tau) tau."""
        g_tau, _, tau = self._tangent_terms(zeta, rule)
        return -(self.sigma ** 2 / (4 * rule.total_batch)) * g_tau * tau

    def trace_rate(self, zeta: Tensor, rule) -> Tensor:
        """d tr Hessian(L) / dt along the slow SDE at zeta (no diffusion with label noise)."""
        g_tau, trace_tau, _ = self._tangent_terms(zeta, rule)
        return -(self.sigma ** 2 / (4 * rule.total_batch)) * g_tau * trace_tau

    def sample_gradient(self, theta: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
        """Mean label-noise gradient of a batch of entries drawn with replacement; theta (..., m+q)."""
        u, v = self.split(theta)
        shape = theta.shape[:-1] + (batch_size,)
        a = torch.randint(self.m, shape, generator=generator, device=theta.device)
        b = torch.randint(self.q, shape, generator=generator, device=theta.device)
        noise = torch.randn(shape, generator=generator, dtype=theta.dtype, device=theta.device)
        ua, vb = torch.gather(u, -1, a), torch.gather(v, -1, b)
        r = (ua * vb - self.target[a, b] - self.sigma * noise) / batch_size
        gu = torch.zeros_like(u).scatter_add_(-1, a, r * vb)
        gv = torch.zeros_like(v).scatter_add_(-1, b, r * ua)
        return torch.cat([gu, gv], dim=-1)
