"""Building blocks of the slow SDEs at a point zeta of the minimizer manifold Gamma (THEORY.md).

Dense float64 algebra for problems whose (D, D) Hessian fits in memory:

- `hessian_matrix`, `hessian_eigen` (eigendecomposition + the split normal / tangent),
- projectors P (tangent, onto ker Hessian) and P_perp, the pseudo-inverse H^+,
- `noise_blocks`: S_par = P Sigma P, S_perp, S_par_perp = P Sigma P_perp, S_perp_par, S_diamond,
- `lyapunov_inverse` (Lyap(X) = H X + X H inverted on pairs with lambda_i + lambda_j > 0),
  `s_hat` = Lyap^-1(S_diamond), `psi_hat` (the psi-weighted version with eta H = beta),
- `third_order`: d3L(zeta)[M] = grad_theta <Hessian(L)(theta), M> at theta = zeta,
- `d2phi`: the second derivative of the projection Phi on Gamma in closed form,
  d2Phi[M] = -H^+ d3L[P M P] - P d3L[Lyap^-1(M - P M P)]. On the tangent block this is
  THEORY.md's d2Phi[S_par] = -H^+ d3L[S_par], on the normal block d2Phi[S_perp] =
  -P d3L[Lyap^-1(S_perp)]; the mixed block follows from the same derivation (differentiate
  dPhi(x) grad L(x) = 0 twice at zeta; Li, Wang & Arora 2022, Lemma C.4-C.6).

Rank rule (which eigen-directions are normal): with `rank=None`, eigenvalue lambda_i is normal
iff lambda_i > rank_rtol x lambda_max (default rank_rtol = 1e-6); with an int `rank`, the top
`rank` eigenvalues are normal. Tangent eigenvalues are then treated as exactly zero.

Everything here is `torch.func.vmap`-compatible: masks instead of boolean indexing, no `.item()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, hessian

from .psi import psi

DEFAULT_RANK_RTOL = 1e-6


@dataclass(frozen=True)
class HessianEigen:
    """Eigendecomposition of the Hessian at zeta with the normal / tangent split.

    values (D,) ascending, vectors (D, D) orthonormal columns, normal (D,) float mask: 1 for
    normal (lambda > threshold) directions, 0 for tangent ones.
    """

    values: Tensor
    vectors: Tensor
    normal: Tensor

    @property
    def normal_values(self) -> Tensor:
        """Eigenvalues with the tangent ones set to exactly zero, (D,)."""
        return self.values * self.normal

    @property
    def pair_mask(self) -> Tensor:
        """(D, D) mask of pairs (i, j) with lambda_i + lambda_j > 0 (at least one normal)."""
        m = self.normal
        return m[:, None] + m[None, :] - m[:, None] * m[None, :]

    @property
    def pair_sums(self) -> Tensor:
        """(D, D) lambda_i + lambda_j on normal pairs, 1 elsewhere (a safe denominator)."""
        lam = self.normal_values
        mask = self.pair_mask
        return (lam[:, None] + lam[None, :]) * mask + (1 - mask)

    def to_eigenbasis(self, X: Tensor) -> Tensor:
        return self.vectors.T @ X @ self.vectors

    def from_eigenbasis(self, Y: Tensor) -> Tensor:
        return self.vectors @ Y @ self.vectors.T


def hessian_matrix(loss: Callable[[Tensor], Tensor], zeta: Tensor) -> Tensor:
    """Dense symmetric Hessian of a dense loss at zeta, (D, D) (torch.func.hessian, symmetrized)."""
    H = hessian(loss)(zeta)
    return (H + H.T) / 2


def hessian_eigen(H: Tensor, *, rank: int | None = None, rank_rtol: float = DEFAULT_RANK_RTOL) -> HessianEigen:
    """Eigendecomposition of a symmetric (D, D) H and the normal mask (rank rule in the module doc)."""
    values, vectors = torch.linalg.eigh(H)
    D = H.shape[0]
    if rank is not None:
        if not 0 <= rank <= D:
            raise ValueError(f"rank must be in [0, {D}], got {rank}")
        normal = (torch.arange(D, device=H.device) >= D - rank).to(H.dtype)
    else:
        lam_max = values[-1].clamp(min=torch.finfo(H.dtype).tiny)
        normal = (values > rank_rtol * lam_max).to(H.dtype)
    return HessianEigen(values, vectors, normal)


def normal_projector(eig: HessianEigen) -> Tensor:
    """P_perp = sum over normal i of v_i v_i^T, (D, D)."""
    V = eig.vectors
    return (V * eig.normal) @ V.T


def tangent_projector(eig: HessianEigen) -> Tensor:
    """P = I - P_perp, the orthogonal projector onto T_zeta Gamma = ker Hessian, (D, D)."""
    V = eig.vectors
    return (V * (1 - eig.normal)) @ V.T


def pseudo_inverse(eig: HessianEigen) -> Tensor:
    """H^+ = sum over normal i of v_i v_i^T / lambda_i, (D, D)."""
    lam = eig.normal_values + (1 - eig.normal)  # safe: 1 on tangent directions, masked below
    V = eig.vectors
    return (V * (eig.normal / lam)) @ V.T


@dataclass(frozen=True)
class NoiseBlocks:
    """Blocks of Sigma split by P (tangent) and P_perp (normal); each (D, D).

    par = P Sigma P, perp = P_perp Sigma P_perp, par_perp = P Sigma P_perp,
    perp_par = P_perp Sigma P, diamond = Sigma - par.
    """

    par: Tensor
    perp: Tensor
    par_perp: Tensor
    perp_par: Tensor
    diamond: Tensor


def noise_blocks(sigma: Tensor, P: Tensor) -> NoiseBlocks:
    """Split a symmetric (D, D) covariance by the tangent projector P."""
    P_perp = torch.eye(P.shape[0], dtype=P.dtype, device=P.device) - P
    par = P @ sigma @ P
    return NoiseBlocks(par=par, perp=P_perp @ sigma @ P_perp, par_perp=P @ sigma @ P_perp,
                       perp_par=P_perp @ sigma @ P, diamond=sigma - par)


def lyapunov_inverse(X: Tensor, eig: HessianEigen) -> Tensor:
    """Lyap^-1(X) = sum_{i,j: lambda_i+lambda_j>0} <X, v_i v_j^T>/(lambda_i+lambda_j) v_i v_j^T, (D, D)."""
    Y = eig.to_eigenbasis(X)
    return eig.from_eigenbasis(Y * eig.pair_mask / eig.pair_sums)


def s_hat(sigma: Tensor, eig: HessianEigen) -> Tensor:
    """S_hat = Lyap^-1(S_diamond), S_diamond = Sigma - P Sigma P (Lyap^-1 kills P Sigma P anyway)."""
    return lyapunov_inverse(sigma, eig)


def psi_hat(sigma: Tensor, eig: HessianEigen, beta: float) -> Tensor:
    """Psi_hat = sum psi(beta (lambda_i+lambda_j)) / (lambda_i+lambda_j) <S_diamond, v_i v_j^T> v_i v_j^T.

    beta = eta H, the slow-time length of a Local SGD round over eta (Gu et al., ICLR 2023).
    Tangent-tangent pairs are excluded by the mask, so Sigma may be passed instead of S_diamond.
    """
    Y = eig.to_eigenbasis(sigma)
    sums = eig.pair_sums
    weight = eig.pair_mask * psi(beta * sums) / sums
    return eig.from_eigenbasis(Y * weight)


def psd_sqrt(S: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix, (D, D).

    Eigenvalues below 10 D eps x lambda_max (round-off, e.g. the normal block of S_par) are set
    to zero before the square root, so a rank-deficient S gets a square root of the same rank
    instead of sqrt(round-off) ~ 1e-8 entries.
    """
    values, vectors = torch.linalg.eigh((S + S.T) / 2)
    cut = 10 * S.shape[0] * torch.finfo(S.dtype).eps * values[-1].clamp(min=0)
    roots = torch.where(values > cut, values, torch.zeros_like(values)).sqrt()
    return (vectors * roots) @ vectors.T


def third_order(loss: Callable[[Tensor], Tensor], zeta: Tensor, M: Tensor) -> Tensor:
    """d3L(zeta)[M] = grad_theta <Hessian(L)(theta), M> at zeta, (D,); only sym(M) matters."""
    M_sym = (M + M.T) / 2

    def contracted(theta: Tensor) -> Tensor:
        return (hessian(loss)(theta) * M_sym).sum()

    return grad(contracted)(zeta)


def d2phi(loss: Callable[[Tensor], Tensor], zeta: Tensor, M: Tensor, eig: HessianEigen) -> Tensor:
    """Second derivative of Phi on Gamma applied to a symmetric (D, D) M, (D,).

    d2Phi[M] = -H^+ d3L[P M P] - P d3L[Lyap^-1(M - P M P)]  (module docstring).
    """
    P = tangent_projector(eig)
    M = (M + M.T) / 2
    M_par = P @ M @ P
    tangent_part = -pseudo_inverse(eig) @ third_order(loss, zeta, M_par)
    normal_part = -P @ third_order(loss, zeta, lyapunov_inverse(M - M_par, eig))
    return tangent_part + normal_part
