"""Sharpness read at Phi(theta), the gradient-flow projection, from two Gauss-Newton projections (any noise model).

Phi (the limit of gradient flow, Li, Wang & Arora, ICLR 2022) and Pi (Gauss-Newton minimum-norm steps,
`projection.project`) agree to first order in the normal offset x = theta - Pi(theta), not to second: along a
Hessian eigenvector Pi's tangent term is twice Phi's, and reading at Pi adds a spurious drift as |x|^2 grows.
With z = Pi(theta), d2Phi[x x^T] = -P d3L[Lyap^-1(x x^T)] (THEORY.md, the d2Phi block), for s in {tr H, lambda_max}

    s(Phi(theta)) = s(z) - (s(Pi(z - x)) - s(z)) / 2 - 1/2 a^T (dH / (lambda_i + lambda_j)) a + O(|x|^3),

a = U^T x, U (D, r) the normal Hessian eigenvectors, dH = U^T (d_g Hessian) U for g the tangent gradient of s, all
taken once at zeta (error O(|z - zeta| |x|^2)). The reflected reading s(Pi(z - x)) - s(z) is read at a second
projection, or given to second order (`read_at_phi(reflected=)`; `reading_mf.FlowCorrection.reflected_terms`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from dynamics.jacobian import output_jacobian_derivative
from dynamics.objective import Objective

__all__ = ["PhiCorrection", "PhiReading", "read_at_phi"]

Sharpness = tuple[float, float]          # (tr H, lambda_max)


@dataclass(frozen=True)
class PhiCorrection:
    """What the second-order reading needs, once at zeta: the Hessian's normal eigenvectors U (D, r), eigenvalues
    (r,), and dH = U^T (d_g Hessian) U (r, r) for g the tangent gradient of tr H and of lambda_max."""
    basis: Tensor
    eigenvalues: Tensor
    d_hessian_trace: Tensor
    d_hessian_lambda_max: Tensor

    @classmethod
    def at(cls, obj: Objective, geometry, gradients, *, method: str = "jacobian") -> "PhiCorrection":
        """From a `sde.label_noise.GaussNewtonGeometry` at zeta and its `SharpnessGradients`.

        "jacobian" (exact): on Gamma H = M^T M / N with M = geometry.reduce(J), and along a tangent g the residual
        stays zero to first order, so U^T (d_g H) U = S + S^T, S = (M' U)^T (M U) / N with M' = reduce(dJ/dg): two
        Jacobian-derivative passes whatever the rank r. "hvp": central differences of Hessian-vector products
        (`sde.general_formula.hessian_derivative_in_basis`, one pass per normal direction; a cross-check)."""
        U = geometry.hessian_eigenvectors(len(geometry.eigenvalues))
        directions = (gradients.trace, gradients.lambda_max)
        if method == "hvp":
            from sde.general_formula import hessian_derivative_in_basis
            d_hessian = [hessian_derivative_in_basis(obj, geometry.theta, g, U) for g in directions]
        elif method == "jacobian":
            base, n = geometry.reduced_in_basis(), geometry.num_samples
            s = [(geometry.reduce(output_jacobian_derivative(obj, geometry.theta, g)) @ U).T @ base / n
                 for g in directions]
            d_hessian = [m + m.T for m in s]
        else:
            raise ValueError(f"method must be 'jacobian' or 'hvp', got {method!r}")
        return cls(basis=U, eigenvalues=geometry.eigenvalues, d_hessian_trace=d_hessian[0],
                   d_hessian_lambda_max=d_hessian[1])

    def flow_terms(self, offset: Tensor) -> Sharpness:
        """1/2 a^T (dH / (lambda_i + lambda_j)) a for tr H and lambda_max, a = U^T offset."""
        a = self.basis.T @ offset
        sums = self.eigenvalues[:, None] + self.eigenvalues[None, :]
        return tuple(0.5 * float(a @ ((dH / sums) @ a)) for dH in (self.d_hessian_trace, self.d_hessian_lambda_max))


@dataclass(frozen=True)
class PhiReading:
    """`corrected` (tr H, lambda_max) at Phi(theta) to O(|x|^3), `raw` the same at the Gauss-Newton projection,
    `projection` = Pi(theta) (D,), `residual` the worse of the two projections' final distances to Gamma."""
    corrected: Sharpness
    raw: Sharpness
    projection: Tensor
    residual: float


def read_at_phi(theta: Tensor, correction: PhiCorrection, project: Callable[[Tensor], tuple[Tensor, float]],
                sharpness: Callable[[Tensor], Sharpness],
                reflected: Callable[[Tensor], Sharpness] | None = None) -> PhiReading:
    """(tr H, lambda_max) at Phi(theta) to second order in the normal offset (module docstring).

    project(theta) -> (Pi(theta), final distance): a Gauss-Newton projection without gradient-descent prefix.
    sharpness(z) -> (tr H, lambda_max) at a point z of Gamma. reflected(x) -> s(Pi(z - x)) - s(z) to second order
    in x (e.g. `reading_mf.FlowCorrection.reflected_terms`); None: read there, by a second projection and reading.
    """
    z, residual = project(theta)
    x = theta - z
    if reflected is None:
        point, residual2 = project(z - x)
        residual = max(residual, residual2)
        s_z, s_point = sharpness(z), sharpness(point)
        shift = tuple(p - s for p, s in zip(s_point, s_z))
    else:
        s_z, shift = sharpness(z), reflected(x)
    flow = correction.flow_terms(x)
    corrected = tuple(s_z[k] - 0.5 * shift[k] - flow[k] for k in range(2))
    return PhiReading(corrected=corrected, raw=s_z, projection=z, residual=residual)
