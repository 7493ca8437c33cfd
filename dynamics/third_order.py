"""Third-order contractions d3L[M] = grad_theta <Hessian L(theta), M> (THEORY.md).

Only the symmetric part of M matters. With M = sum_m c_m v_m v_m^T,
    d3L[M] = sum_m c_m grad_theta (v_m^T Hessian L(theta) v_m),
computed batch by batch by triple reverse mode with plain `torch.autograd` (gradient graph,
v^T H v by a double backward, then its gradient): never a dense Hessian. Normalization layers
run as composite mean/var arithmetic meanwhile (`_CompositeNormalization`): the fused kernels'
derivative formulas are wrong at third order. Cost per rank-one term and batch: about two
Hessian-vector products; the gradient graph is shared by all terms of a batch.

grad tr Hessian L = d3L[I] (the sharpness-reduction direction of SGD with label noise) is
estimated stochastically by `grad_trace_hessian` from E[z z^T] = I.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from dynamics.lanczos import random_vector
from dynamics.objective import Objective

__all__ = ["LowRank", "third_order", "grad_trace_hessian", "GradTraceEstimate"]


@dataclass(frozen=True)
class LowRank:
    """M = sum_m coeffs[m] vectors[:, m] vectors[:, m]^T; coeffs (m,), vectors (D, m)."""

    coeffs: Tensor
    vectors: Tensor

    def __post_init__(self):
        if self.vectors.dim() != 2 or self.coeffs.dim() != 1 or self.coeffs.shape[0] != self.vectors.shape[1]:
            raise ValueError(f"LowRank needs coeffs (m,) and vectors (D, m), got {tuple(self.coeffs.shape)} "
                             f"and {tuple(self.vectors.shape)}")

    def dense(self) -> Tensor:
        """The (D, D) matrix sum_m c_m v_m v_m^T."""
        return (self.vectors * self.coeffs.to(self.vectors.dtype)) @ self.vectors.T


def _as_low_rank(M, dim: int) -> LowRank:
    if isinstance(M, LowRank):
        if M.vectors.shape[0] != dim:
            raise ValueError(f"LowRank vectors must have {dim} rows (D), got {tuple(M.vectors.shape)}")
        return M
    if not isinstance(M, Tensor) or M.shape != (dim, dim):
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"M must be a ({dim}, {dim}) tensor or a LowRank, got {shape}")
    sym = ((M + M.T) / 2).to(torch.float64)
    values, vectors = torch.linalg.eigh(sym)
    keep = values.abs() > 1e-14 * max(float(values.abs().max()), 1e-300)
    return LowRank(values[keep], vectors[:, keep].to(M.dtype))


class _CompositeNormalization(TorchFunctionMode):
    """Run batch_norm (batch statistics), group_norm and layer_norm as plain mean/var arithmetic.

    Their fused kernels have hand-written double-backward formulas that are NOT differentiable
    once more: a third derivative through train-mode BatchNorm came out nonzero along a conv
    bias that the loss provably ignores (measured here; forward-over-forward jvp was 1.6% off
    too). The composite versions below are exact to any order. Running statistics are not
    updated (Objective hands train-mode normalization copies of its buffers anyway).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training",
                              "momentum", "eps"), args), **kwargs)
            if bound.get("training", False) or bound.get("running_mean") is None:
                x = bound["input"]
                dims = [d for d in range(x.dim()) if d != 1]
                return _affine(_standardize(x, dims, bound.get("eps", 1e-5)), bound.get("weight"),
                               bound.get("bias"), 1)
        elif func is F.group_norm:
            bound = dict(zip(("input", "num_groups", "weight", "bias", "eps"), args), **kwargs)
            x, groups = bound["input"], bound["num_groups"]
            z = _standardize(x.reshape(x.shape[0], groups, -1), [2], bound.get("eps", 1e-5)).reshape(x.shape)
            return _affine(z, bound.get("weight"), bound.get("bias"), 1)
        elif func is F.layer_norm:
            bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
            x, k = bound["input"], len(bound["normalized_shape"])
            z = _standardize(x, list(range(x.dim() - k, x.dim())), bound.get("eps", 1e-5))
            weight, bias = bound.get("weight"), bound.get("bias")
            return (z if weight is None else z * weight) + (0 if bias is None else bias)
        return func(*args, **kwargs)


def _standardize(x: Tensor, dims: list[int], eps: float) -> Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _affine(z: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    shape = [1] * z.dim()
    shape[channel_dim] = -1
    if weight is not None:
        z = z * weight.reshape(shape)
    return z if bias is None else z + bias.reshape(shape)


def _rank_one_grads(obj: Objective, theta: Tensor, vectors: Tensor, coeffs: Tensor | None) -> Tensor:
    """grad_theta (v^T Hessian L(theta) v) for each column v of `vectors` (D, m), summed over the
    data list with sample weights; returns (m, D), or the coeffs-weighted sum (D,) if given.

    Triple reverse mode with plain `torch.autograd`; the gradient graph of each batch is built
    once and reused for all m columns.
    """
    m = vectors.shape[1]
    out = torch.zeros(m, obj.dim, dtype=theta.dtype, device=theta.device)
    with torch.enable_grad(), _CompositeNormalization():
        for w, (x, y) in zip(obj._weights, obj.data):
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(obj.batch_loss(t, x, y), t, create_graph=True)
            if not g.requires_grad:  # linear loss: no curvature at all
                continue
            for j in range(m):
                v = vectors[:, j]
                (hv,) = torch.autograd.grad(g, t, grad_outputs=v, create_graph=True, retain_graph=True,
                                            allow_unused=True)
                if hv is None or not hv.requires_grad:  # quadratic loss on this batch: d3L = 0
                    continue
                (d,) = torch.autograd.grad(hv @ v, t, retain_graph=True, allow_unused=True)
                if d is not None:
                    out[j] += w * d
    return out if coeffs is None else coeffs.to(out.dtype) @ out


def _check_objective(obj) -> None:
    if not isinstance(obj, Objective):
        raise ValueError(f"third-order contractions need a dynamics.Objective (they differentiate "
                         f"the loss itself), got {type(obj).__name__}")


def third_order(obj: Objective, M, *, theta: Tensor | None = None) -> Tensor:
    """d3L(theta)[M] = grad_theta <Hessian L(theta), M>, a (D,) vector in obj's dtype.

    Args:
        obj: the `Objective` defining L.
        M: a dense (D, D) tensor (its symmetric part is eigendecomposed; rank r costs r passes,
            so keep dense M for small D) or a `LowRank(coeffs, vectors)`.
        theta: flat (D,) point; default the model's parameters.
    """
    _check_objective(obj)
    low_rank = _as_low_rank(M, obj.dim)
    theta = (obj.params if theta is None else theta).detach()
    if theta.shape != (obj.dim,):
        raise ValueError(f"theta must have shape ({obj.dim},), got {tuple(theta.shape)}")
    keep = low_rank.coeffs != 0
    return _rank_one_grads(obj, theta, low_rank.vectors[:, keep].to(theta.dtype), low_rank.coeffs[keep])


@dataclass(frozen=True)
class GradTraceEstimate:
    """Estimate of grad tr Hessian L = d3L[I]: `value` (D,), per-coordinate `stderr` (D,).

    `samples` (num_probes, D) are the single-probe estimates d3L[z z^T].
    """

    value: Tensor
    stderr: Tensor
    num_probes: int
    samples: Tensor


def grad_trace_hessian(obj: Objective, *, num_probes: int, generator: torch.Generator | None = None,
                       distribution: str = "rademacher", theta: Tensor | None = None) -> GradTraceEstimate:
    """Stochastic d3L[I] = grad tr Hessian L: the mean of d3L[z z^T] over probes with E[z z^T] = I.

    Unbiased; the standard error is the per-coordinate sample std over sqrt(num_probes), so
    num_probes >= 2. Probes come from `generator` (seed 0 if None).
    """
    _check_objective(obj)
    if not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"num_probes must be an integer >= 2 (for a standard error), got {num_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    theta = (obj.params if theta is None else theta).detach()
    probes = torch.stack([random_vector(obj, gen, distribution) for _ in range(num_probes)], dim=1)
    samples = _rank_one_grads(obj, theta, probes, None)
    return GradTraceEstimate(samples.mean(0), samples.std(0, unbiased=True) / math.sqrt(num_probes),
                             num_probes, samples)
