"""Matrix-free label-noise sharpness rates: neither the (N C, D) Jacobian nor the Hessian is formed.

Setting and units as in `sde.label_noise` (any output metric, Sigma = c H on Gamma with c =
noise_scale; slow time t = eta^2 x steps per worker; H = J^T J / N on Gamma, G = J J^T / N its Gram
twin in output space, J here the REDUCED Jacobian metric.reduce(J) (N m, D), held fixed with the
metric). One entry point, `predict_rates_matrix_free`, for every rule. For a scalar s in {tr H,
lambda_max} with exact tangent gradient u_s = P grad s (`TangentProjector`: P v = v - J^T a,
(J J^T) a = J v by preconditioned CG), the drift
-(c/4B) P d3L[c_I P_perp + c_II psi(2 beta H)] (rule.drift_coefficients) gives

    d s/dt = -(c / 4B) [ c_I u_s . grad tr H + c_II tr(psi(2 beta G) DG[u_s]) ]

(u . d3L[M] = tr(M DH[u]), and tr(psi(2 beta H) DH[u]) = tr(psi(2 beta G) DG[u]) for tangent u since
J psi(2 beta H) = psi(2 beta G) J). The first term is exact (SGD and QSR at eta -> 0 have only it and
get their drift vector, stderr 0). The trace (rules with a psi term: Local SGD, QSR at finite eta) is
estimated by stochastic Lanczos in output space (`dynamics.trace_function_product` on `GramOperator`
with `GramDerivativeOperator`s): top-k Gram eigenpairs exact, Rademacher probes for the rest,
tr DG[u_s] = u_s . grad tr H as a control variate, one Krylov basis per probe for every beta (none when G's
eigendecomposition is given, `spectrum`: then psi(2 beta G) z is exact and a probe costs one DG[u_s] product); those
rates come with standard errors and no drift vector. Assumes no normalization layers (outputs per
sample); tests/sde/test_label_noise_mf.py checks it against the exact route. (A truncated projector
P = I - U U^T from the top eigenpairs overshot the rates 1.5-2.4x below full rank and was removed:
docs/studies/drift_check_findings.md.)
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad

from dynamics.jacobian import (BlockJacobi, gram_solve_cg, jacobian_derivative_times,
                               jacobian_derivative_transpose_times, jacobian_frobenius_pass, jacobian_times,
                               jacobian_transpose_times, per_sample_gram_blocks)
from dynamics.lanczos import top_eigenpairs
from dynamics.matrix_function import SpectralOperator, trace_function_product
from dynamics.objective import Objective
from sde.label_noise import OutputMetric, PredictedRates
from sde.psi import psi
from sde.rules import check_rule

__all__ = ["TangentProjector", "GramOperator", "GramDerivativeOperator", "lambda_max_pairing_grad",
           "MatrixFreeRates", "predict_rates_matrix_free"]


class TangentProjector:
    """P v = v - J^T a with (J J^T + shift I) a = J v by `dynamics.jacobian.gram_solve_cg`, J the reduced
    Jacobian metric.reduce(J) (N m, D) at theta (metric None: the identity).

    On Gamma the normal space is J's row space, so this is the exact tangent projector of
    `GaussNewtonGeometry.tangent_project`. preconditioner: any object with .apply(r (N, m)) -> (N, m)
    (default `BlockJacobi` of the per-sample blocks J_i J_i^T). Stopping rule ||J J^T a - J v|| <= rtol
    ||J v||, so ||P v - P_exact v|| <= rtol sqrt(lambda_max / lambda_min) ||v||. Every solve is kept: a v
    equal to a solved one costs no CG, one within `warm_start_within` (relative distance) starts from its
    coefficients. log: optional callable receiving {"solve", "iteration", "rel_residual", "sq_norm" =
    ||v - J^T a||^2} every `log_every` CG iterations (sq_norm falls monotonically to ||P v||^2).
    shift: Tikhonov shift in Gram units (Jacobians of numerically deficient rank, `gram_solve_cg`).
    """

    def __init__(self, obj: Objective, theta: Tensor, preconditioner=None, *, metric: OutputMetric | None = None,
                 rtol: float = 1e-10, max_iter: int = 5000, shift: float = 0.0, warm_start_within: float = 1e-3,
                 log: Callable[[dict], None] | None = None, log_every: int = 50, chunk_size: int = 64):
        if not 0 < rtol < 1 or max_iter < 1:
            raise ValueError(f"need 0 < rtol < 1 and max_iter >= 1, got rtol = {rtol}, max_iter = {max_iter}")
        self.obj, self.theta, self.metric = obj, theta.detach(), metric or OutputMetric()
        if preconditioner is None:
            preconditioner = BlockJacobi(self.metric.reduce_blocks(
                per_sample_gram_blocks(obj, self.theta, chunk_size=chunk_size)))
        self.preconditioner = preconditioner
        self.rtol, self.max_iter, self.shift = rtol, max_iter, shift
        self.warm_start_within, self.log, self.log_every = warm_start_within, log, log_every
        self.solved: list[tuple[Tensor, Tensor, Tensor]] = []          # (v, a, P v)

    @classmethod
    def from_blocks(cls, obj: Objective, theta: Tensor, blocks: Tensor, **options) -> "TangentProjector":
        """Block-Jacobi projector from the per-sample blocks J_i J_i^T (N, m, m) of the reduced Jacobian."""
        return cls(obj, theta, BlockJacobi(blocks), **options)

    def project(self, v: Tensor) -> tuple[Tensor, int]:
        """(P v (D,), CG iterations of this call)."""
        x0, best = None, self.warm_start_within
        for v_old, a_old, pv_old in self.solved:
            if torch.equal(v, v_old):
                return pv_old.clone(), 0
            dist = float((v - v_old).norm() / v.norm())
            if dist <= best:
                x0, best = a_old, dist
        solve = len(self.solved)

        def callback(it: int, rel: float, jta: Tensor) -> None:
            if self.log is not None and it % self.log_every == 0:
                self.log({"solve": solve, "iteration": it, "rel_residual": rel,
                          "sq_norm": float((v - jta).pow(2).sum())})
        rhs = self.metric.reduce(jacobian_times(self.obj, self.theta, v))
        a, iters = gram_solve_cg(self.obj, self.theta, rhs, self.preconditioner, rtol=self.rtol, max_iter=self.max_iter,
                                 x0=x0, shift=self.shift, callback=callback, metric=self.metric)
        pv = v - jacobian_transpose_times(self.obj, self.theta, self.metric.lift(a))
        self.solved.append((v.detach().clone(), a, pv))
        return pv.clone(), iters


def lambda_max_pairing_grad(obj: Objective, theta: Tensor, u: Tensor, metric: OutputMetric | None = None) -> Tensor:
    """(2/N) grad_theta <J(theta) u, lift(reduce(J0 u))> (J0 = J at theta, held fixed), (D,); its tangent
    projection is P grad lambda_max = P d3L[u u^T] on Gamma for the unit top eigenvector u."""
    metric = metric or OutputMetric()
    ju0 = metric.lift(metric.reduce(jacobian_times(obj, theta, u)))
    return 2 / obj.num_samples * grad(lambda t: (jacobian_times(obj, t, u) * ju0).sum())(theta)


class GramOperator:
    """G = J J^T / N on flat output-space vectors (N m,), J = metric.reduce(output Jacobian) at theta.

    Its nonzero eigenvalues are those of Hessian(L) on Gamma; one product costs a vector-Jacobian and a
    Jacobian-vector product. `.calls` counts products. Operator interface of `dynamics.lanczos`.
    passes: the objective the Jacobian passes run on (default obj), e.g. obj.to(torch.float32): vectors in and out
    stay in theta's dtype, each product is then exact to the pass dtype's rounding (~1e-6 relative in float32).
    """

    def __init__(self, obj: Objective, theta: Tensor, metric: OutputMetric | None = None, *,
                 passes: Objective | None = None):
        self.obj, self.theta, self.metric = obj, theta.detach(), metric or OutputMetric()
        self.passes = obj if passes is None else passes
        if self.passes.dim != obj.dim or self.passes.num_samples != obj.num_samples:
            raise ValueError(f"passes has D = {self.passes.dim}, N = {self.passes.num_samples}; the objective "
                             f"D = {obj.dim}, N = {obj.num_samples}: not the same objective")
        self.pass_theta = self.theta.to(self.passes.dtype)
        self.num_samples = obj.num_samples
        self.outputs = self.metric.size(obj.forward(self.theta, obj.data[0][0][:1]).shape[-1])
        self.dim = self.num_samples * self.outputs
        self.dtype, self.device = self.theta.dtype, self.theta.device
        self.calls = 0

    def shaped(self, a: Tensor) -> Tensor:
        """A flat (N m,) vector as (N, m)."""
        if a.shape != (self.dim,):
            raise ValueError(f"output-space vectors must have shape ({self.dim},) = N m, got {tuple(a.shape)}")
        return a.reshape(self.num_samples, self.outputs)

    def _lifted(self, a: Tensor) -> Tensor:
        return self.metric.lift(self.shaped(a)).to(self.passes.dtype)

    def transpose_times(self, a: Tensor) -> Tensor:
        """J^T a, (D,), for a flat (N m,) vector a."""
        return jacobian_transpose_times(self.passes, self.pass_theta, self._lifted(a)).to(self.dtype)

    def times(self, v: Tensor) -> Tensor:
        """J v, flat (N m,), for v (D,)."""
        out = jacobian_times(self.passes, self.pass_theta, v.to(self.passes.dtype)).to(self.dtype)
        return self.metric.reduce(out).reshape(-1)

    def derivative_transpose_times(self, u: Tensor, a: Tensor) -> Tensor:
        """DJ[u]^T a = grad_theta <a, J(theta) u>, (D,), for u (D,) and a flat (N m,) vector a."""
        return jacobian_derivative_transpose_times(self.passes, self.pass_theta, u.to(self.passes.dtype),
                                                   self._lifted(a)).to(self.dtype)

    def hvp(self, a: Tensor) -> Tensor:
        self.calls += 1
        return self.times(self.transpose_times(a)) / self.num_samples

    def parameter_vectors(self, gram_vectors: Tensor, values: Tensor) -> Tensor:
        """Unit Hessian eigenvectors J^T g_i / sqrt(N lambda_i), (D, k), from Gram eigenpairs ((N m, k), (k,))."""
        cols = [self.transpose_times(gram_vectors[:, i]) for i in range(gram_vectors.shape[1])]
        return torch.stack(cols, 1) / (self.num_samples * values.to(self.dtype)).sqrt()


class GramDerivativeOperator:
    """DG[u] = d/de G(theta + e u) = (DJ[u] J^T + J DJ[u]^T) / N on flat (N m,) vectors, symmetric.

    For a tangent u (J u = 0) on Gamma, DH[u] = (DJ[u]^T J + J^T DJ[u]) / N, so tr(f(G) DG[u]) =
    tr(f(H) DH[u]) for any f; in particular tr DG[u] = u . grad tr H. `.calls` counts products.
    """

    def __init__(self, gram: GramOperator, u: Tensor):
        if u.shape != (gram.obj.dim,):
            raise ValueError(f"u must have shape ({gram.obj.dim},), got {tuple(u.shape)}")
        self.gram, self.u = gram, u.detach()
        self.dim, self.dtype, self.device = gram.dim, gram.dtype, gram.device
        self.calls = 0

    def hvp(self, a: Tensor) -> Tensor:
        self.calls += 1
        g = self.gram
        u, ja = self.u.to(g.passes.dtype), g.transpose_times(a).to(g.passes.dtype)      # passes as the Gram's
        first = g.metric.reduce(jacobian_derivative_times(g.passes, g.pass_theta, u, ja).to(g.dtype))
        second = g.times(g.derivative_transpose_times(self.u, a))
        return (first.reshape(-1) + second) / g.num_samples


class MatrixFreeRates(list):
    """The `PredictedRates` of each rule, in order, plus `cost`: {"cg_iterations" (two projections),
    "eigen_matvecs" (top-k Gram), "lanczos_matvecs" (all probes), "derivative_matvecs" (per DG[u_s]:
    k + num_probes), "converged" (every probe's Lanczos met its tolerance), "seconds" per phase}."""

    def __init__(self, rates, cost: dict):
        super().__init__(rates)
        self.cost = cost


def _check(rules, noise_scale, eta, deflate, num_probes) -> list:
    rules = list(rules)
    for rule in rules:
        check_rule(rule)
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be positive (sigma^2, or 1 for flipped labels), got {noise_scale}")
    if eta is not None and not eta > 0:
        raise ValueError(f"eta must be positive, got {eta}")
    if not isinstance(deflate, int) or deflate < 1:
        raise ValueError(f"deflate must be an integer >= 1 (the top eigenpair gives lambda_max), got {deflate!r}")
    if not isinstance(num_probes, int) or num_probes < 3:
        raise ValueError(f"num_probes must be an integer >= 3, got {num_probes!r}")
    return rules


def _checked_top(spectrum, gram: "GramOperator", k: int, tol: float) -> tuple[Tensor, Tensor, int]:
    """The top-k eigenpairs of a known spectrum of G, after one Gram product shows its top pair is G's here."""
    if spectrum.dim != gram.dim or spectrum.values.shape[0] < k:
        raise ValueError(f"spectrum has {spectrum.values.shape[0]} eigenpairs of dimension {spectrum.dim}; G needs "
                         f"{k} of dimension {gram.dim}")
    lam, vecs = spectrum.values[:k].to(torch.float64), spectrum.vectors[:, :k].to(gram.dtype)
    residual = float(torch.linalg.vector_norm(gram.hvp(vecs[:, 0]) - lam[0] * vecs[:, 0])) / float(lam[0])
    if not residual <= max(tol, 1e-8):
        raise ValueError(f"spectrum is not G's at zeta: its top eigenpair has relative residual {residual:.2e} "
                         "(an eigendecomposition of another point?)")
    return lam, vecs, 1


def predict_rates_matrix_free(obj: Objective, zeta: Tensor, rules, *, noise_scale: float,
                              metric: OutputMetric | None = None, eta: float | None = None,
                              projector=None, num_probes: int = 30, deflate: int = 50,
                              generator: torch.Generator | None = None, function_tol: float = 1e-8,
                              max_lanczos_steps: int = 400, rtol: float = 1e-10, max_iter: int = 5000,
                              eigen_tol: float = 1e-10, chunk_size: int = 64, loss_on_gamma: float = 0.0,
                              max_loss: float = 1e-8, spectrum: SpectralOperator | None = None,
                              passes: Objective | None = None, progress: Callable[[str], None] | None = None
                              ) -> MatrixFreeRates:
    """Label-noise rates of every rule at zeta on Gamma, matrix-free (module docstring).

    Args:
        obj, zeta: `Objective` without normalization layers; zeta with L - loss_on_gamma <= max_loss
            (loss_on_gamma: 0 for Gaussian label noise, the mean entropy of the soft targets for flips).
        rules: SGD / LocalSGD / QSR (any mix); eta: only for finite-eta QSR (Local SGD at alpha^2/eta).
        noise_scale: c > 0 (sigma^2, or 1). metric: the `OutputMetric` at zeta (None: identity).
        projector: a `TangentProjector` (or any `.project(v) -> (P v, iterations)`) to use and fill;
            default block-Jacobi at rtol / max_iter.
        num_probes (>= 3), deflate (k >= 1 exact top Gram eigenpairs; k = 1 when no rule has a psi
            term), function_tol, max_lanczos_steps: the stochastic trace; eigen_tol: the top-k eigenpairs.
        generator: all random draws (Lanczos starts, probes); seed 0 if None.
        spectrum: G's eigendecomposition at zeta if known (`SpectralOperator`, eigenvalues descending, e.g.
            `Point.gram_spectrum`): the top-k eigenpairs are read from it and each probe's
            psi(2 beta G) z is exact, no Lanczos (one Gram product checks it belongs to this zeta).
        passes: the objective the psi trace's DG[u] products run on (default obj), e.g. obj.to(torch.float32):
            their rounding (~1e-6 relative) is far below the probes' standard error; the exact terms stay in obj.
        progress: optional callable receiving one line at the end of each phase (quiet otherwise).
    Returns `MatrixFreeRates` (a list of `PredictedRates`, with `.cost`). Raises ValueError for bad input
    or zeta off Gamma (before any Jacobian pass), GramSolveNotConverged, RuntimeError if the top-k
    eigenpairs miss eigen_tol within 50 k + 500 Gram products.
    """
    rules = _check(rules, noise_scale, eta, deflate, num_probes)
    zeta = zeta.detach()
    excess = obj.loss(zeta).item() - loss_on_gamma
    if not excess <= max_loss:
        raise ValueError(f"zeta is not on Gamma: L - loss_on_gamma = {excess:.3e} > max_loss = {max_loss:.1e}")
    metric = metric or OutputMetric()
    metric.check(obj.num_samples, obj.forward(zeta, obj.data[0][0][:1]).shape[-1])
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    coefficients = [rule.drift_coefficients(eta) for rule in rules]
    betas = sorted({beta for _, c_two, beta in coefficients if c_two})
    n, seconds = obj.num_samples, {}
    say = progress or (lambda line: None)

    clock = time.perf_counter()
    frob_grad, blocks, frob = jacobian_frobenius_pass(obj, zeta, chunk_size, reduce=metric.reduce_chunk)
    projector = projector or TangentProjector.from_blocks(obj, zeta, blocks, metric=metric, rtol=rtol,
                                                          max_iter=max_iter)
    grad_trace = frob_grad / n
    g_trace, it_trace = projector.project(grad_trace)
    seconds["projections"] = time.perf_counter() - clock
    say(f"grad tr H projected: {it_trace} CG iterations, {seconds['projections']:.1f} s")

    clock = time.perf_counter()
    gram = GramOperator(obj, zeta, metric)
    k = min(deflate if betas else 1, gram.dim)
    if spectrum is None:
        eig = top_eigenpairs(gram, k, tol=eigen_tol, max_matvecs=50 * k + 500, max_basis=min(gram.dim, 2 * k + 40),
                             generator=gen)
        if not eig.converged:
            raise RuntimeError(f"top-{k} Gram eigenpairs did not reach tol {eigen_tol:.1e} in {eig.matvecs} products")
        lam, gram_vecs, eigen_matvecs = eig.values, eig.vectors, eig.matvecs
    else:
        lam, gram_vecs, eigen_matvecs = _checked_top(spectrum, gram, k, eigen_tol)
    seconds["eigenpairs"] = time.perf_counter() - clock
    clock = time.perf_counter()
    u1 = gram.parameter_vectors(gram_vecs[:, :1], lam[:1])[:, 0]
    g_lmax, it_lmax = projector.project(lambda_max_pairing_grad(obj, zeta, u1, metric))
    seconds["projections"] += time.perf_counter() - clock
    say(f"top-{k} Gram eigenpairs ({eigen_matvecs} products) and grad lambda_max projected ({it_lmax} CG iterations)")
    first = torch.tensor([float(g_trace @ grad_trace), float(g_lmax @ grad_trace)], dtype=torch.float64)

    clock = time.perf_counter()
    psi_tr = psi_se = torch.zeros(len(betas), 2, dtype=torch.float64)
    cost = dict(cg_iterations=(it_trace, it_lmax), eigen_matvecs=eigen_matvecs, lanczos_matvecs=0,
                derivative_matvecs=0, converged=True)
    if betas:
        beta_t = torch.tensor(betas, dtype=torch.float64)
        f = lambda x: psi(2 * x.clamp(min=0)[:, None] * beta_t[None, :])     # noqa: E731 (m, b); G is PSD
        derivative = gram if passes is None else GramOperator(obj, zeta, metric, passes=passes)
        ops = [GramDerivativeOperator(derivative, g_trace), GramDerivativeOperator(derivative, g_lmax)]
        est = trace_function_product(gram if spectrum is None else spectrum, f, ops, num_probes=num_probes,
                                     generator=gen, deflate=(lam, gram_vecs), b_trace=first.tolist(),
                                     tol=function_tol, max_steps=max_lanczos_steps)
        psi_tr, psi_se = est.value, est.stderr
        cost.update(lanczos_matvecs=est.matvecs, derivative_matvecs=est.b_matvecs, converged=est.converged)
    seconds["traces"] = time.perf_counter() - clock
    if betas:
        say(f"psi traces for {len(betas)} beta(s): {cost['lanczos_matvecs']} Lanczos products, "
            f"{seconds['traces']:.1f} s")

    out = []
    for rule, (c_one, c_two, beta) in zip(rules, coefficients):
        scale = -noise_scale / (4 * rule.total_batch)
        rates, stderr, drift = scale * c_one * first, torch.zeros(2, dtype=torch.float64), None
        if c_two:
            i = betas.index(beta)
            rates, stderr = rates + scale * c_two * psi_tr[i], abs(scale) * c_two * psi_se[i]
        else:
            drift = scale * c_one * g_trace
            rates = torch.stack([g_trace @ drift, g_lmax @ drift]).double()
        out.append(PredictedRates(rule=rule, noise_scale=float(noise_scale), trace_rate=float(rates[0]),
                                  lambda_max_rate=float(rates[1]), trace=frob / n, lambda_max=float(lam[0]),
                                  drift=drift, trace_rate_stderr=float(stderr[0]),
                                  lambda_max_rate_stderr=float(stderr[1])))
    return MatrixFreeRates(out, {**cost, "seconds": seconds})
