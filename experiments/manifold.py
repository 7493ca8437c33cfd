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

Matrix-free variant for thousands of images (N C up to D, e.g. 2,000 images and 20,000 equations):
`project_to_manifold_cg`, the same Gauss-Newton map with the Gram systems (J J^T) a = r solved by
`gram_solve_cg` (conjugate gradients on Jacobian-vector / vector-Jacobian products) under
`GramPreconditionerMF` (block-Jacobi scaling by the per-sample blocks J_i J_i^T plus a randomized
Nystrom deflation of the scaled Gram's top eigenvalues); memory O(N C rank + D), no (N C, D) array.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.func import jacrev, jvp, vjp, vmap

from dynamics.objective import Objective
from sde.label_noise import output_jacobian
from sde.label_noise_mf import jacobian_times, jacobian_transpose_times
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
    """f(x_i) - onehot(y_i), shape (N, C); float targets (N, C) are used as they are."""
    y = torch.cat([yb for _, yb in obj.data])
    if y.is_floating_point():
        return outputs - y.to(outputs.dtype)
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


def gram_solve(jac: Tensor, r: Tensor, pre: GramPreconditioner | None, *, rtol: float = 1e-11,
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
        a = gram_solve(jac, r, preconditioner)
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


# ---------------------------------------------------------------------------------------------
# Matrix-free projection (issue #6): neither the (N C, D) Jacobian nor the Gram matrix is formed
# ---------------------------------------------------------------------------------------------

def per_sample_gram_blocks(obj: Objective, theta: Tensor, *, chunk_size: int = 64) -> Tensor:
    """J_i J_i^T for every sample i, shape (N, C, C); per-sample Jacobians exist `chunk_size` at a time.

    Memory chunk_size x C x D. The traces sum to ||J||_F^2, so on Gamma tr H = blocks' traces / N.
    Assumes no normalization layers (each sample's outputs depend on that sample only).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    theta = theta.detach()

    def single(t: Tensor, x: Tensor) -> Tensor:
        return obj.forward(t, x.unsqueeze(0))[0]

    blocks = []
    inputs = torch.cat([x for x, _ in obj.data])
    for start in range(0, len(inputs), chunk_size):
        jac = vmap(jacrev(single), in_dims=(None, 0))(theta, inputs[start:start + chunk_size])  # (n, C, D)
        blocks.append(jac @ jac.transpose(1, 2))
    return torch.cat(blocks)


def _gram_times_block(obj: Objective, theta: Tensor, block: Tensor) -> Tensor:
    """J J^T applied to each of m output-space vectors, block (m, N, C) -> (m, N, C), by vmapped vjp / jvp."""
    weights, start = torch.zeros(len(block), obj.dim, dtype=theta.dtype, device=theta.device), 0
    outs = []
    for x, _ in obj.data:
        _, pull = vjp(lambda t: obj.forward(t, x), theta)
        weights = weights + vmap(pull)(block[:, start:start + len(x)])[0]
        start += len(x)
    for x, _ in obj.data:
        outs.append(vmap(lambda w: jvp(lambda t: obj.forward(t, x), (theta,), (w,))[1])(weights))
    return torch.cat(outs, dim=1)


@dataclass(frozen=True)
class GramPreconditionerMF:
    """Matrix-free preconditioner M^-1 = S Q S of the Gram matrix G = J J^T (N C, N C).

    S: symmetric inverse square roots of the per-sample blocks J_i J_i^T (block-Jacobi scaling,
    (N, C, C)). Q: randomized Nystrom deflation of the scaled Gram A = S G S (Frangella, Tropp &
    Udell, "Randomized Nystrom preconditioning", SIMAX 2023, with mu = 0): with A's top-l
    approximate eigenpairs (U, lambda), Q = lambda_l U diag(1/lambda) U^T + (I - U U^T), which maps
    the l largest eigenvalues of A near lambda_l. On image data the scaled Gram of a network has a
    few large outliers (shared modes of all samples) over a slowly decaying bulk; deflating them
    is what makes conjugate gradients affordable here. rank 0 gives plain block-Jacobi.
    """
    block_inv_sqrt: Tensor   # (N, C, C)
    vectors: Tensor          # (N C, l) orthonormal
    values: Tensor           # (l,) descending, positive

    @classmethod
    def at(cls, obj: Objective, theta: Tensor, *, rank: int = 200, chunk_size: int = 64, block: int = 16,
           generator: torch.Generator | None = None) -> "GramPreconditionerMF":
        """Build at theta: one per-sample-Jacobian pass and `rank` Gram products (`block` at a time)."""
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        theta = theta.detach()
        blocks = per_sample_gram_blocks(obj, theta, chunk_size=chunk_size)
        values, vectors = torch.linalg.eigh(blocks)
        floor = values.amax(-1, keepdim=True) * 1e-12
        inv_sqrt = torch.where(values > floor, values.clamp_min(1e-300).rsqrt(), torch.zeros_like(values))
        s = (vectors * inv_sqrt.unsqueeze(-2)) @ vectors.transpose(-1, -2)
        n, c = blocks.shape[:2]
        if rank == 0:
            empty = torch.zeros(n * c, 0, dtype=theta.dtype, device=theta.device)
            return cls(block_inv_sqrt=s, vectors=empty, values=empty[0])
        if rank >= n * c:
            raise ValueError(f"rank must be below N C = {n * c}, got {rank}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        omega, _ = torch.linalg.qr(torch.randn(n * c, rank, generator=gen, dtype=theta.dtype).to(theta.device))
        scale = lambda m: (s @ m.reshape(-1, n, c).unsqueeze(-1)).squeeze(-1)   # (m, N, C) -> (m, N, C)
        cols = []
        for j in range(0, rank, block):
            w = scale(omega[:, j:j + block].T.reshape(-1, n, c))
            cols.append(scale(_gram_times_block(obj, theta, w)).reshape(-1, n * c).T)
        y = torch.cat(cols, dim=1)                                              # A omega, (N C, l)
        shift = torch.finfo(y.dtype).eps * y.norm()
        y = y + shift * omega
        chol = torch.linalg.cholesky(omega.T @ y, upper=True)
        b = torch.linalg.solve_triangular(chol, y, upper=True, left=False)      # y chol^-1
        u, sing, _ = torch.linalg.svd(b, full_matrices=False)
        lam = (sing ** 2 - shift).clamp_min(0)
        keep = lam > lam[0] * 1e-12
        return cls(block_inv_sqrt=s, vectors=u[:, keep], values=lam[keep])

    def _scale(self, r: Tensor) -> Tensor:
        return (self.block_inv_sqrt @ r.unsqueeze(-1)).squeeze(-1)

    def apply(self, r: Tensor) -> Tensor:
        """M^-1 r for r (N, C)."""
        z = self._scale(r).reshape(-1)
        if len(self.values):
            coef = self.vectors.T @ z
            z = z - self.vectors @ coef + self.vectors @ (coef * (self.values[-1] / self.values))
        return self._scale(z.reshape(r.shape))


class GramSolveNotConverged(RuntimeError):
    """Conjugate gradients on (J J^T) a = r did not reach the requested relative residual."""


def gram_solve_cg(obj: Objective, theta: Tensor, r: Tensor, preconditioner: GramPreconditionerMF, *,
                  rtol: float, max_iter: int, x0: Tensor | None = None, shift: float = 0.0,
                  callback: Callable[[int, float, Tensor], None] | None = None) -> tuple[Tensor, int]:
    """(a (N, C) with (J J^T + shift I) a = r, iterations): preconditioned CG on J v / J^T a products.

    r: (N, C) output-space right-hand side; J the output Jacobian at theta, applied only through
    `sde.label_noise_mf.jacobian_times` / `jacobian_transpose_times` (one forward-mode and one
    reverse pass over all samples per iteration). Stops when ||(J J^T + shift I) a - r|| <= rtol ||r||;
    GramSolveNotConverged after max_iter iterations.

    x0: optional starting guess (N, C) (warm start, e.g. the solution for a nearby right-hand side;
    one extra Gram product). callback(iteration, relative residual, J^T a) is called after every
    iteration (and at iteration 0); J^T a (D,) is kept by the CG recurrence from the J^T p of each
    product (a D-vector update, no extra pass). For r = J v, v - J^T a is the approximate tangent
    projection of v, and CG minimizes its error ||J^T (a - a*)|| = ||P~v - P v|| (Craig's method),
    so (shift 0) ||v - J^T a||^2 decreases monotonically to ||P v||^2 while the residual need not:
    when J J^T has a cluster of numerically null eigenvalues the residual climbs back (1e-8 -> 1e-4)
    and ||v - J^T a||^2 drops in steps, one null direction at a time (seen at the n = 1,000 and
    2,000 points, docs/studies/big_point_findings.md).

    shift >= 0 (Tikhonov, in Gram units = N x Hessian units): v - J^T a is then the tangent
    projection with the directions of Gram eigenvalue << shift counted as tangent and those >> shift
    as normal (relative distortion shift / eigenvalue); it bounds the condition number by
    lambda_max / shift. For a Gram with a cluster of numerically-null eigenvalues (a Jacobian of
    numerically deficient rank) it is the way to get the projection onto the well-defined normal
    space; with shift 0 CG keeps resolving that cluster one direction at a time.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    track = callback is not None
    if x0 is None:
        a, res = torch.zeros_like(r), r.clone()
        jta = torch.zeros_like(theta) if track else None
    else:
        if x0.shape != r.shape:
            raise ValueError(f"x0 must have the shape of r {tuple(r.shape)}, got {tuple(x0.shape)}")
        a = x0.clone()
        jta = jacobian_transpose_times(obj, theta, a)
        res = r - jacobian_times(obj, theta, jta) - shift * a
    target = rtol * r.norm()
    if track:
        callback(0, float(res.norm() / r.norm()), jta)
    if res.norm() <= target:
        return a, 0
    z = preconditioner.apply(res)
    p, rz = z, (res * z).sum()
    for it in range(1, max_iter + 1):
        jtp = jacobian_transpose_times(obj, theta, p)
        gp = jacobian_times(obj, theta, jtp)
        if shift:
            gp = gp + shift * p
        step = rz / (p * gp).sum()
        a, res = a + step * p, res - step * gp
        if track:
            jta = jta + step * jtp
            callback(it, float(res.norm() / r.norm()), jta)
        if res.norm() <= target:
            return a, it
        z = preconditioner.apply(res)
        rz_new = (res * z).sum()
        p, rz = z + (rz_new / rz) * p, rz_new
    raise GramSolveNotConverged(f"conjugate gradients on J J^T did not converge: relative residual "
                                f"{float(res.norm() / r.norm()):.2e} > rtol {rtol:.1e} after {max_iter} iterations")


@dataclass(frozen=True)
class MatrixFreeProjectionReport(ProjectionReport):
    """`ProjectionReport` plus the conjugate-gradient iterations of each Gauss-Newton step."""
    cg_iterations: tuple[int, ...]


def project_to_manifold_cg(obj: Objective, theta: Tensor | None = None, *, tol: float = 1e-10,
                           gd_steps: int = 0, gd_lr: float | None = None, max_gauss_newton: int = 30,
                           cg_rtol: float = 1e-4, cg_max_iter: int = 5000,
                           preconditioner: GramPreconditionerMF | None = None, preconditioner_rank: int = 200,
                           refresh_after: int | None = 500, generator: torch.Generator | None = None,
                           raise_on_failure: bool = True) -> tuple[Tensor, MatrixFreeProjectionReport]:
    """`project_to_manifold` without the dense Jacobian: for thousands of images (N C up to D).

    The same map (optional gradient descent, then Gauss-Newton minimum-norm steps
    delta = -J^T a, (J J^T) a = r, halved when the full step raises L, until L <= tol), but the
    Gram system is solved by `gram_solve_cg` to relative residual `cg_rtol` (an inexact Newton
    step: each step shrinks the residual by about cg_rtol until the quadratic term takes over).
    Memory O((N C) rank + D + 64 C D) instead of O(N C D). The preconditioner
    (`GramPreconditionerMF`, Nystrom rank min(`preconditioner_rank`, N C - 1), sketch drawn from `generator`) is built
    once at the first Gauss-Newton point and reused, unless one is given (e.g. from a nearby point
    of Gamma, for repeated projections); it is rebuilt at the current point after a step whose CG
    needed more than `refresh_after` iterations (None: never), since far from where it was built
    (Gauss-Newton from an initialization moves theta by O(10)) it loses its effect. The CG iterations of each step are
    in the report. ValueError if N C > D; RuntimeError (or the report with converged=False)
    if L > tol at the end.
    """
    theta0 = (obj.params if theta is None else theta).detach().clone()
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if gd_steps and (gd_lr is None or gd_lr <= 0):
        raise ValueError("gd_steps > 0 needs a positive gd_lr")
    if not 0 < cg_rtol < 1:
        raise ValueError(f"cg_rtol must be in (0, 1), got {cg_rtol}")
    equations = obj.num_samples * obj.forward(theta0, obj.data[0][0][:1]).shape[-1]     # N C
    if equations > obj.dim:
        raise ValueError(f"N*C = {equations} equations exceed D = {obj.dim} parameters: "
                         "Gamma is not a manifold of interpolating solutions here")
    theta = theta0.clone()
    initial = obj.loss(theta).item()
    for _ in range(gd_steps):
        theta = theta - gd_lr * obj.grad(theta)
    steps, loss, iterations = 0, obj.loss(theta).item(), []
    while loss > tol and steps < max_gauss_newton:
        if preconditioner is None:
            preconditioner = GramPreconditionerMF.at(obj, theta, rank=min(preconditioner_rank, equations - 1),
                                                     generator=generator)
        outputs = torch.cat([obj.forward(theta, x) for x, _ in obj.data]).detach()
        a, its = gram_solve_cg(obj, theta, residuals(obj, outputs), preconditioner, rtol=cg_rtol,
                               max_iter=cg_max_iter)
        iterations.append(its)
        if refresh_after is not None and its > refresh_after:
            preconditioner = None
        step = jacobian_transpose_times(obj, theta, a)
        candidate = theta - step
        new_loss = obj.loss(candidate).item()
        if new_loss > loss:  # damped step when the full step overshoots (far from Gamma)
            candidate = theta - 0.5 * step
            new_loss = obj.loss(candidate).item()
        theta, loss, steps = candidate, new_loss, steps + 1
    report = MatrixFreeProjectionReport(loss=loss, initial_loss=initial, gd_steps=gd_steps,
                                        gauss_newton_steps=steps, distance=(theta - theta0).norm().item(),
                                        converged=loss <= tol, cg_iterations=tuple(iterations))
    if raise_on_failure and not report.converged:
        raise RuntimeError(f"projection onto Gamma failed: loss {loss:.3e} > tol {tol:.1e} after "
                           f"{steps} Gauss-Newton steps (start loss {initial:.3e}; CG iterations {iterations})")
    return theta, report
