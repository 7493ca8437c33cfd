"""Discrete reference simulators: SGD, Local SGD and QSR on toy problems, vectorized over seeds
and workers, to check the slow SDEs against the algorithms they describe.

Parameters are held as one tensor (seeds, workers, D). Every step each worker takes
theta <- theta - eta g with g its own minibatch stochastic gradient
`sampler(theta (..., D), batch_size, generator) -> (..., D)` (e.g. `toys.DiagonalNet.sample_gradient`;
`per_sample` adapts a one-sample sampler); after every H local steps the workers are replaced by
their average. SGD is the case K = 1, H = 1. Slow time t = eta^2 x steps per worker
(Li, Wang & Arora 2022; Gu et al. 2023, 2024); observations are taken on the averaged
parameters at round boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .rules import QSR, LocalSGD

__all__ = ["DiscreteRun", "run_local_sgd", "run_sgd", "local_steps_for_beta", "qsr_local_steps",
           "per_sample", "richardson"]

Sampler = Callable[[Tensor, int, torch.Generator], Tensor]


@dataclass(frozen=True)
class DiscreteRun:
    """times (n_obs,): slow time eta^2 x steps per worker; steps (n_obs,) steps per worker;
    values (n_obs, seeds, ...): `observe` of the worker-averaged parameters."""
    times: Tensor
    steps: Tensor
    values: Tensor
    eta: float
    local_steps: int


def local_steps_for_beta(beta: float, eta: float) -> int:
    """H = max(1, round(beta / eta)): `sde.LocalSGD.local_steps` (the one rounding rule, Gu et al. 2023)."""
    return LocalSGD(1, 1, beta).local_steps(eta)


def qsr_local_steps(eta: float, alpha: float, h_base: int = 1) -> int:
    """H = max(H_base, floor((alpha / eta)^2)): `sde.QSR.local_steps` (Gu et al. 2024)."""
    return QSR(1, 1, alpha=alpha).local_steps(eta, h_base)


def per_sample(sampler: Callable[[Tensor, torch.Generator], Tensor]) -> Sampler:
    """Turn a one-sample gradient sampler (theta (..., D), generator) -> (..., D) into a
    minibatch sampler by averaging batch_size independent draws."""
    def minibatch(theta: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
        expanded = theta.unsqueeze(-2).expand(*theta.shape[:-1], batch_size, theta.shape[-1])
        return sampler(expanded, generator).mean(-2)
    return minibatch


def run_local_sgd(sampler: Sampler, theta0: Tensor, *, eta: float, workers: int, local_batch: int,
                  local_steps: int, n_rounds: int, n_seeds: int, generator: torch.Generator,
                  observe: Callable[[Tensor], Tensor] | None = None, observe_every: int = 1) -> DiscreteRun:
    """Local SGD with K = workers, H = local_steps, from theta0 (D,) (or one start per seed,
    (n_seeds, D)), for n_rounds rounds; observe(theta_avg (n_seeds, D)) every observe_every rounds
    (and at round 0). Returns a `DiscreteRun`; slow time of one round is H eta^2."""
    for name, value in [("workers", workers), ("local_batch", local_batch), ("local_steps", local_steps),
                        ("n_rounds", n_rounds), ("n_seeds", n_seeds), ("observe_every", observe_every)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not eta > 0:
        raise ValueError(f"eta must be positive, got {eta}")
    if theta0.dim() == 1:
        theta0 = theta0.expand(n_seeds, -1)
    if theta0.shape[0] != n_seeds or theta0.dim() != 2:
        raise ValueError(f"theta0 must be (D,) or ({n_seeds}, D), got {tuple(theta0.shape)}")
    observe = observe or (lambda th: th)
    theta = theta0.unsqueeze(1).expand(n_seeds, workers, theta0.shape[-1]).clone()
    values, steps = [observe(theta0.clone())], [0]
    for r in range(1, n_rounds + 1):
        for _ in range(local_steps):
            theta = theta - eta * sampler(theta, local_batch, generator)
        if not bool(torch.isfinite(theta).all()):
            raise FloatingPointError(f"the iterates diverged in round {r} (eta={eta} too large?)")
        avg = theta.mean(1)
        theta = avg.unsqueeze(1).expand_as(theta).clone()
        if r % observe_every == 0:
            values.append(observe(avg))
            steps.append(r * local_steps)
    steps_t = torch.tensor(steps, dtype=theta0.dtype)
    return DiscreteRun(times=steps_t * eta ** 2, steps=steps_t, values=torch.stack(values),
                       eta=float(eta), local_steps=int(local_steps))


def run_sgd(sampler: Sampler, theta0: Tensor, *, eta: float, batch_size: int, n_steps: int,
            n_seeds: int, generator: torch.Generator, observe: Callable[[Tensor], Tensor] | None = None,
            observe_every: int = 1) -> DiscreteRun:
    """SGD with batch B: `run_local_sgd` with one worker and H = 1."""
    return run_local_sgd(sampler, theta0, eta=eta, workers=1, local_batch=batch_size, local_steps=1,
                         n_rounds=n_steps, n_seeds=n_seeds, generator=generator, observe=observe,
                         observe_every=observe_every)


def richardson(etas, values, *, degree: int = 1, weights=None) -> tuple[float, np.ndarray]:
    """Fit value(eta) = r0 + c1 eta (+ c2 eta^2 ...) by (weighted) least squares; returns
    (r0, all coefficients from the constant up). Needs at least degree + 2 learning rates so
    that the fit is over-determined."""
    etas, values = np.asarray(etas, float), np.asarray(values, float)
    if len(etas) < degree + 2:
        raise ValueError(f"need at least {degree + 2} learning rates for a degree-{degree} fit")
    design = np.vander(etas, degree + 1, increasing=True)
    w = np.ones_like(etas) if weights is None else np.asarray(weights, float)
    coef, *_ = np.linalg.lstsq(design * w[:, None], values * w, rcond=None)
    return float(coef[0]), coef
