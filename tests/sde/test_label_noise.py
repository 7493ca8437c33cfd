"""sde.label_noise against dense float64 references, for both output metrics, on a tiny tanh MLP on Gamma.

The point: theta0 of the network with targets chosen so that theta0 lies exactly on Gamma (Gaussian:
y = f(theta0), squared loss; flip: q = softmax(f(theta0)), cross-entropy against soft targets).
Dense references, none of which uses the closed form: Hessian(L) = torch.func.hessian of the actual
loss; d3L[M] = grad_theta <Hessian(L)(theta), M> by autograd through it; the tangent projector from
the dense Hessian's kernel; the one-draw noise covariance Sigma = (1/N) sum_i J_i^T Cov_i J_i
(Cov_i = sigma^2 I for Gaussian targets, diag(q_i) - q_i q_i^T for one flipped-label draw); and the
GENERAL slow-SDE drift of THEORY.md (drift-I with Lyap^-1, drift-II with Psi_hat) built from it.
Runtime: about 10 s on one thread.
"""
import pytest
import torch
from torch.func import grad, hessian

from dynamics.jacobian import output_jacobian
from dynamics.objective import Objective
from sde.label_noise import (OutputMetric, centred_basis, drift_weights, gauss_newton_geometry, label_noise_drift,
                             metric_roots, predict_rates, sharpness_gradients)
from sde.psi import psi
from sde.rules import QSR, SGD, LocalSGD
from tests.reference import classification_batches, tiny_mlp

RTOL = 1e-9          # float64 end to end; the references take different autograd routes
N, C = 4, 3
SIGMA = 0.3


def squared(out, y):
    return 0.5 * (out - y).pow(2).sum(-1).mean()


def soft_ce(out, q):
    return -(q * torch.log_softmax(out, -1)).sum(-1).mean()


def build(kind: str):
    """(obj, zeta, metric, noise_scale, Cov (N, C, C), loss(theta), m) for 'gaussian' or 'flip'."""
    model = tiny_mlp(seed=3, d_in=5, width=7, d_out=C)          # D = 66
    x = classification_batches(N, image=False, seed=2, classes=C)[0][0]
    f0 = model(x).detach()
    if kind == "gaussian":
        obj = Objective(model, squared, [(x, f0)])
        metric, scale, cov = OutputMetric(), SIGMA ** 2, torch.eye(C, dtype=f0.dtype).expand(N, C, C)
    else:
        q = torch.softmax(f0, -1)
        obj = Objective(model, soft_ce, [(x, q)])
        Q = centred_basis(C, q.dtype, q.device)
        metric, scale, cov = OutputMetric(Q, metric_roots(q, Q)), 1.0, torch.diag_embed(q) - q[:, :, None] * q[:, None]
    loss = lambda t: obj.batch_loss(t, *obj.data[0])          # noqa: E731
    return obj, obj.params, metric, scale, cov, loss, C if kind == "gaussian" else C - 1


@pytest.fixture(scope="module", params=["gaussian", "flip"])
def point(request):
    obj, zeta, metric, scale, cov, loss, m = build(request.param)
    H = hessian(loss)(zeta)
    values, vectors = torch.linalg.eigh(H)
    normal = values > 1e-10 * values.max()
    P = torch.eye(obj.dim, dtype=H.dtype) - vectors[:, normal] @ vectors[:, normal].T
    geo = gauss_newton_geometry(obj, zeta, metric=metric)
    return dict(obj=obj, zeta=zeta, metric=metric, scale=scale, cov=cov, loss=loss, m=m, H=H, lam=values[normal],
                V=vectors[:, normal], P=P, geo=geo, grads=sharpness_gradients(obj, geo))


def d3(pt, M):
    """d3L[M] = grad_theta <Hessian(L)(theta), M> (dense, autograd through torch.func.hessian)."""
    return grad(lambda t: (hessian(pt["loss"])(t) * M).sum())(pt["zeta"])


def general_drift(pt, rule):
    """THEORY.md's drift-I + drift-II with the dense Sigma, Lyap^-1 and Psi_hat (no closed form used)."""
    H, P = pt["H"], pt["P"]
    _, jac = output_jacobian(pt["obj"], pt["zeta"])
    Sigma = pt["scale"] * torch.einsum("icd,ice,ief->df", jac, pt["cov"], jac) / N
    values, vectors = torch.linalg.eigh(H)
    coeff = vectors.T @ (Sigma - P @ Sigma @ P) @ vectors
    pair = values[:, None] + values[None, :]
    ok = pair > 1e-10 * values.max()
    safe = torch.where(ok, pair, 1.0)
    c_one, c_two, beta = rule.drift_coefficients()
    B = rule.total_batch
    drift = -c_one / (2 * B) * P @ d3(pt, vectors @ torch.where(ok, coeff / safe, 0.0) @ vectors.T)
    if c_two:
        psi_hat = vectors @ (torch.where(ok, psi(beta * safe) / safe, 0.0) * coeff) @ vectors.T
        drift = drift - c_two / (2 * B) * P @ d3(pt, psi_hat)
    return drift, Sigma


def test_geometry_is_the_dense_hessian(point):
    obj, geo, H, P = point["obj"], point["geo"], point["H"], point["P"]
    scale = H.abs().max().item()
    torch.testing.assert_close(geo.reduced.T @ geo.reduced / N, H, rtol=0, atol=1e-12 * scale)
    assert geo.reduced.shape == (N * point["m"], obj.dim) and len(geo.eigenvalues) == N * point["m"]
    torch.testing.assert_close(geo.eigenvalues, point["lam"].flip(0), rtol=RTOL, atol=0)
    assert geo.trace == pytest.approx(H.trace().item(), rel=RTOL)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(obj.dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(geo.tangent_project(v), P @ v, rtol=0, atol=1e-9 * v.norm().item())
    u = geo.hessian_eigenvectors(2)
    torch.testing.assert_close(H @ u, u * geo.eigenvalues[:2], rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(geo.reduced_in_basis(), geo.reduced @ geo.hessian_eigenvectors(len(geo.eigenvalues)),
                               rtol=0, atol=1e-10 * scale ** 0.5)
    # lift is the adjoint of reduce, and reduce(J) is `reduced`
    x = torch.randn(N, C, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(N, point["m"], 2, generator=gen, dtype=torch.float64)
    metric = point["metric"]
    assert float((metric.reduce(x) * y).sum()) == pytest.approx(float((x * metric.lift(y)).sum()), rel=1e-12)
    torch.testing.assert_close(geo.reduce(geo.jacobian), geo.reduced)


def test_sharpness_gradients_match_dense_third_order(point):
    grads, P = point["grads"], point["P"]
    ref_trace = P @ d3(point, torch.eye(point["obj"].dim, dtype=torch.float64))
    u = point["V"][:, -1:]                                     # top eigenvector
    ref_lmax = P @ d3(point, u @ u.T)
    torch.testing.assert_close(grads.trace, ref_trace, rtol=0, atol=RTOL * ref_trace.norm().item())
    torch.testing.assert_close(grads.lambda_max, ref_lmax, rtol=0, atol=RTOL * ref_lmax.norm().item())


@pytest.mark.parametrize("rule", [SGD(6), LocalSGD(3, 2, 0.7), LocalSGD(4, 1, 5.0), QSR(3, 2)],
                         ids=["sgd", "local", "local-large-beta", "qsr"])
def test_drift_and_rates_equal_general_formula(point, rule):
    obj, geo, H = point["obj"], point["geo"], point["H"]
    ref, Sigma = general_drift(point, rule)
    # on Gamma, Sigma = c Hessian (Gauss-Newton at zero residual; Fisher = Hessian for flipped labels)
    torch.testing.assert_close(Sigma, point["scale"] * H, rtol=0, atol=1e-12 * H.abs().max().item())
    ours = label_noise_drift(obj, geo, rule, noise_scale=point["scale"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=RTOL * ref.norm().item())
    # rates: the dense tangent gradients (previous test) dotted with the general-formula drift
    P, u = point["P"], point["V"][:, -1:]
    rates = predict_rates(obj, geo, rule, noise_scale=point["scale"])
    assert rates.trace_rate == pytest.approx(float(P @ d3(point, torch.eye(obj.dim, dtype=H.dtype)) @ ref), rel=RTOL)
    assert rates.lambda_max_rate == pytest.approx(float(P @ d3(point, u @ u.T) @ ref), rel=RTOL)
    assert (rates.trace, rates.lambda_max) == (geo.trace, geo.lambda_max)
    assert rates.noise_scale == point["scale"] and rates.trace_rate_stderr == 0 == rates.lambda_max_rate_stderr
    torch.testing.assert_close(rates.drift, ours, rtol=0, atol=0)


def test_qsr_limit_and_rates(point):
    obj, geo, grads, c = point["obj"], point["geo"], point["grads"], point["scale"]
    sgd = predict_rates(obj, geo, SGD(8), noise_scale=c, gradients=grads)
    qsr = predict_rates(obj, geo, QSR(4, 2), noise_scale=c, gradients=grads)
    # SGD: d trH/dt = -(c/4B) |P grad trH|^2 < 0, and QSR is exactly K times SGD
    assert sgd.trace_rate == pytest.approx(-(c / 32) * (grads.trace @ grads.trace).item(), rel=1e-10)
    assert qsr.trace_rate == pytest.approx(4 * sgd.trace_rate, rel=1e-10)
    assert qsr.lambda_max_rate == pytest.approx(4 * sgd.lambda_max_rate, rel=1e-10)
    # QSR at finite eta is Local SGD at beta = alpha^2 / eta
    finite = predict_rates(obj, geo, QSR(4, 2, alpha=0.3), noise_scale=c, eta=0.1, gradients=grads)
    local = predict_rates(obj, geo, LocalSGD(4, 2, 0.9), noise_scale=c, gradients=grads)
    assert finite.trace_rate == pytest.approx(local.trace_rate, rel=1e-12)
    # Local SGD lies between SGD and QSR, and tends to each limit in beta
    rates = [predict_rates(obj, geo, LocalSGD(4, 2, b), noise_scale=c, gradients=grads).trace_rate
             for b in (1e-9, 0.5, 1e9)]
    assert rates[0] == pytest.approx(sgd.trace_rate, rel=1e-6)
    assert rates[2] == pytest.approx(qsr.trace_rate, rel=1e-6)
    assert qsr.trace_rate < rates[1] < sgd.trace_rate


def test_drift_weights_and_bad_input():
    lam = torch.tensor([10.0, 1.0, 0.01], dtype=torch.float64)
    torch.testing.assert_close(drift_weights(LocalSGD(5, 2, 0.3), lam), 1 + 4 * psi(0.6 * lam))
    torch.testing.assert_close(drift_weights(QSR(5, 2, alpha=0.1), lam, eta=0.01), 1 + 4 * psi(2.0 * lam))
    with pytest.raises(ValueError, match="alpha"):
        drift_weights(QSR(5, 2), lam, eta=0.01)
    obj, zeta, metric, *_ = build("gaussian")
    geo = gauss_newton_geometry(obj, zeta, metric=metric, residual=3e-12)
    assert geo.residual == 3e-12
    with pytest.raises(ValueError, match="noise_scale"):
        label_noise_drift(obj, geo, SGD(2), noise_scale=0.0)
    with pytest.raises(ValueError, match="noise_scale"):
        predict_rates(obj, geo, SGD(2), noise_scale=-1.0)
    Q = centred_basis(C, torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"metric roots must be \(N, m, m\) = \(4, 2, 2\)"):
        gauss_newton_geometry(obj, zeta, metric=OutputMetric(Q, torch.eye(2, dtype=torch.float64).expand(3, 2, 2)))
    with pytest.raises(ValueError, match=r"metric basis must be \(C = 3, m\)"):
        gauss_newton_geometry(obj, zeta, metric=OutputMetric(centred_basis(4, torch.float64, "cpu")))


def test_metric_helpers():
    Q = centred_basis(4, torch.float64, "cpu")
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Q.sum(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-15)
    q = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    R = metric_roots(q, Q)
    A = torch.diag_embed(q) - q[:, :, None] * q[:, None]
    torch.testing.assert_close(R @ R, Q.T @ A @ Q)
    torch.testing.assert_close(R, R.transpose(1, 2))
    # Q R_i^2 Q^T = A_i (A_i annihilates the ones vector), so lift(reduce(x)) = A x
    metric = OutputMetric(Q, R)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(metric.lift(metric.reduce(x)), (A @ x[..., None])[..., 0])
    torch.testing.assert_close(OutputMetric().reduce(x), x, rtol=0, atol=0)
