"""Matrix-free slow-SDE terms against the dense problem built from the same small network.

The network is tests/reference.py's tiny tanh MLP (D = 66) with squared loss on n = 5 inputs,
each present twice with targets y +- delta (so residuals and per-sample noise do not vanish at
a minimum), plus an extra output xi_i s(theta) with xi of opposite signs on the two copies: it
cancels in L but adds per-sample gradient noise with tangent components (S_par != 0, mixed
block != 0). Gamma = {theta: MLP(x_g) = mean target of group g}, codimension 15; the point is
put on Gamma by Gauss-Newton to ||grad L|| ~ 1e-15.
"""
import math

import pytest
import torch
from torch import nn

import sde
from dynamics.objective import Objective
from sde.matrix_free import MatrixFreeProblem
from tests.reference import tiny_mlp

DT = torch.float64


class MLPWithTangentNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = tiny_mlp(seed=0, d_in=5, width=7, d_out=3)

    def forward(self, x):
        s = torch.tanh(self.mlp[0].weight).sum() + 0.2 * (self.mlp[2].weight ** 3).sum()
        return torch.cat([self.mlp(x[:, :5]), (x[:, 5] * s)[:, None]], dim=1)


def loss_fn(out, y):
    return (0.5 * ((out[:, :3] - y) ** 2).sum(1) + out[:, 3]).mean()


@pytest.fixture(scope="module")
def setting():
    gen = torch.Generator().manual_seed(3)
    n = 5
    Xg, Yg = torch.randn(n, 5, generator=gen, dtype=DT), torch.randn(n, 3, generator=gen, dtype=DT)
    delta = 0.3 * torch.randn(n, 3, generator=gen, dtype=DT)
    xi = torch.randn(n, 1, generator=gen, dtype=DT)
    x = torch.cat([torch.cat([Xg, xi], 1), torch.cat([Xg, -xi], 1)])
    y = torch.cat([Yg + delta, Yg - delta])
    obj = Objective(MLPWithTangentNoise(), loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])])
    group_inputs = torch.cat([Xg, torch.zeros(n, 1, dtype=DT)], 1)

    def residual(theta):
        return (obj.forward(theta, group_inputs)[:, :3] - Yg).reshape(-1)

    theta = obj.params
    for _ in range(30):   # minimum-norm Gauss-Newton steps onto Gamma (quadratic convergence)
        r = residual(theta)
        if r.norm() < 1e-13:
            break
        J = torch.func.jacrev(residual)(theta)
        theta = theta - J.T @ torch.linalg.solve(J @ J.T, r)
    assert obj.grad(theta).norm() < 1e-12

    def dense_loss(t):
        return sum(len(xb) / obj.num_samples * obj.batch_loss(t, xb, yb) for xb, yb in obj.data)

    def dense_noise_cov(t):
        G = obj.per_sample_grads(t)
        Gc = G - G.mean(0)
        return Gc.T @ Gc / len(G)

    return obj, theta, sde.Problem(dense_loss, dense_noise_cov, name="tiny MLP")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rule", [sde.SGD(4), sde.LocalSGD(3, 2, 0.7), sde.QSR(3, 2)], ids=str)
def test_matrix_free_terms_equal_dense_terms(setting, rule):
    obj, theta, dense = setting
    ref = sde.slow_sde(dense, theta, rule, gradient_tol=1e-10)
    got = sde.slow_sde(sde.Problem.from_objective(obj, max_rank=20, eig_tol=1e-10), theta, rule)
    assert ref.rank == got.rank == 15
    # Lanczos eigenvectors to ~1e-10 residual; everything else is exact linear algebra
    for field in ["drift", "drift_I", "ito_correction", "raw_drift"]:
        assert getattr(ref, field).norm() > 0.1
        assert _rel(getattr(got, field), getattr(ref, field)) < 1e-8, field
    if isinstance(rule, sde.LocalSGD):
        assert _rel(got.drift_II, ref.drift_II) < 1e-8
    else:
        assert got.drift_II.abs().max() == 0
    # diffusion: a (D, N) factor instead of the symmetric root, same A A^T = S_par / B
    A, A_ref = got.diffusion, ref.diffusion
    assert A.shape == (obj.dim, obj.num_samples)
    assert _rel(A @ A.T, A_ref @ A_ref.T) < 1e-10


def test_rank_rule_finds_the_gap_and_truncation_error_is_visible(setting):
    obj, theta, dense = setting
    state = MatrixFreeProblem(obj, max_rank=20, eig_tol=1e-10).normal_space(theta)
    assert state.basis.shape == (obj.dim, 15)
    assert state.spectral_gap > 1e10          # lambda_15 ~ 0.1 against round-off ~1e-15
    with pytest.raises(ValueError, match="max_rank"):
        MatrixFreeProblem(obj, max_rank=10).normal_space(theta)
    # Truncating the normal space to the top 13 directions (two curved directions called
    # tangent) changes the drift by O(1): the measured truncation error of a wrong rank.
    rule = sde.SGD(4)
    ref = sde.slow_sde(dense, theta, rule, gradient_tol=1e-10).drift
    truncated = sde.slow_sde(MatrixFreeProblem(obj, rank=13, eig_tol=1e-10), theta, rule).drift
    error = _rel(truncated, ref)
    assert error > 0.05, f"truncation to rank 13 changed the drift by only {error:.2e}"


def test_sampled_tangent_noise_is_unbiased(setting):
    obj, theta, dense = setting
    problem = MatrixFreeProblem(obj, rank=15, eig_tol=1e-10)
    U = problem.normal_space(theta).basis
    exact = problem.tangent_noise_factor(theta, U)
    S = exact @ exact.T
    m = 4000
    sampled = MatrixFreeProblem(obj, rank=15, noise_samples=m,
                                generator=torch.Generator().manual_seed(0)).tangent_noise_factor(theta, U)
    # Gaussian mixtures: E||S_hat - S||_F^2 = (||S||_F^2 + (tr S)^2) / m; allow 3 x the RMS
    rms = math.sqrt((S.norm() ** 2 + S.trace() ** 2).item() / m) / S.norm().item()
    err = _rel(sampled @ sampled.T, S)
    assert err < 3 * rms and err > 0        # a genuine estimate, and within its error bar
    assert (U.T @ sampled).abs().max() < 1e-12   # tangent by construction


def test_bad_inputs(setting):
    obj, theta, _ = setting
    with pytest.raises(ValueError, match="Objective"):
        MatrixFreeProblem("not an objective")
    with pytest.raises(ValueError, match="rank"):
        MatrixFreeProblem(obj, rank=0)
    with pytest.raises(ValueError, match="noise_samples"):
        MatrixFreeProblem(obj, noise_samples=0)
    with pytest.raises(ValueError, match="not on Gamma"):
        sde.slow_sde(MatrixFreeProblem(obj, rank=15), theta + 1e-3, sde.SGD(4))
