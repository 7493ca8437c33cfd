"""The terms of the slow SDEs of SGD, Local SGD and QSR at a point zeta of Gamma (THEORY.md).

With B = K x B_loc the total batch (Li, Wang & Arora 2022; Gu et al. 2023, 2024):

    d zeta = P( B^-1/2 S_par^1/2 dW  -  c/(2B) d3L[S_hat] dt  -  (K-1)/(2B) d3L[Psi_hat] dt )

c = 1 for SGD and Local SGD, c = K for QSR; the last (drift-II) term only for Local SGD, with
eta H = beta inside psi. "P(...)" is shorthand for the projected increment
dPhi(A dW + b dt) + 1/2 d2Phi[A A^T] dt, so the total drift includes the Ito correction
1/2 d2Phi[S_par / B] = -(1/(2B)) H^+ d3L[S_par] of staying on Gamma.

Time unit: slow time t = eta^2 x (steps taken by one worker); one Local SGD round lasts
beta x eta, one QSR round alpha^2.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vmap

from . import blocks
from .problem import Problem
from .matrix_free import MatrixFreeProblem
from .rules import check_rule
from .terms import SlowSDETerms

DEFAULT_GRADIENT_TOL = 1e-6


def _rule_constants(rule) -> tuple[float, float, float, float | None]:
    """(B, drift-I scale c, drift-II scale K-1, beta or None): `rule.drift_coefficients()` (eta -> 0)."""
    check_rule(rule)
    return (float(rule.total_batch), *rule.drift_coefficients())


def _dense_terms(loss, noise_cov, zeta: Tensor, constants, rank: int | None, rank_rtol: float):
    """All terms at one point as a tuple of tensors (vmap-compatible core)."""
    B, c_I, c_II, beta = constants
    eig = blocks.hessian_eigen(blocks.hessian_matrix(loss, zeta), rank=rank, rank_rtol=rank_rtol)
    P = blocks.tangent_projector(eig)
    sigma = noise_cov(zeta)
    sigma = (sigma + sigma.T) / 2
    S_par = P @ sigma @ P
    diffusion = blocks.psd_sqrt(S_par / B)

    raw_I = -(c_I / (2 * B)) * blocks.third_order(loss, zeta, blocks.s_hat(sigma, eig))
    if beta is not None and c_II > 0:
        raw_II = -(c_II / (2 * B)) * blocks.third_order(loss, zeta, blocks.psi_hat(sigma, eig, beta))
    else:
        raw_II = torch.zeros_like(zeta)
    ito = -(1 / (2 * B)) * blocks.pseudo_inverse(eig) @ blocks.third_order(loss, zeta, S_par)
    drift_I, drift_II = P @ raw_I, P @ raw_II
    drift = drift_I + drift_II + ito
    return drift, diffusion, drift_I, drift_II, ito, raw_I + raw_II, eig.normal.sum()


def _check_point(zeta: Tensor, name: str = "zeta") -> None:
    if not isinstance(zeta, Tensor) or not zeta.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")


def slow_sde(problem, zeta: Tensor, rule, *, check: bool = True,
             gradient_tol: float = DEFAULT_GRADIENT_TOL, rank: int | None = None,
             rank_rtol: float = blocks.DEFAULT_RANK_RTOL) -> SlowSDETerms:
    """Slow-SDE terms of `rule` at zeta in Gamma for a dense `Problem` or a matrix-free problem.

    zeta: (D,) point of Gamma. If `check`, raises ValueError when ||grad L(zeta)|| > gradient_tol
    (absolute). rank / rank_rtol: the normal-space rule of `sde.blocks` (dense problems; a
    matrix-free problem carries its own rank).
    """
    check_rule(rule)
    _check_point(zeta)
    if zeta.dim() != 1:
        raise ValueError(f"zeta must have shape (D,), got {tuple(zeta.shape)}")
    if isinstance(problem, MatrixFreeProblem):
        if rank is not None:
            raise ValueError("a MatrixFreeProblem carries its own rank: pass rank= to MatrixFreeProblem")
        return problem.slow_sde(zeta, rule, check=check, gradient_tol=gradient_tol)
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be an sde.Problem or a matrix-free problem, got {type(problem).__name__}")
    zeta = zeta.detach()
    if check:
        g = grad(problem.loss)(zeta)
        norm = float(g.norm())
        if not norm <= gradient_tol:
            raise ValueError(f"zeta is not on Gamma: ||grad L(zeta)|| = {norm:.3e} > gradient_tol = "
                             f"{gradient_tol:.1e}; project it first with sde.project")
    out = _dense_terms(problem.loss, problem.noise_cov, zeta, _rule_constants(rule), rank, rank_rtol)
    *tensors, r = out
    return SlowSDETerms(*tensors, rank=int(r))


def drift_and_diffusion(problem: Problem, zetas: Tensor, rule, *, rank: int | None = None,
                        rank_rtol: float = blocks.DEFAULT_RANK_RTOL,
                        chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(raw_drift (n, D), diffusion (n, D, D)) at n points of Gamma, batched with torch.func.vmap.

    For projected Euler-Maruyama: zeta <- Phi(zeta + raw_drift dt + diffusion dW). No on-Gamma
    check is made (the simulator keeps its paths on Gamma by construction).
    """
    check_rule(rule)
    if not isinstance(problem, Problem):
        raise ValueError("drift_and_diffusion needs a dense sde.Problem")
    _check_point(zetas, "zetas")
    if zetas.dim() != 2:
        raise ValueError(f"zetas must have shape (n, D), got {tuple(zetas.shape)}")
    constants = _rule_constants(rule)

    def one(z: Tensor) -> tuple[Tensor, Tensor]:
        terms = _dense_terms(problem.loss, problem.noise_cov, z, constants, rank, rank_rtol)
        return terms[5], terms[1]

    return vmap(one, chunk_size=chunk_size)(zetas.detach())
