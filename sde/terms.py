"""`SlowSDETerms`: what `sde.slow_sde` returns, for dense and matrix-free problems alike.

It lives below both `sde.slow_sde` and `sde.matrix_free` so that neither has to import the other
to build it (issue 12, item 4: no import cycles).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class SlowSDETerms:
    """Terms of d zeta = drift dt + diffusion dW at zeta; slow time t = eta^2 x steps per worker.

    drift (D,): total drift = drift_I + drift_II + ito_correction (tangent to Gamma up to the
        curvature term ito_correction, which is normal).
    diffusion (D, D): A with A A^T = S_par / B (symmetric, tangent); for a MatrixFreeProblem a
        (D, n) factor with the same A A^T (dW then n-dimensional).
    drift_I (D,): -P c/(2B) d3L[S_hat], c = K for QSR, 1 otherwise.
    drift_II (D,): -P (K-1)/(2B) d3L[Psi_hat] (zero for SGD and QSR).
    ito_correction (D,): 1/2 d2Phi[A A^T] = -(1/(2B)) H^+ d3L[S_par].
    raw_drift (D,): the un-projected b, so that Phi(zeta + b dt + A dW) = zeta + drift dt + A dW
        to first order in dt (for projected Euler-Maruyama with a retraction Phi).
    rank (int): number of normal directions used (the Hessian rank at zeta).
    """

    drift: Tensor
    diffusion: Tensor
    drift_I: Tensor
    drift_II: Tensor
    ito_correction: Tensor
    raw_drift: Tensor
    rank: int
