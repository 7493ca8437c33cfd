"""Matrix-free slow-SDE terms for networks: low-rank normal space, Hessian-vector products only.

`MatrixFreeProblem(obj, ...)` (also `sde.Problem.from_objective(obj, ...)`) wraps a
`dynamics.Objective`. At a point zeta near Gamma it never forms a (D, D) matrix:

- Normal space: the top-r Hessian eigenpairs (U (D, r), lambda (r,)) by Lanczos
  (`dynamics.top_eigenpairs`). TRUNCATION: the tangent space is taken to be the orthogonal
  complement of span(U), P = I - U U^T; Hessian eigen-directions beyond the r-th are treated as
  tangent (zero curvature). This is exact when rank Hessian(zeta) = r, and the error grows with
  the neglected eigenvalues (tests/sde/test_matrix_free.py measures it).
- Rank rule: with `rank=None`, r = #{lambda_i > rank_rtol x lambda_1} among the top `max_rank + 1`
  eigenvalues; at least one computed eigenvalue must fall below the cut (otherwise the spectrum
  has no gap within max_rank and a ValueError asks for a larger max_rank). The observed gap
  lambda_r / lambda_{r+1} is reported as `LowRankState.spectral_gap`. An int `rank` skips the rule.
- Noise: `dynamics.noise_probe` gives C = U^T Sigma U (r, r) and the mixed block
  X = P Sigma U (D, r). With Lambda = diag(lambda) and Y = X Lambda^-1 (THEORY.md):
      S_hat   = U (C / (lambda_i + lambda_j)) U^T + Y U^T + U Y^T,
      Psi_hat = U (C psi(beta(lambda_i+lambda_j)) / (lambda_i+lambda_j)) U^T + Y' U^T + U Y'^T,
  Y' = X diag(psi(beta lambda) / lambda): both of rank <= 2r, so d3L of each costs 2r
  rank-one third-order passes (`dynamics.third_order` with a `LowRank`).
- Tangent noise S_par = P Sigma P = Z Z^T with Z = P G_c^T / sqrt(N) (G_c: centered per-sample
  gradients), exact with all N samples (`noise_samples=None`), or unbiased with m Gaussian
  sample-mixtures Z = P G_c^T Xi / sqrt(N m), Xi (N, m) ~ N(0, 1) (`noise_samples=m`). The Ito
  correction -(1/(2B)) U Lambda^-1 U^T d3L[Z Z^T] costs one third-order pass per column of Z.
- Noise from another objective (`noise_obj`): by default Sigma is the per-sample-gradient
  covariance of `obj` itself. When SGD's noise does not come from the samples of the loss whose
  Hessian defines Gamma (e.g. flipped labels: the Hessian is that of the expected, soft-target
  loss, the noise that of sampled (x_i, flipped label) draws), pass an `Objective` over those
  draws as `noise_obj`: its per-sample gradients, centred by their own mean, give Sigma (a
  Monte Carlo estimate; `sde.general_formula.sampled_noise_objective`). Same parameters (D).
- `diffusion` is returned as the (D, n) factor A = Z / sqrt(B) (A A^T = S_par / B); dW is then
  n-dimensional. (The dense problem's A is the symmetric square root; both give the same law.)

Cost of one drift: Lanczos matvecs (k = r + 1 eigenpairs) + two per-sample-gradient passes
(`noise_probe` and Z) + 2r (+ 2r for Local SGD's drift-II) + n third-order passes;
benchmarks/bench_drift_cost.py measures it (third-order passes dominate, ~8 gradients each).
Time unit: slow time t = eta^2 x steps per worker.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .psi import psi
from .rules import check_rule
from .terms import SlowSDETerms

DEFAULT_RANK_RTOL = 1e-5


@dataclass(frozen=True)
class LowRankState:
    """Normal-space data at zeta: U (D, r), values (r,), the gap lambda_r / lambda_{r+1} (inf if
    lambda_{r+1} <= 0 or was not computed), and the operator counts spent on it."""

    basis: Tensor
    values: Tensor
    spectral_gap: float
    hvp_calls: int


class MatrixFreeProblem:
    """Slow-SDE terms of a network's training loss from HVPs, Lanczos and third-order passes.

    Args:
        obj: `dynamics.Objective` with bn="eval" (per-sample gradients are needed).
        rank: number of normal directions; None applies the rank rule (module docstring).
        max_rank: the most eigenpairs the rule may look at (computes max_rank + 1).
        rank_rtol: relative eigenvalue cut of the rank rule.
        eig_tol, max_matvecs: Lanczos residual tolerance and budget.
        noise_samples: None (exact tangent noise, N third-order passes) or m > 0 random mixtures.
        chunk_size: samples per vmap call for per-sample gradients.
        generator: draws the Lanczos start vector and the noise mixtures.
        noise_obj: `dynamics.Objective` whose per-sample-gradient covariance is Sigma (default
            `obj`); same parameter vector, bn="eval" (module docstring).
    """

    def __init__(self, obj, *, rank: int | None = None, max_rank: int = 32,
                 rank_rtol: float = DEFAULT_RANK_RTOL, eig_tol: float = 1e-8, max_matvecs: int = 2000,
                 noise_samples: int | None = None, chunk_size: int = 64,
                 generator: torch.Generator | None = None, noise_obj=None):
        from dynamics.objective import Objective
        if not isinstance(obj, Objective):
            raise ValueError(f"MatrixFreeProblem needs a dynamics.Objective, got {type(obj).__name__}")
        if obj.bn == "train":
            raise ValueError("MatrixFreeProblem needs per-sample gradients: build the Objective with bn='eval'")
        if rank is not None and not (isinstance(rank, int) and 1 <= rank < obj.dim):
            raise ValueError(f"rank must be an int in [1, D) = [1, {obj.dim}), got {rank!r}")
        if not (isinstance(max_rank, int) and 1 <= max_rank < obj.dim):
            raise ValueError(f"max_rank must be an int in [1, D) = [1, {obj.dim}), got {max_rank!r}")
        if not 0 < rank_rtol < 1:
            raise ValueError(f"rank_rtol must be in (0, 1), got {rank_rtol}")
        if noise_samples is not None and not (isinstance(noise_samples, int) and noise_samples >= 1):
            raise ValueError(f"noise_samples must be None or an int >= 1, got {noise_samples!r}")
        if noise_obj is not None:
            if not isinstance(noise_obj, Objective):
                raise ValueError(f"noise_obj must be a dynamics.Objective, got {type(noise_obj).__name__}")
            if noise_obj.dim != obj.dim:
                raise ValueError(f"noise_obj has D = {noise_obj.dim} parameters, obj has {obj.dim}")
            if noise_obj.bn == "train":
                raise ValueError("noise_obj needs per-sample gradients: build it with bn='eval'")
        self.obj = obj
        self.noise_obj = noise_obj if noise_obj is not None else obj
        self.rank, self.max_rank, self.rank_rtol = rank, max_rank, rank_rtol
        self.eig_tol, self.max_matvecs = eig_tol, max_matvecs
        self.noise_samples, self.chunk_size = noise_samples, chunk_size
        self.generator = generator

    # ------------------------------------------------------------------ normal space
    def normal_space(self, zeta: Tensor) -> LowRankState:
        """Top Hessian eigenpairs at zeta and the rank rule; ValueError if no gap within max_rank."""
        from dynamics.lanczos import top_eigenpairs
        obj = self.obj
        k = min((self.rank if self.rank is not None else self.max_rank) + 1, obj.dim)
        operator = _PointOperator(obj, zeta)
        result = top_eigenpairs(operator, k, tol=self.eig_tol, max_matvecs=self.max_matvecs,
                                generator=self.generator)
        values, vectors = result.values, result.vectors
        if self.rank is not None:
            r = self.rank
        else:
            cut = self.rank_rtol * values[0].clamp(min=torch.finfo(values.dtype).tiny)
            r = int((values > cut).sum())
            if r >= len(values):
                raise ValueError(
                    f"no spectral gap within max_rank = {self.max_rank}: all {len(values)} computed "
                    f"eigenvalues exceed rank_rtol x lambda_max = {float(cut):.3e} (smallest "
                    f"{float(values[-1]):.3e}); raise max_rank or pass rank explicitly")
            if r == 0:
                raise ValueError("the Hessian has no positive eigenvalue: zeta is not near a minimizer manifold")
        # Ritz pairs of the kept directions must be accurate (the tail one may not converge).
        kept_res = result.residuals[:r]
        if not bool((kept_res <= 1e3 * self.eig_tol * values[:r].abs().double()).all()):
            raise ValueError(f"Lanczos did not converge on the top {r} eigenpairs within "
                             f"{self.max_matvecs} matvecs (residuals {kept_res.tolist()}); "
                             "raise max_matvecs or eig_tol")
        nxt = float(values[r]) if r < len(values) else 0.0
        gap = float(values[r - 1]) / nxt if nxt > 0 else float("inf")
        return LowRankState(vectors[:, :r].contiguous(), values[:r].clone(), gap, operator.calls)

    # ------------------------------------------------------------------ tangent noise factor
    def tangent_noise_factor(self, zeta: Tensor, U: Tensor) -> Tensor:
        """Z (D, n) with Z Z^T = P Sigma P (exact, n = N) or its unbiased estimate (n = noise_samples)."""
        obj = self.noise_obj
        N = obj.num_samples
        chunks = list(obj.iter_per_sample_grads(zeta, chunk_size=self.chunk_size))
        mean = sum(G.sum(0) for G in chunks) / N
        if self.noise_samples is None:
            Z = torch.cat([G - mean for G in chunks]).T / N ** 0.5
        else:
            m = self.noise_samples
            gen = self.generator if self.generator is not None else torch.Generator().manual_seed(0)
            Xi = torch.randn(N, m, generator=gen, dtype=zeta.dtype).to(zeta.device)
            Z = torch.zeros(obj.dim, m, dtype=zeta.dtype, device=zeta.device)
            start = 0
            for G in chunks:
                Z += (G - mean).T @ Xi[start:start + len(G)]
                start += len(G)
            Z = Z / (N * m) ** 0.5
        return Z - U @ (U.T @ Z)

    # ------------------------------------------------------------------ the terms
    def slow_sde(self, zeta: Tensor, rule, *, check: bool = True, gradient_tol: float = 1e-6):
        """`sde.SlowSDETerms` at zeta (see `sde.slow_sde`); `diffusion` is a (D, n) factor."""
        from dynamics.noise import noise_probe
        from dynamics.third_order import LowRank, third_order

        check_rule(rule)
        obj = self.obj
        if zeta.shape != (obj.dim,):
            raise ValueError(f"zeta must have shape ({obj.dim},), got {tuple(zeta.shape)}")
        zeta = zeta.detach().to(obj.dtype)
        if check:
            norm = float(obj.grad(zeta).norm())
            if not norm <= gradient_tol:
                raise ValueError(f"zeta is not on Gamma: ||grad L(zeta)|| = {norm:.3e} > gradient_tol = "
                                 f"{gradient_tol:.1e}; project it first with sde.project")
        B, (c_I, c_II, beta) = float(rule.total_batch), rule.drift_coefficients()
        state = self.normal_space(zeta)
        U, lam = state.basis, state.values
        probe = noise_probe(self.noise_obj, U, theta=zeta, chunk_size=self.chunk_size, with_mixed=True)
        C, X = probe.cov_in_basis, probe.mixed
        sums = lam[:, None] + lam[None, :]

        def d3(core: Tensor, Y: Tensor) -> Tensor:
            return third_order(obj, _low_rank(U, core, Y, LowRank), theta=zeta)

        raw_I = -(c_I / (2 * B)) * d3(C / sums, X / lam)
        if beta is not None and c_II > 0:
            raw_II = -(c_II / (2 * B)) * d3(C * psi(beta * sums) / sums, X * (psi(beta * lam) / lam))
        else:
            raw_II = torch.zeros_like(zeta)
        Z = self.tangent_noise_factor(zeta, U)
        d3_par = third_order(obj, LowRank(torch.ones(Z.shape[1], dtype=Z.dtype), Z), theta=zeta)
        ito = -(1 / (2 * B)) * U @ ((U.T @ d3_par) / lam)

        def tangent(v: Tensor) -> Tensor:
            return v - U @ (U.T @ v)

        drift_I, drift_II = tangent(raw_I), tangent(raw_II)
        return SlowSDETerms(drift=drift_I + drift_II + ito, diffusion=Z / B ** 0.5, drift_I=drift_I,
                            drift_II=drift_II, ito_correction=ito, raw_drift=raw_I + raw_II,
                            rank=U.shape[1])


def _low_rank(U: Tensor, core: Tensor, Y: Tensor, LowRank):
    """U core U^T + Y U^T + U Y^T as LowRank(coeffs, vectors): QR of [U, Y], eigh of the small core."""
    r = U.shape[1]
    Q, R = torch.linalg.qr(torch.cat([U, Y], dim=1))
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    G = torch.cat([torch.cat([(core + core.T) / 2, eye], dim=1),
                   torch.cat([eye, torch.zeros_like(eye)], dim=1)], dim=0)
    values, W = torch.linalg.eigh(R @ G @ R.T)
    keep = values.abs() > 1e-13 * values.abs().max().clamp(min=torch.finfo(values.dtype).tiny)
    return LowRank(values[keep], (Q @ W)[:, keep])


class _PointOperator:
    """The Hessian of obj at a fixed theta as an operator for Lanczos; counts HVP calls."""

    def __init__(self, obj, theta: Tensor):
        self.obj, self.theta = obj, theta
        self.dim, self.dtype, self.device = obj.dim, obj.dtype, obj.device
        self.calls = 0

    def hvp(self, v: Tensor) -> Tensor:
        self.calls += 1 if v.dim() == 1 else v.shape[1]
        return self.obj.hvp(v, self.theta)
