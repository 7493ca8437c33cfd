"""The matrix-free label-noise rates agree with the exact Jacobian path (tiny MLP on Gamma).

Truncated path: full rank r = N C = 12 makes the truncation exact, so the only differences are
Lanczos (tol 1e-12) and summation order: rtol 1e-6. Exact-projection path (conjugate gradients on
J J^T with Jacobian-vector products, no eigenvectors beyond the top one): CG rtol 1e-13 bounds the
projection error by 1e-13 sqrt(lambda_max / lambda_min) ~ 1e-11 relative here, so rtol 1e-8.
Runtime: a few seconds on one thread.
"""
import pytest
import torch

from dynamics.objective import Objective
from experiments.manifold import half_squared_error, project_to_manifold
from sde.label_noise import gauss_newton_geometry, predict_label_noise_rates, sharpness_gradients
from sde.label_noise_mf import (ProjectionNotConverged, TangentProjector, jacobian_frobenius_pass,
                                jacobian_times, predict_label_noise_rates_cg,
                                predict_label_noise_rates_matrix_free)
from sde.rules import QSR, SGD, LocalSGD
from tests.reference import classification_batches, tiny_mlp


@pytest.fixture(scope="module")
def on_gamma():
    obj = Objective(tiny_mlp(seed=4, d_in=5, width=7, d_out=3), half_squared_error,
                    classification_batches(4, image=False, seed=5, classes=3))
    zeta, _ = project_to_manifold(obj, tol=1e-22, max_gauss_newton=60)
    return obj, zeta


def test_matrix_free_equals_exact_at_full_rank(on_gamma):
    obj, zeta = on_gamma
    rules = [SGD(4), LocalSGD(2, 2, 0.8), QSR(2, 2)]
    mf = predict_label_noise_rates_matrix_free(obj, zeta, rules, sigma=0.4, rank=12, tol=1e-12,
                                               generator=torch.Generator().manual_seed(0))
    geo = gauss_newton_geometry(obj, zeta)
    grads = sharpness_gradients(obj, geo)
    for rule, got in zip(rules, mf):
        exact = predict_label_noise_rates(obj, geo, rule, sigma=0.4, gradients=grads)
        assert got.trace_rate == pytest.approx(exact.trace_rate, rel=1e-6)
        assert got.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=1e-6)
        torch.testing.assert_close(got.drift, exact.drift, rtol=0, atol=1e-6 * exact.drift.norm().item())
    assert mf[0].trace == pytest.approx(geo.trace, rel=1e-9)


def test_truncation_loses_rate_and_bad_input(on_gamma):
    obj, zeta = on_gamma
    full = predict_label_noise_rates_matrix_free(obj, zeta, [SGD(4)], sigma=0.4, rank=12, tol=1e-12)[0]
    cut = predict_label_noise_rates_matrix_free(obj, zeta, [SGD(4)], sigma=0.4, rank=6, tol=1e-12)[0]
    # truncating the normal space changes the prediction (the neglected directions matter)
    assert abs(cut.trace_rate - full.trace_rate) > 1e-3 * abs(full.trace_rate)
    with pytest.raises(ValueError, match="not on Gamma"):
        predict_label_noise_rates_matrix_free(obj, zeta + 0.1, [SGD(4)], sigma=0.4, rank=3)
    with pytest.raises(ValueError, match="rank"):
        predict_label_noise_rates_matrix_free(obj, zeta, [SGD(4)], sigma=0.4, rank=0)


def test_cg_projection_rates_equal_exact_path(on_gamma):
    obj, zeta = on_gamma
    rules = [SGD(4), QSR(2, 2), QSR(3, 1)]
    got = predict_label_noise_rates_cg(obj, zeta, rules, sigma=0.4, rtol=1e-13,
                                       generator=torch.Generator().manual_seed(0))
    geo = gauss_newton_geometry(obj, zeta)
    grads = sharpness_gradients(obj, geo)
    for rule, mf in zip(rules, got.rates):
        exact = predict_label_noise_rates(obj, geo, rule, sigma=0.4, gradients=grads)
        assert mf.trace_rate == pytest.approx(exact.trace_rate, rel=1e-8)
        assert mf.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=1e-8)
        torch.testing.assert_close(mf.drift, exact.drift, rtol=0, atol=1e-8 * exact.drift.norm().item())
        assert mf.trace == pytest.approx(geo.trace, rel=1e-12)
        assert mf.lambda_max == pytest.approx(geo.lambda_max, rel=1e-9)
    # QSR (eta -> 0) is K times SGD with the same total batch: K = 2, B = 4
    assert got.rates[1].trace_rate == pytest.approx(2 * got.rates[0].trace_rate, rel=1e-12)
    # both projections actually iterated; CG in exact arithmetic needs at most N C = 12 steps
    assert all(1 <= it <= 40 for it in got.cg_iterations)


def test_cg_tangent_projection_equals_dense_projector(on_gamma):
    obj, zeta = on_gamma
    _, blocks, frob = jacobian_frobenius_pass(obj, zeta, chunk_size=3)  # chunks smaller than N: exercise the loop
    geo = gauss_newton_geometry(obj, zeta)
    assert frob / obj.num_samples == pytest.approx(geo.trace, rel=1e-12)
    # the preconditioner blocks are the diagonal C x C blocks of the dense Gram matrix J J^T
    torch.testing.assert_close(blocks, torch.einsum("ncd,nkd->nck", geo.jacobian, geo.jacobian))
    projector = TangentProjector.from_blocks(obj, zeta, blocks, rtol=1e-13)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(obj.dim, generator=gen, dtype=torch.float64)
        pv, iters = projector.project(v)
        dense = geo.tangent_project(v)
        torch.testing.assert_close(pv, dense, rtol=0, atol=1e-10 * v.norm().item())
        assert jacobian_times(obj, zeta, pv).norm() <= 1e-10 * v.norm() * geo.lambda_max ** 0.5
        assert 1 <= iters <= 40


def test_cg_non_convergence_and_bad_input(on_gamma):
    obj, zeta = on_gamma
    with pytest.raises(ProjectionNotConverged, match="did not converge.*max_iter = 2"):
        predict_label_noise_rates_cg(obj, zeta, [SGD(4)], sigma=0.4, rtol=1e-13, max_iter=2)
    with pytest.raises(ValueError, match="SGD and QSR only"):
        predict_label_noise_rates_cg(obj, zeta, [LocalSGD(2, 2, 0.8)], sigma=0.4)
    with pytest.raises(ValueError, match="not on Gamma"):
        predict_label_noise_rates_cg(obj, zeta + 0.1, [SGD(4)], sigma=0.4)
    with pytest.raises(ValueError, match="rtol"):
        predict_label_noise_rates_cg(obj, zeta, [SGD(4)], sigma=0.4, rtol=0.0)
