"""sde.label_noise against dense float64 references on a tiny tanh MLP placed on Gamma.

Dense references: the Hessian by the plain autograd loop (tests.reference), d3L[M] by exact
triple autograd of tr(Hessian(theta) M), the tangent projector from the dense Hessian's kernel,
and the GENERAL slow-SDE drift of THEORY.md (Lyap^-1, Psi_hat) with Sigma built from the
per-sample label-noise covariance sigma^2 J_i^T J_i, so the closed form is tested, not assumed.
Runtime: about 5 s on one thread.
"""
import pytest
import torch

from experiments.manifold import half_squared_error, project_to_manifold
from dynamics.objective import Objective
from sde.label_noise import (drift_weights, gauss_newton_geometry, label_noise_drift,
                             output_jacobian, predict_label_noise_rates, sharpness_gradients)
from sde.psi import psi
from sde.rules import QSR, SGD, LocalSGD
from tests.reference import classification_batches, dense_loss_hessian, tiny_mlp

RTOL = 1e-7  # float64 end to end; the references use different autograd routes


@pytest.fixture(scope="module")
def on_gamma():
    model = tiny_mlp(seed=3, d_in=5, width=7, d_out=3)          # D = 66
    obj = Objective(model, half_squared_error, classification_batches(4, image=False, seed=2, classes=3))
    zeta, report = project_to_manifold(obj, tol=1e-20, max_gauss_newton=60)
    assert report.loss <= 1e-20
    return obj, zeta


def dense_third_order(obj, theta, M):
    """d3L[M] = grad_theta tr(Hessian(theta) M) by triple autograd over M's eigenvectors."""
    values, vectors = torch.linalg.eigh((M + M.T) / 2)
    theta = theta.detach().clone().requires_grad_(True)
    loss = sum(len(x) / obj.num_samples * obj.batch_loss(theta, x, y) for x, y in obj.data)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    total = torch.zeros_like(theta)
    for lam, w in zip(values, vectors.T):
        if abs(lam) < 1e-14:
            continue
        (hw,) = torch.autograd.grad(g @ w, theta, create_graph=True)
        (d,) = torch.autograd.grad(hw @ w, theta, retain_graph=True)
        total += lam * d
    return total


def dense_geometry(obj, zeta):
    H = dense_loss_hessian(obj, zeta)
    values, vectors = torch.linalg.eigh(H)
    normal = values > 1e-10 * values.max()
    V, lam = vectors[:, normal], values[normal]
    P = torch.eye(obj.dim, dtype=H.dtype) - V @ V.T
    return H, lam, V, P


def general_drift(obj, zeta, rule, sigma):
    """THEORY.md's drift-I + drift-II with dense Sigma, Lyap^-1 and Psi_hat (no closed form used)."""
    H, lam, V, P = dense_geometry(obj, zeta)
    _, jac = output_jacobian(obj, zeta)
    # one-sample label-noise gradient: J_i^T (r_i - sigma xi), r_i = 0 on Gamma -> cov sigma^2 J_i^T J_i
    Sigma = sigma ** 2 * torch.einsum("icd,ice->de", jac, jac) / jac.shape[0]
    S_diamond = Sigma - P @ Sigma @ P
    values, vectors = torch.linalg.eigh(H)
    coeff = vectors.T @ S_diamond @ vectors
    pair = values[:, None] + values[None, :]
    ok = pair > 1e-10 * values.max()
    S_hat = vectors @ torch.where(ok, coeff / torch.where(ok, pair, 1.0), 0.0) @ vectors.T
    B = rule.total_batch
    drift = -1 / (2 * B) * P @ dense_third_order(obj, zeta, S_hat)
    if isinstance(rule, (LocalSGD, QSR)) and rule.workers > 1:
        beta = rule.beta if isinstance(rule, LocalSGD) else 1e6
        weights = torch.where(ok, psi(beta * torch.where(ok, pair, 1.0)) / torch.where(ok, pair, 1.0), 0.0)
        Psi_hat = vectors @ (weights * coeff) @ vectors.T
        drift = drift - (rule.workers - 1) / (2 * B) * P @ dense_third_order(obj, zeta, Psi_hat)
    return drift, Sigma, H


def test_geometry_matches_dense_hessian(on_gamma):
    obj, zeta = on_gamma
    geo = gauss_newton_geometry(obj, zeta)
    H, lam, V, P = dense_geometry(obj, zeta)
    assert len(geo.eigenvalues) == len(lam) == 12            # N C = 4 x 3 normal directions
    torch.testing.assert_close(geo.eigenvalues, lam.flip(0), rtol=RTOL, atol=0)
    assert geo.trace == pytest.approx(H.trace().item(), rel=RTOL)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(geo.tangent_project(v), P @ v, rtol=0, atol=1e-9 * v.norm().item())
    u = geo.hessian_eigenvectors(2)
    torch.testing.assert_close(H @ u, u * geo.eigenvalues[:2], rtol=0, atol=1e-8)


def test_sharpness_gradients_match_dense_third_order(on_gamma):
    obj, zeta = on_gamma
    geo = gauss_newton_geometry(obj, zeta)
    grads = sharpness_gradients(obj, geo)
    H, lam, V, P = dense_geometry(obj, zeta)
    eye = torch.eye(obj.dim, dtype=torch.float64)
    ref_trace = P @ dense_third_order(obj, zeta, eye)
    u = V[:, -1:]                                             # top eigenvector
    ref_lmax = P @ dense_third_order(obj, zeta, u @ u.T)
    torch.testing.assert_close(grads.trace, ref_trace, rtol=0, atol=RTOL * ref_trace.norm().item())
    torch.testing.assert_close(grads.lambda_max, ref_lmax, rtol=0, atol=RTOL * ref_lmax.norm().item())
    # the tangent gradient of lambda_max is also a finite difference of lambda_max along Gamma
    # only to first order; the exact identity checked above is what the rates use.


@pytest.mark.parametrize("rule", [SGD(6), LocalSGD(3, 2, 0.7), LocalSGD(4, 1, 5.0)])
def test_closed_form_drift_equals_general_formula(on_gamma, rule):
    obj, zeta = on_gamma
    sigma = 0.3
    geo = gauss_newton_geometry(obj, zeta)
    ours = label_noise_drift(obj, geo, rule, sigma=sigma)
    ref, Sigma, H = general_drift(obj, zeta, rule, sigma)
    # Sigma = sigma^2 Hessian on Gamma (zero residuals make the Hessian Gauss-Newton)
    torch.testing.assert_close(Sigma, sigma ** 2 * H, rtol=0, atol=1e-9 * H.abs().max().item())
    torch.testing.assert_close(ours, ref, rtol=0, atol=RTOL * ref.norm().item())


def test_qsr_limit_and_rates(on_gamma):
    obj, zeta = on_gamma
    geo = gauss_newton_geometry(obj, zeta)
    grads = sharpness_gradients(obj, geo)
    sgd = predict_label_noise_rates(obj, geo, SGD(8), sigma=0.5, gradients=grads)
    qsr = predict_label_noise_rates(obj, geo, QSR(4, 2), sigma=0.5, gradients=grads)
    # SGD: d trH/dt = -(sigma^2/4B) |P grad trH|^2 < 0, and QSR is exactly K times SGD
    assert sgd.trace_rate == pytest.approx(-(0.25 / 32) * (grads.trace @ grads.trace).item(), rel=1e-10)
    assert qsr.trace_rate == pytest.approx(4 * sgd.trace_rate, rel=1e-10)
    assert qsr.lambda_max_rate == pytest.approx(4 * sgd.lambda_max_rate, rel=1e-10)
    # Local SGD lies between SGD and QSR, and tends to each limit in beta
    rates = [predict_label_noise_rates(obj, geo, LocalSGD(4, 2, b), sigma=0.5, gradients=grads).trace_rate
             for b in (1e-9, 0.5, 1e9)]
    assert rates[0] == pytest.approx(sgd.trace_rate, rel=1e-6)
    assert rates[2] == pytest.approx(qsr.trace_rate, rel=1e-6)
    assert qsr.trace_rate < rates[1] < sgd.trace_rate


def test_drift_weights_and_bad_input(on_gamma):
    lam = torch.tensor([10.0, 1.0, 0.01], dtype=torch.float64)
    torch.testing.assert_close(drift_weights(LocalSGD(5, 2, 0.3), lam), 1 + 4 * psi(0.6 * lam))
    torch.testing.assert_close(drift_weights(QSR(5, 2, alpha=0.1), lam, eta=0.01), 1 + 4 * psi(2.0 * lam))
    with pytest.raises(ValueError, match="alpha"):
        drift_weights(QSR(5, 2), lam, eta=0.01)
    obj, zeta = on_gamma
    with pytest.raises(ValueError, match="not on Gamma"):
        gauss_newton_geometry(obj, zeta + 0.1)
    with pytest.raises(ValueError, match="sigma"):
        label_noise_drift(obj, gauss_newton_geometry(obj, zeta), SGD(2), sigma=0.0)
