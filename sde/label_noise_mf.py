"""Matrix-free label-noise sharpness rates: neither the full (N C, D) Jacobian nor the Hessian is formed.

Two paths. `predict_label_noise_rates_cg` (exact, SGD and QSR at eta -> 0): the exact tangent
projection P v = v - J^T a, (J J^T) a = J v, by block-Jacobi preconditioned conjugate gradients
on Jacobian-vector / vector-Jacobian products (`TangentProjector`), and P grad tr H from chunked
per-sample Jacobians; it equals the exact path of `sde.label_noise` to the CG tolerance.
`predict_label_noise_rates_matrix_free` (all rules, TRUNCATED, described next) is kept for Local
SGD, whose weights need psi(2 beta H); it is only right at full rank.

Truncated path: the same prediction as `sde.label_noise` (read its docstring for the setting and
the units: slow time t = eta^2 x steps per worker) from Hessian-vector products only:

- the top-r Hessian eigenpairs (U (D, r), lambda (r,)) by `dynamics.top_eigenpairs`;
- TRUNCATION, as in `sde.matrix_free`: the normal space is span(U), P = I - U U^T;
- on Gamma P d3L[P_perp] = P d3L[I] (the tangent-tangent block of d3L vanishes), so
  P grad tr H = P d3L[U U^T], P grad lambda_max = P d3L[u_1 u_1^T] and the drift is
  -(sigma^2 / 4B) P d3L[U diag(w(lambda)) U^T] with `drift_weights` w: r rank-one third-order
  passes each (`dynamics.third_order` with a `LowRank`).

Exact when r = rank Hessian (= N C for an interpolating squared-loss network with D > N C);
otherwise P is wrong and the rates are off by factors (1.5-2.4x on the MLP point of
benchmarks/results/drift_check_findings.md). tests/sde/test_label_noise_mf.py checks both paths
against the exact one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev, jvp, vjp, vmap

from dynamics.lanczos import top_eigenpairs
from dynamics.objective import Objective
from dynamics.third_order import LowRank, third_order
from sde.label_noise import PredictedRates, drift_weights
from sde.rules import QSR, SGD, check_rule


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


# ---------------------------------------------------------------------------------------------
# Exact tangent projection by conjugate gradients (issue #6)
# ---------------------------------------------------------------------------------------------

class ProjectionNotConverged(RuntimeError):
    """Conjugate gradients on (J J^T) a = J v did not reach the requested relative residual."""


def _inputs(obj: Objective) -> list[Tensor]:
    return [x for x, _ in obj.data]


def _offsets(obj: Objective) -> list[int]:
    starts, s = [], 0
    for x in _inputs(obj):
        starts.append(s)
        s += len(x)
    return starts


def jacobian_times(obj: Objective, theta: Tensor, v: Tensor) -> Tensor:
    """J v, shape (N, C): forward-mode products of all network outputs at theta with v (D,)."""
    f = lambda x: (lambda t: obj.forward(t, x))
    return torch.cat([jvp(f(x), (theta,), (v,))[1] for x in _inputs(obj)])


def jacobian_transpose_times(obj: Objective, theta: Tensor, a: Tensor) -> Tensor:
    """J^T a, shape (D,), for output-space coefficients a (N, C): one reverse pass per batch."""
    out, start = torch.zeros_like(theta), 0
    for x in _inputs(obj):
        _, pull = vjp(lambda t: obj.forward(t, x), theta)
        out += pull(a[start:start + len(x)])[0]
        start += len(x)
    return out


def jacobian_frobenius_pass(obj: Objective, theta: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, float]:
    """(grad_theta ||J(theta)||_F^2 (D,), per-sample Gram blocks J_i J_i^T (N, C, C), ||J||_F^2).

    Per-sample Jacobians exist only `chunk_size` samples at a time (memory chunk x C x D).
    """
    def single(t: Tensor, x: Tensor) -> Tensor:
        return obj.forward(t, x.unsqueeze(0))[0]

    def chunk(t: Tensor, xs: Tensor):
        jac = vmap(jacrev(single), in_dims=(None, 0))(t, xs)          # (n, C, D)
        return jac.pow(2).sum(), jac.detach() @ jac.detach().transpose(1, 2)

    grads, blocks, total = torch.zeros_like(theta), [], 0.0
    inputs = torch.cat(_inputs(obj))
    for start in range(0, len(inputs), chunk_size):
        g, (value, block) = grad_and_value(chunk, has_aux=True)(theta, inputs[start:start + chunk_size])
        grads += g
        blocks.append(block)
        total += float(value)
    return grads, torch.cat(blocks), total


def _check_cg_options(rtol: float, max_iter: int) -> None:
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


@dataclass(frozen=True)
class TangentProjector:
    """P v = v - J^T a, (J J^T) a = J v solved by block-Jacobi preconditioned conjugate gradients.

    J is the (N C, D) output Jacobian at theta, applied only through `jacobian_times` /
    `jacobian_transpose_times`; on Gamma (squared loss) the normal space is its row space, so
    this is the exact tangent projector of `sde.label_noise.GaussNewtonGeometry.tangent_project`.
    block_inverses: (N, C, C) pseudo-inverses of the per-sample blocks J_i J_i^T (preconditioner).
    Stopping rule: ||J J^T a - J v|| <= rtol ||J v||; then ||P v - P_exact v|| <= rtol
    sqrt(lambda_max / lambda_min) ||v|| (lambda the nonzero Hessian eigenvalues).
    """
    obj: Objective
    theta: Tensor
    block_inverses: Tensor
    rtol: float = 1e-10
    max_iter: int = 5000

    @classmethod
    def from_blocks(cls, obj: Objective, theta: Tensor, blocks: Tensor, *, rtol: float = 1e-10,
                    max_iter: int = 5000) -> "TangentProjector":
        _check_cg_options(rtol, max_iter)
        return cls(obj=obj, theta=theta.detach(), block_inverses=torch.linalg.pinv(blocks, hermitian=True,
                                                                                 rtol=1e-12),
                   rtol=rtol, max_iter=max_iter)

    def gram_times(self, a: Tensor) -> Tensor:
        return jacobian_times(self.obj, self.theta, jacobian_transpose_times(self.obj, self.theta, a))

    def normal_coefficients(self, v: Tensor) -> tuple[Tensor, int]:
        """(a (N, C) with (J J^T) a = J v, CG iterations used); ProjectionNotConverged past max_iter."""
        rhs = jacobian_times(self.obj, self.theta, v)
        target = self.rtol * rhs.norm()
        a, res = torch.zeros_like(rhs), rhs.clone()
        if res.norm() <= target:
            return a, 0
        precondition = lambda r: (self.block_inverses @ r.unsqueeze(-1)).squeeze(-1)
        z = precondition(res)
        p, rz = z, (res * z).sum()
        for it in range(1, self.max_iter + 1):
            gp = self.gram_times(p)
            step = rz / (p * gp).sum()
            a, res = a + step * p, res - step * gp
            if res.norm() <= target:
                return a, it
            z = precondition(res)
            rz_new = (res * z).sum()
            p, rz = z + (rz_new / rz) * p, rz_new
        raise ProjectionNotConverged(
            f"conjugate gradients on J J^T did not converge: relative residual {float(res.norm() / rhs.norm()):.2e} "
            f"> rtol {self.rtol:.1e} after max_iter = {self.max_iter} iterations")

    def project(self, v: Tensor) -> tuple[Tensor, int]:
        """(P v (D,), CG iterations)."""
        a, iters = self.normal_coefficients(v)
        return v - jacobian_transpose_times(self.obj, self.theta, a), iters


@dataclass(frozen=True)
class ExactProjectionRates:
    """Rates per rule (`PredictedRates`) and the cost: CG iterations of the two projections, Lanczos matvecs."""
    rates: list
    cg_iterations: tuple[int, int]
    lanczos_matvecs: int


def predict_label_noise_rates_cg(obj: Objective, zeta: Tensor, rules, *, sigma: float, rtol: float = 1e-10,
                                 max_iter: int = 5000, lanczos_tol: float = 1e-10, chunk_size: int = 64,
                                 generator: torch.Generator | None = None) -> ExactProjectionRates:
    """Exact label-noise rates for SGD and QSR (eta -> 0) without forming J or the Hessian.

    P grad tr H = (1/N) P grad ||J(theta)||_F^2 (chunked per-sample Jacobians), P grad lambda_max =
    (2/N) P grad <J(theta) u, J0 u> (u the top Lanczos eigenvector), P by `TangentProjector`. The
    drift is -(sigma^2 / 4B) w P grad tr H with w = 1 (SGD) or K (QSR), so
    d tr H/dt = -(sigma^2 w / 4B) ||P grad tr H||^2. Local SGD (and QSR at finite eta) needs
    psi(2 beta H) and is rejected (ValueError): use `predict_label_noise_rates` or the truncated
    `predict_label_noise_rates_matrix_free`. Assumes no normalization layers (batch = per-sample outputs).
    Cost: one chunked per-sample-Jacobian pass, two CG solves (each iteration one J and one J^T
    product over all samples; `cg_iterations` in the result) and a top-1 Lanczos.
    """
    rules = list(rules)
    for rule in rules:
        check_rule(rule)
        if not isinstance(rule, (SGD, QSR)):
            raise ValueError(f"{rule!r}: the exact-projection matrix-free path supports SGD and QSR only "
                             "(Local SGD needs the matrix function psi(2 beta H))")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    _check_cg_options(rtol, max_iter)
    zeta = zeta.detach()
    loss = obj.loss(zeta).item()
    if loss > 1e-8:
        raise ValueError(f"zeta is not on Gamma: L = {loss:.3e} > 1e-8")
    n = obj.num_samples

    frob_grad, blocks, frob = jacobian_frobenius_pass(obj, zeta, chunk_size)
    projector = TangentProjector.from_blocks(obj, zeta, blocks, rtol=rtol, max_iter=max_iter)
    g_trace, it_trace = projector.project(frob_grad / n)

    class _AtZeta:  # the Hessian at zeta as a symmetric operator for Lanczos
        dim, dtype, device = obj.dim, obj.dtype, obj.device

        @staticmethod
        def hvp(v: Tensor) -> Tensor:
            return obj.hvp(v, zeta)

    eig = top_eigenpairs(_AtZeta(), 1, tol=lanczos_tol, max_matvecs=2000, generator=generator)
    if not eig.converged:
        raise RuntimeError(f"Lanczos for lambda_max did not reach tol {lanczos_tol:.1e} "
                           "in 2000 Hessian-vector products")
    u = eig.vectors[:, 0]
    ju0 = jacobian_times(obj, zeta, u)
    pairing = lambda t: sum((jvp(lambda tt: obj.forward(tt, x), (t,), (u,))[1] * ju0[s:s + len(x)]).sum()
                            for x, s in zip(_inputs(obj), _offsets(obj)))
    g_lmax, it_lmax = projector.project(2 / n * grad(pairing)(zeta))

    out = []
    for rule in rules:
        weight = 1.0 if isinstance(rule, SGD) else float(rule.workers)
        drift = -(sigma ** 2) * weight / (4 * rule.total_batch) * g_trace
        out.append(PredictedRates(rule=rule, sigma=float(sigma), trace_rate=float(g_trace @ drift),
                                  lambda_max_rate=float(g_lmax @ drift), trace=frob / n,
                                  lambda_max=float(eig.values[0]), drift=drift))
    return ExactProjectionRates(rates=out, cg_iterations=(it_trace, it_lmax), lanczos_matvecs=eig.matvecs)

