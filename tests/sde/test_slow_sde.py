"""slow_sde against closed forms and an analytic projection.

1. Label noise on a diagonal linear network (THEORY.md closed form): the drift of SGD, Local SGD
   (two betas, two K) and QSR equals -(sigma^2/(4B)) grad_Gamma[tr H + (K-1)/(2 beta) tr F(2 beta H)]
   computed from an ANALYTIC Hessian by finite differences; beta -> 0 and beta -> inf limits.
2. General noise on a product of ellipsoids with an analytic Phi: the SGD drift equals
   1/2 d2Phi[Sigma/B] by finite differences of Phi (Li, Wang & Arora 2022), and
   Phi(zeta + raw_drift dt + A sqrt(dt) xi) reproduces drift and covariance to O(dt).
3. vmap-batched terms equal per-point terms; validation errors.
"""
import numpy as np
import pytest
import scipy.linalg
import torch

import sde
from sde import QSR, SGD, LocalSGD, Problem, psi_integral, slow_sde
from tests.sde.test_blocks import ProductEllipsoid, fd_second_derivative_of_phi, random_spd

DT = torch.float64


# ---------------------------------------------------------------- label noise, diagonal linear net
class DiagonalNet:
    """f(x) = x . (u*u - v*v), squared loss 1/2 (f - y)^2 on n < d samples, label-noise variance s2."""

    def __init__(self, n=3, d=5, sigma=0.8, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=gen, dtype=DT)
        self.u0 = torch.randn(d, generator=gen, dtype=DT)
        self.v0 = torch.randn(d, generator=gen, dtype=DT)
        self.y = self.X @ (self.u0 ** 2 - self.v0 ** 2)       # interpolated exactly at (u0, v0)
        self.n, self.d, self.s2 = n, d, sigma ** 2

    def f(self, theta):
        u, v = theta[:self.d], theta[self.d:]
        return self.X @ (u * u - v * v)

    def loss(self, theta):
        return 0.5 * ((self.f(theta) - self.y) ** 2).mean()

    def jacobian(self, theta):
        """Analytic (n, 2d) Jacobian of f: [2 x_i * u, -2 x_i * v]."""
        u, v = theta[:self.d], theta[self.d:]
        return torch.cat([2 * self.X * u, -2 * self.X * v], dim=1)

    def noise_cov(self, theta):
        """Single-sample covariance: residual part Cov_i(r_i grad f_i) + label part s2 J^T J / n."""
        J = self.jacobian(theta)
        G = (self.f(theta) - self.y)[:, None] * J
        Gc = G - G.mean(0)
        return self.s2 * J.T @ J / self.n + Gc.T @ Gc / self.n

    def analytic_hessian(self, theta):
        """(1/n) sum_i [grad f_i grad f_i^T + r_i diag(2 x_i, -2 x_i)], written by hand."""
        J = self.jacobian(theta)
        r = self.f(theta) - self.y
        curvature = torch.cat([2 * (r[:, None] * self.X).sum(0), -2 * (r[:, None] * self.X).sum(0)])
        return J.T @ J / self.n + torch.diag(curvature) / self.n

    @property
    def zeta(self):
        return torch.cat([self.u0, self.v0])

    def problem(self):
        return Problem(self.loss, self.noise_cov, name="diagonal net, label noise")


def closed_form_label_noise_drift(net: DiagonalNet, B: int, K: int = 1, beta: float | None = None):
    """-(s2/(4B)) P grad g, g = tr H + (K-1)/(2 beta) tr F(2 beta H), by 4th-order central differences."""
    def g(theta):
        H = net.analytic_hessian(theta)
        value = torch.trace(H)
        if beta is not None and K > 1:
            lam = torch.linalg.eigvalsh(H)
            value = value + (K - 1) / (2 * beta) * psi_integral(2 * beta * lam).sum()
        return value

    zeta, h = net.zeta, 1e-3
    grad = torch.zeros_like(zeta)
    for k in range(len(zeta)):
        e = torch.zeros_like(zeta)
        e[k] = h
        grad[k] = (-g(zeta + 2 * e) + 8 * g(zeta + e) - 8 * g(zeta - e) + g(zeta - 2 * e)) / (12 * h)
    N = torch.from_numpy(scipy.linalg.null_space(net.analytic_hessian(zeta).numpy(), rcond=1e-8))
    return -(net.s2 / (4 * B)) * (N @ N.T) @ grad


@pytest.fixture(scope="module")
def net():
    return DiagonalNet()


def _assert_rel(got, ref, rtol):
    err = (got - ref).norm() / ref.norm()
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


# 4th-order differences with h = 1e-3: truncation ~h^4 = 1e-12, round-off ~1e-16/h = 1e-13,
# so 1e-6 relative leaves a wide margin and still catches any wrong factor or missing term.
def test_sgd_label_noise_drift_is_minus_grad_trace(net):
    terms = slow_sde(net.problem(), net.zeta, SGD(8))
    assert terms.rank == 3
    _assert_rel(terms.drift, closed_form_label_noise_drift(net, B=8), 1e-6)
    # S_par = 0: no diffusion and no Ito correction (up to round-off of sigma^2 H on ker H)
    assert (terms.diffusion @ terms.diffusion.T).abs().max() < 1e-14
    assert terms.ito_correction.abs().max() < 1e-12
    assert terms.drift_II.abs().max() == 0


@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("beta", [0.3, 2.0])
def test_local_sgd_label_noise_drift_matches_closed_form(net, K, beta):
    B_loc = 4
    terms = slow_sde(net.problem(), net.zeta, LocalSGD(K, B_loc, beta))
    _assert_rel(terms.drift, closed_form_label_noise_drift(net, B=K * B_loc, K=K, beta=beta), 1e-6)
    # drift-II alone is the (K-1)/(2 beta) tr F part
    sgd_part = closed_form_label_noise_drift(net, B=K * B_loc)
    _assert_rel(terms.drift_I, sgd_part, 1e-6)
    _assert_rel(terms.drift_II, closed_form_label_noise_drift(net, B=K * B_loc, K=K, beta=beta) - sgd_part, 1e-6)


def test_qsr_drift_is_k_times_sgd_with_total_batch(net):
    K, B_loc = 4, 3
    terms = slow_sde(net.problem(), net.zeta, QSR(K, B_loc))
    _assert_rel(terms.drift, K * closed_form_label_noise_drift(net, B=K * B_loc), 1e-6)
    sgd = slow_sde(net.problem(), net.zeta, SGD(K * B_loc))
    torch.testing.assert_close(terms.diffusion, sgd.diffusion)
    _assert_rel(terms.drift, K * sgd.drift, 1e-12)


def test_local_sgd_limits_in_beta(net):
    K, B_loc = 3, 4
    sgd_total = slow_sde(net.problem(), net.zeta, SGD(K * B_loc)).drift
    # beta -> 0: drift-II ~ beta x (...) vanishes; relative size ~ (K-1) beta lambda_max / 2 ~ 1e-9
    _assert_rel(slow_sde(net.problem(), net.zeta, LocalSGD(K, B_loc, 1e-10)).drift, sgd_total, 1e-6)
    # beta -> inf: psi -> 1, total drift K/(2B) = 1/(2 B_loc) scaling, i.e. SGD with batch B_loc;
    # 1 - psi(2 beta lambda_min) ~ 1/(2e10 lambda_min) with lambda_min ~ 0.1 here
    fast = slow_sde(net.problem(), net.zeta, LocalSGD(K, B_loc, 1e10)).drift
    _assert_rel(fast, slow_sde(net.problem(), net.zeta, SGD(B_loc)).drift, 1e-6)
    _assert_rel(fast, slow_sde(net.problem(), net.zeta, QSR(K, B_loc)).drift, 1e-6)


def test_local_sgd_with_one_worker_is_sgd(net):
    a = slow_sde(net.problem(), net.zeta, LocalSGD(1, 8, 0.7))
    b = slow_sde(net.problem(), net.zeta, SGD(8))
    torch.testing.assert_close(a.drift, b.drift, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- general noise, analytic Phi
class NoisyEllipsoid(ProductEllipsoid):
    """Product ellipsoid with a theta-dependent full-rank noise covariance (S_par != 0)."""

    def __init__(self):
        super().__init__([[1.0, 2.5, 0.6], [3.0, 0.7]], seed=2)
        self.C = random_spd(self.dim, seed=21)

    def noise_cov(self, theta):
        return self.C + 0.3 * torch.outer(torch.sin(theta), torch.sin(theta))

    def problem(self):
        return Problem(self.loss, self.noise_cov, project=self.project, name="noisy ellipsoid")


@pytest.fixture(scope="module")
def ellipsoid():
    toy = NoisyEllipsoid()
    return toy, toy.point_on_gamma(seed=4)


def test_sgd_drift_is_half_second_derivative_of_phi(ellipsoid):
    # Li, Wang & Arora (2022): d zeta = dPhi Sigma^1/2 dW / sqrt(B) + 1/(2B) d2Phi[Sigma] dt
    toy, zeta = ellipsoid
    B = 4
    terms = slow_sde(toy.problem(), zeta, SGD(B))
    ref = fd_second_derivative_of_phi(toy.project, zeta, toy.noise_cov(zeta)) / (2 * B)
    torch.testing.assert_close(terms.drift, ref, rtol=1e-5, atol=1e-7)   # h = 1e-4 second differences
    assert terms.ito_correction.norm() > 0.01 and terms.drift_I.norm() > 0.01


def test_diffusion_is_tangent_square_root_of_s_par(ellipsoid):
    toy, zeta = ellipsoid
    terms = slow_sde(toy.problem(), zeta, LocalSGD(2, 3, 0.5))
    H = torch.func.hessian(toy.loss)(zeta)
    N = torch.from_numpy(scipy.linalg.null_space(H.numpy(), rcond=1e-8))
    P = N @ N.T
    A = terms.diffusion
    torch.testing.assert_close(A @ A.T, P @ toy.noise_cov(zeta) @ P / 6, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(A, A.T)
    torch.testing.assert_close(P @ A, A, rtol=1e-10, atol=1e-13)
    # drift_I, drift_II tangent; Ito correction normal
    torch.testing.assert_close(P @ terms.drift_I, terms.drift_I, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(P @ terms.drift_II, terms.drift_II, rtol=1e-10, atol=1e-13)
    assert (P @ terms.ito_correction).norm() < 1e-12
    torch.testing.assert_close(terms.drift, terms.drift_I + terms.drift_II + terms.ito_correction)


def test_retraction_of_raw_increments_reproduces_the_sde(ellipsoid):
    """E[Phi(zeta + b dt + A sqrt(dt) xi)] - zeta = drift dt + O(dt^2), Cov = A A^T dt + O(dt^2).

    The expectation over xi ~ N(0, I) uses the 2D sigma points +-sqrt(D) e_k, exact for moments up
    to order 3, so the remaining error is O(dt^2) from 4th moments: halving dt halves the error.
    """
    toy, zeta = ellipsoid
    terms = slow_sde(toy.problem(), zeta, LocalSGD(3, 2, 0.8))
    D = len(zeta)
    A, b = terms.diffusion, terms.raw_drift
    errors = []
    for dt in [1e-3, 5e-4]:
        pts = [toy.project(zeta + b * dt + s * np.sqrt(D * dt) * A[:, k]) for k in range(D) for s in (1, -1)]
        pts = torch.stack(pts)
        mean_step = (pts.mean(0) - zeta) / dt
        cov = (pts - pts.mean(0)).T @ (pts - pts.mean(0)) / len(pts) / dt
        errors.append(((mean_step - terms.drift).norm() / terms.drift.norm()).item())
        torch.testing.assert_close(cov, A @ A.T, rtol=0, atol=50 * dt)
    assert errors[0] < 0.05
    assert 1.6 < errors[0] / errors[1] < 2.4                                # first order in dt


def test_batched_terms_equal_pointwise_terms(ellipsoid):
    toy, _ = ellipsoid
    zetas = torch.stack([toy.point_on_gamma(seed=s) for s in range(3)])
    for rule in [SGD(4), LocalSGD(2, 3, 0.5), QSR(3, 2)]:
        raw, diff = sde.drift_and_diffusion(toy.problem(), zetas, rule)
        assert raw.shape == (3, 5) and diff.shape == (3, 5, 5)
        for i in range(3):
            t = slow_sde(toy.problem(), zetas[i], rule)
            torch.testing.assert_close(raw[i], t.raw_drift, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(diff[i], t.diffusion, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- validation
def test_point_off_gamma_is_refused_with_the_gradient_norm(ellipsoid):
    toy, zeta = ellipsoid
    off = zeta + 1e-3 * torch.ones_like(zeta)
    norm = torch.func.grad(toy.loss)(off).norm().item()
    with pytest.raises(ValueError, match=r"not on Gamma.*sde.project") as info:
        slow_sde(toy.problem(), off, SGD(4))
    assert f"{norm:.3e}" in str(info.value)
    slow_sde(toy.problem(), off, SGD(4), check=False)                    # allowed when asked
    slow_sde(toy.problem(), off, SGD(4), gradient_tol=1.0)


def test_bad_inputs_are_refused(ellipsoid):
    toy, zeta = ellipsoid
    with pytest.raises(ValueError, match="rule"):
        slow_sde(toy.problem(), zeta, "sgd")
    with pytest.raises(ValueError, match="shape"):
        slow_sde(toy.problem(), zeta[None], SGD(4))
    with pytest.raises(ValueError, match="floating"):
        slow_sde(toy.problem(), torch.zeros(5, dtype=torch.int64), SGD(4))
    with pytest.raises(ValueError, match="problem"):
        slow_sde(toy.loss, zeta, SGD(4))
    with pytest.raises(ValueError, match="callable"):
        Problem(loss=3.0, noise_cov=toy.noise_cov)
