"""Output-Jacobian primitives of a network over the samples of an `Objective` (measurement, no theory).

J is the (N, C, D) Jacobian of the N x C network outputs with respect to the flat parameters theta
(D,). The products below never form it except where the name says so (`output_jacobian`,
`output_jacobian_derivative`, per-sample chunks). `gram_solve_cg` solves (J J^T + shift I) a = r
by preconditioned conjugate gradients on these products (the one CG of the project's projections).
All assume outputs per sample (no normalization layer mixing samples; DESIGN.md "Known traps").
Device and dtype follow theta.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev, jvp, vjp, vmap

from dynamics.objective import Objective

__all__ = ["output_jacobian", "output_jacobian_derivative", "jacobian_pairing_grad", "jacobian_times",
           "jacobian_transpose_times", "jacobian_derivative_times", "jacobian_derivative_transpose_times",
           "per_sample_gram_blocks", "gram_matrix", "gram_matrix_bytes", "gram_times_block",
           "jacobian_frobenius_pass", "BlockJacobi",
           "GramSolveNotConverged", "gram_solve_cg"]


def _inputs(obj: Objective) -> list[Tensor]:
    return [x for x, _ in obj.data]


def _per_sample_jacobians(obj: Objective, theta: Tensor, xs: Tensor) -> Tensor:
    """(n, C, D) Jacobians of the samples xs (n, ...) at theta."""
    single = lambda t, x: obj.forward(t, x.unsqueeze(0))[0]      # noqa: E731
    return vmap(jacrev(single), in_dims=(None, 0))(theta, xs)


def _chunks(obj: Objective, chunk_size: int):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    inputs = torch.cat(_inputs(obj))
    return [inputs[s:s + chunk_size] for s in range(0, len(inputs), chunk_size)]


def output_jacobian(obj: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs (N, C), Jacobian (N, C, D)) of the network at theta over all samples of obj."""
    def single(t: Tensor, x: Tensor):
        out = obj.forward(t, x.unsqueeze(0))[0]
        return out, out

    outs, jacs = [], []
    for x in _inputs(obj):
        jac, out = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(theta, x)
        outs.append(out)
        jacs.append(jac)
    return torch.cat(outs), torch.cat(jacs)


def output_jacobian_derivative(obj: Objective, theta: Tensor, direction: Tensor) -> Tensor:
    """d/de J(theta + e v) at e = 0, (N, C, D), v = `direction` (D,): forward mode over each batch's
    reverse-mode Jacobian, exact, a few Jacobian passes."""
    if direction.shape != theta.shape:
        raise ValueError(f"direction must have shape {tuple(theta.shape)}, got {tuple(direction.shape)}")
    theta, direction = theta.detach(), direction.detach().to(theta.dtype)
    return torch.cat([jvp(lambda t: _per_sample_jacobians(obj, t, x), (theta,), (direction,))[1]
                      for x in _inputs(obj)])


def jacobian_pairing_grad(obj: Objective, theta: Tensor, pairing: Tensor, *, chunk_size: int = 64) -> Tensor:
    """grad_theta sum_{i,c} <grad f_ic(theta), pairing[i, c]>, (D,), pairing (N, C, D) held fixed:
    the reverse pass of N C Jacobian-vector products, `chunk_size` samples at a time."""
    theta = theta.detach()
    inputs = torch.cat(_inputs(obj))
    if pairing.shape[0] != len(inputs) or pairing.shape[-1] != obj.dim:
        raise ValueError(f"pairing must have shape (N={len(inputs)}, C, D={obj.dim}), got {tuple(pairing.shape)}")

    def chunk_value(t: Tensor, xs: Tensor, rs: Tensor) -> Tensor:
        def per_sample(x: Tensor, r: Tensor) -> Tensor:
            f = lambda tt: obj.forward(tt, x.unsqueeze(0))[0]      # noqa: E731
            return vmap(lambda v: jvp(f, (t,), (v,))[1])(r).diagonal().sum()   # sum_c (J r_c)_c
        return vmap(per_sample)(xs, rs).sum()

    total = torch.zeros_like(theta)
    for start in range(0, len(inputs), chunk_size):
        total += grad(chunk_value)(theta, inputs[start:start + chunk_size], pairing[start:start + chunk_size])
    return total


def jacobian_times(obj: Objective, theta: Tensor, v: Tensor) -> Tensor:
    """J v, (N, C): forward-mode products of all outputs at theta with v (D,)."""
    return torch.cat([jvp(lambda t: obj.forward(t, x), (theta,), (v,))[1] for x in _inputs(obj)])


def jacobian_transpose_times(obj: Objective, theta: Tensor, a: Tensor) -> Tensor:
    """J^T a, (D,), for output-space coefficients a (N, C): one reverse pass per batch."""
    out, start = torch.zeros_like(theta), 0
    for x in _inputs(obj):
        _, pull = vjp(lambda t: obj.forward(t, x), theta)
        out += pull(a[start:start + len(x)])[0]
        start += len(x)
    return out


def jacobian_derivative_times(obj: Objective, theta: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """DJ[u] v = d/de J(theta + e u) v, (N, C): second directional derivatives of the outputs along
    (u, v), forward over forward mode."""
    outs = []
    for x in _inputs(obj):
        inner = lambda t: jvp(lambda tt: obj.forward(tt, x), (t,), (v,))[1]      # noqa: E731
        outs.append(jvp(inner, (theta,), (u,))[1])
    return torch.cat(outs)


def jacobian_derivative_transpose_times(obj: Objective, theta: Tensor, u: Tensor, a: Tensor) -> Tensor:
    """DJ[u]^T a = grad_theta <a, J(theta) u>, (D,), for output coefficients a (N, C)."""
    out, start = torch.zeros_like(theta), 0
    for x in _inputs(obj):
        _, pull = vjp(lambda t: jvp(lambda tt: obj.forward(tt, x), (t,), (u,))[1], theta)
        out += pull(a[start:start + len(x)])[0]
        start += len(x)
    return out


def per_sample_gram_blocks(obj: Objective, theta: Tensor, *, chunk_size: int = 64) -> Tensor:
    """J_i J_i^T for every sample i, (N, C, C); per-sample Jacobians exist `chunk_size` at a time
    (memory chunk_size x C x D). The traces sum to ||J||_F^2."""
    theta = theta.detach()
    blocks = []
    for xs in _chunks(obj, chunk_size):
        jac = _per_sample_jacobians(obj, theta, xs)
        blocks.append(jac @ jac.transpose(1, 2))
    return torch.cat(blocks)


def gram_matrix_bytes(num_samples: int, outputs: int, dim: int, block_samples: int, chunk_size: int,
                      itemsize: int = 8) -> int:
    """Peak bytes of `gram_matrix`: the (N m, N m) result, one row block of Jacobians (block_samples x m x D) and
    one streamed chunk of per-sample Jacobians (chunk_size x C x D, C ~ m)."""
    rows = num_samples * outputs
    return itemsize * (rows * rows + (block_samples + 2 * chunk_size) * outputs * dim)


def gram_matrix(obj: Objective, theta: Tensor, *, chunk_size: int = 64, block_samples: int | None = None,
                reduce: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """M M^T, (N m, N m), for M = J (m = C) or M_i = reduce(J_chunk (n, C, D), start index) -> (n, m, D),
    without the (N m, D) array: the rows of `block_samples` samples (default all) are held while the chunks after
    them stream past, so the cost is about (N / block_samples + 1) / 2 Jacobian passes; rows ordered (sample,
    output) as M.reshape(-1, D). Peak memory: `gram_matrix_bytes`."""
    theta = theta.detach()
    chunks = _chunks(obj, chunk_size)                # chunk c holds samples c chunk_size onwards
    block = len(chunks) if block_samples is None else max(1, block_samples // chunk_size)

    def rows(c: int) -> Tensor:                      # (n_c m, D) of chunk c
        jac = _per_sample_jacobians(obj, theta, chunks[c])
        jac = jac if reduce is None else reduce(jac, c * chunk_size)
        return jac.reshape(-1, jac.shape[-1])
    gram = None
    for first in range(0, len(chunks), block):
        held = torch.cat([rows(c) for c in range(first, min(first + block, len(chunks)))])
        if gram is None:
            m = len(held) // sum(len(chunks[c]) for c in range(min(block, len(chunks))))
            size = m * sum(len(xs) for xs in chunks)
            gram = torch.empty(size, size, dtype=held.dtype, device=held.device)
        top = first * chunk_size * m
        gram[top:top + len(held), top:top + len(held)] = held @ held.T
        for c in range(first + block, len(chunks)):
            product = held @ rows(c).T
            left = c * chunk_size * m
            gram[top:top + len(held), left:left + product.shape[1]] = product
            gram[left:left + product.shape[1], top:top + len(held)] = product.T
    return gram


def gram_times_block(obj: Objective, theta: Tensor, block: Tensor) -> Tensor:
    """J J^T applied to each of m output-space vectors, block (m, N, C) -> (m, N, C), vmapped vjp / jvp."""
    weights, start = torch.zeros(len(block), obj.dim, dtype=theta.dtype, device=theta.device), 0
    for x in _inputs(obj):
        _, pull = vjp(lambda t: obj.forward(t, x), theta)
        weights = weights + vmap(pull)(block[:, start:start + len(x)])[0]
        start += len(x)
    return torch.cat([vmap(lambda w: jvp(lambda t: obj.forward(t, x), (theta,), (w,))[1])(weights)
                      for x in _inputs(obj)], dim=1)


def jacobian_frobenius_pass(obj: Objective, theta: Tensor, chunk_size: int, *,
                            reduce: Callable[[Tensor, int], Tensor] | None = None) -> tuple[Tensor, Tensor, float]:
    """(grad_theta ||M(theta)||_F^2 (D,), per-sample Gram blocks M_i M_i^T (N, m, m), ||M||_F^2) for M = J,
    or M_i = reduce(J_chunk (n, C, D), start index of the chunk) -> (n, m, D) held fixed (an output metric).

    Per-sample Jacobians exist only `chunk_size` samples at a time (memory chunk x C x D)."""
    def chunk(t: Tensor, xs: Tensor, start: int):
        jac = _per_sample_jacobians(obj, t, xs)
        jac = jac if reduce is None else reduce(jac, start)
        return jac.pow(2).sum(), jac.detach() @ jac.detach().transpose(1, 2)

    grads, blocks, total, start = torch.zeros_like(theta), [], 0.0, 0
    for xs in _chunks(obj, chunk_size):
        g, (value, block) = grad_and_value(chunk, has_aux=True)(theta, xs, start)
        grads += g
        blocks.append(block)
        total += float(value)
        start += len(xs)
    return grads, torch.cat(blocks), total


class GramSolveNotConverged(RuntimeError):
    """Conjugate gradients on (J J^T + shift I) a = r did not reach the requested relative residual."""


class BlockJacobi:
    """The block-Jacobi preconditioner of J J^T: `apply(r)` = (J_i J_i^T)^+ r_i for r (N, C).

    blocks: (N, C, C) per-sample Gram blocks (`per_sample_gram_blocks`); pseudo-inverses at rtol 1e-12.
    """

    def __init__(self, blocks: Tensor):
        self.inverses = torch.linalg.pinv(blocks, hermitian=True, rtol=1e-12)

    def apply(self, r: Tensor) -> Tensor:
        return (self.inverses @ r.unsqueeze(-1)).squeeze(-1)


def gram_solve_cg(obj: Objective, theta: Tensor, r: Tensor, preconditioner, *, rtol: float, max_iter: int,
                  x0: Tensor | None = None, shift: float = 0.0,
                  callback: Callable[[int, float, Tensor], None] | None = None, metric=None,
                  passes: Objective | None = None) -> tuple[Tensor, int]:
    """(a (N, C) with (J J^T + shift I) a = r, CG iterations): preconditioned conjugate gradients on
    Jacobian-vector / vector-Jacobian products, J never formed. metric: None, or an object with
    reduce (N, C) -> (N, m) and its adjoint lift (`sde.label_noise.OutputMetric`): J is then the reduced
    Jacobian reduce(J) and a, r are (N, m).

    preconditioner: any object with .apply(r (N, C)) -> (N, C) (e.g. `BlockJacobi`). Stops when
    ||(J J^T + shift I) a - r|| <= rtol ||r||, else GramSolveNotConverged after max_iter iterations; a
    preconditioner with .residual_norm(r) -> scalar (a pseudo-inverse: the part of r it solves for) sets that norm
    (naming the residual reached). x0: warm start (N, C), one extra Gram product. callback(iteration,
    relative residual, J^T a (D,)) at iteration 0 and after each one (J^T a kept by the recurrence): for
    r = J v, v - J^T a is the approximate tangent projection of v, and CG minimizes ||J^T (a - a*)||
    (Craig's method), so ||v - J^T a||^2 falls monotonically to ||P v||^2 even where the residual does not.
    shift >= 0: Tikhonov shift in Gram units (N x Hessian units); Gram directions of eigenvalue << shift
    then count as tangent, which bounds the condition number by lambda_max / shift.
    passes: the objective the Jacobian products run on (default obj), e.g. obj.to(torch.float32); the iterates,
    residuals and preconditioner stay in theta's dtype. Each product is then exact only to the pass dtype, so the
    true residual levels off near its rounding times the condition number while CG's recurrence goes on: an
    inexact-Newton caller must recompute its residual in full precision (as `project` does).
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if not 0 < rtol < 1 or max_iter < 1:
        raise ValueError(f"need 0 < rtol < 1 and max_iter >= 1, got rtol = {rtol}, max_iter = {max_iter}")
    passes = obj if passes is None else passes
    pass_theta = theta.to(passes.dtype)

    def times(v: Tensor) -> Tensor:
        out = jacobian_times(passes, pass_theta, v.to(passes.dtype)).to(theta.dtype)
        return out if metric is None else metric.reduce(out)

    def transpose_times(a: Tensor) -> Tensor:
        lifted = a if metric is None else metric.lift(a)
        return jacobian_transpose_times(passes, pass_theta, lifted.to(passes.dtype)).to(theta.dtype)

    norm = getattr(preconditioner, "residual_norm", torch.linalg.norm)
    a, jta = torch.zeros_like(r), torch.zeros_like(theta)
    res = r.clone()
    if x0 is not None:
        if x0.shape != r.shape:
            raise ValueError(f"x0 must have the shape of r {tuple(r.shape)}, got {tuple(x0.shape)}")
        a = x0.clone()
        jta = transpose_times(a)
        res = r - times(jta) - shift * a
    scale = norm(r)
    if callback is not None:
        callback(0, float(norm(res) / scale), jta)
    if norm(res) <= rtol * scale:
        return a, 0
    z = preconditioner.apply(res)
    p, rz = z, (res * z).sum()
    for it in range(1, max_iter + 1):
        jtp = transpose_times(p)
        gp = times(jtp) + shift * p
        step = rz / (p * gp).sum()
        a, res, jta = a + step * p, res - step * gp, jta + step * jtp
        if callback is not None:
            callback(it, float(norm(res) / scale), jta)
        if norm(res) <= rtol * scale:
            return a, it
        z = preconditioner.apply(res)
        rz, rz_old = (res * z).sum(), rz
        p = z + (rz / rz_old) * p
    raise GramSolveNotConverged(f"conjugate gradients on J J^T did not converge: relative residual "
                                f"{float(norm(res) / scale):.2e} > rtol {rtol:.1e} after max_iter = {max_iter} "
                                "iterations")
