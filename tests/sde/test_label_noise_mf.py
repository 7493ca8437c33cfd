"""The matrix-free label-noise rates agree with the exact Jacobian path at full rank (tiny MLP on Gamma).

Full rank r = N C = 12 makes the truncation exact, so the only differences are Lanczos
(tol 1e-12) and summation order: rtol 1e-6. Runtime: a few seconds on one thread.
"""
import pytest
import torch

from dynamics.objective import Objective
from experiments.manifold import half_squared_error, project_to_manifold
from sde.label_noise import gauss_newton_geometry, predict_label_noise_rates, sharpness_gradients
from sde.label_noise_mf import predict_label_noise_rates_matrix_free
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
