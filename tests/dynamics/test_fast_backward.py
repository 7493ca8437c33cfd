"""fast_backward: conv, eval batch norm and ReLU with first-order-kernel double backwards.

Every derivative up to third order (value, gradient, Hessian-vector product, and the gradient
of v^T H v) must equal the stock PyTorch op's in float64, for the layer alone and inside the
TorchFunctionMode, including composition with third_order's normalization mode."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamics import LowRank, Objective, third_order
from dynamics.fast_backward import FastDoubleBackward, conv, eval_batch_norm, relu
from tests.reference import classification_batches, tiny_cnn_bn

F64 = torch.float64


def derivatives(fn, inputs, seed=0):
    """[f, grad f, H v, grad (v^T H v)] of the scalar sum(tanh(fn(*inputs)) * c), flattened per input.

    tanh makes the outer function non-quadratic, so all three orders are nonzero."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    c = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    loss = (torch.tanh(out) * c).sum()
    vs = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in inputs]
    g = torch.autograd.grad(loss, inputs, create_graph=True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, vs)), inputs, create_graph=True)
    third = torch.autograd.grad(sum((hi * vi).sum() for hi, vi in zip(hv, vs)), inputs)
    return [loss.detach()] + [t.detach() for t in (*g, *hv, *third)]


def assert_same(fast, stock):
    assert len(fast) == len(stock)
    for a, b in zip(fast, stock):
        # float64, same arithmetic up to summation order: agreement ~1e-13 relative.
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


CONV_CASES = [  # (dims, stride, padding, dilation, groups, bias)
    (2, 1, 1, 1, 1, True),
    (2, 2, 1, 1, 1, False),
    (2, 1, 0, 1, 2, True),
    (2, 2, 2, 1, 2, False),
    (2, 1, "same", 2, 1, True),
    (2, 1, "valid", 1, 1, False),
    (1, 2, 1, 1, 1, True),
    (3, 1, 1, 1, 1, False),
]


@pytest.mark.parametrize("dims,stride,padding,dilation,groups,bias", CONV_CASES)
def test_conv_derivatives_match_stock_to_third_order(dims, stride, padding, dilation, groups, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((3, 4) + (7,) * dims, generator=gen, dtype=F64)
    w = torch.randn((6, 4 // groups) + (3,) * dims, generator=gen, dtype=F64)
    b = torch.randn(6, generator=gen, dtype=F64)
    stock_conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    inputs = [x, w, b] if bias else [x, w]

    def stock(x, w, b=None):
        return stock_conv(x, w, b, stride, padding, dilation, groups)

    def fast(x, w, b=None):
        return conv(x, w, b, stride, padding, dilation, groups)

    expected = derivatives(stock, inputs)
    assert_same(derivatives(fast, inputs), expected)
    with FastDoubleBackward():  # the mode routes the stock call through `conv`
        assert_same(derivatives(stock, inputs), expected)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (6, 3), (4, 3, 5)])
def test_eval_batch_norm_derivatives_match_stock_to_third_order(shape, affine):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=F64)
    w, b = torch.randn(3, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)
    mean = torch.randn(3, generator=gen, dtype=F64)
    var = 0.5 + torch.rand(3, generator=gen, dtype=F64)
    inputs = [x, w, b] if affine else [x]

    def stock(x, w=None, b=None):
        return F.batch_norm(x, mean, var, w, b, training=False, eps=1e-3)

    expected = derivatives(stock, inputs)
    assert_same(derivatives(lambda x, w=None, b=None: eval_batch_norm(x, mean, var, w, b, 1e-3), inputs),
                expected)
    with FastDoubleBackward():
        assert_same(derivatives(stock, inputs), expected)


def test_relu_derivatives_match_stock_to_third_order():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=F64)
    w = torch.randn(3, 3, 3, 3, generator=gen, dtype=F64)

    def net(x, w):  # relu after a conv: its input depends on both x and w
        return F.relu(F.conv2d(x, w, padding=1)) ** 2 + F.relu(x)

    expected = derivatives(net, [x, w])
    assert_same(derivatives(lambda x, w: relu(F.conv2d(x, w, padding=1)) ** 2 + relu(x), [x, w]), expected)
    with FastDoubleBackward():
        assert_same(derivatives(net, [x, w]), expected)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_mode_passes_other_calls_to_the_stock_ops():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 5, generator=gen, dtype=F64)  # unbatched: falls back
    w = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)
    mean, var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    xb = torch.randn(4, 3, 5, 5, generator=gen, dtype=F64)
    with FastDoubleBackward():
        torch.testing.assert_close(F.conv2d(x, w), torch.ops.aten.convolution(
            x.unsqueeze(0), w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)[0])
        out = F.conv2d(xb, w, padding="same")  # even kernel: odd total padding, stock handles it
        assert out.shape == (4, 2, 5, 5)
        train = F.batch_norm(xb, mean.clone(), var.clone(), training=True)  # batch statistics
        torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
        y = xb.clone()
        assert F.relu(y, inplace=True) is y  # in-place stays in place
    with pytest.raises(ValueError, match="batched input"):
        conv(x, w)
    with pytest.raises(ValueError, match="padding"):
        conv(xb, w, padding="same")
    with pytest.raises(ValueError, match="stride 1"):
        conv(xb, w[:, :, :1, :1], stride=2, padding="same")


def _weight_net_loss(t, x, nonlinear_weight: bool):
    w1, w2 = t[:54].view(2, 3, 3, 3), t[54:72].view(2, 1, 3, 3)
    if nonlinear_weight:  # a weight computed from theta: its gradient value matters at 2nd order
        w2 = w2 * w2.norm()
    h = torch.tanh(F.conv2d(x, w1, padding=1, stride=2))
    return torch.tanh(F.conv2d(h, w2, groups=2)).pow(2).sum() + (t[72:] * h.mean()).sum()


@pytest.mark.parametrize("nonlinear_weight", [False, True])
def test_unread_gradient_values_keep_the_hvp_exact(nonlinear_weight):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 6, 6, generator=gen, dtype=F64)
    theta, v = torch.randn(75, generator=gen, dtype=F64), torch.randn(75, generator=gen, dtype=F64)

    def hvp(fast: bool, unread: bool):
        with (FastDoubleBackward() if fast else contextlib.nullcontext()) as mode:
            t = theta.clone().requires_grad_(True)
            with mode.gradient_values_unread() if unread else contextlib.nullcontext():
                (g,) = torch.autograd.grad(_weight_net_loss(t, x, nonlinear_weight), t, create_graph=True)
            return g.detach(), torch.autograd.grad(g, t, v)[0]

    g_stock, hv_stock = hvp(False, False)
    g_fast, hv_fast = hvp(True, False)
    g_unread, hv_unread = hvp(True, True)
    torch.testing.assert_close(g_fast, g_stock, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv_fast, hv_stock, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(hv_unread, hv_stock, rtol=1e-10, atol=1e-11)
    # The placeholder: the leaf-view weight w1's gradient VALUE is zero, the rest is true.
    assert torch.count_nonzero(g_unread[:54]) == 0 and torch.count_nonzero(g_stock[:54]) > 0
    torch.testing.assert_close(g_unread[72:], g_stock[72:], rtol=1e-12, atol=1e-12)
    if nonlinear_weight:  # w2 is not a view of theta: its gradient is computed for real
        torch.testing.assert_close(g_unread[54:72], g_stock[54:72], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_mode_composes_with_third_order(bn):
    """third_order runs its own TorchFunctionMode (composite normalization); inside or outside
    FastDoubleBackward it must give the same d3L[M]."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).double()
    ref = tiny_cnn_bn()
    with torch.no_grad():
        model[1].running_mean.copy_(ref[1].running_mean[:3].repeat(2)[:4])
        model[1].running_var.copy_(ref[1].running_var[:3].repeat(2)[:4])
    obj = Objective(model, nn.CrossEntropyLoss(), classification_batches(8, image=True), bn=bn)
    vecs = torch.randn(obj.dim, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    M = LowRank(torch.tensor([1.0, -0.5], dtype=F64), vecs)
    expected = third_order(obj, M)
    with FastDoubleBackward():
        got = third_order(obj, M)
    assert float(expected.norm()) > 1e-6  # a nonzero third derivative
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
