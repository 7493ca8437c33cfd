"""Reaching the minimizer manifold Gamma of a small smooth network on real CIFAR-10.

Loss convention (used identically by `sde.label_noise` and `experiments.continuation`):

    L(theta) = (1/N) sum_i 1/2 || f(x_i; theta) - y_i ||^2,

the MEAN over samples of HALF the SUM over the C = 10 outputs of the squared residual, with
y_i the one-hot target (`half_squared_error`). On Gamma every residual is zero, so the
Hessian is exactly the Gauss-Newton matrix J^T J / N, J the (N*C, D) Jacobian of all outputs.

Pipeline: `cifar_subset` (balanced real images, optionally avg-pooled to 16x16) ->
`build_small_cnn` (GELU CNN without normalization, ~10k parameters) -> `train_to_interpolation`
(full-batch Adam) -> `project_to_manifold` (gradient descent then Gauss-Newton minimum-norm
steps in float64 until L <= tol), which returns a `ProjectionReport`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamics.objective import Objective
from sde.label_noise import output_jacobian
from experiments.data import load_cifar10, normalize

from experiments.datasets import subset

NUM_CLASSES = 10


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of 1/2 sum_c (outputs - targets)^2; integer targets mean one-hot."""
    if targets.dtype in (torch.int64, torch.int32, torch.uint8):
        # scatter instead of F.one_hot: one_hot inspects values, which vmap forbids
        targets = torch.zeros_like(outputs).scatter(-1, targets.long().unsqueeze(-1), 1.0)
    return 0.5 * (outputs - targets).pow(2).sum(-1).mean()


_ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def build_small_cnn(*, channels: tuple[int, int] = (8, 16), hidden: int = 32, image_size: int = 16,
                    classes: int = NUM_CLASSES, activation: str = "gelu",
                    generator: torch.Generator | None = None, dtype=torch.float64) -> nn.Module:
    """Conv3x3-act-avgpool2 twice, then Linear-act-Linear; smooth, no normalization layers.

    With the defaults (16x16 inputs) D = 9,946 parameters. Initialization: PyTorch's default
    scheme, drawn from `generator` (a fixed seed 0 if None) so the network is reproducible.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if image_size % 4:
        raise ValueError(f"image_size must be divisible by 4, got {image_size}")
    act = _ACTIVATIONS[activation]
    c1, c2 = channels
    flat = c2 * (image_size // 4) ** 2
    model = nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), act(), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), act(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(flat, hidden), act(), nn.Linear(hidden, classes))
    _init_uniform(model, generator)
    return model.to(dtype)


def _init_uniform(model: nn.Module, generator: torch.Generator | None) -> None:
    """Weights U(-sqrt(3/fan_in), sqrt(3/fan_in)), biases U(-1/sqrt(fan_in), ...), from `generator` (seed 0 if None)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                bound = fan_in ** -0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound * 3 ** 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)


def build_small_mlp(*, image_size: int = 8, hidden: tuple[int, ...] = (32, 32), classes: int = NUM_CLASSES,
                    activation: str = "gelu", generator: torch.Generator | None = None,
                    dtype=torch.float64) -> nn.Module:
    """Flatten -> (Linear-act) x len(hidden) -> Linear on 3 x image_size^2 inputs; smooth, no normalization.

    Cheaper per step than the CNN when many seeds and workers are vmapped (batched matmuls).
    With the defaults (8x8 inputs) D = 7,562. Initialization as `build_small_cnn`.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    widths = [3 * image_size ** 2, *hidden, classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    model = nn.Sequential(*layers)
    _init_uniform(model, generator)
    return model.to(dtype)


def cifar_subset(root: str | Path, n: int, *, image_size: int = 16, split: str = "train",
                 dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """n real CIFAR-10 images, n/10 per class, normalized per channel and avg-pooled.

    Returns float images (n, 3, image_size, image_size) and int64 labels (n,): the first n/10
    images of every class in record order (`experiments.datasets.subset`), so deterministic.
    """
    if n < NUM_CLASSES or n % NUM_CLASSES:
        raise ValueError(f"n must be a positive multiple of {NUM_CLASSES} (class-balanced), got {n}")
    if 32 % image_size:
        raise ValueError(f"image_size must divide 32, got {image_size}")
    images, labels = load_cifar10(root, split)
    images, labels = subset(images, labels, n, balanced=True)
    x = normalize(images, dtype=dtype)
    if image_size != 32:
        x = F.avg_pool2d(x, 32 // image_size)
    return x, labels


def squared_loss_objective(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int | None = None) -> Objective:
    """`Objective` of `half_squared_error` over (x, y), split into batches of `batch_size`."""
    size = batch_size or len(x)
    return Objective(model, half_squared_error, list(zip(x.split(size), y.split(size))))


def train_to_interpolation(obj: Objective, *, steps: int = 3000, lr: float = 3e-3,
                           target_loss: float = 1e-6) -> Tensor:
    """Full-batch Adam on `obj` from its model's parameters until L <= target_loss or `steps`.

    Returns the flat parameters reached (the model itself is not modified). Deterministic.
    """
    theta = obj.params.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        loss, g = obj.loss_and_grad(theta.detach())
        if loss.item() <= target_loss:
            break
        theta.grad = g
        opt.step()
    return theta.detach()


def residuals(obj: Objective, outputs: Tensor) -> Tensor:
    """f(x_i) - onehot(y_i), shape (N, C)."""
    y = torch.cat([yb for _, yb in obj.data])
    return outputs - F.one_hot(y, outputs.shape[-1]).to(outputs.dtype)


@dataclass(frozen=True)
class GramPreconditioner:
    """Eigendecomposition of the Gram matrix J0 J0^T (N C, N C) at a reference point of Gamma.

    Near that point it preconditions the Gauss-Newton systems (J J^T) a = r, so conjugate
    gradients converge in a few iterations without forming J J^T (the O((N C)^2 D) product
    dominated the cost of a projection), and its top eigenvectors seed `sharpness_on_manifold`.
    """
    values: Tensor   # (r,) descending, unnormalized (eigenvalues of J0 J0^T, = N x Hessian eigenvalues)
    vectors: Tensor  # (N C, r)

    @classmethod
    def at(cls, obj: Objective, theta: Tensor) -> "GramPreconditioner":
        _, jac = output_jacobian(obj, theta.detach())
        flat = jac.reshape(-1, obj.dim)
        values, vectors = torch.linalg.eigh(flat @ flat.T)
        floor = values[-1] * 1e-13
        return cls(values=values.flip(0).clamp_min(floor), vectors=vectors.flip(1))

    def solve(self, r: Tensor) -> Tensor:
        return self.vectors @ ((self.vectors.T @ r) / self.values)


def _gram_solve(jac: Tensor, r: Tensor, pre: GramPreconditioner | None, *, rtol: float = 1e-11,
                max_iter: int = 200) -> Tensor:
    """a with (J J^T) a = r: dense solve, or preconditioned conjugate gradients if `pre` is given."""
    if pre is None:
        gram = jac @ jac.T
        return torch.linalg.solve(gram + 1e-14 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype), r)
    a = torch.zeros_like(r)
    res = r.clone()
    z = pre.solve(res)
    p, rz = z, res @ z
    for _ in range(max_iter):
        ap = jac @ (jac.T @ p)
        step = rz / (p @ ap)
        a, res = a + step * p, res - step * ap
        if res.norm() <= rtol * r.norm():
            break
        z = pre.solve(res)
        rz_new = res @ z
        p, rz = z + (rz_new / rz) * p, rz_new
    return a


@dataclass(frozen=True)
class ProjectionReport:
    """How `project_to_manifold` ended: final loss, steps used, distance moved, success."""
    loss: float
    initial_loss: float
    gd_steps: int
    gauss_newton_steps: int
    distance: float
    converged: bool


def project_to_manifold(obj: Objective, theta: Tensor | None = None, *, tol: float = 1e-10,
                        gd_steps: int = 0, gd_lr: float | None = None, max_gauss_newton: int = 30,
                        preconditioner: GramPreconditioner | None = None,
                        raise_on_failure: bool = True) -> tuple[Tensor, ProjectionReport]:
    """Project theta (default the model's parameters) onto Gamma = {L = 0}.

    First `gd_steps` of gradient descent with step `gd_lr` (a discretized gradient flow,
    which is what Phi is), then Gauss-Newton minimum-norm steps
    delta = -J^T (J J^T)^-1 r until L <= tol (quadratic convergence near Gamma). The Gram
    system is solved densely, or by conjugate gradients preconditioned with `preconditioner`
    (a `GramPreconditioner` at a nearby point of Gamma: much cheaper for repeated projections). Needs
    N*C <= D (the equations must be underdetermined). Raises RuntimeError if L > tol at the
    end and `raise_on_failure`.
    """
    theta0 = (obj.params if theta is None else theta).detach().clone()
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if gd_steps and (gd_lr is None or gd_lr <= 0):
        raise ValueError("gd_steps > 0 needs a positive gd_lr")
    theta = theta0.clone()
    initial = obj.loss(theta).item()
    for _ in range(gd_steps):
        theta = theta - gd_lr * obj.grad(theta)
    steps, loss = 0, obj.loss(theta).item()
    while loss > tol and steps < max_gauss_newton:
        out, jac = output_jacobian(obj, theta)
        r = residuals(obj, out).reshape(-1)
        jac = jac.reshape(-1, obj.dim)
        if jac.shape[0] > jac.shape[1]:
            raise ValueError(f"N*C = {jac.shape[0]} equations exceed D = {jac.shape[1]} parameters: "
                             "Gamma is not a manifold of interpolating solutions here")
        a = _gram_solve(jac, r, preconditioner)
        candidate = theta - jac.T @ a
        new_loss = obj.loss(candidate).item()
        if new_loss > loss:  # damped step when the full step overshoots (far from Gamma)
            candidate = theta - 0.5 * jac.T @ a
            new_loss = obj.loss(candidate).item()
        theta, loss, steps = candidate, new_loss, steps + 1
    report = ProjectionReport(loss=loss, initial_loss=initial, gd_steps=gd_steps, gauss_newton_steps=steps,
                              distance=(theta - theta0).norm().item(), converged=loss <= tol)
    if raise_on_failure and not report.converged:
        raise RuntimeError(f"projection onto Gamma failed: loss {loss:.3e} > tol {tol:.1e} after "
                           f"{steps} Gauss-Newton steps (start loss {initial:.3e})")
    return theta, report
