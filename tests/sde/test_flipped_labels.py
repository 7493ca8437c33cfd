"""Flipped-label cross-entropy (sde.flipped_labels): noise model, Sigma = H on Gamma, predictions
against a dense float64 reference on a tiny network (exact Sigma by enumerating labels)."""
import pytest
import torch
from torch import nn
from torch.func import hessian

from dynamics.objective import Objective
from experiments.flipped_labels import project_to_flip_manifold
from sde import blocks
from sde.flipped_labels import (check_flip_probability, closed_form_drift, closed_form_rates, dense_flip_problem,
                                exact_noise_in_basis, flip_geometry, flip_labels, flip_sharpness_gradients,
                                general_rates, hessian_derivative_in_basis, monte_carlo_rate, noise_projections,
                                rate_kernel, sampled_noise_objective, soft_cross_entropy, soft_target_objective,
                                soft_targets)
from sde.matrix_free import MatrixFreeProblem
from sde.rules import QSR, SGD, LocalSGD
from sde.slow_sde import slow_sde

C, N, P_FLIP = 3, 4, 0.2          # q = (0.8, 0.1, 0.1): exact enumeration by replicating draws 8:1:1


def _tiny():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, C)).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.7)
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    obj = soft_target_objective(model, x, y, P_FLIP, num_classes=C)
    theta = obj.params
    for _ in range(300):                                     # get near Gamma, then project
        theta = theta - 0.5 * obj.grad(theta)
    zeta, report = project_to_flip_manifold(obj, theta, tol=1e-12)
    return model, x, y, obj, zeta, report


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _replicated_noise_objective(model, x, y):
    """Objective whose per-sample-gradient covariance is the EXACT Sigma (counts 8:1:1 = q x 10)."""
    xs, ls = [], []
    for i in range(N):
        for c in range(C):
            count = 8 if c == int(y[i]) else 1
            xs += [x[i]] * count
            ls += [c] * count
    return Objective(model, soft_cross_entropy, [(torch.stack(xs), torch.tensor(ls))])


def test_projection_reaches_gamma(tiny):
    model, x, y, obj, zeta, report = tiny
    assert report.converged and report.residual <= 1e-12
    probs = torch.softmax(obj.forward(zeta, x), -1)
    q = soft_targets(y, P_FLIP, C)
    assert torch.allclose(probs, q, atol=1e-12, rtol=0)
    assert obj.grad(zeta).norm() < 1e-11


def test_sigma_equals_hessian_on_gamma_and_not_off_it(tiny):
    model, x, y, obj, zeta, _ = tiny
    problem = dense_flip_problem(obj)
    H = hessian(problem.loss)(zeta)
    S = problem.noise_cov(zeta)
    # on Gamma: Fisher = Hessian, to round-off (both ~1e-1 in norm)
    assert (S - H).norm() <= 1e-10 * H.norm()
    # and Sigma lives in the normal space: P Sigma = 0
    eig = blocks.hessian_eigen(H, rank=N * (C - 1))
    P = blocks.tangent_projector(eig)
    assert (P @ S).norm() <= 1e-10 * S.norm()
    # off Gamma they differ by far more than round-off
    off = zeta + 0.3 * torch.randn(zeta.shape, generator=torch.Generator().manual_seed(3), dtype=zeta.dtype)
    H_off, S_off = hessian(problem.loss)(off), problem.noise_cov(off)
    assert (S_off - H_off).norm() > 1e-3 * H_off.norm()


@pytest.mark.parametrize("rule", [SGD(4), LocalSGD(3, 2, 0.7), QSR(3, 2)], ids=["sgd", "local", "qsr"])
def test_general_formula_against_dense_reference(tiny, rule):
    model, x, y, obj, zeta, _ = tiny
    r = N * (C - 1)
    dense = slow_sde(dense_flip_problem(obj), zeta, rule, rank=r, gradient_tol=1e-9)
    mf = MatrixFreeProblem(obj, rank=r, noise_obj=_replicated_noise_objective(model, x, y), eig_tol=1e-10,
                           generator=torch.Generator().manual_seed(0))
    terms = slow_sde(mf, zeta, rule, gradient_tol=1e-9)
    scale = dense.drift.norm()
    assert scale > 1e-6
    # float64, exact rank, Lanczos to 1e-10: agreement to ~1e-8 relative; tolerance 1e-6
    assert (terms.drift - dense.drift).norm() <= 1e-6 * scale
    assert (terms.drift_I - dense.drift_I).norm() <= 1e-6 * scale
    # no diffusion: the noise is normal
    assert dense.diffusion.norm() <= 1e-6 * scale and terms.diffusion.norm() <= 1e-6 * scale
    # the closed form (Sigma = H) is the same drift on Gamma
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    closed = closed_form_drift(obj, geometry, rule)
    assert (closed - dense.drift).norm() <= 1e-6 * scale
    grads = flip_sharpness_gradients(obj, geometry)
    rates = general_rates(mf, zeta, rule, grads, gradient_tol=1e-9)
    assert rates.trace_rate == pytest.approx(closed_form_rates(obj, geometry, rule, gradients=grads).trace_rate, rel=1e-6)
    assert rates.diffusion_sq <= 1e-12 * float(scale) ** 2


def test_closed_form_rates_match_dense_trace_gradient(tiny):
    _, _, _, obj, zeta, _ = tiny
    problem = dense_flip_problem(obj)
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    grads = flip_sharpness_gradients(obj, geometry)
    # dense grad tr H, projected on the tangent space
    H = hessian(problem.loss)(zeta)
    P = blocks.tangent_projector(blocks.hessian_eigen(H, rank=N * (C - 1)))
    dense_grad = P @ blocks.third_order(problem.loss, zeta, torch.eye(len(zeta), dtype=zeta.dtype))
    assert torch.allclose(grads.trace, dense_grad, rtol=0, atol=1e-8 * dense_grad.norm())
    assert abs(geometry.trace - float(torch.linalg.eigvalsh(H).clamp_min(0).sum())) <= 1e-10 * geometry.trace
    rule = SGD(4)
    drift = slow_sde(problem, zeta, rule, rank=N * (C - 1), gradient_tol=1e-9).drift
    rates = closed_form_rates(obj, geometry, rule, gradients=grads)
    assert rates.trace_rate == pytest.approx(float(dense_grad @ drift), rel=1e-7)


def test_kernel_rate_matches_closed_form(tiny):
    _, _, _, obj, zeta, _ = tiny
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    grads = flip_sharpness_gradients(obj, geometry)
    U = geometry.hessian_eigenvectors(len(geometry.eigenvalues))
    dH = hessian_derivative_in_basis(obj, zeta, grads.trace, U)
    exact = exact_noise_in_basis(obj, zeta, U)
    assert torch.allclose(exact, torch.diag(geometry.eigenvalues), atol=1e-11, rtol=0)   # Sigma = H
    for rule in (SGD(4), LocalSGD(3, 2, 0.7)):
        K = rate_kernel(rule, geometry.eigenvalues, dH)
        closed = closed_form_rates(obj, geometry, rule, gradients=grads).trace_rate
        # central differences in float64: ~1e-8 relative
        assert float((K * exact).sum()) == pytest.approx(closed, rel=1e-6)


def test_monte_carlo_sigma_mean_matches_exact(tiny):
    model, x, y, obj, zeta, _ = tiny
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    U = geometry.hessian_eigenvectors(len(geometry.eigenvalues))
    exact = exact_noise_in_basis(obj, zeta, U)
    gen = torch.Generator().manual_seed(7)
    estimates = []
    for _ in range(20):
        noise = sampled_noise_objective(model, x, y, P_FLIP, 2000, generator=gen, num_classes=C)
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
    dH = hessian_derivative_in_basis(obj, zeta, flip_sharpness_gradients(obj, geometry).trace, U)
    K = rate_kernel(SGD(4), geometry.eigenvalues, dH)
    mc = monte_carlo_rate(K, noise_projections(noise, zeta, U), exact)
    assert abs(mc.estimate - mc.exact) < 5 * mc.stderr


def test_flip_frequency_and_uniform_other_class():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (200_000,), generator=gen)
    flipped = flip_labels(labels, 0.1, 10, generator=gen)
    changed = flipped != labels
    rate = changed.double().mean().item()
    # binomial s.e. sqrt(0.1 x 0.9 / 2e5) = 6.7e-4: 5 s.e.
    assert abs(rate - 0.1) < 3.4e-3
    shift = (flipped[changed] - labels[changed]) % 10
    counts = torch.bincount(shift, minlength=10).double()
    assert counts[0] == 0
    expected = changed.sum() / 9
    # each of 9 shifts ~ 2,222 +/- 47: 5 s.e.
    assert float((counts[1:] - expected).abs().max()) < 5 * float(expected.sqrt())
    assert torch.equal(flip_labels(labels, 0.0, 10, generator=gen), labels)


def test_soft_targets_rows():
    q = soft_targets(torch.tensor([0, 2]), 0.3, 4)
    assert torch.allclose(q, torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]], dtype=torch.float64))


@pytest.mark.parametrize("p", [-0.1, 0.9, 0.95, float("nan")])
def test_bad_flip_probability(p):
    with pytest.raises(ValueError, match="flip probability p"):
        check_flip_probability(p, 10)
    with pytest.raises(ValueError, match="flip probability p"):
        soft_targets(torch.tensor([0, 1]), p, 10)


def test_bad_shapes(tiny):
    model, x, y, obj, zeta, _ = tiny
    with pytest.raises(ValueError, match="1-D integer"):
        soft_targets(torch.zeros(3, 2, dtype=torch.int64), 0.1, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        soft_targets(torch.tensor([0, 5]), 0.1, 3)
    with pytest.raises(ValueError, match="samples but labels"):
        soft_target_objective(model, x, y[:2], 0.1, num_classes=C)
    with pytest.raises(ValueError, match="num_draws"):
        sampled_noise_objective(model, x, y, 0.1, 1, generator=torch.Generator(), num_classes=C)
    with pytest.raises(ValueError, match="not on Gamma"):
        flip_geometry(obj, zeta + 0.1)
    with pytest.raises(ValueError, match="noise_obj has D"):
        other = Objective(nn.Linear(2, 2).double(), soft_cross_entropy, [(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]))])
        MatrixFreeProblem(obj, rank=2, noise_obj=other)
    U = torch.eye(len(zeta), dtype=zeta.dtype)[:, :3]
    with pytest.raises(ValueError, match="direction must be"):
        hessian_derivative_in_basis(obj, zeta, zeta[:5], U)
