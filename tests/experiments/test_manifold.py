"""experiments.manifold: the matrix-free (conjugate-gradient) projection onto Gamma on real CIFAR-10.

Setting: 20 real images (two per class) avg-pooled to 4x4, a float64 GELU MLP 48 -> 24 -> 10
(D = 1,426 > N C = 200). Dense references: the output Jacobian (`sde.label_noise.output_jacobian`)
and the dense Gauss-Newton projection `project_to_manifold`. Runtime: a few seconds on one thread.
"""
import pytest
import torch

from experiments.manifold import (GramPreconditionerMF, GramSolveNotConverged, cifar_subset, gram_solve_cg,
                                  per_sample_gram_blocks, project_to_manifold, project_to_manifold_cg)
from sde.label_noise import output_jacobian
from tests.experiments.test_drift_check import tiny_mlp_objective


_objective = tiny_mlp_objective   # the float64 GELU MLP 48 -> 24 -> 10 of test_drift_check


@pytest.fixture(scope="module")
def small(cifar10_dir):
    x, y = cifar_subset(cifar10_dir, 20, image_size=4)
    return _objective(x, y)


def _dense_gram(obj, theta):
    _, jac = output_jacobian(obj, theta)
    flat = jac.reshape(-1, obj.dim)
    return jac, flat @ flat.T


def test_per_sample_blocks_and_preconditioner_match_dense_gram(small):
    obj = small
    theta = obj.params
    jac, gram = _dense_gram(obj, theta)
    blocks = per_sample_gram_blocks(obj, theta, chunk_size=7)     # chunks smaller than N: exercise the loop
    torch.testing.assert_close(blocks, jac @ jac.transpose(1, 2), rtol=1e-12, atol=1e-12)
    # M^-1 is symmetric positive definite, and with rank N C - 1 the Nystrom part captures the scaled
    # Gram's top: all but two preconditioned eigenvalues collapse onto lambda_l (seen: 197 of 200
    # within 1e-3; the remaining two are the Nystrom error at the bottom of the spectrum)
    for rank in (0, 199):
        pre = GramPreconditionerMF.at(obj, theta, rank=rank, block=64, generator=torch.Generator().manual_seed(0))
        eye = torch.eye(200, dtype=torch.float64)
        m_inv = torch.stack([pre.apply(e.reshape(20, 10)).reshape(-1) for e in eye], dim=1)
        torch.testing.assert_close(m_inv, m_inv.T, rtol=0, atol=1e-10 * m_inv.abs().max().item())
        vals = torch.linalg.eigvals(m_inv @ gram).real.sort().values
        assert vals[0] > 0
        kappa = (vals[-1] / vals[0]).item()
        if rank == 0:
            plain = kappa
        else:
            assert (vals[-2] / vals[1]).item() < 1.01 and kappa < plain / 10
    with pytest.raises(ValueError, match="rank"):
        GramPreconditionerMF.at(obj, theta, rank=200)


def test_cg_gram_solve_equals_dense_solve(small):
    obj = small
    theta = obj.params
    _, gram = _dense_gram(obj, theta)
    r = torch.randn(20, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pre = GramPreconditionerMF.at(obj, theta, rank=50)
    a, iters = gram_solve_cg(obj, theta, r, pre, rtol=1e-12, max_iter=2000)
    exact = torch.linalg.solve(gram, r.reshape(-1))
    # relative residual 1e-12 bounds the error by 1e-12 x cond(G) (cond ~ 1e5 here)
    torch.testing.assert_close(a.reshape(-1), exact, rtol=0, atol=1e-6 * exact.abs().max().item())
    assert (gram @ a.reshape(-1) - r.reshape(-1)).norm() <= 1e-11 * r.norm()
    assert 1 <= iters < 200                                           # exact arithmetic: at most N C steps
    with pytest.raises(GramSolveNotConverged, match="did not converge"):
        gram_solve_cg(obj, theta, r, pre, rtol=1e-12, max_iter=1)


def test_cg_projection_lands_on_gamma_and_equals_dense_projection(small):
    obj = small
    start = obj.params
    dense, rep_dense = project_to_manifold(obj, start, tol=1e-20, max_gauss_newton=60)
    cg, rep_cg = project_to_manifold_cg(obj, start, tol=1e-20, max_gauss_newton=60, cg_rtol=1e-13,
                                        preconditioner_rank=40)
    assert rep_cg.converged and obj.loss(cg).item() <= 1e-20
    assert rep_cg.initial_loss > 1.0                                  # it really started far from Gamma
    assert len(rep_cg.cg_iterations) == rep_cg.gauss_newton_steps
    # the same minimum-norm Gauss-Newton iteration, solved to 1e-13: the same point of Gamma
    torch.testing.assert_close(cg, dense, rtol=0, atol=1e-9)
    assert rep_cg.gauss_newton_steps == rep_dense.gauss_newton_steps
    # near Gamma, with a loose inexact-Newton tolerance and a preconditioner built elsewhere: the
    # projection Phi of a kicked point agrees with the dense one to the tolerance of L (1e-10 ->
    # residual ~1e-5 per output, moved distance error of the same order)
    kick = 1e-3 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = project_to_manifold(obj, dense + kick, tol=1e-22, max_gauss_newton=60)
    pre = GramPreconditionerMF.at(obj, dense, rank=20)
    got, rep = project_to_manifold_cg(obj, dense + kick, tol=1e-22, max_gauss_newton=60, cg_rtol=1e-3,
                                      preconditioner=pre)
    assert rep.converged and rep.gauss_newton_steps >= 2
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)


def test_cg_projection_guards(small, cifar10_dir):
    obj = small
    with pytest.raises(ValueError, match="cg_rtol"):
        project_to_manifold_cg(obj, cg_rtol=1.5)
    with pytest.raises(ValueError, match="gd_lr"):
        project_to_manifold_cg(obj, gd_steps=2)
    with pytest.raises(RuntimeError, match="projection onto Gamma failed"):
        project_to_manifold_cg(obj, max_gauss_newton=1, cg_rtol=1e-3)
    x, y = cifar_subset(cifar10_dir, 200, image_size=4)             # N C = 2,000 equations, D = 1,426
    with pytest.raises(ValueError, match="exceed D"):
        project_to_manifold_cg(_objective(x, y))


def test_cg_warm_start_and_callback_track_the_tangent_projection(small):
    """r = J v: the callback's J^T a_k is the CG iterate's J^T a (checked against dense J at the end),
    ||v - J^T a_k||^2 decreases monotonically to ||P v||^2 (CG minimizes ||J^T (a_k - a*)||, Craig's
    method), and a warm start from a nearby right-hand side's solution saves iterations."""
    obj = small
    theta = obj.params
    jac, gram = _dense_gram(obj, theta)
    flat = jac.reshape(-1, obj.dim)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pv = v - flat.T @ torch.linalg.solve(gram, flat @ v)                    # dense tangent projection
    pre = GramPreconditionerMF.at(obj, theta, rank=20)
    seen = []
    a, iters = gram_solve_cg(obj, theta, (flat @ v).reshape(20, 10), pre, rtol=1e-12, max_iter=2000,
                             callback=lambda it, rel, jta: seen.append((it, rel, float((v - jta) @ (v - jta)),
                                                                        jta.clone())))
    assert [s[0] for s in seen] == list(range(iters + 1)) and seen[0][1] == 1.0
    torch.testing.assert_close(seen[-1][3], flat.T @ a.reshape(-1), rtol=0, atol=1e-10 * v.norm().item())
    sq = torch.tensor([s[2] for s in seen], dtype=torch.float64)
    assert sq[0] == pytest.approx(float(v @ v), rel=1e-14)
    # monotone up to rounding (1e-12 relative: sums over D = 1,426 terms of size ||v||^2)
    assert (sq[1:] <= sq[:-1] + 1e-12 * sq[0]).all()
    assert sq[-1].item() == pytest.approx(float(pv @ pv), rel=1e-9)
    # warm start: from the exact solution no iteration; from a nearby right-hand side's solution fewer
    a0, zero = gram_solve_cg(obj, theta, (flat @ v).reshape(20, 10), pre, rtol=1e-8, max_iter=2000, x0=a)
    assert zero == 0 and torch.equal(a0, a)
    w = v + 1e-4 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rw = (flat @ w).reshape(20, 10)
    cold, n_cold = gram_solve_cg(obj, theta, rw, pre, rtol=1e-11, max_iter=2000)
    warm, n_warm = gram_solve_cg(obj, theta, rw, pre, rtol=1e-11, max_iter=2000, x0=a)
    assert n_warm < n_cold
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-6 * cold.abs().max().item())   # both to 1e-11 x cond
    with pytest.raises(ValueError, match="x0"):
        gram_solve_cg(obj, theta, rw, pre, rtol=1e-8, max_iter=10, x0=a.reshape(-1))
    # Tikhonov shift: the solution of (J J^T + mu I) a = r (mu = 1e-3 x the smallest Gram eigenvalue
    # moves the solution visibly, by ~1e-3 relative, so the comparison tests that the shift is applied)
    mu = 1e-3 * torch.linalg.eigvalsh(gram)[0].item()
    shifted, _ = gram_solve_cg(obj, theta, rw, pre, rtol=1e-12, max_iter=2000, shift=mu)
    exact = torch.linalg.solve(gram + mu * torch.eye(200, dtype=torch.float64), rw.reshape(-1))
    torch.testing.assert_close(shifted.reshape(-1), exact, rtol=0, atol=1e-6 * exact.abs().max().item())
    assert (shifted - cold).abs().max() > 1e-5 * exact.abs().max()
    assert gram_solve_cg(obj, theta, rw, pre, rtol=1e-10, max_iter=10, x0=shifted, shift=mu)[1] == 0
    with pytest.raises(ValueError, match="shift"):
        gram_solve_cg(obj, theta, rw, pre, rtol=1e-8, max_iter=10, shift=-1.0)
