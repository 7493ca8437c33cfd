"""The training loss over a fixed data list, as a function of one flat parameter vector.

`Objective` is what every probe in `dynamics` (and the matrix-free problems of `sde`) works
on: L(theta) = (1/N) sum_i l_i(theta) over the samples of a fixed list of (x, y) batches,
evaluated at any flat vector theta of shape (D,) through `torch.func.functional_call`, so the
model's own parameters are never modified.

Normalization layers (`bn`):
- "eval": running statistics, the usual evaluation-mode network (default).
- "train": batch statistics of each batch in the list; running buffers are left untouched.
  Only normalization layers are switched; dropout and everything else stay in eval mode so
  that the loss is a deterministic function of theta.

Hessian-vector products (`hvp`, hvp_mode="reverse") run inside `dynamics.fast_backward.
FastDoubleBackward` by default: convolutions, eval-mode batch norm and ReLU then have exact
double backwards made of first-order kernels (ResNet-20, batch 256: HVP / gradient CPU time about
0.75x that of the stock path, e.g. 2.5 vs 3.4 in benchmarks/results/bench_hessian.md);
`fast_backward=False` gives the stock autograd path.
`cache_graphs=True` keeps each batch's gradient graph between `hvp` calls at the same theta.

Per-sample quantities (`per_sample_losses`, `per_sample_grads`) evaluate each sample alone
through `torch.func.vmap`; with bn="train" that would normalize a single sample by its own
statistics, so they refuse bn="train" (see DESIGN.md, "Known traps").
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from dynamics.fast_backward import FastDoubleBackward

# Normalization layers: put in train mode by bn="train"; experiments excludes their parameters
# from weight decay (experiments.models.param_groups_no_wd, experiments.workers.weight_decay_mask).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d)

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def _network_mode(model: nn.Module, bn: str):
    """Temporarily put `model` in eval mode, with normalization layers in train mode if bn == "train"."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if bn == "train":
            for m in model.modules():
                if isinstance(m, NORM_TYPES):
                    m.train()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@dataclass
class _GraphCache:
    """Gradient graphs (t, g) of the batches, in data order, built at `theta` with buffer versions `key`."""

    theta: Tensor
    key: tuple
    graphs: list

    def matches(self, theta: Tensor, key: tuple) -> bool:
        return (key == self.key and theta.shape == self.theta.shape and theta.dtype == self.theta.dtype
                and theta.device == self.theta.device and torch.equal(theta, self.theta))


class Objective:
    """L(theta) over a fixed list of (x, y) batches, averaged by sample count.

    Args:
        model: any `nn.Module`; its trainable parameters (requires_grad) define theta, in
            `named_parameters()` order. Frozen parameters and buffers are held fixed.
        loss_fn: `loss_fn(outputs, targets)` returning the MEAN loss over the batch
            (e.g. `nn.CrossEntropyLoss()`); batches are re-weighted by their sample counts so
            that a short last batch does not bias L.
        data: a non-empty sequence of (x, y) tensor pairs on the model's device.
        bn: "eval" or "train", how normalization layers behave (module docstring).
        hvp_mode: "forward" (jvp of grad, forward-over-reverse, `torch.func`) or "reverse"
            (double backward with `torch.autograd`; one graph per batch serves all columns of a
            (D, k) block). Both are exact. Default "reverse": the cheaper one on ResNet-20 and
            on tiny nets (benchmarks/results/bench_hessian.md).
        fast_backward: reverse mode only. True (default): build and differentiate the gradient
            inside `FastDoubleBackward` (module docstring); False: stock autograd ops.
        cache_graphs: reverse mode only. True: keep the gradient graph of every batch (its
            saved activations: ~1 GB per 256 CIFAR-10 images on ResNet-20 in float32) for the
            next `hvp` call at the same theta, which then costs only the second backward
            (~2 gradients instead of ~3 on ResNet-20). Default False (memory). The cache is
            rebuilt when theta changes (values) or a buffer or data tensor is modified in place
            (versions); `clear_cache()` frees it.

    Attributes: `dim` (D), `num_samples` (N), `dtype`, `device`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Sequence[tuple[Tensor, Tensor]],
                 *, bn: str = "eval", hvp_mode: str = "reverse", fast_backward: bool = True,
                 cache_graphs: bool = False):
        if bn not in ("eval", "train"):
            raise ValueError(f"bn must be 'eval' or 'train', got {bn!r}")
        if hvp_mode not in ("forward", "reverse"):
            raise ValueError(f"hvp_mode must be 'forward' or 'reverse', got {hvp_mode!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
        data = list(data)
        if not data:
            raise ValueError("the data list is empty: Objective needs at least one (x, y) batch")
        for i, batch in enumerate(data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"data[{i}] is not an (x, y) pair")
            if len(batch[0]) == 0 or len(batch[0]) != len(batch[1]):
                raise ValueError(f"data[{i}] has {len(batch[0])} inputs and {len(batch[1])} targets")

        self.model = model
        self.loss_fn = loss_fn
        self.bn = bn
        self.hvp_mode = hvp_mode
        self.fast_backward = bool(fast_backward)
        self.cache_graphs = bool(cache_graphs)
        self._graphs: _GraphCache | None = None
        self.data = [(x, y) for x, y in data]
        self.num_samples = sum(len(x) for x, _ in self.data)
        self._weights = [len(x) / self.num_samples for x, _ in self.data]
        self._names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._numels = [p.numel() for _, p in named]
        self.dim = sum(self._numels)
        first = named[0][1]
        self.dtype, self.device = first.dtype, first.device
        trainable = set(self._names)
        # Frozen parameters and buffers enter every call as constants.
        self._fixed = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
        self._fixed.update({n: b for n, b in model.named_buffers()})

    def to(self, dtype: torch.dtype) -> "Objective":
        """This objective in `dtype`: a copy of the model, its buffers and the data converted (self when the dtype
        is already this one). E.g. float32 passes where float64 ones are not needed (5-8x faster CPU convolutions)."""
        if dtype == self.dtype:
            return self
        return Objective(copy.deepcopy(self.model).to(dtype), self.loss_fn,
                         [(x.to(dtype), y.to(dtype) if y.is_floating_point() else y) for x, y in self.data],
                         bn=self.bn, hvp_mode=self.hvp_mode, fast_backward=self.fast_backward,
                         cache_graphs=self.cache_graphs)

    # ------------------------------------------------------------------ parameters
    @property
    def params(self) -> Tensor:
        """A flat (D,) copy of the model's trainable parameters."""
        return torch.cat([p.detach().reshape(-1) for n, p in self.model.named_parameters()
                          if p.requires_grad])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat (D,) vector into the model's named parameter shapes (views)."""
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {tuple(theta.shape)}")
        chunks = torch.split(theta, self._numels)
        return {n: c.view(s) for n, c, s in zip(self._names, chunks, self._shapes)}

    def _theta(self, theta: Tensor | None) -> Tensor:
        return self.params if theta is None else theta

    # ------------------------------------------------------------------ losses
    def _constants(self) -> dict[str, Tensor]:
        if self.bn == "train":
            # batch-norm in train mode writes its running buffers in place: give it copies.
            return {n: t.clone() for n, t in self._fixed.items()}
        return self._fixed

    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """Network outputs at theta for inputs x (normalization mode as set by `bn`)."""
        with _network_mode(self.model, self.bn):
            return functional_call(self.model, {**self._constants(), **self.unflatten(theta)}, (x,))

    def batch_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Mean loss of one batch at theta (a differentiable scalar)."""
        return self.loss_fn(self.forward(theta, x), y)

    def loss(self, theta: Tensor | None = None) -> Tensor:
        """L(theta), a 0-dim tensor."""
        theta = self._theta(theta).detach()
        with torch.no_grad():
            return sum(w * self.batch_loss(theta, x, y) for w, (x, y) in zip(self._weights, self.data))

    def grad(self, theta: Tensor | None = None) -> Tensor:
        """grad L(theta), shape (D,)."""
        theta = self._theta(theta).detach()
        total = torch.zeros_like(theta)
        for w, (x, y) in zip(self._weights, self.data):
            total += w * grad(self.batch_loss)(theta, x, y)
        return total

    def loss_and_grad(self, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L(theta), grad L(theta)) in one pass over the data."""
        theta = self._theta(theta).detach()
        loss, total = torch.zeros((), dtype=theta.dtype, device=theta.device), torch.zeros_like(theta)
        for w, (x, y) in zip(self._weights, self.data):
            g, value = torch.func.grad_and_value(self.batch_loss)(theta, x, y)
            total += w * g
            loss += w * value.detach()
        return loss, total

    # ------------------------------------------------------------------ curvature
    def hvp(self, v: Tensor, theta: Tensor | None = None) -> Tensor:
        """Hessian-vector product Hessian(L)(theta) v for v of shape (D,) or (D, k).

        Exact (no finite differences). The data list is processed batch by batch, so only one
        batch's graph is alive at a time (all of them with cache_graphs=True). hvp_mode "forward"
        does each column of a (D, k) block by its own jvp of grad; "reverse" builds one
        double-backward graph per batch and reuses it for all k columns.
        """
        theta = self._theta(theta).detach()
        if v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(f"v must have shape ({self.dim},) or ({self.dim}, k), got {tuple(v.shape)}")
        block = v.to(theta.dtype).reshape(self.dim, -1)
        if self.hvp_mode == "reverse":
            out = self._hvp_reverse(block, theta)
        else:
            out = torch.stack([self._hvp_forward(block[:, j], theta) for j in range(block.shape[1])], 1)
        return out if v.dim() == 2 else out[:, 0]

    def _hvp_forward(self, v: Tensor, theta: Tensor) -> Tensor:
        total = torch.zeros_like(theta)
        for w, (x, y) in zip(self._weights, self.data):
            batch_grad = grad(self.batch_loss)
            _, hv = jvp(lambda t: batch_grad(t, x, y), (theta,), (v,))
            total += w * hv
        return total

    def _gradient_graph(self, theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
        """(t, g): a leaf copy t of theta and the batch gradient g at t with its graph, or None if
        the loss is linear in theta. With fast_backward, g's VALUES are placeholders for the
        convolution weights (`FastDoubleBackward.gradient_values_unread`): only differentiate g."""
        t = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            if self.fast_backward:
                with FastDoubleBackward() as mode, mode.gradient_values_unread():
                    (g,) = torch.autograd.grad(self.batch_loss(t, x, y), t, create_graph=True)
            else:
                (g,) = torch.autograd.grad(self.batch_loss(t, x, y), t, create_graph=True)
        return (t, g) if g.requires_grad else None

    def _graph_key(self) -> tuple:
        """In-place versions of everything a cached graph captured besides theta."""
        return (tuple(b._version for b in self._fixed.values()),
                tuple((x._version, y._version) for x, y in self.data))

    def clear_cache(self) -> None:
        """Free the gradient graphs kept by cache_graphs=True."""
        self._graphs = None

    def _hvp_reverse(self, block: Tensor, theta: Tensor) -> Tensor:
        total = torch.zeros_like(block)
        k = block.shape[1]
        cache = None
        if self.cache_graphs:
            key = self._graph_key()
            if self._graphs is None or not self._graphs.matches(theta, key):
                self._graphs = None  # free the old graphs before building new ones
                self._graphs = _GraphCache(theta.clone(), key, [])
            cache = self._graphs
        for i, (w, (x, y)) in enumerate(zip(self._weights, self.data)):
            if cache is not None and i < len(cache.graphs):
                graph = cache.graphs[i]
            else:
                graph = self._gradient_graph(theta, x, y)
                if cache is not None:
                    cache.graphs.append(graph)
            if graph is None:  # the loss is linear in theta on this batch
                continue
            t, g = graph
            for j in range(k):
                (hv,) = torch.autograd.grad(g, t, grad_outputs=block[:, j],
                                            retain_graph=cache is not None or j < k - 1, allow_unused=True)
                if hv is not None:
                    total[:, j] += w * hv
        return total

    # ------------------------------------------------------------------ per-sample
    def _check_per_sample(self):
        if self.bn == "train":
            raise ValueError("per-sample quantities are undefined with bn='train' (a single "
                             "sample would be normalized by its own statistics); use bn='eval'")

    def _sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.batch_loss(theta, x.unsqueeze(0), y.unsqueeze(0))

    def per_sample_losses(self, theta: Tensor | None = None) -> Tensor:
        """l_i(theta) for every sample of the data list, shape (N,)."""
        self._check_per_sample()
        theta = self._theta(theta).detach()
        with torch.no_grad():
            return torch.cat([vmap(self._sample_loss, in_dims=(None, 0, 0))(theta, x, y)
                              for x, y in self.data])

    def iter_per_sample_grads(self, theta: Tensor | None = None, *,
                              chunk_size: int = 64) -> Iterator[Tensor]:
        """Yield per-sample gradients grad l_i(theta) in chunks of shape (n <= chunk_size, D).

        Memory is bounded by chunk_size x D; the chunks cover the data list in order.
        """
        self._check_per_sample()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        theta = self._theta(theta).detach()
        sample_grad = vmap(grad(self._sample_loss), in_dims=(None, 0, 0))
        for x, y in self.data:
            for start in range(0, len(x), chunk_size):
                yield sample_grad(theta, x[start:start + chunk_size], y[start:start + chunk_size])

    def per_sample_grads(self, theta: Tensor | None = None, *, chunk_size: int = 64) -> Tensor:
        """All per-sample gradients as one (N, D) tensor (N x D memory: small problems only)."""
        return torch.cat(list(self.iter_per_sample_grads(theta, chunk_size=chunk_size)))

    def __repr__(self) -> str:
        return (f"Objective(D={self.dim}, N={self.num_samples}, batches={len(self.data)}, "
                f"bn={self.bn!r}, dtype={self.dtype}, device={self.device})")
