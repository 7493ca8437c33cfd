"""Matrix-free label-noise sharpness rates: Lanczos eigenpairs and third-order passes only.

The same prediction as `sde.label_noise` (read its docstring for the setting and the units:
slow time t = eta^2 x steps per worker) without any Jacobian or (N C)-sized matrix, so it runs
for any number of images at the cost of Hessian-vector products:

- the top-r Hessian eigenpairs (U (D, r), lambda (r,)) by `dynamics.top_eigenpairs`;
- TRUNCATION, as in `sde.matrix_free`: the normal space is span(U), P = I - U U^T;
- on Gamma P d3L[P_perp] = P d3L[I] (the tangent-tangent block of d3L vanishes), so
  P grad tr H = P d3L[U U^T], P grad lambda_max = P d3L[u_1 u_1^T] and the drift is
  -(sigma^2 / 4B) P d3L[U diag(w(lambda)) U^T] with `drift_weights` w: r rank-one third-order
  passes each (`dynamics.third_order` with a `LowRank`).

Exact when r = rank Hessian (= N C for an interpolating squared-loss network with D > N C);
otherwise the neglected directions' share is missing (report the rates against r). The test
tests/sde/test_label_noise_mf.py checks agreement with the exact path at full rank.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dynamics.lanczos import top_eigenpairs
from dynamics.objective import Objective
from dynamics.third_order import LowRank, third_order
from sde.label_noise import PredictedRates, drift_weights
from sde.rules import check_rule


def predict_label_noise_rates_matrix_free(obj: Objective, zeta: Tensor, rules, *, sigma: float, rank: int,
                                          eta: float | None = None, tol: float = 1e-10,
                                          max_matvecs: int | None = None,
                                          generator: torch.Generator | None = None) -> list[PredictedRates]:
    """Predicted d tr H/dt, d lambda_max/dt at zeta for each rule in `rules`, from the top-`rank` eigenpairs.

    `trace` in the result is the truncated sum of the r eigenvalues. Raises ValueError if zeta
    is not on Gamma (L > 1e-8) or sigma <= 0.
    """
    rules = list(rules)
    for rule in rules:
        check_rule(rule)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    zeta = zeta.detach()
    loss = obj.loss(zeta).item()
    if loss > 1e-8:
        raise ValueError(f"zeta is not on Gamma: L = {loss:.3e} > 1e-8")
    if not 1 <= rank <= obj.dim:
        raise ValueError(f"rank must be in [1, D = {obj.dim}], got {rank}")

    class _AtZeta:  # the Hessian at zeta as a symmetric operator for Lanczos
        dim, dtype, device = obj.dim, obj.dtype, obj.device

        @staticmethod
        def hvp(v: Tensor) -> Tensor:
            return obj.hvp(v, zeta)

    eig = top_eigenpairs(_AtZeta(), rank, tol=tol, max_matvecs=max_matvecs or max(20 * rank, 200),
                         max_basis=min(obj.dim, 2 * rank + 40), generator=generator)
    lam, U = eig.values, eig.vectors

    def project(v: Tensor) -> Tensor:
        return v - U @ (U.T @ v)

    def d3(weights: Tensor) -> Tensor:
        return project(third_order(obj, LowRank(weights, U), theta=zeta))

    g_trace = d3(torch.ones_like(lam))
    top = torch.zeros_like(lam)
    top[0] = 1
    g_lmax = d3(top)
    out = []
    for rule in rules:
        drift = -(sigma ** 2) / (4 * rule.total_batch) * d3(drift_weights(rule, lam, eta=eta))
        out.append(PredictedRates(rule=rule, sigma=float(sigma), trace_rate=float(g_trace @ drift),
                                  lambda_max_rate=float(g_lmax @ drift), trace=float(lam.sum()),
                                  lambda_max=float(lam[0]), drift=drift))
    return out
