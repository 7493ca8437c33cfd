"""Small float64 networks and exact dense references shared by the tests.

Dense Hessians are built by the plain row-by-row autograd loop, never by `torch.func.hessian`
(which was seen to be silently wrong for train-mode BatchNorm, DESIGN.md "Known traps"), and
`check_against_finite_differences` confirms them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dynamics.objective import Objective


def tiny_mlp(seed: int = 0, d_in: int = 5, width: int = 7, d_out: int = 3) -> nn.Module:
    """Two-layer tanh MLP in float64 (smooth, so third derivatives are meaningful)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
    return model


def tiny_cnn_bn(seed: int = 0, channels: int = 3, classes: int = 3) -> nn.Module:
    """Conv -> BatchNorm -> tanh -> pool -> linear in float64, for 3 x 6 x 6 inputs.

    The BatchNorm running statistics are set to non-trivial values so that "eval" and "train"
    modes give different losses.
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, classes)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        model[1].running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64) * 0.3)
        model[1].running_var.copy_(1.0 + torch.rand(channels, generator=gen, dtype=torch.float64))
    return model


def classification_batches(n: int, *, image: bool, seed: int = 1, classes: int = 3,
                           sizes: list[int] | None = None) -> list[tuple[Tensor, Tensor]]:
    """n float64 samples (5-vectors or 3x6x6 images) with integer labels, split into `sizes`."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 3, 6, 6) if image else (n, 5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    sizes = sizes or [n]
    assert sum(sizes) == n
    return list(zip(torch.split(x, sizes), torch.split(y, sizes)))


def dense_loss_hessian(obj: Objective, theta: Tensor | None = None) -> Tensor:
    """Exact (D, D) Hessian of obj.loss by one autograd backward pass per row."""
    theta = (obj.params if theta is None else theta).detach().clone().requires_grad_(True)
    loss = sum(len(x) / obj.num_samples * obj.batch_loss(theta, x, y) for x, y in obj.data)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(obj.dim)]
    return torch.stack(rows)


def finite_difference_hessian(obj: Objective, theta: Tensor | None = None, h: float = 1e-5) -> Tensor:
    """Central differences of the gradient, column by column: an independent check, O(h^2)."""
    theta = (obj.params if theta is None else theta).detach()
    cols = []
    for i in range(obj.dim):
        e = torch.zeros_like(theta)
        e[i] = h
        cols.append((obj.grad(theta + e) - obj.grad(theta - e)) / (2 * h))
    H = torch.stack(cols, dim=1)
    return (H + H.T) / 2
