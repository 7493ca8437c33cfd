"""third_order (d3L[M] = grad <Hessian L, M>) against central differences of HVPs and of dense
Hessians; dense vs low-rank M; grad_trace_hessian against the exact grad tr Hessian."""
import math

import pytest
import torch
from torch import nn

from dynamics import LowRank, MatrixOperator, Objective, grad_trace_hessian, third_order
from dynamics.third_order import _CompositeNormalization
from tests.reference import classification_batches, dense_loss_hessian, tiny_cnn_bn, tiny_mlp


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_cnn_group_layer_norm(seed=0):
    """Conv -> GroupNorm(2 groups) -> tanh -> pool -> linear -> LayerNorm, float64."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3), nn.LayerNorm(3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed), dtype=p.dtype) * 0.5)
    return model


def make(case, sizes=(6, 4)):
    if case == "cnn-gn":
        return Objective(tiny_cnn_group_layer_norm(), nn.CrossEntropyLoss(),
                         classification_batches(10, image=True, sizes=[6, 4]), hvp_mode="reverse")
    if case == "mlp":
        return Objective(tiny_mlp(), nn.CrossEntropyLoss(), classification_batches(sum(sizes), image=False, sizes=list(sizes)),
                         hvp_mode="reverse")
    return Objective(tiny_cnn_bn(), nn.CrossEntropyLoss(), classification_batches(sum(sizes), image=True, sizes=list(sizes)),
                     bn=case[4:], hvp_mode="reverse")


def exact_grad_trace(obj):
    """grad_theta tr Hessian L(theta) by plain autograd: trace of the dense Hessian, differentiated.

    Normalization layers run as composite arithmetic (the fused BatchNorm kernel's third
    derivative is wrong); the test confirms this reference by differences of dense traces.
    """
    theta = obj.params.clone().requires_grad_(True)
    with _CompositeNormalization():
        return _grad_trace(obj, theta)


def _grad_trace(obj, theta):
    loss = sum(len(x) / obj.num_samples * obj.batch_loss(theta, x, y) for x, y in obj.data)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    trace = sum(torch.autograd.grad(g[i], theta, create_graph=True)[0][i] for i in range(obj.dim))
    return torch.autograd.grad(trace, theta)[0]


@pytest.mark.parametrize("case", ["mlp", "cnn-eval", "cnn-train", "cnn-gn"])
def test_low_rank_matches_central_differences_of_hvps(case):
    obj = make(case)
    theta = obj.params
    V = torch.randn(obj.dim, 2, generator=gen(1), dtype=torch.float64)
    M = LowRank(torch.tensor([1.5, -0.7], dtype=torch.float64), V)
    d3 = third_order(obj, M)

    def contraction(t):  # <Hessian L(t), M> = sum_m c_m v_m^T H(t) v_m by HVPs
        return float((M.coeffs * (V * obj.hvp(V, t)).sum(0)).sum())

    # Central differences with h = 1e-4 have truncation ~h^2 |d4L| ~ 1e-8 and rounding
    # ~eps |<H, M>| / h ~ 1e-11, so compare at atol 1e-6. Directions: 4 coordinate axes (first
    # and last layers) and 6 random unit vectors, each checking u . d3L[M].
    h = 1e-4
    axes = torch.eye(obj.dim, dtype=torch.float64)[:, [0, 1, obj.dim - 2, obj.dim - 1]]
    directions = torch.randn(obj.dim, 6, generator=gen(7), dtype=torch.float64)
    directions = torch.cat([axes, directions / directions.norm(dim=0)], dim=1)
    fd = torch.tensor([(contraction(theta + h * u) - contraction(theta - h * u)) / (2 * h)
                       for u in directions.T], dtype=torch.float64)
    torch.testing.assert_close(directions.T @ d3, fd, rtol=1e-5, atol=1e-6)
    assert d3.abs().max() > 1e-2  # the check is not vacuous
    if case == "cnn-train":
        # Batch statistics cancel the conv bias (parameters 81..83): L does not depend on it at
        # all, so neither does any derivative. The fused BatchNorm kernel's third derivative
        # gets this wrong (~1 here); the composite normalization must give exactly 0.
        assert d3[81:84].abs().max() < 1e-10


def test_dense_m_matches_low_rank_and_dense_finite_differences():
    obj = make("mlp")
    V = torch.randn(obj.dim, 3, generator=gen(2), dtype=torch.float64)
    low = LowRank(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), V)
    torch.testing.assert_close(third_order(obj, low.dense()), third_order(obj, low), rtol=1e-9, atol=1e-11)
    # A full-rank non-symmetric M: only its symmetric part matters, and the directional
    # derivative u . d3L[M] matches central differences of <dense Hessian(theta +- h u), M>.
    M = torch.randn(obj.dim, obj.dim, generator=gen(3), dtype=torch.float64)
    d3 = third_order(obj, M)
    torch.testing.assert_close(third_order(obj, M.T), d3, rtol=1e-9, atol=1e-10)
    theta, h = obj.params, 1e-4
    for seed in (4, 5):
        u = torch.randn(obj.dim, generator=gen(seed), dtype=torch.float64)
        plus = (dense_loss_hessian(obj, theta + h * u) * M).sum()
        minus = (dense_loss_hessian(obj, theta - h * u) * M).sum()
        assert float(u @ d3) == pytest.approx(float(plus - minus) / (2 * h), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("case", ["mlp", "cnn-train"])
def test_identity_gives_the_exact_gradient_of_the_trace(case):
    obj = make(case, sizes=(8,))
    exact = exact_grad_trace(obj)
    # Cross-check the reference itself on one coordinate by differences of dense traces.
    for i in (obj.dim - 1,):
        e = torch.zeros(obj.dim, dtype=torch.float64)
        e[i] = 1e-4
        fd = (torch.trace(dense_loss_hessian(obj, obj.params + e))
              - torch.trace(dense_loss_hessian(obj, obj.params - e))) / 2e-4
        assert float(exact[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)
    identity = torch.eye(obj.dim, dtype=torch.float64)
    if case == "mlp":  # the dense path (eigendecomposition of M) once; LowRank for both
        torch.testing.assert_close(third_order(obj, identity), exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(third_order(obj, LowRank(torch.ones(obj.dim, dtype=torch.float64), identity)),
                               exact, rtol=1e-9, atol=1e-11)


def test_grad_trace_hessian_converges_to_the_exact_value():
    obj = make("mlp")
    exact = exact_grad_trace(obj)
    estimate = grad_trace_hessian(obj, num_probes=200, generator=gen(6))
    assert estimate.samples.shape == (200, obj.dim)
    error = estimate.value - exact
    # Unbiased: the error vector's squared norm is about sum(stderr^2) (D = 66 roughly
    # independent coordinates -> ratio 1 +- 0.17); [0.5, 1.6] is a safe band for the norm ratio.
    ratio = float(error.norm() / estimate.stderr.norm())
    assert 0.5 <= ratio <= 1.6
    z = error / estimate.stderr
    assert float(z.abs().max()) < 4.5  # 66 z-scores, each N(0, 1)-like: max |z| > 4.5 has p < 1e-3
    # Running mean: the error after 200 probes is smaller than after 12.5 (= 200 / 16) on average;
    # compare with the first 12 probes: expected ratio of norms ~ 4.
    early = estimate.samples[:12].mean(0) - exact
    assert float(error.norm()) < float(early.norm()) / 2
    assert float(error.norm()) < 0.1 * float(exact.norm())


def test_bad_arguments_raise_clear_errors():
    obj = make("mlp")
    with pytest.raises(ValueError, match=r"M must be a \(66, 66\) tensor"):
        third_order(obj, torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="66 rows"):
        third_order(obj, LowRank(torch.ones(1, dtype=torch.float64), torch.ones(5, 1, dtype=torch.float64)))
    with pytest.raises(ValueError, match="coeffs"):
        LowRank(torch.ones(2, dtype=torch.float64), torch.ones(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Objective"):
        third_order(MatrixOperator(torch.eye(3, dtype=torch.float64)), torch.eye(3))
    with pytest.raises(ValueError, match="num_probes"):
        grad_trace_hessian(obj, num_probes=1)
    with pytest.raises(ValueError, match="theta must have shape"):
        third_order(obj, torch.eye(66, dtype=torch.float64), theta=torch.zeros(3, dtype=torch.float64))
