"""Hessian spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe q, m Lanczos steps from q give a tridiagonal T = Y diag(nodes) Y^T; the Gauss
quadrature with `nodes` and weights Y[0, :]^2 (summing to 1) matches q^T f(H) q exactly for
polynomials f of degree < 2m (Golub & Meurant, "Matrices, Moments and Quadrature", 2010).
Averaging over random probes, sum_j w_j delta(x - node_j) estimates the spectral density
phi(x) = (1/D) sum_i delta(x - lambda_i) (Lin, Saad & Yang, SIAM Review 2016; Ghorbani,
Krishnan & Xiao, ICML 2019 for neural networks). A Gaussian of width sigma smooths it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dynamics.lanczos import check_operator, lanczos_tridiagonal, random_vector

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """Gauss quadrature per probe: `nodes` and `weights`, both float64 (num_probes, m).

    Each row of weights sums to 1. A probe whose Krylov space became invariant after m' < m
    steps is padded with copies of its first node at weight 0. `dim` is D; `matvecs` the total.
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    matvecs: int

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """Gaussian-smoothed density (1/D) sum_i N(x; lambda_i, sigma^2) estimated on grid (G,)."""
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        x = torch.as_tensor(grid, dtype=torch.float64).reshape(-1, 1, 1)
        kernel = torch.exp(-0.5 * ((x - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights).sum(-1).mean(-1)

    def mass(self, low: float, high: float, sigma: float = 0.0) -> float:
        """Estimated fraction of eigenvalues in [low, high] (smoothed by sigma if sigma > 0)."""
        if not high >= low:
            raise ValueError(f"need low <= high, got [{low}, {high}]")
        if sigma > 0:
            cdf = lambda t: 0.5 * (1 + torch.erf((t - self.nodes) / (sigma * math.sqrt(2))))
            inside = cdf(torch.tensor(high, dtype=torch.float64)) - cdf(torch.tensor(low, dtype=torch.float64))
        else:
            inside = ((self.nodes >= low) & (self.nodes <= high)).to(torch.float64)
        return float((inside * self.weights).sum(-1).mean())

    def expectation(self, fn: Callable[[Tensor], Tensor]) -> float:
        """Estimate of (1/D) tr f(H) for an elementwise torch function f (e.g. tr H / D)."""
        return float((fn(self.nodes) * self.weights).sum(-1).mean())


def spectral_density(obj, *, num_probes: int, lanczos_steps: int,
                     generator: torch.Generator | None = None,
                     distribution: str = "rademacher") -> SpectralDensity:
    """SLQ with `num_probes` random probes and `lanczos_steps` (<= D) Lanczos steps each.

    Cost: num_probes x lanczos_steps matvecs; memory D x lanczos_steps (full reorthogonalization).
    Probes come from `generator` (seed 0 if None), normalized to unit length.
    """
    check_operator(obj)
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    if not isinstance(lanczos_steps, int) or lanczos_steps < 1:
        raise ValueError(f"lanczos_steps must be a positive integer, got {lanczos_steps!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = min(lanczos_steps, obj.dim)
    nodes = torch.empty(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    matvecs = 0
    for p in range(num_probes):
        alpha, beta, m = lanczos_tridiagonal(obj, random_vector(obj, gen, distribution), steps)
        matvecs += m
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        theta, Y = torch.linalg.eigh(T)
        nodes[p, :m], weights[p, :m] = theta, Y[0, :] ** 2
        nodes[p, m:] = theta[0]
    return SpectralDensity(nodes, weights, obj.dim, matvecs)
