"""experiments.comparison.phi: the reading at Phi against an adaptive gradient flow, the Phi correction against
the dense third derivative, and the Gauss-Newton projection's second order (twice Phi's), for both noise models.

Settings of test_projection: 10 real CIFAR-10 images at 4x4 with the MLP 48 -> 24 -> 10 (Gaussian noise) and the
tiny 4 -> 8 -> 3 network under flipped labels (C = 3, p = 0.2). References: `sde.projection.project` (Phi as the
limit of an adaptive Runge-Kutta gradient flow), torch.func.hessian / jvp, `sde.blocks.d2phi`.
"""
from types import SimpleNamespace

import pytest
import torch
from torch.func import hessian, jvp

from experiments.comparison.phi import PhiCorrection, read_at_phi
from experiments.comparison.projection import project, sharpness_at
from sde import blocks
from sde.label_noise import gauss_newton_geometry, sharpness_gradients
from sde.projection import project as gradient_flow
from tests.experiments.comparison.test_projection import FLIP, GAUSS, expected_loss, flip_problem, gaussian_objective


@pytest.fixture(scope="module")
def points(cifar10_dir):
    """noise name -> (objective, noise model, zeta, geometry, gradients, correction)."""
    obj = gaussian_objective(cifar10_dir, 10)
    fobj, fzeta, _ = flip_problem()
    out = {"gaussian": (obj, GAUSS, project(obj, GAUSS, tol=1e-24, max_gauss_newton=60)[0]),
           "flip": (fobj, FLIP, fzeta)}
    for name, (o, noise, zeta) in out.items():
        geometry = gauss_newton_geometry(o, zeta, metric=noise.metric(o.data[0][1]))
        gradients = sharpness_gradients(o, geometry)
        out[name] = (o, noise, zeta, geometry, gradients, PhiCorrection.at(o, geometry, gradients))
    return out


@pytest.mark.parametrize("name, scales, bound", [("gaussian", (3e-2, 3e-3), (0.05, 0.01)),
                                                 ("flip", (1e-2, 1e-3), (0.01, 0.01))])
def test_reading_matches_gradient_flow_to_third_order(points, name, scales, bound):
    """The Gauss-Newton reading is off from s(Phi(theta)) at O(|x|^2); the corrected one at O(|x|^3) (errors
    relative for the squared loss, absolute for cross-entropy, as the two tests this merges had them)."""
    obj, noise, zeta, _, _, correction = points[name]
    flow_problem = SimpleNamespace(loss=expected_loss(obj, noise), project=None)     # the flow needs only L
    direction = torch.randn(zeta.shape, generator=torch.Generator().manual_seed(0), dtype=zeta.dtype)
    if name == "gaussian":
        direction /= direction.norm()

    def gauss_newton(theta):
        z, report = project(obj, noise, theta, tol=1e-22 if name == "gaussian" else 1e-10, max_gauss_newton=60)
        return z, report.distance
    errors, biases = [], []
    for scale in scales:
        theta = zeta + scale * direction
        reading = read_at_phi(theta, correction, gauss_newton, lambda z: sharpness_at(obj, noise, z))
        assert reading.residual <= (1e-20 if name == "gaussian" else 1e-10)
        truth = sharpness_at(obj, noise, gradient_flow(flow_problem, theta, method="flow", tol=1e-12, rtol=1e-12,
                                                       atol=1e-14))
        scale_of = (lambda t: abs(t)) if name == "gaussian" else (lambda t: 1.0)
        errors.append(max(abs(c - t) / scale_of(t) for c, t in zip(reading.corrected, truth)))
        biases.append(abs(reading.raw[0] - truth[0]) / scale_of(truth[0]))
    # 10x smaller offset: the raw bias falls ~100x, the corrected error ~1000x
    assert biases[1] < biases[0] / 50 and errors[1] < errors[0] / 300, (errors, biases)
    assert errors[0] < bound[0] * biases[0] and errors[1] < bound[1] * biases[1], (errors, biases)


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_correction_from_jacobian_derivatives_is_exact(points, name):
    """PhiCorrection.at from Jacobian derivatives equals the dense third derivative (forward-mode jvp of the
    dense Hessian) to ~1e-13; the finite-difference route (method="hvp") to its own ~1e-6."""
    obj, noise, zeta, geometry, gradients, exact = points[name]
    fd = PhiCorrection.at(obj, geometry, gradients, method="hvp")
    for field, g in (("d_hessian_trace", gradients.trace), ("d_hessian_lambda_max", gradients.lambda_max)):
        dH = exact.basis.T @ jvp(hessian(expected_loss(obj, noise)), (zeta,), (g,))[1] @ exact.basis
        ref = (dH + dH.T) / 2
        rel = lambda a: float((a - ref).norm() / ref.norm())       # noqa: E731
        assert rel(getattr(exact, field)) < 1e-12, (field, rel(getattr(exact, field)))
        assert 1e-12 < rel(getattr(fd, field)) < 1e-5, (field, rel(getattr(fd, field)))
    with pytest.raises(ValueError, match="method"):
        PhiCorrection.at(obj, geometry, gradients, method="dense")


def test_gauss_newton_second_order_is_twice_phis(points):
    """(Pi(z + e v) + Pi(z - e v) - 2 z) / e^2 -> 2 P d2Phi[v v^T] for a Hessian eigenvector v (flipped labels,
    metric-weighted Gauss-Newton): why the reading is corrected; d2Phi itself (sde.blocks.d2phi) is confirmed
    against the adaptive gradient flow."""
    obj, noise, zeta, geometry, _, _ = points["flip"]
    loss = expected_loss(obj, noise)
    eig = blocks.hessian_eigen(hessian(loss)(zeta), rank=len(geometry.eigenvalues))
    P = blocks.tangent_projector(eig)
    errors = []
    for idx in (-1, -3, -6):                      # three normal eigen-directions
        v = eig.vectors[:, idx]
        expected = P @ blocks.d2phi(loss, zeta, torch.outer(v, v), eig)
        plus, minus = (project(obj, noise, zeta + s * 1e-3 * v, tol=1e-13)[0] for s in (1, -1))
        errors.append(float((P @ (plus + minus - 2 * zeta) / 1e-6 - 2 * expected).norm() / expected.norm()))
    assert max(errors) < 1e-3, errors             # O(eps^2) = 1e-6 truncation plus the chord steps' O(eps^3)
    v = eig.vectors[:, -1]
    flow = [gradient_flow(SimpleNamespace(loss=loss, project=None), zeta + s * 1e-2 * v, method="flow", tol=1e-12,
                          rtol=1e-12, atol=1e-14) for s in (1, -1)]
    expected = P @ blocks.d2phi(loss, zeta, torch.outer(v, v), eig)
    assert float((P @ (flow[0] + flow[1] - 2 * zeta) / 1e-4 - expected).norm() / expected.norm()) < 1e-4
