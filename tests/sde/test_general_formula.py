"""sde.general_formula: flipped-label cross-entropy, Sigma = H on Gamma, and the general formula (dense
exact Sigma by enumerating labels, matrix-free, kernel and Monte Carlo routes) against the closed form of
`sde.label_noise` with the flip metric, on a tiny float64 network.

The point: soft targets q of flip probability 0.2 (C = 3: q = (0.8, 0.1, 0.1), exact enumeration by
replicating draws 8:1:1), and the last layer solved (minimum norm) so that softmax(f_i) = q_i exactly.
"""
import pytest
import torch
from torch import nn
from torch.func import hessian

from dynamics.objective import Objective
from experiments.datasets import flip_labels
from sde import blocks
from sde.general_formula import (dense_flip_problem, exact_noise_in_basis, general_rates, hessian_derivative_in_basis,
                                 monte_carlo_rate, noise_projections, rate_kernel, sampled_noise_objective)
from sde.label_noise import (OutputMetric, centred_basis, gauss_newton_geometry, label_noise_drift, metric_roots,
                             predict_rates, sharpness_gradients)
from sde.matrix_free import MatrixFreeProblem
from sde.rules import QSR, SGD, LocalSGD
from sde.slow_sde import slow_sde

C, N, P_FLIP = 3, 4, 0.2
RANK = N * (C - 1)


def soft_ce(out, q):
    return -(q * torch.log_softmax(out, -1)).sum(-1).mean()


def one_hot(labels):
    return torch.nn.functional.one_hot(labels, C).double()


def draw(q, generator):
    """One flipped-label draw per row of soft targets q (M, C), as one-hot targets."""
    return one_hot(flip_labels(q.argmax(-1), P_FLIP, C, generator))


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, C)).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.7)
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    q = torch.full((N, C), P_FLIP / (C - 1), dtype=torch.float64).scatter(1, y[:, None], 1 - P_FLIP)
    with torch.no_grad():                                     # last layer on Gamma: [h, 1] [W; b] = log q
        h = torch.cat([model[1](model[0](x)), torch.ones(N, 1, dtype=torch.float64)], 1)
        wb = torch.linalg.pinv(h) @ q.log()
        model[2].weight.copy_(wb[:-1].T)
        model[2].bias.copy_(wb[-1])
    obj = Objective(model, soft_ce, [(x, q)])
    zeta = obj.params
    Q = centred_basis(C, q.dtype, q.device)
    geometry = gauss_newton_geometry(obj, zeta, metric=OutputMetric(Q, metric_roots(q, Q)))
    return model, x, y, q, obj, zeta, geometry, sharpness_gradients(obj, geometry)


def _replicated_noise_objective(model, x, y):
    """Objective whose per-sample-gradient covariance is the EXACT Sigma (counts 8:1:1 = q x 10)."""
    xs, ls = [], []
    for i in range(N):
        for c in range(C):
            count = 8 if c == int(y[i]) else 1
            xs += [x[i]] * count
            ls += [c] * count
    return Objective(model, soft_ce, [(torch.stack(xs), one_hot(torch.tensor(ls)))])


def test_point_is_on_gamma(tiny):
    _, x, _, q, obj, zeta, _, _ = tiny
    assert torch.allclose(torch.softmax(obj.forward(zeta, x), -1), q, atol=1e-13, rtol=0)
    assert obj.grad(zeta).norm() < 1e-12


def test_sigma_equals_hessian_on_gamma_and_not_off_it(tiny):
    obj, zeta = tiny[4], tiny[5]
    problem = dense_flip_problem(obj)
    H = hessian(problem.loss)(zeta)
    S = problem.noise_cov(zeta)
    # on Gamma: Fisher = Hessian, to round-off (both ~1e-1 in norm)
    assert (S - H).norm() <= 1e-10 * H.norm()
    # and Sigma lives in the normal space: P Sigma = 0
    P = blocks.tangent_projector(blocks.hessian_eigen(H, rank=RANK))
    assert (P @ S).norm() <= 1e-10 * S.norm()
    # off Gamma they differ by far more than round-off
    off = zeta + 0.3 * torch.randn(zeta.shape, generator=torch.Generator().manual_seed(3), dtype=zeta.dtype)
    H_off, S_off = hessian(problem.loss)(off), problem.noise_cov(off)
    assert (S_off - H_off).norm() > 1e-3 * H_off.norm()


@pytest.mark.parametrize("rule", [SGD(4), LocalSGD(3, 2, 0.7), QSR(3, 2)], ids=["sgd", "local", "qsr"])
def test_general_formula_against_dense_reference(tiny, rule):
    model, x, y, _, obj, zeta, geometry, grads = tiny
    dense = slow_sde(dense_flip_problem(obj), zeta, rule, rank=RANK, gradient_tol=1e-9)
    mf = MatrixFreeProblem(obj, rank=RANK, noise_obj=_replicated_noise_objective(model, x, y), eig_tol=1e-10,
                           generator=torch.Generator().manual_seed(0))
    terms = slow_sde(mf, zeta, rule, gradient_tol=1e-9)
    scale = dense.drift.norm()
    assert scale > 1e-6
    # float64, exact rank, Lanczos to 1e-10: agreement to ~1e-8 relative; tolerance 1e-6
    assert (terms.drift - dense.drift).norm() <= 1e-6 * scale
    assert (terms.drift_I - dense.drift_I).norm() <= 1e-6 * scale
    # no diffusion: the noise is normal
    assert dense.diffusion.norm() <= 1e-6 * scale and terms.diffusion.norm() <= 1e-6 * scale
    # the closed form (Sigma = H, noise_scale 1) is the same drift on Gamma
    closed = label_noise_drift(obj, geometry, rule, noise_scale=1.0)
    assert (closed - dense.drift).norm() <= 1e-6 * scale
    rates = general_rates(mf, zeta, rule, grads, gradient_tol=1e-9)
    closed_rates = predict_rates(obj, geometry, rule, noise_scale=1.0, gradients=grads)
    assert rates.trace_rate == pytest.approx(closed_rates.trace_rate, rel=1e-6)
    assert rates.lambda_max_rate == pytest.approx(closed_rates.lambda_max_rate, rel=1e-6)
    assert rates.diffusion_sq <= 1e-12 * float(scale) ** 2
    assert rates.drift_norm == pytest.approx(float(terms.drift.norm()), rel=1e-12)


def test_closed_form_rates_match_dense_trace_gradient(tiny):
    obj, zeta, geometry, grads = tiny[4:]
    problem = dense_flip_problem(obj)
    H = hessian(problem.loss)(zeta)
    P = blocks.tangent_projector(blocks.hessian_eigen(H, rank=RANK))
    dense_grad = P @ blocks.third_order(problem.loss, zeta, torch.eye(len(zeta), dtype=zeta.dtype))
    assert torch.allclose(grads.trace, dense_grad, rtol=0, atol=1e-8 * dense_grad.norm())
    assert abs(geometry.trace - float(torch.linalg.eigvalsh(H).clamp_min(0).sum())) <= 1e-10 * geometry.trace
    rule = SGD(4)
    drift = slow_sde(problem, zeta, rule, rank=RANK, gradient_tol=1e-9).drift
    rates = predict_rates(obj, geometry, rule, noise_scale=1.0, gradients=grads)
    assert rates.trace_rate == pytest.approx(float(dense_grad @ drift), rel=1e-7)


def test_kernel_rate_matches_closed_form(tiny):
    obj, zeta, geometry, grads = tiny[4:]
    U = geometry.hessian_eigenvectors(len(geometry.eigenvalues))
    dH = hessian_derivative_in_basis(obj, zeta, grads.trace, U)
    exact = exact_noise_in_basis(obj, zeta, U)
    assert torch.allclose(exact, torch.diag(geometry.eigenvalues), atol=1e-11, rtol=0)   # Sigma = H
    for rule in (SGD(4), LocalSGD(3, 2, 0.7)):
        K = rate_kernel(rule, geometry.eigenvalues, dH)
        closed = predict_rates(obj, geometry, rule, noise_scale=1.0, gradients=grads).trace_rate
        # central differences in float64: ~1e-8 relative
        assert float((K * exact).sum()) == pytest.approx(closed, rel=1e-6)


def test_monte_carlo_sigma_mean_matches_exact(tiny):
    obj, zeta, geometry, grads = tiny[4:]
    U = geometry.hessian_eigenvectors(len(geometry.eigenvalues))
    exact = exact_noise_in_basis(obj, zeta, U)
    gen = torch.Generator().manual_seed(7)
    estimates = []
    for _ in range(20):
        noise = sampled_noise_objective(obj, 2000, draw=draw, generator=gen)
        c = noise_projections(noise, zeta, U)
        cc = c - c.mean(0)
        estimates.append(cc.T @ cc / len(c))
    est = torch.stack(estimates)
    mean, se = est.mean(0), est.std(0) / len(est) ** 0.5
    # centred by the sample mean: E = (M-1)/M Sigma (2000 draws: 5e-4 bias, inside the band)
    z = ((mean - exact) / (se + 1e-15)).abs()
    assert float(z.max()) < 4.5           # 64 entries, 4.5 sigma: a false failure has p < 1e-3
    assert float((mean - exact).norm() / exact.norm()) < 0.02
    # every sampled gradient is normal on Gamma: P g = 0
    G = noise.per_sample_grads(zeta)
    tangent = G - (G @ U) @ U.T
    assert tangent.norm() <= 1e-9 * G.norm()
    # the per-draw standard error brackets the kernel rate's spread
    dH = hessian_derivative_in_basis(obj, zeta, grads.trace, U)
    K = rate_kernel(SGD(4), geometry.eigenvalues, dH)
    mc = monte_carlo_rate(K, noise_projections(noise, zeta, U), exact)
    assert abs(mc.estimate - mc.exact) < 5 * mc.stderr and mc.num_draws == 2000


def test_bad_input(tiny):
    obj, zeta = tiny[4], tiny[5]
    with pytest.raises(ValueError, match="num_draws"):
        sampled_noise_objective(obj, 1, draw=draw, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise_obj has D"):
        other = Objective(nn.Linear(2, 2).double(), soft_ce, [(torch.zeros(1, 2, dtype=torch.float64),
                                                               one_hot(torch.tensor([0])))])
        MatrixFreeProblem(obj, rank=2, noise_obj=other)
    U = torch.eye(len(zeta), dtype=zeta.dtype)[:, :3]
    with pytest.raises(ValueError, match="direction must be"):
        hessian_derivative_in_basis(obj, zeta, zeta[:5], U)
