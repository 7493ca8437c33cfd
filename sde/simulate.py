"""Simulators: a plain Euler-Maruyama core and the projected scheme that keeps paths on Gamma.

`euler_maruyama(drift_fn, diffusion_fn, y0, ...)` integrates dY = b(t, Y) dt + G(t, Y) dW
for a batch of paths (n, D) with an explicit generator or given Brownian increments.

`simulate(problem, zeta0, rule, ...)` integrates a slow SDE of THEORY.md by the projected
Euler-Maruyama scheme

    zeta_{k+1} = Phi(zeta_k + b(zeta_k) dt + A(zeta_k) sqrt(dt) xi_k),   xi_k ~ N(0, I_D),

with b the un-projected ("raw") drift and A the diffusion of `sde.slow_sde`. Expanding Phi to
second order gives P b dt + P A dW + 1/2 d2Phi[A A^T] dt: the tangent projection and the Ito
correction of staying on Gamma come out of the retraction itself, so every iterate lies on
Gamma and the scheme keeps Euler-Maruyama's orders (strong 1/2, weak 1). Slow time
t = eta^2 x steps per worker; row k of the result is at t = k x save_every x dt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sde.projection import gradient_norm, project

__all__ = ["EulerMaruyama", "euler_maruyama", "simulate", "save_times"]

DriftFn = Callable[[float, Tensor], Tensor]


@dataclass(frozen=True)
class EulerMaruyama:
    """Y <- Y + b dt + G dW. Declared orders (Kloeden & Platen 1992, Thms 10.2.2 and 14.1.5):
    strong 1/2 for general noise (1 for additive noise), weak 1."""
    strong_order: float = 0.5
    weak_order: float = 1.0
    name: str = "euler"

    def step(self, y: Tensor, drift: Tensor, diffusion: Tensor, dt: float, dw: Tensor) -> Tensor:
        """One step. y, drift: (n, D); diffusion: (n, D, m) general or (n, D) diagonal; dw: (n, m)."""
        if diffusion.dim() == y.dim():  # diagonal noise
            return torch.addcmul(y.add(drift, alpha=dt), diffusion, dw)
        return y.add(drift, alpha=dt).add_(torch.bmm(diffusion, dw.unsqueeze(-1)).squeeze(-1))


SCHEMES = {"euler": EulerMaruyama()}


def _scheme(scheme) -> EulerMaruyama:
    if isinstance(scheme, EulerMaruyama):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; available: {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _num_steps(t1: float, dt: float) -> int:
    if not (t1 > 0 and math.isfinite(t1)):
        raise ValueError(f"t1 must be a positive finite slow time, got {t1}")
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be positive, got {dt}")
    n = round(t1 / dt)
    if n < 1 or abs(n * dt - t1) > 1e-9 * max(t1, dt):
        raise ValueError(f"t1={t1} must be a whole multiple of dt={dt}")
    return n


def save_times(t1: float, dt: float, save_every: int = 1) -> list[float]:
    """The times of the rows `euler_maruyama` and `simulate` return."""
    n = _num_steps(t1, dt)
    return [k * dt for k in range(0, n + 1, save_every)]


def euler_maruyama(drift_fn: DriftFn, diffusion_fn: DriftFn, y0: Tensor, *, t1: float, dt: float,
                   generator: torch.Generator | None = None, dw: Tensor | None = None,
                   noise_dim: int | None = None, save_every: int = 1, scheme="euler",
                   retract: Callable[[Tensor], Tensor] | None = None, progress: bool = False) -> Tensor:
    """Integrate dY = drift_fn(t, Y) dt + diffusion_fn(t, Y) dW from t = 0 to t1, un-projected
    unless `retract` is given (then Y <- retract(Y) after every step).

    Args:
        drift_fn: (t, Y (n, D)) -> (n, D).
        diffusion_fn: (t, Y) -> (n, D, m) (general noise) or (n, D) (diagonal noise, m = D).
        y0: (n, D) initial states, one per path.
        t1, dt: end time and step; t1 must be a whole multiple of dt.
        generator: draws the Brownian increments (required unless `dw` is given).
        dw: optional Brownian increments (n_steps, n, m) with variance dt, e.g. sums of a finer
            grid's increments for strong-order studies.
        noise_dim: m; default D (needed only when drawing increments for general noise).
        save_every: keep every save_every-th state (the initial state always).
    Returns: (n_saves, n, D) with n_saves = n_steps // save_every + 1.
    """
    n_steps = _num_steps(t1, dt)
    if y0.dim() != 2 or y0.shape[0] < 1:
        raise ValueError(f"y0 must have shape (n_paths >= 1, D), got {tuple(y0.shape)}")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    step = _scheme(scheme).step
    n, dim = y0.shape
    m = dim if noise_dim is None else noise_dim
    if dw is not None:
        if dw.shape[:2] != (n_steps, n):
            raise ValueError(f"dw must have shape ({n_steps}, {n}, m), got {tuple(dw.shape)}")
    elif generator is None:
        raise ValueError("pass a torch.Generator (or the increments dw): no hidden global random state")
    sqrt_dt = math.sqrt(dt)
    y = y0.clone()
    saves = [y0.clone()]
    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="Euler-Maruyama", unit="step")
    for k in steps:
        t = k * dt
        inc = dw[k] if dw is not None else sqrt_dt * torch.randn(
            n, m, generator=generator, dtype=y0.dtype, device=y0.device)
        y = step(y, drift_fn(t, y), diffusion_fn(t, y), dt, inc)
        if retract is not None:
            y = retract(y)
        if (k + 1) % save_every == 0:
            saves.append(y)
    return torch.stack(saves)


def simulate(problem, zeta0: Tensor, rule, *, t1: float, dt: float, n_paths: int,
             generator: torch.Generator, save_every: int = 1, scheme="euler", progress: bool = False,
             project_initial: bool = False, on_manifold_tol: float = 1e-6,
             projection_tol: float = 1e-10) -> Tensor:
    """Paths of the slow SDE of `rule` (SGD, LocalSGD, QSR) on Gamma, by projected Euler-Maruyama.

    Args:
        problem: an `sde.Problem`; its analytic `project` is used for the retraction when set,
            else the batched gradient-flow projection `sde.project`.
        zeta0: (D,) starting point on Gamma (||grad L(zeta0)|| <= on_manifold_tol), or anywhere
            in the basin with project_initial=True (then Phi(zeta0) is the start).
        rule: `sde.SGD`, `sde.LocalSGD` or `sde.QSR`.
        t1, dt: slow-time horizon and step (t = eta^2 x steps per worker).
        n_paths: independent paths, simulated as one batch.
        generator: the only source of randomness.
    Returns: (n_saves, n_paths, D), row k at slow time k x save_every x dt (`save_times`).
    """
    from sde.slow_sde import drift_and_diffusion

    if zeta0.dim() != 1:
        raise ValueError(f"zeta0 must have shape (D,), got {tuple(zeta0.shape)}")
    if not isinstance(n_paths, int) or n_paths < 1:
        raise ValueError(f"n_paths must be a positive integer, got {n_paths!r}")
    _num_steps(t1, dt)
    if project_initial:
        zeta0 = project(problem, zeta0, tol=projection_tol)
    else:
        gnorm = float(gradient_norm(problem, zeta0))
        if not gnorm <= on_manifold_tol:
            raise ValueError(
                f"zeta0 is not on Gamma: ||grad L(zeta0)|| = {gnorm:.3e} > {on_manifold_tol:.1e}; "
                f"project it first (sde.project) or pass project_initial=True")
    cache: dict[str, Tensor] = {}

    def terms(y: Tensor) -> tuple[Tensor, Tensor]:
        if cache.get("y") is not y:  # drift_fn and diffusion_fn are called on the same y
            cache["y"] = y
            cache["b"], cache["a"] = drift_and_diffusion(problem, y, rule)
        return cache["b"], cache["a"]

    def retract(y: Tensor) -> Tensor:
        return project(problem, y, tol=projection_tol)

    y0 = zeta0.detach().expand(n_paths, -1).clone()
    return euler_maruyama(lambda t, y: terms(y)[0], lambda t, y: terms(y)[1], y0, t1=t1, dt=dt,
                          generator=generator, save_every=save_every, scheme=scheme,
                          retract=retract, progress=progress)
