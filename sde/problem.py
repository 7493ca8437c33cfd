"""`Problem`: a dense loss and its single-sample gradient-noise covariance, the input of `sde`.

A dense problem is what toy models and small networks provide: `loss` maps a flat parameter
vector (D,) to a scalar and `noise_cov` maps (D,) to the (D, D) covariance Sigma of ONE sample's
gradient noise (a batch of B samples drawn with replacement has covariance Sigma / B). Both are
torch functions, usually float64; `loss` must be twice differentiable by `torch.func`
(three times for d3L) and both must be `torch.func.vmap`-compatible for the batched
`sde.drift_and_diffusion` (no `.item()`, no data-dependent Python branching).

Toy problems with a known projection Phi (the limit of gradient flow, mapping a neighbourhood
of the minimizer manifold Gamma onto Gamma) pass it as `project`; `sde.project` uses it when
present and falls back to integrating gradient flow otherwise.

For a network, `Problem.from_objective(obj, ...)` builds a matrix-free, low-rank problem
(`sde.matrix_free.MatrixFreeProblem`) from a `dynamics.Objective`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

LossFunction = Callable[[Tensor], Tensor]
CovarianceFunction = Callable[[Tensor], Tensor]
ProjectionFunction = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Problem:
    """Dense problem: `loss` (D,) -> scalar, `noise_cov` (D,) -> (D, D), optional `project` (D,) -> (D,)."""

    loss: LossFunction
    noise_cov: CovarianceFunction
    project: ProjectionFunction | None = None
    name: str = ""

    def __post_init__(self):
        if not callable(self.loss):
            raise ValueError(f"Problem.loss must be callable (D,) -> scalar, got {type(self.loss).__name__}")
        if not callable(self.noise_cov):
            raise ValueError("Problem.noise_cov must be callable (D,) -> (D, D), "
                             f"got {type(self.noise_cov).__name__}")
        if self.project is not None and not callable(self.project):
            raise ValueError(f"Problem.project must be callable (D,) -> (D,) or None, "
                             f"got {type(self.project).__name__}")

    @staticmethod
    def from_objective(obj, **options):
        """A matrix-free problem for a network; see `sde.matrix_free.MatrixFreeProblem` for options."""
        # Lazy and one-way: matrix_free never imports problem, so no cycle (tests/test_layout.py).
        from .matrix_free import MatrixFreeProblem
        return MatrixFreeProblem(obj, **options)
