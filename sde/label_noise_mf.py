"""Matrix-free label-noise sharpness rates: neither the full (N C, D) Jacobian nor the Hessian is formed.

Setting and units as in `sde.label_noise` (squared loss at zero residual, Gaussian label noise
sigma, slow time t = eta^2 x steps per worker; H = J^T J / N on Gamma, G = J J^T / N its Gram
twin in output space, J the (N C, D) output Jacobian). Two entry points:

- `predict_label_noise_rates_lanczos` (ALL rules: SGD, QSR, Local SGD; the one to use). Exact
  tangent projection by CG (below) for u_s = P grad s, s in {tr H, lambda_max}, and

      d s/dt = -(sigma^2 / 4B) [ u_s . grad tr H + (K-1) tr(psi(2 beta G) DG[u_s]) ]

  (drift -(sigma^2/4B) P d3L[P_perp + (K-1) psi(2 beta H)]; u . d3L[M] = tr(M DH[u]); and
  tr(psi(2 beta H) DH[u]) = tr(psi(2 beta G) DG[u]) for tangent u since J psi(2 beta H) =
  psi(2 beta G) J). The first term is exact; the trace is estimated by stochastic Lanczos in
  output space (`dynamics.trace_function_product` on `GramOperator` with `GramDerivativeOperator`s):
  top-k Gram eigenpairs exact, Rademacher probes for the rest, tr DG[u_s] = u_s . grad tr H as a
  control variate; one Krylov basis per probe serves every beta. Rates come with standard errors.
  SGD and QSR (eta -> 0) rules are exact (stderr 0) and get their drift vector; Local SGD rules
  get only the two rates (the drift vector is never formed).
- `predict_label_noise_rates_cg` (SGD and QSR at eta -> 0 only, deterministic): the exact
  tangent projection P v = v - J^T a, (J J^T) a = J v, by block-Jacobi preconditioned conjugate
  gradients on Jacobian-vector / vector-Jacobian products (`TangentProjector`), and P grad tr H
  from chunked per-sample Jacobians; it equals the exact path of `sde.label_noise` to the CG
  tolerance and returns `PredictedRates` with the drift.

(A truncated path, P = I - U U^T from the top-r Hessian eigenpairs, was removed on 2026-12-04: below
full rank it overshot the rates 1.5-2.4x, docs/studies/drift_check_findings.md.) Both paths assume no
normalization layers (outputs per sample); tests/sde/test_label_noise_mf.py checks them against the exact one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev, jvp, vjp, vmap

from dynamics.lanczos import top_eigenpairs
from dynamics.matrix_function import trace_function_product
from dynamics.objective import Objective
from sde.label_noise import PredictedRates
from sde.psi import psi
from sde.rules import check_rule


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


def _check_point(obj: Objective, zeta: Tensor, sigma: float, rtol: float, max_iter: int) -> Tensor:
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    _check_cg_options(rtol, max_iter)
    zeta = zeta.detach()
    loss = obj.loss(zeta).item()
    if loss > 1e-8:
        raise ValueError(f"zeta is not on Gamma: L = {loss:.3e} > 1e-8")
    return zeta


def lambda_max_pairing_grad(obj: Objective, theta: Tensor, u: Tensor) -> Tensor:
    """(2/N) grad_theta <J(theta) u, J0 u> (J0 = J at theta, held fixed), shape (D,).

    Its tangent projection is P grad lambda_max = P d3L[u u^T] on Gamma for the unit top eigenvector u.
    """
    ju0 = jacobian_times(obj, theta, u)
    pairing = lambda t: sum((jvp(lambda tt: obj.forward(tt, x), (t,), (u,))[1] * ju0[s:s + len(x)]).sum()
                            for x, s in zip(_inputs(obj), _offsets(obj)))
    return 2 / obj.num_samples * grad(pairing)(theta)


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
                                 generator: torch.Generator | None = None, projector=None) -> ExactProjectionRates:
    """Exact label-noise rates for SGD and QSR (eta -> 0) without forming J or the Hessian.

    P grad tr H = (1/N) P grad ||J(theta)||_F^2 (chunked per-sample Jacobians), P grad lambda_max =
    (2/N) P grad <J(theta) u, J0 u> (u the top Lanczos eigenvector), P by `TangentProjector`. The
    drift is -(sigma^2 / 4B) w P grad tr H with w = 1 (SGD) or K (QSR), so
    d tr H/dt = -(sigma^2 w / 4B) ||P grad tr H||^2. Local SGD (and QSR at finite eta) needs
    psi(2 beta H) and is rejected (ValueError): use `predict_label_noise_rates_lanczos` (matrix-free,
    stochastic) or `predict_label_noise_rates` (exact path). Assumes no normalization layers (batch = per-sample outputs).
    `projector` (optional, `.project(v) -> (P v, cg_iterations)`) replaces the block-Jacobi
    `TangentProjector`. Cost: one chunked per-sample-Jacobian pass, two CG solves (each iteration one J and one J^T
    product over all samples; `cg_iterations` in the result) and a top-1 Lanczos.
    """
    rules = list(rules)
    for rule in rules:
        check_rule(rule)
        if rule.drift_coefficients()[2] is not None:
            raise ValueError(f"{rule!r}: the exact-projection matrix-free path supports SGD and QSR only "
                             "(Local SGD needs the matrix function psi(2 beta H): use "
                             "predict_label_noise_rates_lanczos)")
    zeta = _check_point(obj, zeta, sigma, rtol, max_iter)
    n = obj.num_samples

    frob_grad, blocks, frob = jacobian_frobenius_pass(obj, zeta, chunk_size)
    if projector is None:
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
    g_lmax, it_lmax = projector.project(lambda_max_pairing_grad(obj, zeta, eig.vectors[:, 0]))

    out = []
    for rule in rules:
        weight = rule.drift_coefficients()[0]
        drift = -(sigma ** 2) * weight / (4 * rule.total_batch) * g_trace
        out.append(PredictedRates(rule=rule, sigma=float(sigma), trace_rate=float(g_trace @ drift),
                                  lambda_max_rate=float(g_lmax @ drift), trace=frob / n,
                                  lambda_max=float(eig.values[0]), drift=drift))
    return ExactProjectionRates(rates=out, cg_iterations=(it_trace, it_lmax), lanczos_matvecs=eig.matvecs)



# ---------------------------------------------------------------------------------------------
# Local SGD: psi(2 beta H) by stochastic Lanczos in output space (issue #6)
# ---------------------------------------------------------------------------------------------

def jacobian_derivative_times(obj: Objective, theta: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """DJ[u] v = d/d eps J(theta + eps u) v, shape (N, C): second directional derivatives of the
    outputs along (u, v), by forward-over-forward mode (no normalization layers: see DESIGN.md)."""
    outs = []
    for x in _inputs(obj):
        inner = lambda t: jvp(lambda tt: obj.forward(tt, x), (t,), (v,))[1]
        outs.append(jvp(inner, (theta,), (u,))[1])
    return torch.cat(outs)


def jacobian_derivative_transpose_times(obj: Objective, theta: Tensor, u: Tensor, a: Tensor) -> Tensor:
    """DJ[u]^T a = grad_theta <a, J(theta) u>, shape (D,), for output coefficients a (N, C)."""
    out, start = torch.zeros_like(theta), 0
    for x in _inputs(obj):
        inner = lambda t: jvp(lambda tt: obj.forward(tt, x), (t,), (u,))[1]
        _, pull = vjp(inner, theta)
        out += pull(a[start:start + len(x)])[0]
        start += len(x)
    return out


class GramOperator:
    """G = J J^T / N on flat output-space vectors (N C,), J the output Jacobian at theta.

    Its nonzero eigenvalues are those of Hessian(L) on Gamma (H = J^T J / N); one product costs a
    vector-Jacobian and a Jacobian-vector product over all samples. `.calls` counts products.
    Operator interface of `dynamics.lanczos` (`hvp`, `dim`, `dtype`, `device`).
    """

    def __init__(self, obj: Objective, theta: Tensor):
        self.obj, self.theta = obj, theta.detach()
        self.num_samples = obj.num_samples
        self.outputs = obj.forward(self.theta, obj.data[0][0][:1]).shape[-1]
        self.dim = self.num_samples * self.outputs
        self.dtype, self.device = self.theta.dtype, self.theta.device
        self.calls = 0

    def _shape(self, a: Tensor) -> Tensor:
        if a.shape != (self.dim,):
            raise ValueError(f"output-space vectors must have shape ({self.dim},) = N C, got {tuple(a.shape)}")
        return a.reshape(self.num_samples, self.outputs)

    def transpose_times(self, a: Tensor) -> Tensor:
        """J^T a, shape (D,), for a flat (N C,) vector a."""
        return jacobian_transpose_times(self.obj, self.theta, self._shape(a))

    def hvp(self, a: Tensor) -> Tensor:
        self.calls += 1
        return jacobian_times(self.obj, self.theta, self.transpose_times(a)).reshape(-1) / self.num_samples

    def parameter_vectors(self, gram_vectors: Tensor, values: Tensor) -> Tensor:
        """Unit Hessian eigenvectors J^T g_i / sqrt(N lambda_i), (D, k), from Gram eigenpairs ((N C, k), (k,))."""
        cols = [self.transpose_times(gram_vectors[:, i]) for i in range(gram_vectors.shape[1])]
        return torch.stack(cols, 1) / (self.num_samples * values.to(self.dtype)).sqrt()


class GramDerivativeOperator:
    """DG[u] = d/d eps G(theta + eps u) = (DJ[u] J^T + J DJ[u]^T) / N on flat (N C,) vectors.

    Symmetric. For a tangent u (J u = 0) on Gamma, DH[u] = (DJ[u]^T J + J^T DJ[u]) / N (the
    residual term's derivative is (J u)-weighted, hence 0), so tr(f(G) DG[u]) = tr(f(H) DH[u]) for
    any f (J f(H) = f(G) J); in particular tr DG[u] = tr DH[u] = u . grad tr H.
    One product: a vector-Jacobian, a forward-over-forward, a reverse-over-forward and a
    Jacobian-vector pass. `.calls` counts products.
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
        obj, theta, u = g.obj, g.theta, self.u
        first = jacobian_derivative_times(obj, theta, u, g.transpose_times(a))
        second = jacobian_times(obj, theta, jacobian_derivative_transpose_times(obj, theta, u, g._shape(a)))
        return (first + second).reshape(-1) / g.num_samples


@dataclass(frozen=True)
class RateEstimate:
    """Predicted d tr H/dt and d lambda_max/dt (slow time) for one rule, with standard errors.

    beta: the psi argument scale (LocalSGD.beta, or alpha^2/eta for QSR at finite eta), None for
    SGD and QSR (eta -> 0), whose rates are exact (stderr 0). drift: the exact (D,) drift for
    those rules, None for Local SGD (only its pairings with the two sharpness gradients are estimated).
    """
    rule: object
    sigma: float
    trace_rate: float
    trace_rate_stderr: float
    lambda_max_rate: float
    lambda_max_rate_stderr: float
    trace: float
    lambda_max: float
    beta: float | None = None
    drift: Tensor | None = None


@dataclass(frozen=True)
class LanczosRates:
    """Output of `predict_label_noise_rates_lanczos`.

    rates: one `RateEstimate` per rule, in order. betas: (b,) the distinct psi scales;
    psi_traces, psi_traces_stderr: (b, 2) float64 estimates of tr(psi(2 beta H) DH[u_s]) for
    s = (tr H, lambda_max), u_s = P grad s; sgd_terms: (u_tr . grad tr H, u_lmax . grad tr H) (exact).
    Cost: cg_iterations (two projections), eigen_matvecs (Gram products of the top-k Lanczos),
    lanczos_matvecs (Gram products of all probes' Lanczos runs), derivative_matvecs (products with
    EACH of the two DG[u_s]: k for deflation + num_probes). converged: every probe's Lanczos met tol.
    `trace_estimate` keeps the full `dynamics.FunctionTraceEstimate`; `seconds`: wall time of the
    phases "projections" (Jacobian pass + both CG solves), "eigenpairs" (top-k Gram) and "traces".
    """
    rates: list
    betas: Tensor
    psi_traces: Tensor
    psi_traces_stderr: Tensor
    sgd_terms: tuple[float, float]
    cg_iterations: tuple[int, int]
    eigen_matvecs: int
    lanczos_matvecs: int
    derivative_matvecs: int
    converged: bool
    trace_estimate: object = None
    seconds: dict | None = None


def _rule_beta(rule, eta: float | None) -> float | None:
    """beta inside psi of `rule`'s drift (None: no psi term); eta checked when given."""
    if eta is not None and not eta > 0:
        raise ValueError(f"eta must be positive, got {eta}")
    return rule.drift_coefficients(eta)[2]


def predict_label_noise_rates_lanczos(obj: Objective, zeta: Tensor, rules, *, sigma: float, num_probes: int = 30,
                                      deflate: int = 50, eta: float | None = None,
                                      generator: torch.Generator | None = None, function_tol: float = 1e-8,
                                      max_lanczos_steps: int = 400, rtol: float = 1e-10, max_iter: int = 5000,
                                      eigen_tol: float = 1e-10, chunk_size: int = 64,
                                      projector=None) -> LanczosRates:
    """Label-noise rates for SGD, QSR and LOCAL SGD at zeta on Gamma, matrix-free, with standard errors.

    For a scalar s (tr H or lambda_max) with tangent gradient u_s = P grad s (exact, by
    `TangentProjector` as in `predict_label_noise_rates_cg`), the drift
    -(sigma^2/4B) P d3L[P_perp + (K-1) psi(2 beta H)] gives

        d s/dt = -(sigma^2 / 4B) [ u_s . grad tr H + (K-1) tr(psi(2 beta G) DG[u_s]) ]

    (G = J J^T / N, DG[u] its derivative along u; tr(psi(2 beta H) DH[u]) equals the output-space
    trace because J psi(2 beta H) = psi(2 beta G) J). The first term is exact; the second is
    estimated by `dynamics.trace_function_product` on `GramOperator` with `num_probes`
    Rademacher probes, the top-`deflate` Gram eigenpairs taken exactly, and tr DG[u_s] =
    u_s . grad tr H as a control variate. SGD: first term only; QSR (eta None): K times it; QSR
    with eta: Local SGD at beta = alpha^2/eta. Limits: beta -> 0 gives SGD, beta -> inf K x SGD.

    Args:
        obj, zeta: squared-loss `Objective` without normalization layers, zeta with L <= 1e-8.
        rules: SGD / LocalSGD / QSR rules (any mix; one set of probes serves all betas).
        sigma: label-noise std (> 0). num_probes: >= 3. deflate: k >= 1 exact top eigenpairs
            (also give lambda_max and its eigenvector). eta: only for finite-eta QSR.
        generator: all random draws (Lanczos start vectors, probes); seed 0 if None.
        function_tol, max_lanczos_steps: per-probe Lanczos for psi(2 beta G) z (relative change).
        rtol, max_iter: CG of the tangent projections; eigen_tol: top-k Gram eigenpairs.
        projector: optional object with `.project(v) -> (P v, cg_iterations)` replacing the default
            block-Jacobi `TangentProjector` (e.g. a better-preconditioned one for large N).
    Raises ValueError for bad input or zeta off Gamma, ProjectionNotConverged, RuntimeError if
    the top-k eigenpairs do not converge within 50 k + 500 Gram products.
    """
    rules = list(rules)
    for rule in rules:
        check_rule(rule)
    zeta = _check_point(obj, zeta, sigma, rtol, max_iter)
    if not isinstance(deflate, int) or deflate < 1:
        raise ValueError(f"deflate must be an integer >= 1 (the top eigenpair gives lambda_max), got {deflate!r}")
    if not isinstance(num_probes, int) or num_probes < 3:
        raise ValueError(f"num_probes must be an integer >= 3, got {num_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = obj.num_samples
    betas_per_rule = [_rule_beta(rule, eta) for rule in rules]

    clock = time.perf_counter()
    frob_grad, blocks, frob = jacobian_frobenius_pass(obj, zeta, chunk_size)
    if projector is None:
        projector = TangentProjector.from_blocks(obj, zeta, blocks, rtol=rtol, max_iter=max_iter)
    grad_trace = frob_grad / n
    g_trace, it_trace = projector.project(grad_trace)
    seconds = {"projections": time.perf_counter() - clock}

    clock = time.perf_counter()
    gram = GramOperator(obj, zeta)
    k = min(deflate, gram.dim)
    eig = top_eigenpairs(gram, k, tol=eigen_tol, max_matvecs=50 * k + 500, max_basis=min(gram.dim, 2 * k + 40),
                         generator=gen)
    if not eig.converged:
        raise RuntimeError(f"top-{k} Gram eigenpairs did not reach tol {eigen_tol:.1e} in {eig.matvecs} products")
    lam, gram_vecs = eig.values, eig.vectors
    u1 = gram.parameter_vectors(gram_vecs[:, :1], lam[:1])[:, 0]
    seconds["eigenpairs"] = time.perf_counter() - clock
    clock = time.perf_counter()
    g_lmax, it_lmax = projector.project(lambda_max_pairing_grad(obj, zeta, u1))
    seconds["projections"] += time.perf_counter() - clock
    sgd_terms = (float(g_trace @ grad_trace), float(g_lmax @ grad_trace))

    clock = time.perf_counter()
    betas = sorted({b for b in betas_per_rule if b is not None})
    psi_tr = torch.zeros(len(betas), 2, dtype=torch.float64)
    psi_se = torch.zeros_like(psi_tr)
    estimate, lanczos_matvecs, derivative_matvecs, converged = None, 0, 0, True
    if betas:
        beta_t = torch.tensor(betas, dtype=torch.float64)
        f = lambda x: psi(2 * x.clamp(min=0)[:, None] * beta_t[None, :])     # (m, b); G is PSD
        ops = [GramDerivativeOperator(gram, g_trace), GramDerivativeOperator(gram, g_lmax)]
        estimate = trace_function_product(gram, f, ops, num_probes=num_probes, generator=gen,
                                          deflate=(lam, gram_vecs), b_trace=list(sgd_terms), tol=function_tol,
                                          max_steps=max_lanczos_steps)
        psi_tr, psi_se = estimate.value, estimate.stderr
        lanczos_matvecs, derivative_matvecs, converged = estimate.matvecs, estimate.b_matvecs, estimate.converged
    seconds["traces"] = time.perf_counter() - clock

    out = []
    for rule, beta in zip(rules, betas_per_rule):
        scale = -(sigma ** 2) / (4 * rule.total_batch)
        if beta is None:
            drift = scale * rule.drift_coefficients()[0] * g_trace
            out.append(RateEstimate(rule=rule, sigma=float(sigma), trace_rate=float(g_trace @ drift),
                                    trace_rate_stderr=0.0, lambda_max_rate=float(g_lmax @ drift),
                                    lambda_max_rate_stderr=0.0, trace=frob / n, lambda_max=float(lam[0]),
                                    drift=drift))
            continue
        i = betas.index(beta)
        km1 = rule.workers - 1
        out.append(RateEstimate(
            rule=rule, sigma=float(sigma),
            trace_rate=scale * (sgd_terms[0] + km1 * float(psi_tr[i, 0])),
            trace_rate_stderr=abs(scale) * km1 * float(psi_se[i, 0]),
            lambda_max_rate=scale * (sgd_terms[1] + km1 * float(psi_tr[i, 1])),
            lambda_max_rate_stderr=abs(scale) * km1 * float(psi_se[i, 1]),
            trace=frob / n, lambda_max=float(lam[0]), beta=beta))
    return LanczosRates(rates=out, betas=torch.tensor(betas, dtype=torch.float64), psi_traces=psi_tr,
                        psi_traces_stderr=psi_se, sgd_terms=sgd_terms, cg_iterations=(it_trace, it_lmax),
                        eigen_matvecs=eig.matvecs, lanczos_matvecs=lanczos_matvecs,
                        derivative_matvecs=derivative_matvecs, converged=converged, trace_estimate=estimate,
                        seconds=seconds)
