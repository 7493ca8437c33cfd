"""Toy problems: their closed forms against `sde.slow_sde` (automatic differentiation of the
general formulas of THEORY.md) and against dense autograd references.

Budget: about 15 s on one thread.
"""
import math

import pytest
import torch
from torch.func import hessian

from sde.rules import QSR, SGD, LocalSGD
from sde.slow_sde import slow_sde
from sde.toys import DiagonalNet, RankOneFactorization, Sphere

RULES = [SGD(4), LocalSGD(2, 2, 0.3), LocalSGD(4, 1, 1.5), QSR(2, 2)]


pytestmark = pytest.mark.usefixtures("float64_default")


def _net():
    X = torch.tensor([[0.8, 0.0], [0.0, 1.0], [1.2, 0.0], [0.0, -0.5]])
    return DiagonalNet(X, torch.tensor([0.5, -0.3]), sigma=0.7)


def _factorization():
    return RankOneFactorization(torch.tensor([1.0, 0.5, -0.7]), torch.tensor([0.8, -0.4]), sigma=0.5)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_diagonal_net_drift_matches_slow_sde(rule):
    net = _net()
    zeta = net.point_on_gamma(torch.tensor([0.4, -0.25]))
    terms = slow_sde(net.problem, zeta, rule)
    assert _rel(terms.drift, net.drift(zeta, rule)) < 1e-6
    assert float(terms.diffusion.abs().max()) < 1e-7      # label noise: S_par = 0 on Gamma
    # the closed-form log-rate of p_i = u_i v_i is grad p_i . drift
    u, v = net.split(zeta)
    dp = v * terms.drift[:2] + u * terms.drift[2:]
    assert _rel(dp / (u * v), net.log_rate(zeta, rule)) < 1e-6


def test_diagonal_net_sgd_log_rate_and_local_sgd_weights():
    net = _net()
    zeta = net.point_on_gamma(torch.tensor([0.4, -0.25]))
    # d log p_i/dt = -4 sigma^2 m_i / B with m_i = mean_j x_ji^2
    m = torch.tensor([(0.64 + 1.44) / 4, (1.0 + 0.25) / 4])
    torch.testing.assert_close(net.log_rate(zeta, SGD(4)), -4 * 0.49 * m / 4, rtol=1e-12, atol=0)
    torch.testing.assert_close(net.log_rate(zeta, QSR(2, 2)), 2 * net.log_rate(zeta, SGD(4)), rtol=1e-12, atol=0)
    lam = net.eigenvalues(zeta)
    dense = torch.linalg.eigvalsh(hessian(net.loss)(zeta))
    torch.testing.assert_close(dense[-2:], lam.sort().values, rtol=1e-10, atol=0)
    local = net.log_rate(zeta, LocalSGD(2, 2, 0.3)) / net.log_rate(zeta, SGD(4))
    psi = lambda x: (math.exp(-x) - 1 + x) / x
    expected = torch.tensor([1 + psi(0.6 * float(l)) for l in lam])
    torch.testing.assert_close(local, expected, rtol=1e-12, atol=0)


def test_label_noise_covariance_is_sigma2_hessian_on_gamma():
    for toy, zeta in [(_net(), _net().point_on_gamma(torch.tensor([0.4, -0.25]))),
                      (_factorization(), _factorization().point_on_gamma(1.3))]:
        H = hessian(toy.loss)(zeta)
        torch.testing.assert_close(toy.noise_cov(zeta), toy.sigma ** 2 * H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [_net, _factorization], ids=["diagonal-net", "factorization"])
def test_sample_gradient_mean_and_covariance_off_gamma(make):
    toy = make()
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(toy.dim, generator=g) * 0.5 + 0.3
    draws = toy.sample_gradient(theta.expand(200_000, -1), 1, g)
    mean_grad = torch.func.grad(toy.loss)(theta)
    cov = toy.noise_cov(theta)
    se = torch.sqrt(torch.diagonal(cov) / draws.shape[0])
    # 5 standard errors per coordinate: a false alarm has probability < 1e-5 per coordinate.
    assert bool(((draws.mean(0) - mean_grad).abs() <= 5 * se + 1e-12).all())
    # covariance entries: relative Frobenius error of an empirical covariance over 2e5 draws is
    # about sqrt(2/2e5) x (kurtosis factor ~3) ~ 1e-2; 4e-2 leaves a margin.
    emp = torch.cov(draws.T)
    assert _rel(emp, cov) < 4e-2


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_sphere_is_brownian_motion_for_every_rule(rule):
    sphere = Sphere(radius=1.5, noise=0.7, dim=3)
    zeta = sphere.project(torch.tensor([0.3, -0.5, 0.9]))
    terms = slow_sde(sphere.problem, zeta, rule)
    assert _rel(terms.drift, sphere.drift(zeta, rule)) < 1e-6
    AAt = terms.diffusion @ terms.diffusion.T
    assert _rel(AAt, sphere.diffusion_covariance(zeta, rule)) < 1e-6
    assert sphere.decay_rate(rule) == pytest.approx(2 * 0.7 / (2 * rule.total_batch * 1.5 ** 2), rel=1e-12)


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_factorization_drift_and_trace_rate(rule):
    mf = _factorization()
    zeta = mf.point_on_gamma(1.3)
    terms = slow_sde(mf.problem, zeta, rule)
    assert _rel(terms.drift, mf.drift(zeta, rule)) < 1e-6
    trace = lambda th: torch.trace(hessian(mf.loss)(th))
    assert float(trace(zeta)) == pytest.approx(float(mf.hessian_trace(zeta)), rel=1e-12)
    rate = torch.dot(torch.func.grad(trace)(zeta), terms.drift)
    assert float(rate) == pytest.approx(float(mf.trace_rate(zeta, rule)), rel=1e-6)
    if isinstance(rule, SGD):
        u, v = mf.split(zeta)
        nu, nv = float(u @ u), float(v @ v)
        closed = -(0.25 / 4) * (nu / 3 - nv / 2) ** 2 / (nu + nv)
        assert float(rate) == pytest.approx(closed, rel=1e-10)


def test_factorization_balance_closed_forms():
    mf = _factorization()
    zeta = mf.point_on_gamma(1.3)
    torch.testing.assert_close(mf.point_with_balance(mf.balance(zeta)), zeta, rtol=0, atol=1e-14)
    for rule in RULES:
        drift = slow_sde(mf.problem, zeta, rule).drift
        grad_balance = torch.func.grad(mf.balance)(zeta)
        assert float(mf.balance_rate(zeta, rule)) == pytest.approx(float(grad_balance @ drift), rel=1e-6)


def test_diagonal_net_rejects_non_orthogonal_design():
    with pytest.raises(ValueError, match="orthogonal"):
        DiagonalNet(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.zeros(2), sigma=1.0)
    with pytest.raises(ValueError, match="sigma"):
        DiagonalNet(torch.eye(2), torch.zeros(2), sigma=0.0)
