"""The reading at Phi(theta) with no (N m, D) array (issue 13, item 1): `phi.read_at_phi` on matrix-free pieces.

Same reading as `experiments.comparison.phi` (its docstring), three pieces replaced (Jt = metric.reduce(J) (N m, D),
H = Jt^T Jt / N and G = Jt Jt^T / N on Gamma, never formed):
- projection: `projection.project(method="cg")` under ONE `GramPreconditionerMF` built at zeta (never refreshed);
  a projection that does not converge is refused (`ProjectionNotConverged`, naming CG iterations and residual).
  Inexact Newton steps are normal at their iterate, so cg_rtol moves z along Gamma by cg_rtol x O(|x|^2) only.
- sharpness at z on Gamma: tr H = ||Jt||_F^2 / N exactly from per-sample Jacobian chunks; lambda_max by thick-restart
  Lanczos on G (`dynamics.lanczos.top_eigenpairs`) from the seed's previous top vector, to ||G u - l u|| <= eig_tol l
  (then |l - lambda_max| <= eig_tol lambda_max once u is the top direction).
- the flow term of s in {tr H, lambda_max} (`FlowCorrection`): 1/2 a^T (dH_s / (lambda_i + lambda_j)) a, a = U^T x,
  equals 1/2 <d_g H, X>, X = int_0^inf e^{-tH} n n^T e^{-tH} dt (H X + X H = n n^T), n = U U^T x the normal part of x
  at zeta. Tangent part: removed exactly (to cg_rtol) by one preconditioned CG solve at zeta, (Jt Jt^T) a = Jt x,
  n = Jt^T a, warm-started from the seed's previous solve: dense `PhiCorrection` drops it the same way (U^T x).
  Then Lanczos on H from n: V (D, k), T = V^T H V = (Jt V)^T (Jt V) / N, X ~ V X_k V^T with
  T X_k + X_k T = |n|^2 e1 e1^T (solved in T's eigenbasis; Ritz values below rank_tol x the largest dropped, as
  `gauss_newton_geometry` drops Gram eigenvalues), and V^T (d_g H) V = S + S^T, S = (Jt' V)^T (Jt V) / N,
  Jt' v = reduce(DJ[g] v) (on Gamma the residual term of d_g H vanishes along a tangent g). Jt V comes free with the
  Lanczos products. Stops when both terms change by <= flow_rtol x |term| over `step` more Lanczos vectors, or when
  the Krylov space is invariant (exact); `cost` reports k.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from dynamics.jacobian import (GramSolveNotConverged, gram_solve_cg, jacobian_derivative_times,
                               jacobian_frobenius_pass, per_sample_gram_blocks)
from dynamics.lanczos import top_eigenpairs
from experiments.comparison.phi import PhiReading, read_at_phi
from experiments.comparison.projection import GramPreconditionerMF, project
from sde.label_noise_mf import GramOperator, lambda_max_pairing_grad

__all__ = ["ProjectionNotConverged", "FlowCorrection", "tangent_gradients", "MatrixFreeReader"]


class ProjectionNotConverged(RuntimeError):
    """A projection onto Gamma (or its CG solves) stopped short: no reading is reported from it."""


class FlowCorrection:
    """Matrix-free `PhiCorrection` at zeta: flow_terms(x) -> (tr H term, lambda_max term) (module docstring).

    gram: `GramOperator` at zeta; preconditioner: .apply(r (N, m)) -> (N, m); gradients: the tangent gradients of
    tr H and lambda_max at zeta, (D,) each. `seed` (set by the reader) keys the CG warm starts; `cost` holds the
    last call's Lanczos steps k, CG iterations and seconds.
    """

    def __init__(self, gram: GramOperator, preconditioner, gradients: tuple[Tensor, Tensor], *,
                 flow_rtol: float = 1e-6, step: int = 10, max_steps: int = 400, cg_rtol: float = 1e-10,
                 cg_max_iter: int = 5000, rank_tol: float = 1e-12):
        if not 0 < flow_rtol < 1 or step < 1 or max_steps < 1:
            raise ValueError(f"need 0 < flow_rtol < 1, step >= 1, max_steps >= 1; got {flow_rtol}, {step}, {max_steps}")
        self.gram, self.preconditioner, self.gradients = gram, preconditioner, gradients
        self.flow_rtol, self.step, self.max_steps, self.rank_tol = flow_rtol, step, max_steps, rank_tol
        self.cg_rtol, self.cg_max_iter = cg_rtol, cg_max_iter
        self.seed, self.warm, self.cost = None, {}, {}

    def normal_part(self, v: Tensor, x0: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """(U U^T v (D,), the CG solution a (N, m) of (Jt Jt^T) a = Jt v, CG iterations) at zeta."""
        g = self.gram
        rhs = g.shaped(g.times(v))
        if not rhs.norm() > 0:
            return torch.zeros_like(v), torch.zeros_like(rhs), 0
        try:
            a, its = gram_solve_cg(g.obj, g.theta, rhs, self.preconditioner, rtol=self.cg_rtol,
                                   max_iter=self.cg_max_iter, x0=x0, metric=g.metric)
        except GramSolveNotConverged as exc:
            raise ProjectionNotConverged(f"normal part of the offset at zeta: {exc}") from None
        return g.transpose_times(a.reshape(-1)), a, its

    def flow_terms(self, offset: Tensor) -> tuple[float, float]:
        """1/2 a^T (dH_s / (lambda_i + lambda_j)) a, a = U^T offset, for s = tr H and lambda_max."""
        start, g = time.perf_counter(), self.gram
        normal, a, its = self.normal_part(offset, self.warm.get(self.seed))
        self.warm[self.seed] = a
        size = float(normal.norm())
        if size == 0:
            self.cost = dict(lanczos_steps=0, cg_iterations=its, seconds=time.perf_counter() - start)
            return 0.0, 0.0
        steps = min(self.max_steps, g.dim, g.obj.dim)
        basis = torch.zeros(g.obj.dim, steps, dtype=g.dtype, device=g.device)
        images = torch.zeros(g.dim, steps, dtype=g.dtype, device=g.device)             # Jt V
        derived = torch.zeros(2, g.dim, steps, dtype=g.dtype, device=g.device)         # Jt'_s V
        basis[:, 0], previous, scale = normal / size, None, 0.0
        for k in range(1, steps + 1):
            q = basis[:, k - 1]
            images[:, k - 1] = g.times(q)
            for s, direction in enumerate(self.gradients):
                derived[s, :, k - 1] = g.metric.reduce(jacobian_derivative_times(g.obj, g.theta, direction, q)
                                                       ).reshape(-1)
            w = g.transpose_times(images[:, k - 1]) / g.num_samples
            for _ in range(2):                                                        # full reorthogonalization
                w = w - basis[:, :k] @ (basis[:, :k].T @ w)
            beta = float(w.norm())
            scale = max(scale, float(images[:, k - 1].norm() ** 2 / g.num_samples))
            invariant = beta <= 1e-10 * scale
            if k % self.step == 0 or invariant or k == steps:
                terms = self._terms(images[:, :k], derived[:, :, :k], size)
                if invariant or (previous is not None and all(
                        abs(t - p) <= self.flow_rtol * abs(t) for t, p in zip(terms, previous))):
                    break
                previous = terms
            if k < steps:
                basis[:, k] = w / beta
        else:
            raise RuntimeError(f"flow terms did not settle to flow_rtol {self.flow_rtol:.1e} in {steps} Lanczos "
                               f"steps (last two: {previous}, {terms})")
        self.cost = dict(lanczos_steps=k, cg_iterations=its, seconds=time.perf_counter() - start)
        return terms

    def _terms(self, images: Tensor, derived: Tensor, size: float) -> tuple[float, float]:
        """<S_s, X_k> for the Krylov basis behind `images` = Jt V (N m, k), `derived` = Jt'_s V (2, N m, k)."""
        n = self.gram.num_samples
        values, vectors = torch.linalg.eigh(images.T @ images / n)
        keep = values > self.rank_tol * values[-1]
        values, vectors = values[keep], vectors[:, keep]
        c = size * vectors[0]
        lyapunov = c[:, None] * c[None, :] / (values[:, None] + values[None, :])        # X_k in T's eigenbasis
        rotated = images @ vectors
        return tuple(float(((d @ vectors).T @ rotated / n * lyapunov).sum()) for d in derived)


def tangent_gradients(gram: GramOperator, correction: FlowCorrection, *, eig_tol: float = 1e-10,
                      chunk_size: int = 64, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Tangent gradients (D,) of tr H and lambda_max at zeta, matrix-free (as `sde.label_noise_mf`): grad ||Jt||_F^2 / N
    and (2/N) grad <Jt u, Jt0 u> (u the top Hessian eigenvector), minus their normal parts."""
    obj, zeta, metric = gram.obj, gram.theta, gram.metric
    frob_grad = jacobian_frobenius_pass(obj, zeta, chunk_size,
                                        reduce=lambda jac, s: metric.part(s, s + len(jac)).reduce(jac))[0]
    eig = top_eigenpairs(gram, 1, tol=eig_tol, max_matvecs=1000, generator=generator)
    top = gram.parameter_vectors(eig.vectors, eig.values)[:, 0]
    raw = (frob_grad / gram.num_samples, lambda_max_pairing_grad(obj, zeta, top, metric))
    return tuple(v - correction.normal_part(v)[0] for v in raw)


class MatrixFreeReader:
    """`read_at_phi`'s pieces at a `Point` of either method, with no (N m, D) array (module docstring).

    project(theta) -> (z, distance), sharpness(z) -> (tr H, lambda_max), correction.flow_terms(x); reading(theta,
    seed) -> PhiReading, with warm starts per seed: the projection's first CG from the seed's previous checkpoint
    (Pi(z - x)'s from minus Pi(theta)'s: the residual there is -r(theta) + O(|x|^2)), the normal part's CG, and
    the Lanczos of lambda_max from the previous top vector. A dense point's gradients are reused; a "cg" point's are
    computed here. `cost` lists per call the CG iterations (projections, normal parts), Lanczos steps k,
    eigen-products and seconds per reading. `project_options` go to `project` (e.g. max_gauss_newton).
    """

    def __init__(self, point, *, tol: float = 1e-10, cg_rtol: float = 1e-4, cg_max_iter: int = 5000,
                 eig_tol: float = 1e-10, preconditioner_rank: int = 200, chunk_size: int = 64,
                 generator: torch.Generator | None = None, flow: dict | None = None, **project_options):
        obj, noise, zeta = point.objective, point.noise, point.zeta
        self.point, self.tol, self.cg_rtol, self.cg_max_iter = point, tol, cg_rtol, cg_max_iter
        self.eig_tol, self.chunk_size, self.project_options = eig_tol, chunk_size, project_options
        self.metric = noise.metric(point.targets.to(zeta.dtype))
        self.preconditioner = point.preconditioner if hasattr(point.preconditioner, "apply") else \
            GramPreconditionerMF.at(obj, noise, zeta, rank=min(preconditioner_rank,
                                                             noise.equations(*point.targets.shape) - 1),
                                    chunk_size=chunk_size, generator=generator)
        gram = GramOperator(obj, zeta, self.metric)
        self.correction = FlowCorrection(gram, self.preconditioner, (), **(flow or {}))
        gradients = point.gradients
        self.correction.gradients = (gradients.trace, gradients.lambda_max) if gradients is not None else \
            tangent_gradients(gram, self.correction, eig_tol=eig_tol, chunk_size=chunk_size, generator=generator)
        self.seed, self.top, self.starts, self.coefficients, self.generator = None, {}, {}, None, generator
        self.cost = dict(projection_cg=[], normal_cg=[], lanczos_steps=[], eigen_matvecs=[], seconds=[])

    def project(self, theta: Tensor, x0: Tensor | None = None) -> tuple[Tensor, float]:
        """(Pi(theta) on Gamma, its distance), the first CG from x0 (N, m); ProjectionNotConverged if a CG solve or
        the projection fails. The first step's CG solution is kept in `coefficients`."""
        pt = self.point
        try:
            z, report = project(pt.objective, pt.noise, theta, tol=self.tol, method="cg",
                                preconditioner=self.preconditioner, cg_rtol=self.cg_rtol, x0=x0,
                                cg_max_iter=self.cg_max_iter, refresh_after=None, raise_on_failure=False,
                                **self.project_options)
        except GramSolveNotConverged as exc:
            raise ProjectionNotConverged(f"no reading: a Gauss-Newton step's CG failed ({exc})") from None
        if not report.converged:
            raise ProjectionNotConverged(
                f"no reading: the projection stopped at distance {report.distance:.3e} > tol {self.tol:.1e} "
                f"({pt.noise}) after {report.gauss_newton_steps} Gauss-Newton steps, CG iterations "
                f"{list(report.cg_iterations)}")
        self.coefficients = report.coefficients
        self.cost["projection_cg"].append(sum(report.cg_iterations))
        return z, report.distance

    def sharpness(self, z: Tensor) -> tuple[float, float]:
        """(tr H, lambda_max) at z on Gamma (module docstring); the top vector is kept for this seed."""
        obj, metric = self.point.objective, self.metric
        blocks = per_sample_gram_blocks(obj, z.detach(), chunk_size=self.chunk_size)
        trace = float(metric.reduce_blocks(blocks).diagonal(dim1=-2, dim2=-1).sum()) / obj.num_samples
        eig = top_eigenpairs(GramOperator(obj, z, metric), 1, tol=self.eig_tol, max_matvecs=2000,
                             v0=self.top.get(self.seed), generator=self.generator)
        if not eig.converged:
            raise RuntimeError(f"lambda_max did not reach eig_tol {self.eig_tol:.1e} in {eig.matvecs} Gram products")
        self.top[self.seed] = eig.vectors[:, 0]
        self.cost["eigen_matvecs"].append(eig.matvecs)
        return trace, float(eig.values[0])

    def reading(self, theta: Tensor, seed: int = 0) -> PhiReading:
        """`read_at_phi` at theta (D,) with this reader's pieces; `seed` keys the warm starts."""
        start = time.perf_counter()
        self.seed = self.correction.seed = seed
        firsts = []

        def warm_project(point: Tensor) -> tuple[Tensor, float]:
            """Pi(theta) from this seed's last checkpoint's first CG solution, Pi(z - x) from minus theta's."""
            x0 = self.starts.get(seed) if not firsts else (None if firsts[0] is None else -firsts[0])
            out = self.project(point, x0)
            firsts.append(self.coefficients)
            return out
        reading = read_at_phi(theta, self.correction, warm_project, self.sharpness)
        self.starts[seed] = firsts[0]
        self.cost["lanczos_steps"].append(self.correction.cost["lanczos_steps"])
        self.cost["normal_cg"].append(self.correction.cost["cg_iterations"])
        self.cost["seconds"].append(time.perf_counter() - start)
        return reading
