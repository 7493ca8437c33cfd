"""Sharpness read at Phi(theta), the gradient-flow projection, from Gauss-Newton projections.

Continuation runs read tr H and lambda_max at the projection of each noisy iterate onto the
minimizer manifold Gamma. The projection the theory means is Phi (the limit of gradient flow,
Li, Wang & Arora, ICLR 2022); the cheap one is Pi, Gauss-Newton minimum-norm steps. They agree
to first order in the normal offset x = theta - Pi(theta) but not to second: along a Hessian
eigenvector Pi's tangent term is twice Phi's (tests/experiments/test_flipped_labels.py). In
normal directions that have not equilibrated during a run (lambda_i < ~ eta / t in slow time)
|x|^2 grows with time, so reading at Pi adds a spurious drift to the measured slope.

With z = Pi(theta) and x = theta - z, Pi(z - x) = z + d2Pi[x x^T] + O(x^3) (the reflected
point projects to the other side), and Phi(theta) = z + 1/2 (d2Phi - d2Pi)[x x^T] + O(x^3) with
d2Phi[x x^T] = -P d3L[Lyap^-1(x x^T)] for normal x (THEORY.md, the d2Phi block). For a
sharpness s in {tr H, lambda_max} this gives

    s(Phi(theta)) = s(z) - (s(Pi(z - x)) - s(z)) / 2 - 1/2 a^T (dH / (lambda_i + lambda_j)) a + O(|x|^3),

a = U^T x, U (D, r) the Hessian's normal eigenvectors and dH = U^T (d_g Hessian) U for g the
tangent gradient of s, all taken once at the start point zeta (error O(|z - zeta| |x|^2)).
The loss-specific parts (the projection Pi and the sharpness at a point of Gamma) are passed in,
so the same reading serves the squared loss (`experiments.continuation`) and the soft-target
cross-entropy (`experiments.flipped_labels`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from dynamics.objective import Objective

Sharpness = tuple[float, float]          # (tr H, lambda_max)


@dataclass(frozen=True)
class PhiCorrection:
    """What the second-order reading needs, computed once at zeta: the Hessian's normal
    eigenvectors U (D, r), eigenvalues (r,), and dH = U^T (d_g Hessian) U (r, r) for g the
    tangent gradient of tr H and of lambda_max (`sde.flipped_labels.hessian_derivative_in_basis`)."""
    basis: Tensor
    eigenvalues: Tensor
    d_hessian_trace: Tensor
    d_hessian_lambda_max: Tensor

    @classmethod
    def at(cls, obj: Objective, geometry, gradients, *, method: str = "jacobian") -> "PhiCorrection":
        """From a geometry at zeta (`sde.label_noise.GaussNewtonGeometry` or `sde.flipped_labels.FlipGeometry`:
        fields theta, jacobian, eigenvalues, methods hessian_eigenvectors, reduce, reduced_in_basis) and
        its `SharpnessGradients` (tangent directions g).

        method "jacobian" (exact): on Gamma the Hessian is M^T M / N with M = geometry.reduce(J), and along a
        tangent g the residual terms stay zero to first order, so U^T (d_g Hessian) U = S + S^T with
        S = (M' U)^T (M U) / N, M' = reduce(dJ/dg) (`sde.label_noise.output_jacobian_derivative`):
        two Jacobian-derivative passes and two (N C, D) x (D, r) products, whatever the rank r.
        method "hvp": central differences of 2 r Hessian-vector products per direction (about 8 digits;
        one dense pass per normal direction, the pre-2026-12-04 route, kept as a cross-check)."""
        U = geometry.hessian_eigenvectors(len(geometry.eigenvalues))
        if method == "hvp":
            from sde.flipped_labels import hessian_derivative_in_basis
            d_hessian = [hessian_derivative_in_basis(obj, geometry.theta, g, U)
                         for g in (gradients.trace, gradients.lambda_max)]
        elif method == "jacobian":
            from sde.label_noise import output_jacobian_derivative
            base, n = geometry.reduced_in_basis(), geometry.num_samples
            d_hessian = []
            for g in (gradients.trace, gradients.lambda_max):
                s = (geometry.reduce(output_jacobian_derivative(obj, geometry.theta, g)) @ U).T @ base / n
                d_hessian.append(s + s.T)
        else:
            raise ValueError(f"method must be 'jacobian' or 'hvp', got {method!r}")
        return cls(basis=U, eigenvalues=geometry.eigenvalues, d_hessian_trace=d_hessian[0],
                   d_hessian_lambda_max=d_hessian[1])

    def flow_terms(self, offset: Tensor) -> Sharpness:
        """1/2 a^T (dH / (lambda_i + lambda_j)) a for tr H and lambda_max, a = U^T offset."""
        a = self.basis.T @ offset
        sums = self.eigenvalues[:, None] + self.eigenvalues[None, :]
        return tuple(0.5 * float(a @ ((dH / sums) @ a))
                     for dH in (self.d_hessian_trace, self.d_hessian_lambda_max))


@dataclass(frozen=True)
class PhiReading:
    """One reading: `corrected` (tr H, lambda_max) at Phi(theta) to O(|x|^3), `raw` the same at the
    Gauss-Newton projection, `projection` = Pi(theta) (D,), `residual` the worse of the two
    projections' final residuals (in the projection's own units)."""
    corrected: Sharpness
    raw: Sharpness
    projection: Tensor
    residual: float


def read_at_phi(theta: Tensor, correction: PhiCorrection, project: Callable[[Tensor], tuple[Tensor, float]],
                sharpness: Callable[[Tensor], Sharpness]) -> PhiReading:
    """Read (tr H, lambda_max) at Phi(theta) to second order in the normal offset (module docstring).

    project(theta) -> (Pi(theta), final residual): a Gauss-Newton projection onto Gamma (no
    gradient-descent prefix: the correction assumes pure Gauss-Newton). sharpness(z) -> (tr H,
    lambda_max) at a point z of Gamma. Two projections and two sharpness readings per call.
    """
    z, residual = project(theta)
    x = theta - z
    reflected, residual2 = project(z - x)
    s_z, s_reflected = sharpness(z), sharpness(reflected)
    flow = correction.flow_terms(x)
    corrected = tuple(s_z[k] - 0.5 * (s_reflected[k] - s_z[k]) - flow[k] for k in range(2))
    return PhiReading(corrected=corrected, raw=s_z, projection=z, residual=max(residual, residual2))
