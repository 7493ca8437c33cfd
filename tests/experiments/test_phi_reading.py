"""experiments.phi_reading on the squared loss: the reading at Phi against an adaptive gradient flow,
and a continuation run that uses it (10 real CIFAR-10 images at 4x4, float64 GELU MLP 48 -> 24 -> 10)."""
from types import SimpleNamespace

import pytest
import torch

from experiments.continuation import ContinuationConfig, run_continuation, sharpness_on_manifold
from experiments.manifold import cifar_subset, half_squared_error, project_to_manifold
from experiments.phi_reading import PhiCorrection, read_at_phi
from sde.label_noise import gauss_newton_geometry, sharpness_gradients
from sde.projection import project
from sde.rules import LocalSGD
from tests.experiments.test_drift_check import tiny_mlp_objective


@pytest.fixture(scope="module")
def tiny(cifar10_dir):
    x, y = cifar_subset(cifar10_dir, 10, image_size=4)
    obj = tiny_mlp_objective(x, y)
    zeta, _ = project_to_manifold(obj, tol=1e-24, max_gauss_newton=60)
    geometry = gauss_newton_geometry(obj, zeta)
    correction = PhiCorrection.at(obj, geometry, sharpness_gradients(obj, geometry))
    problem = SimpleNamespace(loss=lambda t: half_squared_error(obj.forward(t, x), y), project=None)  # the flow needs only L
    return obj, zeta, correction, problem


def _gauss_newton(obj):
    def run(theta):
        z, report = project_to_manifold(obj, theta, tol=1e-22, max_gauss_newton=60)
        return z, report.loss
    return run


def test_reading_matches_gradient_flow_to_third_order(tiny):
    """The Gauss-Newton reading is off from s(Phi(theta)) at O(|x|^2); the corrected one at O(|x|^3)."""
    obj, zeta, correction, problem = tiny
    direction = torch.randn(zeta.shape, generator=torch.Generator().manual_seed(0), dtype=zeta.dtype)
    direction /= direction.norm()
    errors, biases = [], []
    for scale in (3e-2, 3e-3):
        theta = zeta + scale * direction
        reading = read_at_phi(theta, correction, _gauss_newton(obj), lambda z: sharpness_on_manifold(obj, z))
        assert reading.residual <= 1e-20
        flow = project(problem, theta, method="flow", tol=1e-12, rtol=1e-12, atol=1e-14)
        truth = sharpness_on_manifold(obj, flow)
        errors.append(max(abs(c - t) / abs(t) for c, t in zip(reading.corrected, truth)))
        biases.append(abs(reading.raw[0] - truth[0]) / truth[0])
    # 10x smaller offset: the raw bias falls ~100x, the corrected error ~1000x
    assert biases[1] < biases[0] / 50 and errors[1] < errors[0] / 300, (errors, biases)
    assert errors[0] < 0.05 * biases[0] and errors[1] < 0.01 * biases[1], (errors, biases)


def test_continuation_reads_at_phi(tiny):
    """A short Local SGD run: the corrected readings differ from the raw ones, and each corrected
    reading equals a direct `read_at_phi` of the same iterate."""
    obj, zeta, correction, _ = tiny
    cfg = ContinuationConfig(rule=LocalSGD(2, 1, 0.04), eta=0.004, sigma=0.3, rounds=3, seeds=2,
                             max_relative_change=10.0)
    res = run_continuation(obj, zeta, cfg, generator=torch.Generator().manual_seed(0), correction=correction)
    assert res.trace.shape == res.raw_trace.shape == (4, 2)
    assert float(res.projection_loss.max()) <= 1e-10
    assert (res.trace[1:] - res.raw_trace[1:]).abs().min() > 1e-12
    assert torch.equal(res.trace[0], res.raw_trace[0])
    plain = run_continuation(obj, zeta, cfg, generator=torch.Generator().manual_seed(0))
    # same noise draws: the raw readings of the corrected run are Gauss-Newton projections of the same
    # iterates, which the plain run reads after 10 gradient-descent steps: equal to first order only
    assert torch.allclose(plain.raw_trace, plain.trace)
    assert torch.allclose(res.raw_trace, plain.trace, rtol=1e-3)


def _dense_d_hessian(loss, zeta, direction, basis):
    """U^T (d/de Hessian(L)(zeta + e v)) U, exact: forward-mode jvp of the dense Hessian."""
    from torch.func import hessian, jvp
    dH = basis.T @ jvp(hessian(loss), (zeta,), (direction,))[1] @ basis
    return (dH + dH.T) / 2


def assert_correction_is_exact(obj, geometry, gradients, loss, zeta):
    """PhiCorrection.at from Jacobian derivatives equals the dense third derivative to ~1e-13 (float64
    round-off); the finite-difference route (method="hvp") to its own ~1e-6."""
    exact = PhiCorrection.at(obj, geometry, gradients)
    fd = PhiCorrection.at(obj, geometry, gradients, method="hvp")
    for name, g in (("d_hessian_trace", gradients.trace), ("d_hessian_lambda_max", gradients.lambda_max)):
        ref = _dense_d_hessian(loss, zeta, g, exact.basis)
        rel = lambda a: float((a - ref).norm() / ref.norm())       # noqa: E731
        assert rel(getattr(exact, name)) < 1e-12, (name, rel(getattr(exact, name)))
        assert 1e-12 < rel(getattr(fd, name)) < 1e-5, (name, rel(getattr(fd, name)))
    with pytest.raises(ValueError, match="method"):
        PhiCorrection.at(obj, geometry, gradients, method="dense")


def test_correction_from_jacobian_derivatives_is_exact(tiny):
    obj, zeta, _, problem = tiny
    geometry = gauss_newton_geometry(obj, zeta)
    assert_correction_is_exact(obj, geometry, sharpness_gradients(obj, geometry), problem.loss, zeta)
