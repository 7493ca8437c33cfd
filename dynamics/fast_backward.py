"""Conv, eval-mode batch norm and ReLU whose derivatives of every order use first-order kernels.

Why (measured on ResNet-20, batch 256, 1 CPU thread, torch 2.13): a reverse-over-reverse
Hessian-vector product through the stock ops spends most of its second backward in
- PyTorch's generic `_convolution_double_backward`, which forms weight-gradient terms by
  convolving batch/channel-transposed tensors (~4x a forward convolution of the same size);
- `NativeBatchNormBackwardBackward` (eval mode), ~10 activation-sized multiplications per layer;
- `ThresholdBackwardBackward` (ReLU), which fills and accumulates a zero tensor per layer.
The autograd Functions below compute the same values and express every derivative with the
fast first-order kernels (the forward convolution and `aten.convolution_backward`) or single
elementwise passes.

Convolution y = conv(x, W) (stride, padding, dilation, groups fixed; bias added outside):
- `_Conv`: forward y = conv(x, W); backward (gx, gW) = `_ConvBackward(gy, x, W)`.
- `_ConvBackward(gy, x, W) -> (gx, gW)`, the adjoints gx = B_x(gy, W), gW = B_W(gy, x) with
  <B_x(gy, W), a> = <gy, conv(a, W)> and <B_W(gy, x), A> = <gy, conv(x, A)>. Both are bilinear,
  so for upstream (dgx, dgW) its vector-Jacobian product is
      d gy = conv(dgx, W) + conv(x, dgW),   d x = B_x(gy, dgW),   d W = B_W(gy, dgx),
  written again with `_Conv` and `_ConvBackward`: differentiable to any order, exactly.
Eval batch norm is the per-channel affine map y = x * s + c (s = weight / sqrt(running_var +
eps), c = bias - running_mean * s), `_ChannelAffine`, whose backward `_ChannelAffineBackward`
is differentiated with plain torch ops. ReLU's backward `_ReLUBackward` is linear in gy and
piecewise constant in y (derivative 0 at y = 0, PyTorch's convention).

`FastDoubleBackward` is a TorchFunctionMode that routes `F.conv1d/2d/3d`, eval-mode
`F.batch_norm` and non-inplace `F.relu` through these while active. Modes stack: inside another
mode (e.g. the composite normalization of `dynamics.third_order`) each mode handles its own
calls and passes the rest on. Reverse-mode autograd only: the Functions define no forward-mode
rule, so do not enter the mode under `torch.func.jvp` or `torch.autograd.forward_ad`.

`with mode.gradient_values_unread():` is for callers that build a gradient only to differentiate
it again without reading its value (a reverse-over-reverse HVP): backward passes run inside it
skip the weight-gradient convolution B_W(gy, x) of every convolution whose weight is a leaf
tensor or a view of one, and return a zero placeholder of the right shape whose graph is exact.
Valid because nothing downstream of such a gW reads its value (view backward is linear and
value-free); a weight computed from the parameters by other ops keeps its true gradient. Only
the backward passes run inside the block skip: the next one (through the same forward graph,
where B_W(ybar, x) is part of the HVP itself) computes everything.

Shapes: x (N, C_in, *spatial), W (C_out, C_in / groups, *kernel), as `F.conv{1,2,3}d`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["conv", "eval_batch_norm", "relu", "FastDoubleBackward"]

_aten = torch.ops.aten


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _non_channel_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


# ---------------------------------------------------------------------------- convolution
class _SkipPolicy:
    """Shared by the nodes of one `FastDoubleBackward`; `skip` is read at backward time."""

    def __init__(self):
        self.skip = False


class _Conv(torch.autograd.Function):
    """y = conv(x, W), no bias; params = (stride, padding, dilation, groups). If `policy` (a
    _SkipPolicy or None) says so at backward time and W is a leaf or a view of one, the weight
    gradient's value is replaced by a placeholder (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, params: tuple, policy: _SkipPolicy | None) -> Tensor:
        stride, padding, dilation, groups = params
        ctx.set_materialize_grads(False)  # an unused output gives None, not a zero tensor
        ctx.save_for_backward(x, weight)
        ctx.params = params
        ctx.policy = policy if policy is not None and (
            weight.is_leaf or (weight._base is not None and weight._base.is_leaf)) else None
        return _aten.convolution(x, weight, None, stride, padding, dilation, False,
                                 [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, gy: Tensor | None):
        if gy is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        skip = ctx.policy is not None and ctx.policy.skip
        gx, gw = _ConvBackward.apply(gy, x, weight, ctx.params, (need_x, need_w), skip)
        return gx, gw, None, None


class _ConvBackward(torch.autograd.Function):
    """(gx, gW) = (B_x(gy, W), B_W(gy, x)); `mask` says which to compute (the other is None);
    skip_w: return a zero placeholder for gW's value (its graph stays exact)."""

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, weight: Tensor, params: tuple, mask: tuple, skip_w: bool = False):
        stride, padding, dilation, groups = params
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, x, weight)
        ctx.params, ctx.mask = params, mask
        compute_w = mask[1] and not skip_w
        gx, gw, _ = _aten.convolution_backward(gy, x, weight, None, stride, padding, dilation, False,
                                               [0] * len(stride), groups, [mask[0], compute_w, False])
        if mask[1] and not compute_w:  # value never read (module docstring): a free placeholder
            gw = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        return gx, gw

    @staticmethod
    def backward(ctx, dgx: Tensor | None, dgw: Tensor | None):
        gy, x, weight = ctx.saved_tensors
        params = ctx.params
        dgx = dgx if ctx.mask[0] else None
        dgw = dgw if ctx.mask[1] else None
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = d_x = d_w = None
        if need_gy:
            if dgx is not None:
                d_gy = _Conv.apply(dgx, weight, params, None)
            if dgw is not None:
                term = _Conv.apply(x, dgw, params, None)
                d_gy = term if d_gy is None else d_gy + term
        if need_x and dgw is not None:
            d_x = _ConvBackward.apply(gy, x, dgw, params, (True, False))[0]
        if need_w and dgx is not None:
            d_w = _ConvBackward.apply(gy, dgx, weight, params, (False, True))[1]
        return d_gy, d_x, d_w, None, None, None


def _ints(value, n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"conv {name} must be an int or have {n} entries, got {value}")
    return value


def _same_padding(weight: Tensor, dilation: list[int]) -> list[int] | None:
    """Symmetric padding for padding='same' (stride 1), or None when the total is odd."""
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    return None if any(t % 2 for t in total) else [t // 2 for t in total]


def conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
         groups: int = 1, *, policy: _SkipPolicy | None = None) -> Tensor:
    """Same value as `F.conv{n}d(x, weight, bias, stride, padding, dilation, groups)` for a batched
    x of n + 2 dims, with the derivative structure of the module docstring.

    padding: ints, "valid", or "same" (only when d * (k - 1) is even in every dim).
    policy: internal, set by `FastDoubleBackward` (see `gradient_values_unread`).
    """
    n = weight.dim() - 2
    if n < 1 or x.dim() != n + 2:
        raise ValueError(f"conv expects a batched input of {n + 2} dims for a {weight.dim()}-dim weight, "
                         f"got input shape {tuple(x.shape)}")
    stride, dilation = _ints(stride, n, "stride"), _ints(dilation, n, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * n
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("conv: padding='same' needs stride 1 (as F.conv*d)")
            padding = _same_padding(weight, dilation)
            if padding is None:
                raise ValueError("conv: padding='same' with an odd total padding d * (k - 1) is not supported")
        else:
            raise ValueError(f"conv padding must be ints, 'valid' or 'same', got {padding!r}")
    padding = _ints(padding, n, "padding")
    y = _Conv.apply(x, weight, (stride, padding, dilation, int(groups)), policy)
    if bias is not None:
        y = y + bias.reshape(_channel_shape(y))
    return y


# ---------------------------------------------------------------------------- eval batch norm
class _ChannelAffine(torch.autograd.Function):
    """y = x * s + c per channel (dim 1); s and c of shape (C,)."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, c: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, s)
        shape = _channel_shape(x)
        return torch.addcmul(c.reshape(shape), x, s.reshape(shape))

    @staticmethod
    def backward(ctx, gy: Tensor | None):
        if gy is None:
            return None, None, None
        x, s = ctx.saved_tensors
        return _ChannelAffineBackward.apply(gy, x, s, tuple(ctx.needs_input_grad))


class _ChannelAffineBackward(torch.autograd.Function):
    """(gx, gs, gc) = (gy * s, sum(gy * x), sum(gy)), sums over every dim but 1; mask as in _ConvBackward."""

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, s: Tensor, mask: tuple):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, x, s)
        ctx.mask = mask
        dims = _non_channel_dims(x)
        gx = gy * s.reshape(_channel_shape(x)) if mask[0] else None
        gs = (gy * x).sum(dims) if mask[1] else None
        gc = gy.sum(dims) if mask[2] else None
        return gx, gs, gc

    @staticmethod
    def backward(ctx, dgx: Tensor | None, dgs: Tensor | None, dgc: Tensor | None):
        # Plain differentiable torch ops: exact at every order; only this level needs to be fast.
        gy, x, s = ctx.saved_tensors
        dgx, dgs, dgc = (d if m else None for d, m in zip((dgx, dgs, dgc), ctx.mask))
        shape = _channel_shape(x)
        need_gy, need_x, need_s = ctx.needs_input_grad[:3]
        d_gy = d_x = d_s = None
        if need_gy and not (dgx is None and dgs is None and dgc is None):
            d_gy = None if dgc is None else dgc.reshape(shape)
            if dgx is not None:  # addcmul: one fused pass per term
                d_gy = dgx * s.reshape(shape) if d_gy is None else torch.addcmul(d_gy, dgx, s.reshape(shape))
            if dgs is not None:
                d_gy = x * dgs.reshape(shape) if d_gy is None else torch.addcmul(d_gy, x, dgs.reshape(shape))
            if d_gy.shape != gy.shape:
                d_gy = d_gy.expand(gy.shape)
        if need_x and dgs is not None:
            d_x = gy * dgs.reshape(shape)
        if need_s and dgx is not None:
            d_s = (gy * dgx).sum(_non_channel_dims(x))
        return d_gy, d_x, d_s, None


def eval_batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float) -> Tensor:
    """`F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)` as one
    per-channel affine map x * s + c (x of shape (N, C, ...)), exact derivatives of any order."""
    s = torch.rsqrt(running_var + eps)
    if weight is not None:
        s = s * weight
    c = -running_mean * s
    if bias is not None:
        c = c + bias
    return _ChannelAffine.apply(x, s, c)


# ---------------------------------------------------------------------------- relu
class _ReLU(torch.autograd.Function):
    """y = max(x, 0); backward `_ReLUBackward`."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor | None):
        if gy is None:
            return None
        (y,) = ctx.saved_tensors
        return _ReLUBackward.apply(gy, y)


class _ReLUBackward(torch.autograd.Function):
    """gx = gy where y > 0, else 0: linear in gy, piecewise constant in y (no d/dy is formed)."""

    @staticmethod
    def forward(ctx, gy: Tensor, y: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y)
        return _aten.threshold_backward(gy, y, 0)

    @staticmethod
    def backward(ctx, dgx: Tensor | None):
        if dgx is None or not ctx.needs_input_grad[0]:
            return None, None
        (y,) = ctx.saved_tensors
        return _ReLUBackward.apply(dgx, y), None


def relu(x: Tensor) -> Tensor:
    """Same value as `F.relu(x)` with PyTorch's derivative convention (0 at x = 0)."""
    return _ReLU.apply(x)


# ---------------------------------------------------------------------------- the mode
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class FastDoubleBackward(TorchFunctionMode):
    """While active, `F.conv1d/2d/3d` (batched input), `F.batch_norm` with training=False and
    running statistics, and `F.relu(inplace=False)` run as the Functions of this module: same
    values, derivatives exact to any order, cheap double backward. Everything else (unbatched
    convs, odd 'same' paddings, batch statistics, in-place relu) goes to the stock function.
    """

    def __init__(self):
        super().__init__()
        self._policy = _SkipPolicy()

    @contextlib.contextmanager
    def gradient_values_unread(self):
        """Backward passes run in this block may return placeholder VALUES for the gradients of
        leaf (or leaf-view) convolution weights; their graphs stay exact. Use it only to build a
        gradient that is differentiated again and never read (module docstring)."""
        self._policy.skip = True
        try:
            yield self
        finally:
            self._policy.skip = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _CONVS.get(func)
        if n is not None:
            bound = dict(zip(_CONV_ARGS, args), **kwargs)
            x, weight = bound["input"], bound["weight"]
            padding, dilation = bound.get("padding", 0), bound.get("dilation", 1)
            odd_same = padding == "same" and _same_padding(weight, _ints(dilation, n, "dilation")) is None
            if x.dim() == n + 2 and not odd_same:
                return conv(x, weight, bound.get("bias"), bound.get("stride", 1), padding, dilation,
                            bound.get("groups", 1), policy=self._policy)
        elif func is F.batch_norm:
            bound = dict(zip(_BN_ARGS, args), **kwargs)
            if (not bound.get("training", False) and bound.get("running_mean") is not None
                    and bound.get("running_var") is not None and bound["input"].dim() >= 2):
                return eval_batch_norm(bound["input"], bound["running_mean"], bound["running_var"],
                                       bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5))
        elif func is F.relu:
            bound = dict(zip(("input", "inplace"), args), **kwargs)
            if not bound.get("inplace", False):
                return relu(bound["input"])
        return func(*args, **kwargs)
