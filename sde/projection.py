"""Phi: the projection onto the manifold of minimizers Gamma by the limit of gradient flow.

Phi(theta) = lim_{t -> inf} phi(theta, t), phi the gradient flow d theta/dt = -grad L(theta)
(Li, Wang & Arora, ICLR 2022, Sec. 3). It is computed by an adaptive Dormand-Prince 5(4)
embedded Runge-Kutta solve written in torch (any device, any float dtype), batched over rows,
and stopped per row when ||grad L|| <= tol. Optionally the last stretch is replaced by
Gauss-Newton steps restricted to the normal space (the range of the Hessian).

Flow time here is the time of the gradient flow, unrelated to the slow time of the SDEs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, hessian, vmap

__all__ = ["project", "gradient_norm", "ProjectionError"]

# Dormand & Prince (1980), RK5(4)7M: nodes, stage matrix, 5th-order weights, 5th-minus-4th weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

_METHODS = ("auto", "analytic", "flow", "flow+newton")
_INCREMENT_RTOL = 1e-3


class ProjectionError(ValueError):
    """Gradient flow did not reach ||grad L|| <= tol within the allowed flow time."""


def _batched_grad(loss: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return vmap(grad(loss))


def gradient_norm(problem, theta: Tensor) -> Tensor:
    """||grad L(theta)|| for theta of shape (D,) (0-dim result) or (n, D) (shape (n,))."""
    if theta.dim() == 1:
        return torch.linalg.vector_norm(grad(problem.loss)(theta))
    return torch.linalg.vector_norm(_batched_grad(problem.loss)(theta), dim=-1)


def _flow(grad_fn, theta: Tensor, *, tol: float, max_time: float, rtol: float, atol: float,
          max_steps: int) -> tuple[Tensor, Tensor]:
    """Integrate d theta/dt = -grad L row by row until ||grad|| <= tol; returns (theta, ||grad||)."""
    y = theta.clone()
    k1 = -grad_fn(y)
    gnorm = torch.linalg.vector_norm(k1, dim=-1)
    active = gnorm > tol
    time = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    # Initial step ~ 1/(Hessian scale) estimated crudely from the gradient size.
    h = torch.full_like(time, 1e-2)
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        if bool((time[active] >= max_time).all()):
            break
        hc = torch.minimum(h, (max_time - time).clamp_min(0.0))[:, None]
        ks = [k1]
        for i in range(1, 7):
            incr = sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(-grad_fn(y + hc * incr))
        y_new = y + hc * sum(b * k for b, k in zip(_B5, ks) if b != 0.0)
        err = hc * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = torch.sqrt(torch.mean((err / scale) ** 2, dim=-1))
        # Also bound the error by a fraction of the step's own displacement: near Gamma the
        # displacement shrinks with ||grad||, so solver noise can never stall the convergence.
        step_size = torch.linalg.vector_norm(hc * k1, dim=-1).clamp_min(torch.finfo(y.dtype).tiny)
        err_norm = torch.maximum(err_norm, torch.linalg.vector_norm(err, dim=-1) / (_INCREMENT_RTOL * step_size))
        accept = active & (err_norm <= 1.0) & (time < max_time)
        y = torch.where(accept[:, None], y_new, y)
        k1 = torch.where(accept[:, None], ks[6], k1)  # FSAL: the 7th stage is -grad at y_new
        time = torch.where(accept, time + hc[:, 0], time)
        factor = (0.9 * err_norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 5.0)
        h = torch.where(active, hc[:, 0].clamp_min(1e-12) * factor, h)
        gnorm = torch.linalg.vector_norm(k1, dim=-1)
        active = active & (gnorm > tol)
    return y, gnorm


def _newton(loss, theta: Tensor, *, tol: float, max_iter: int = 8, rel_cutoff: float = 1e-6) -> Tensor:
    """Gauss-Newton steps theta <- theta - H^+ grad with H^+ restricted to eigenvalues above
    rel_cutoff x lambda_max (the normal space); dense Hessians, small D only."""
    grad_fn, hess_fn = _batched_grad(loss), vmap(hessian(loss))
    for _ in range(max_iter):
        g = grad_fn(theta)
        if bool((torch.linalg.vector_norm(g, dim=-1) <= tol).all()):
            break
        evals, evecs = torch.linalg.eigh(hess_fn(theta))
        keep = evals > rel_cutoff * evals.abs().amax(dim=-1, keepdim=True)
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        coef = torch.einsum("nij,ni->nj", evecs, g) * inv
        theta = theta - torch.einsum("nij,nj->ni", evecs, coef)
    return theta


def project(problem, theta: Tensor, *, tol: float = 1e-10, max_time: float = 1e4,
            method: str = "auto", rtol: float = 1e-10, atol: float = 1e-12,
            max_steps: int = 200_000, newton_switch: float = 1e-6,
            newton_max_dim: int = 512) -> Tensor:
    """Phi(theta): the limit of gradient flow of `problem.loss` started at theta.

    Args:
        problem: an `sde.Problem` (uses `.loss` and, if set, the analytic `.project`).
        theta: (D,) or a batch (n, D).
        tol: stop when ||grad L|| <= tol (checked per row).
        max_time: the longest gradient-flow time allowed; beyond it a `ProjectionError`
            (a ValueError) reports the largest final gradient norm.
        method: "auto" (the analytic Phi when the problem has one, else "flow+newton" for
            D <= newton_max_dim and "flow" above), "analytic",
            "flow" (the adaptive ODE solve alone), or "flow+newton" (the ODE solve until
            ||grad|| <= newton_switch, then Gauss-Newton steps in the normal space; dense
            Hessians, so small D only).
        rtol, atol: local error tolerances of the Runge-Kutta pair (each step's error is
            also kept below 1e-3 of its displacement, so that the controller cannot hover at
            the stability limit short of tol). The flow is followed accurately because the
            limit point along Gamma depends on the whole path.

    Returns: a tensor of theta's shape, dtype and device.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if tol <= 0 or max_time <= 0:
        raise ValueError(f"tol and max_time must be positive, got tol={tol}, max_time={max_time}")
    if theta.dim() not in (1, 2):
        raise ValueError(f"theta must have shape (D,) or (n, D), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise ValueError(f"theta must be a floating tensor, got {theta.dtype}")
    analytic = getattr(problem, "project", None)
    if method == "analytic" and analytic is None:
        raise ValueError("method='analytic' but the problem has no analytic `project`")
    if method == "analytic" or (method == "auto" and analytic is not None):
        return analytic(theta) if theta.dim() == 1 else vmap(analytic)(theta)

    if method == "auto":
        method = "flow+newton" if theta.shape[-1] <= newton_max_dim else "flow"
    batch = theta.detach().reshape(-1, theta.shape[-1])
    grad_fn = _batched_grad(problem.loss)
    flow_tol = max(tol, newton_switch) if method == "flow+newton" else tol
    out, gnorm = _flow(grad_fn, batch, tol=flow_tol, max_time=max_time, rtol=rtol,
                       atol=atol, max_steps=max_steps)
    if method == "flow+newton":
        out = _newton(problem.loss, out, tol=tol)
        gnorm = torch.linalg.vector_norm(grad_fn(out), dim=-1)
    if bool((gnorm > tol).any()) or not bool(torch.isfinite(out).all()):
        worst = float(gnorm.nan_to_num(float("inf")).max())
        raise ProjectionError(
            f"projection onto Gamma did not converge: after gradient-flow time up to max_time={max_time:g} "
            f"the gradient norm is {worst:.3e} > tol={tol:.1e} ({int((gnorm > tol).sum())} of "
            f"{len(gnorm)} rows); the start may be outside the basin of a manifold of minimizers, "
            f"or raise max_time")
    return out.reshape(theta.shape)
