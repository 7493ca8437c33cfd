"""sde.project: gradient-flow projection onto Gamma against the toys' analytic Phi.

Budget: about 20 s on one thread (several batched adaptive ODE solves of tiny problems).
"""
import pytest
import torch

from sde.problem import Problem
from sde.projection import ProjectionError, gradient_norm, project
from sde.toys import DiagonalNet, RankOneFactorization, Sphere

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("float64_default")


def _diagonal_net():
    X = torch.tensor([[0.8, 0.0], [0.0, 1.0], [1.2, 0.0]])
    return DiagonalNet(X, torch.tensor([0.5, -0.3]), sigma=1.0)


@pytest.mark.parametrize("method", ["flow", "flow+newton"])
def test_flow_matches_analytic_phi_of_diagonal_net(method):
    net = _diagonal_net()
    g = torch.Generator().manual_seed(0)
    theta = net.point_on_gamma(torch.tensor([0.4, -0.2])) + 0.1 * torch.randn(5, 4, generator=g)
    out = project(net.problem, theta, method=method, tol=TOL)
    # 1e-8: the ODE is followed with local errors <= 1e-10 relative, far below the test bound.
    torch.testing.assert_close(out, net.project(theta), rtol=0, atol=1e-8)
    assert bool((gradient_norm(net.problem, out) <= TOL).all())
    # p_i = u_i v_i is conserved by gradient flow (the analytic Phi's premise, checked independently)
    torch.testing.assert_close(net.products(out), net.products(theta), rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["flow", "flow+newton"])
def test_flow_matches_analytic_phi_of_sphere(method):
    sphere = Sphere(radius=1.5, noise=0.7, dim=3)
    g = torch.Generator().manual_seed(1)
    theta = 1.5 * torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    theta = theta * (1 + 0.3 * torch.rand(4, 1, generator=g) - 0.15)
    out = project(sphere.problem, theta, method=method, tol=TOL)
    torch.testing.assert_close(out, sphere.project(theta), rtol=0, atol=1e-8)
    assert bool((gradient_norm(sphere.problem, out) <= TOL).all())


def test_auto_uses_the_analytic_phi_and_handles_single_vectors():
    net = _diagonal_net()
    theta = torch.tensor([0.9, 0.5, 0.3, -0.2])
    assert torch.equal(project(net.problem, theta), net.project(theta))
    flow = project(net.problem, theta, method="flow")
    assert flow.shape == (4,)
    torch.testing.assert_close(flow, net.project(theta), rtol=0, atol=1e-8)


def test_rank_one_factorization_without_analytic_phi():
    mf = RankOneFactorization(torch.tensor([1.0, 0.5, -0.7]), torch.tensor([0.8, -0.4]), sigma=0.5)
    assert mf.problem.project is None
    g = torch.Generator().manual_seed(2)
    theta = mf.point_on_gamma(1.3) + 0.1 * torch.randn(3, 5, generator=g)
    out = project(mf.problem, theta, tol=TOL)            # auto -> flow+newton
    assert bool((gradient_norm(mf.problem, out) <= TOL).all())
    u, v = mf.split(out)
    u0, v0 = mf.split(theta)
    # on Gamma: u v^T equals the target; gradient flow conserves |u|^2 - |v|^2
    torch.testing.assert_close(torch.einsum("ni,nj->nij", u, v), mf.target.expand(3, -1, -1), rtol=0, atol=1e-9)
    torch.testing.assert_close((u * u).sum(1) - (v * v).sum(1), (u0 * u0).sum(1) - (v0 * v0).sum(1),
                               rtol=0, atol=1e-8)
    flow = project(mf.problem, theta, method="flow", tol=TOL)
    torch.testing.assert_close(flow, out, rtol=0, atol=1e-8)


def test_error_when_flow_does_not_converge():
    unbounded = Problem(lambda th: th.sum() + 0.5 * (th[0] ** 2), lambda th: torch.eye(2, dtype=th.dtype))
    with pytest.raises(ProjectionError, match=r"gradient norm is 1\.000e\+00"):
        project(unbounded, torch.tensor([0.3, 0.1]), method="flow", max_time=5.0)
    assert issubclass(ProjectionError, ValueError)


def test_bad_arguments():
    net = _diagonal_net()
    theta = torch.zeros(4)
    with pytest.raises(ValueError, match="method"):
        project(net.problem, theta, method="newton")
    with pytest.raises(ValueError, match="tol"):
        project(net.problem, theta, tol=0.0)
    with pytest.raises(ValueError, match="shape"):
        project(net.problem, torch.zeros(2, 2, 4))
    no_phi = RankOneFactorization(torch.ones(2), torch.ones(2), sigma=1.0).problem
    with pytest.raises(ValueError, match="analytic"):
        project(no_phi, torch.ones(4), method="analytic")
