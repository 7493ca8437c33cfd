"""K simulated workers of one model in one process: stacked state, SGD, two backends.

The state of the K workers lives in flat stacked tensors, one row per worker:
`params` (K, D) trainable parameters in `named_parameters()` order, `momentum` (K, D),
`buffers` (K, D_b) floating-point buffers (BatchNorm running mean / variance) and `counters`
(K, D_c) integer buffers (num_batches_tracked). Averaging, checkpoints and the worker spread
work on these rows whatever the backend.

Backends (exactly equivalent, BatchNorm buffers included; tests/experiments/test_workers.py):
- "serial": the authors' design and the reference. K deep copies of the model whose
  parameters and buffers are views of row k; each step runs the K copies one after another
  with plain autograd and updates worker k from its own gradients right after its backward
  pass (`forward_backward` + `apply_sgd_` is the same step with the (K, D) gradients).
- "vmap": one `torch.func.functional_call` of the model vmapped over the worker dimension,
  parameters and buffers passed as (K, ...) views of the stacked rows, one backward pass for
  all workers (the per-worker losses are summed; workers do not interact).

SGD (PyTorch's convention, dampening 0): d = g + wd m * theta (m = 0 on norm-layer parameters
and biases unless `wd_norm_bias`), buf = mu buf + d, d = d + mu buf (Nesterov) or buf;
theta -= eta d.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dynamics.objective import NORM_TYPES


@dataclass(frozen=True)
class SGDOptions:
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    wd_norm_bias: bool = False


def _layout(named, channels_last: bool = False):
    """(names, shapes, numels, cl): cl[i] says tensor i (a 4-D convolution weight, when
    `channels_last`) is stored in the flat row in channels-last order (out, kh, kw, in)."""
    names, shapes, numels, cl = [], [], [], []
    for n, t in named:
        names.append(n)
        shapes.append(t.shape)
        numels.append(t.numel())
        cl.append(bool(channels_last and t.dim() == 4))
    return names, shapes, numels, cl


def _split_views(flat: Tensor, names, shapes, numels, cl, lead: tuple[int, ...]) -> dict[str, Tensor]:
    """Views of the flat rows `flat` (*lead, D) with each tensor's logical shape; a
    channels-last entry is a permuted view (channels-last strides)."""
    chunks = torch.split(flat, numels, dim=-1)
    L = len(lead)
    out = {}
    for n, c, s, last in zip(names, chunks, shapes, cl):
        if last:
            o, i, kh, kw = s
            out[n] = c.view((*lead, o, kh, kw, i)).permute(*range(L), L, L + 3, L + 1, L + 2)
        else:
            out[n] = c.view((*lead, *s))
    return out


def _flat(t: Tensor, last: bool) -> Tensor:
    """A tensor's values in its flat-row order (channels-last order when `last`)."""
    return (t.permute(0, 2, 3, 1) if last else t).reshape(-1)


def weight_decay_mask(model: nn.Module, *, wd_norm_bias: bool) -> Tensor:
    """(D,) 1.0 where weight decay applies; 0.0 on norm-layer parameters and biases unless
    `wd_norm_bias` (Gu et al. 2023 exclude them)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES)
                   for p in m.parameters(recurse=False)}
    parts = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = wd_norm_bias or not (id(p) in norm_params or name.endswith("bias"))
        parts.append(torch.full((p.numel(),), float(decay), dtype=p.dtype, device=p.device))
    return torch.cat(parts)


class Workers:
    """K workers, all starting from `model`'s current state.

    Args:
        model: the network (its parameters define D; it is not modified).
        num_workers: K of this process.
        backend: "serial" or "vmap".
        sgd: `SGDOptions`.
        autocast_dtype: e.g. torch.bfloat16 for bf16 autocast of the forward pass, or None.
        channels_last: give convolutions channels-last inputs (and store their weights so).
        compile: `torch.compile` the vmapped forward pass (backend "vmap" only; the first step
            compiles, minutes on a CPU).
    """

    def __init__(self, model: nn.Module, num_workers: int, *, backend: str = "serial",
                 sgd: SGDOptions = SGDOptions(), autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, compile: bool = False):
        if backend not in ("serial", "vmap"):
            raise ValueError(f"backend must be 'serial' or 'vmap', got {backend!r}")
        if compile and backend != "vmap":
            raise ValueError("compile applies to the stacked workers: it needs backend 'vmap'")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.K, self.backend, self.sgd = num_workers, backend, sgd
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        self.model = copy.deepcopy(model)
        self.model.train()
        named_p = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        named_b = list(self.model.named_buffers())
        # channels_last: convolution weights are stored (and viewed) channels-last too, so
        # convolutions see channels-last inputs AND weights
        self._p_layout = _layout(named_p, channels_last)
        self._fb_layout = _layout([(n, b) for n, b in named_b if b.is_floating_point()])
        self._ib_layout = _layout([(n, b) for n, b in named_b if not b.is_floating_point()])
        first = named_p[0][1]
        self.device, self.dtype = first.device, first.dtype

        def stack(named, dtype, cl=None):
            cl = cl or [False] * len(named)
            row = torch.cat([_flat(t.detach(), last).to(dtype) for (_, t), last in zip(named, cl)]) \
                if named else torch.zeros(0, dtype=dtype, device=self.device)
            return row.unsqueeze(0).repeat(self.K, 1).contiguous()

        self.params = stack(named_p, self.dtype, self._p_layout[3])
        self.momentum = torch.zeros_like(self.params)
        fb = [(n, b) for n, b in named_b if b.is_floating_point()]
        ib = [(n, b) for n, b in named_b if not b.is_floating_point()]
        self.buffers = stack(fb, fb[0][1].dtype if fb else self.dtype)
        self.counters = stack(ib, torch.int64)
        self.initial_buffers = self.buffers[0].clone()
        self.wd_mask = weight_decay_mask(self.model, wd_norm_bias=sgd.wd_norm_bias)
        if backend == "serial":
            self._copies = [self._bind_copy(k) for k in range(self.K)]
            # per worker: its trainable parameters (views of params[k]) and momentum views, bound
            # once so a step does no per-parameter Python bookkeeping beyond the update itself
            self._copy_params = [[p for p in m.parameters() if p.requires_grad] for m in self._copies]
            self._momentum_views = [list(_split_views(self.momentum[k], *self._p_layout, ()).values())
                                    for k in range(self.K)]
            mask = _split_views(self.wd_mask, *self._p_layout, ())
            self._decayed = [i for i, t in enumerate(mask.values()) if bool(t.reshape(-1)[0])]
        else:
            self.params.requires_grad_(True)
            model_ = self.model

            def one(p, b, xk):   # one worker's forward pass from its parameters and buffers
                return functional_call(model_, {**p, **b}, (xk,))
            self._stacked = vmap(one)
            if compile:
                self._stacked = torch.compile(self._stacked)

    # ------------------------------------------------------------------ layout
    @property
    def dim(self) -> int:
        return self.params.shape[1]

    def _bind_copy(self, k: int) -> nn.Module:
        """A copy of the model whose parameters and buffers are views of row k."""
        m = copy.deepcopy(self.model)
        views = {**_split_views(self.params[k], *self._p_layout, ()),
                 **_split_views(self.buffers[k], *self._fb_layout, ()),
                 **_split_views(self.counters[k], *self._ib_layout, ())}
        for name, view in views.items():
            owner, _, leaf = name.rpartition(".")
            sub = m.get_submodule(owner)
            if leaf in sub._parameters:
                sub._parameters[leaf].data = view
            else:
                sub._buffers[leaf] = view
        return m

    def named_views(self, k: int) -> dict[str, Tensor]:
        """Parameters and buffers of worker k by name (views into the stacked rows)."""
        return {**_split_views(self.params[k].detach(), *self._p_layout, ()),
                **_split_views(self.buffers[k], *self._fb_layout, ()),
                **_split_views(self.counters[k], *self._ib_layout, ())}

    def mean_state(self, params_mean: Tensor | None = None, buffers_mean: Tensor | None = None) -> dict[str, Tensor]:
        """A state_dict-like dict of the mean over this process's workers (or given means)."""
        p = self.params.detach().mean(0) if params_mean is None else params_mean
        b = self.buffers.mean(0) if buffers_mean is None else buffers_mean
        return {**{n: t.clone() for n, t in _split_views(p, *self._p_layout, ()).items()},
                **{n: t.clone() for n, t in _split_views(b, *self._fb_layout, ()).items()},
                **{n: t.clone() for n, t in _split_views(self.counters[0], *self._ib_layout, ()).items()}}

    def load_row_(self, k: int, state: dict[str, Tensor]) -> None:
        """Set worker k from a state_dict (parameters and buffers by name)."""
        with torch.no_grad():
            for name, view in self.named_views(k).items():
                view.copy_(state[name])

    # ------------------------------------------------------------------ steps
    def _prepare(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 5:
            return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return x

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def _loss_logits(self, logits: Tensor) -> Tensor:
        # the loss in at least float32 (bf16 autocast gives bf16 logits); float64 stays float64
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-worker mean cross-entropy losses (K,), correct counts (K,) and gradients (K, D).

        x: (K, B, ...) inputs, y: (K, B) integer labels. Updates the BatchNorm buffers.
        """
        x = self._prepare(x)
        if self.backend == "serial":
            grads = torch.empty_like(self.params)
            losses, correct = [], []
            for k, m in enumerate(self._copies):
                for p in m.parameters():
                    p.grad = None
                with self._autocast():
                    logits = m(x[k])
                loss = F.cross_entropy(self._loss_logits(logits), y[k])
                loss.backward()
                torch.cat([_flat(p.grad, last) for p, last in
                           zip([p for p in m.parameters() if p.requires_grad], self._p_layout[3])], out=grads[k])
                losses.append(loss.detach())
                correct.append((logits.detach().argmax(-1) == y[k]).sum())
            return torch.stack(losses), torch.stack(correct), grads
        self.params.grad = None
        pv = _split_views(self.params, *self._p_layout, (self.K,))
        # vmap does not write in-place buffer updates through non-contiguous views: give it
        # contiguous copies and write them back after the forward pass.
        fb = {n: t.clone() for n, t in _split_views(self.buffers, *self._fb_layout, (self.K,)).items()}
        ib = {n: t.clone() for n, t in _split_views(self.counters, *self._ib_layout, (self.K,)).items()}
        bv = {**fb, **ib}

        with self._autocast():
            logits = self._stacked(pv, bv, x)
        with torch.no_grad():
            if fb:
                torch.cat([t.reshape(self.K, -1) for t in fb.values()], dim=1, out=self.buffers)
            if ib:
                torch.cat([t.reshape(self.K, -1) for t in ib.values()], dim=1, out=self.counters)
        K, B = y.shape
        losses = F.cross_entropy(self._loss_logits(logits).reshape(K * B, -1), y.reshape(-1),
                                 reduction="none").view(K, B).mean(1)
        losses.sum().backward()
        correct = (logits.detach().argmax(-1) == y).sum(1)
        grads, self.params.grad = self.params.grad, None
        return losses.detach(), correct, grads

    def apply_sgd_(self, grads: Tensor, lr: float) -> None:
        """One SGD step on every worker from gradients (K, D) (`grads` is used as scratch)."""
        o = self.sgd
        with torch.no_grad():
            d = grads
            if o.weight_decay:
                d.addcmul_(self.params, self.wd_mask, value=o.weight_decay)
            if o.momentum:
                self.momentum.mul_(o.momentum).add_(d)
                d = d.add(self.momentum, alpha=o.momentum) if o.nesterov else self.momentum
            self.params.sub_(d, alpha=lr)

    def _sgd_row_(self, k: int, grads: list[Tensor], lr: float) -> None:
        """`apply_sgd_` for worker k alone, on per-parameter views (`grads` is used as scratch).

        The same operations in the same order as the (K, D) update, element by element (equal up
        to rounding: the weight decay is an add rather than a masked addcmul). Run right after
        worker k's backward pass, while its gradients are still in cache, it needs no (K, D)
        gradient buffer and no concatenation (measured ~1-2% of a ResNet-20 step).
        """
        o, params, mom = self.sgd, self._copy_params[k], self._momentum_views[k]
        with torch.no_grad():
            d = grads
            if o.weight_decay and self._decayed:
                torch._foreach_add_([grads[i] for i in self._decayed],
                                    [params[i] for i in self._decayed], alpha=o.weight_decay)
            if o.momentum:
                torch._foreach_mul_(mom, o.momentum)
                torch._foreach_add_(mom, d)
                d = torch._foreach_add(d, mom, alpha=o.momentum) if o.nesterov else mom
            torch._foreach_add_(params, d, alpha=-lr)

    def _serial_step(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        losses, correct = [], []
        for k, m in enumerate(self._copies):
            params = self._copy_params[k]
            for p in params:
                p.grad = None
            with self._autocast():
                logits = m(x[k])
            loss = F.cross_entropy(self._loss_logits(logits), y[k])
            loss.backward()
            self._sgd_row_(k, [p.grad for p in params], lr)
            for p in params:
                p.grad = None
            losses.append(loss.detach())
            correct.append((logits.detach().argmax(-1) == y[k]).sum())
        return torch.stack(losses), torch.stack(correct)

    def step(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """One local SGD step of every worker on its own batch; returns (losses (K,), correct (K,))."""
        if x.shape[0] != self.K or y.shape[0] != self.K:
            raise ValueError(f"expected batches stacked over K={self.K} workers, got x {tuple(x.shape)}")
        if self.backend == "serial":
            return self._serial_step(self._prepare(x), y, lr)
        losses, correct, grads = self.forward_backward(x, y)
        self.apply_sgd_(grads, lr)
        return losses, correct

