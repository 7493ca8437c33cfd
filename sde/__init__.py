"""sde: slow SDEs of SGD, Local SGD and QSR on a manifold of minimizers (THEORY.md).

Time unit throughout: slow time t = eta^2 x (steps taken by one worker).

- `Problem(loss, noise_cov, project=None)`: a dense problem; `Problem.from_objective(obj, ...)`
  (= `MatrixFreeProblem`) for networks.
- Rules `SGD`, `LocalSGD`, `QSR`; `slow_sde(problem, zeta, rule)` -> `SlowSDETerms`;
  `drift_and_diffusion` (batched over points, for simulators); `psi`, `psi_integral`.
- `blocks`: Hessian eigen-split, projectors, noise blocks, Lyap^-1, S_hat, Psi_hat, d3L, d2Phi.
- `project` (Phi), `simulate` (projected Euler-Maruyama), `toys`, `discrete`.
- `label_noise` (label-noise drift and sharpness rates on Gamma for any output metric, exact route),
  `label_noise_mf` (the matrix-free route), `general_formula` (the general-formula cross-check).
"""
from . import blocks
from .matrix_free import MatrixFreeProblem
from .problem import Problem
from .psi import psi, psi_integral
from .rules import QSR, SGD, LocalSGD
from .slow_sde import drift_and_diffusion, slow_sde
from .terms import SlowSDETerms
from .projection import project
from .simulate import simulate
from . import analysis, discrete, general_formula, label_noise, label_noise_mf, toys

__all__ = ["Problem", "MatrixFreeProblem", "psi", "psi_integral", "SGD", "LocalSGD", "QSR",
           "slow_sde", "SlowSDETerms", "drift_and_diffusion", "blocks", "project", "simulate", "toys",
           "discrete", "analysis", "label_noise", "label_noise_mf", "general_formula"]
