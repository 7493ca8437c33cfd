"""The reading at Phi(theta) with no (N m, D) array (issue 13, item 1): `phi.read_at_phi` on matrix-free pieces.

Same reading as `experiments.comparison.phi` (its docstring). Jt = metric.reduce(J) (N m, D), H = Jt^T Jt / N and
G = Jt Jt^T / N on Gamma; the one (N m, N m) object is the exact eigendecomposition K = Jt Jt^T = Q diag(kappa) Q^T
at zeta (`projection.GramPreconditioner`, built by Jacobian row blocks once per point, shared by every seed and
checkpoint). Pieces:
- projection: `projection.project(method="cg")` preconditioned by K^-1 at zeta (never refreshed); a projection that
  does not converge is refused (`ProjectionNotConverged`, naming CG iterations and residual). Inexact Newton steps
  are normal at their iterate, so cg_rtol moves z along Gamma by cg_rtol x O(|x|^2) only; the first step may be
  solved more loosely (`ReadingTolerances.first_cg_rtol`): its distance after it is its quadratic remainder.
- sharpness at z on Gamma: tr H = ||Jt||_F^2 / N exactly from per-sample Jacobian chunks; lambda_max by thick-restart
  Lanczos on G (`dynamics.lanczos.top_eigenpairs`) from the seed's previous top vector, to ||G u - l u|| <= eig_tol l.
- the flow term of s in {tr H, lambda_max} (`FlowCorrection`): 1/2 <d_g H, X>, X = int_0^inf e^{-tH} n n^T e^{-tH} dt
  (H X + X H = n n^T), n = U U^T x the normal part of the offset x at zeta (the tangent part is dropped, as dense
  `PhiCorrection` drops it). In H's eigenvectors v_i = Jt^T q_i / sqrt(kappa_i) (kappa_i > rank_tol kappa_1, as
  `gauss_newton_geometry` drops Gram eigenvalues) with a_i = v_i . x = q_i^T Jt x / sqrt(kappa_i):

      term_s = sum_ij C_ij (Jt'_s v_i) . (Jt v_j),   C_ij = a_i a_j / (kappa_i + kappa_j),   Jt'_s = d_{g_s} Jt

  (the 1/N of H and of d_g H cancel). C = int_0^inf z(t) z(t)^T dt, z(t) = a o e^{-kappa t}, is numerically of low
  rank: trapezoid nodes in log t (t = e^u, relative error < 1e-12 for every kappa pair at step 0.3) give
  C ~ Z Z^T, and Z's SVD keeps the ranks y_k (sigma_k^2) until the dropped sigma^2 are <= flow_rtol of the total. Each
  kept rank is a unit vector w_k = sum_i y_ki v_i (one VJP) with Jt w_k = Q (sqrt(kappa) o y_k) known, and
  (Jt'_s w_k) . (Jt w_k) = g_s . DJ[w_k]^T lift(Jt w_k) (DJ symmetric): one reverse-over-forward pass per rank gives
  both terms. |w_k| = 1 bounds what a dropped rank changes by sigma_k^2 |DJ| |J|. `cost` reports the ranks.
- the reflected reading s(Pi(z - x)) - s(z), by a second projection and reading (default) or by its second-order value
  at zeta (`ReadingTolerances.reflected = "formula"`, `FlowCorrection.reflected_terms`): a Gauss-Newton projection
  from zeta + n (n = U U^T x normal, n = Jt^T c) lands at zeta - P DJt[n]^T c + O(|n|^3) (its first step lies in the
  row space of Jt + DJt[n], the Jacobian at zeta + n), and Pi(z - x) - z is twice that (x's tangent part at z is minus
  it), so the reflected reading is -2 g_s . DJt[n]^T c: one VJP and one reverse-over-forward pass in place of a
  projection and a reading, with the flow term's error O(|z - zeta| |x|^2).
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor

from dynamics.jacobian import GramSolveNotConverged, jacobian_frobenius_pass, per_sample_gram_blocks
from dynamics.lanczos import top_eigenpairs
from experiments.comparison.phi import PhiReading, read_at_phi
from experiments.comparison.projection import GramPreconditioner, project
from sde.label_noise_mf import GramOperator, lambda_max_pairing_grad

__all__ = ["ProjectionNotConverged", "ReadingTolerances", "FlowCorrection", "lyapunov_factors", "tangent_gradients",
           "with_eigendecomposition", "MatrixFreeReader"]


PIECES = ("projection", "trace", "lambda_max", "flow")   # where a reading's seconds go (`MatrixFreeReader.cost`)
REFLECTED = ("projected", "formula")                    # `ReadingTolerances.reflected`


class ProjectionNotConverged(RuntimeError):
    """A projection onto Gamma (or its CG solves) stopped short: no reading is reported from it."""


@dataclasses.dataclass(frozen=True)
class ReadingTolerances:
    """The tolerances a study may loosen to read faster, each measured against a window's change of tr H at
    N = 2,000 (BENCHMARKS.md bench_reading_cost_levers and _tolerances); the defaults are the committed studies'.

    flow_rtol: the flow term's truncation (`lyapunov_factors`; 1e-6 keeps 17 of 30 ranks and moves the term by
    4e-4 of itself). first_cg_rtol: the CG tolerance of each projection's first Gauss-Newton step (`project`;
    None: the reader's cg_rtol, like the later steps; 1e-2 cuts the projections' CG iterations from 47 to 28).
    reflected: how the reflected reading s(Pi(z - x)) - s(z) is taken, "projected" (a second projection and
    reading) or "formula" (its second-order value at zeta, module docstring: one projection and reading; with the
    two loosened tolerances a reading takes 0.48x the time and the window's tr H slope moves by +0.65% at eta
    lambda_max 0.1, a finite-eta error that falls with eta).
    """
    flow_rtol: float = 1e-10
    first_cg_rtol: float | None = None
    reflected: str = "projected"

    def __post_init__(self):
        if self.reflected not in REFLECTED:
            raise ValueError(f"reflected must be one of {REFLECTED}, got {self.reflected!r}")
        if not 0 < self.flow_rtol < 1:
            raise ValueError(f"flow_rtol must be in (0, 1), got {self.flow_rtol}")
        if self.first_cg_rtol is not None and not 0 < self.first_cg_rtol < 1:
            raise ValueError(f"first_cg_rtol must be in (0, 1), got {self.first_cg_rtol}")


def lyapunov_factors(a: Tensor, kappa: Tensor, *, rtol: float = 1e-10, step: float = 0.3) -> tuple[Tensor, Tensor]:
    """(Y (r, k) orthonormal, sigma2 (k,)) with C = [a_i a_j / (kappa_i + kappa_j)] ~ Y diag(sigma2) Y^T (r, r),
    the dropped sigma2 summing to <= rtol x trace(C) (module docstring: 1/x = int exp(-x e^u) e^u du, trapezoid)."""
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    low, high = 2 * float(kappa.min()), 2 * float(kappa.max())
    nodes = torch.arange(math.log(1e-17 / high), math.log(math.log(1e17) / low) + step, step,
                         dtype=a.dtype, device=a.device)
    z = a[:, None] * torch.exp(-kappa[:, None] * nodes.exp()[None, :]) * (step * nodes.exp()).sqrt()[None, :]
    y, sing, _ = torch.linalg.svd(z, full_matrices=False)
    sigma2 = sing ** 2
    tail = sigma2.flip(0).cumsum(0).flip(0)                       # tail[k] = sum of sigma2[k:]
    keep = max(1, int((tail > rtol * tail[0]).sum()))
    return y[:, :keep], sigma2[:keep]


class FlowCorrection:
    """Matrix-free `PhiCorrection` at zeta: flow_terms(x) -> (tr H term, lambda_max term) (module docstring).

    gram: `GramOperator` at zeta; eigen: the `GramPreconditioner` at zeta, truncated to the normal space (its
    `rank`, e.g. `.truncated(rank_tol)`); gradients: the tangent gradients of tr H
    and lambda_max at zeta, (D,) each (set by the reader when computed here). `cost` holds the last call's ranks and
    seconds.
    """

    def __init__(self, gram: GramOperator, eigen: GramPreconditioner, gradients: tuple[Tensor, ...] = (), *,
                 flow_rtol: float = 1e-10):
        if not 0 < flow_rtol < 1:
            raise ValueError(f"need 0 < flow_rtol < 1, got {flow_rtol}")
        self.gram, self.gradients, self.flow_rtol = gram, gradients, flow_rtol
        self.kappa, self.basis = eigen.values[:eigen.rank], eigen.vectors[:, :eigen.rank]   # (r,), (N m, r) views
        self.cost, self._last = {}, None

    def coordinates(self, v: Tensor) -> Tensor:
        """a (r,): v's coordinates along H's eigenvectors v_i at zeta (one JVP; the last v's are kept, as a reading
        asks for its offset's twice, for the flow term and the reflected reading)."""
        if self._last is None or self._last[0] is not v:
            self._last = (v, (self.basis.T @ self.gram.times(v)) / self.kappa.sqrt())
        return self._last[1]

    def along(self, y: Tensor) -> Tensor:
        """sum_i y_i v_i (D,) for coefficients y (r,) (one VJP)."""
        return self.gram.transpose_times(self.basis @ (y / self.kappa.sqrt()))

    def normal_part(self, v: Tensor) -> Tensor:
        """U U^T v (D,), the part of v (D,) normal to Gamma at zeta."""
        return self.along(self.coordinates(v))

    def flow_terms(self, offset: Tensor) -> tuple[float, ...]:
        """1/2 a^T (dH_s / (lambda_i + lambda_j)) a, a = U^T offset, for s = tr H and lambda_max."""
        start, g = time.perf_counter(), self.gram
        a = self.coordinates(offset)
        if not a.abs().max() > 0:
            self.cost = dict(ranks=0, seconds=time.perf_counter() - start)
            return (0.0,) * len(self.gradients)
        ys, sigma2 = lyapunov_factors(a, self.kappa, rtol=self.flow_rtol)
        pulled = torch.zeros_like(g.theta)             # sum_k sigma2_k DJ[w_k]^T lift(Jt w_k)
        for y, weight in zip(ys.T, sigma2):
            pulled += weight * g.derivative_transpose_times(self.along(y), self.basis @ (self.kappa.sqrt() * y))
        self.cost = dict(ranks=len(sigma2), seconds=time.perf_counter() - start)
        return tuple(float(direction @ pulled) for direction in self.gradients)

    def reflected_terms(self, offset: Tensor) -> tuple[float, ...]:
        """s(Pi(z - offset)) - s(z) to second order, -2 g_s . DJt[n]^T c with n = U U^T offset = Jt^T c, for s =
        tr H and lambda_max (module docstring): a JVP, a VJP and a reverse-over-forward pass."""
        a = self.coordinates(offset)
        c = self.basis @ (a / self.kappa.sqrt())                  # Jt^T c = along(a) = n
        pulled = self.gram.derivative_transpose_times(self.along(a), c)
        return tuple(-2 * float(direction @ pulled) for direction in self.gradients)


def tangent_gradients(gram: GramOperator, correction: FlowCorrection, *, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Tangent gradients (D,) of tr H and lambda_max at zeta, matrix-free (as `sde.label_noise_mf`): grad ||Jt||_F^2 / N
    and (2/N) grad <Jt u, Jt0 u> (u = v_1, the top Hessian eigenvector, from the eigendecomposition), minus their
    normal parts."""
    obj, zeta, metric = gram.obj, gram.theta, gram.metric
    frob_grad = jacobian_frobenius_pass(obj, zeta, chunk_size, reduce=metric.reduce_chunk)[0]
    top = correction.along(torch.eye(len(correction.kappa), 1, dtype=zeta.dtype, device=zeta.device)[:, 0])
    raw = (frob_grad / gram.num_samples, lambda_max_pairing_grad(obj, zeta, top, metric))
    return tuple(v - correction.normal_part(v) for v in raw)


def with_eigendecomposition(point, *, rank_tol: float = 1e-12, chunk_size: int = 64, memory_limit: int | None = None):
    """The `Point` with the Gram eigendecomposition at zeta as its preconditioner, truncated to the eigenvalues above
    rank_tol x the largest (the normal space): the point's own if it has one (a dense point's), else built by
    Jacobian row blocks (`GramPreconditioner.at`, `memory_limit` bytes, default the machine's RAM, checked first).
    What `MatrixFreeReader` reads on; attach it once to share it between readers (as `compare` does)."""
    eigen = point.preconditioner if isinstance(point.preconditioner, GramPreconditioner) else \
        GramPreconditioner.at(point.objective, point.noise, point.zeta, chunk_size=chunk_size,
                              memory_limit=memory_limit)
    return dataclasses.replace(point, preconditioner=eigen.truncated(rank_tol))


class MatrixFreeReader:
    """`read_at_phi`'s pieces at a `Point` of either method, with no (N m, D) array (module docstring).

    project(theta) -> (z, distance), sharpness(z) -> (tr H, lambda_max), correction.flow_terms(x); reading(theta,
    seed) -> PhiReading, with warm starts per seed: the projection's first CG from the seed's previous checkpoint
    (Pi(z - x)'s from minus Pi(theta)'s: the residual there is -r(theta) + O(|x|^2)) and the Lanczos of lambda_max
    from the previous top vector. Reads on `with_eigendecomposition(point)` (the point's own eigendecomposition
    or one built here, truncated to rank_tol); a dense point's gradients are reused, a "cg" point's computed here.
    `cost` lists the projection CG iterations and Lanczos products per call (two a reading, one with
    `tolerances.reflected` "formula"), the flow ranks, seconds and `pieces` per reading (seconds in the projections,
    tr H, lambda_max, and the terms at zeta: the flow term and, by formula, the reflected reading),
    and `build_seconds` the eigendecomposition. `tolerances`: `ReadingTolerances` (flow term, first CG step);
    `project_options` go to `project`.

    pass_dtype (e.g. torch.float32; default the point's): the dtype of the Jacobian passes that dominate a reading,
    the projection's CG products (and a copy of the eigendecomposition preconditioning them), the flow ranks and
    the Lanczos products (5-8x faster CPU convolutions than float64). What sets the reading stays in the point's
    dtype: the residuals and distance to Gamma and each Gauss-Newton step (so the projection ends on Gamma to `tol`
    as before), tr H (per-sample Jacobians), and lambda_max as the Rayleigh quotient of the Lanczos vector (error
    ~ eig_tol^2 lambda^2 / gap). eig_tol: the Lanczos residual, default 1e-10 at the point's dtype, 1e-6 in a lower
    one (its rounding floor is ~1e-7).
    """

    def __init__(self, point, *, tol: float = 1e-10, cg_rtol: float = 1e-4, cg_max_iter: int = 5000,
                 eig_tol: float | None = None, chunk_size: int = 64, memory_limit: int | None = None,
                 rank_tol: float = 1e-12, pass_dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None, tolerances: ReadingTolerances = ReadingTolerances(),
                 **project_options):
        start = time.perf_counter()
        point = with_eigendecomposition(point, rank_tol=rank_tol, chunk_size=chunk_size, memory_limit=memory_limit)
        self.build_seconds = time.perf_counter() - start
        obj, zeta, self.preconditioner = point.objective, point.zeta, point.preconditioner
        self.point, self.tol, self.cg_rtol, self.cg_max_iter = point, tol, cg_rtol, cg_max_iter
        self.passes = obj if pass_dtype is None else obj.to(pass_dtype)
        self.solver = self.preconditioner.to(self.passes.dtype)        # the projections' CG preconditioner
        self.eig_tol = eig_tol if eig_tol is not None else 1e-10 if self.passes is obj else 1e-6
        self.chunk_size, self.tolerances, self.project_options = chunk_size, tolerances, project_options
        self.metric = point.noise.metric(point.targets.to(zeta.dtype))
        gram = GramOperator(obj, zeta, self.metric, passes=self.passes)
        self.correction = FlowCorrection(gram, self.preconditioner, flow_rtol=tolerances.flow_rtol)
        gradients = point.gradients
        self.correction.gradients = (gradients.trace, gradients.lambda_max) if gradients is not None else \
            tangent_gradients(gram, self.correction, chunk_size=chunk_size)
        self.seed, self.top, self.starts, self.coefficients, self.generator = None, {}, {}, None, generator
        self.cost = dict(projection_cg=[], flow_ranks=[], eigen_matvecs=[], seconds=[], pieces=[])
        self._pieces = dict.fromkeys(PIECES, 0.0)            # seconds so far in the reading under way

    def project(self, theta: Tensor, x0: Tensor | None = None) -> tuple[Tensor, float]:
        """(Pi(theta) on Gamma, its distance), the first CG from x0 (N, m); ProjectionNotConverged if a CG solve or
        the projection fails. The first step's CG solution is kept in `coefficients`."""
        pt, start = self.point, time.perf_counter()
        try:
            z, report = project(pt.objective, pt.noise, theta, tol=self.tol, method="cg",
                                preconditioner=self.solver, cg_rtol=self.cg_rtol, x0=x0,
                                cg_max_iter=self.cg_max_iter, refresh_after=None, raise_on_failure=False,
                                passes=self.passes, first_cg_rtol=self.tolerances.first_cg_rtol,
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
        self._pieces["projection"] += time.perf_counter() - start
        return z, report.distance

    def trace(self, z: Tensor, passes=None) -> float:
        """tr H = ||Jt||_F^2 / N at z (D,) on Gamma from per-sample Jacobian chunks, in the dtype of `passes`
        (an `Objective`; default the point's)."""
        obj = self.point.objective if passes is None else passes
        blocks = per_sample_gram_blocks(obj, z.detach().to(obj.params.dtype), chunk_size=self.chunk_size)
        return float(self.metric.reduce_blocks(blocks.to(self.point.zeta.dtype)).diagonal(dim1=-2, dim2=-1).sum()) / \
            obj.num_samples

    def sharpness(self, z: Tensor) -> tuple[float, float]:
        """(tr H, lambda_max) at z on Gamma (module docstring); the top vector is kept for this seed."""
        obj, metric, start = self.point.objective, self.metric, time.perf_counter()
        trace = self.trace(z)
        middle = time.perf_counter()
        self._pieces["trace"] += middle - start
        eig = top_eigenpairs(GramOperator(obj, z, metric, passes=self.passes), 1, tol=self.eig_tol,
                             max_matvecs=2000, v0=self.top.get(self.seed), generator=self.generator)
        if not eig.converged:
            raise RuntimeError(f"lambda_max did not reach eig_tol {self.eig_tol:.1e} in {eig.matvecs} Gram products")
        top = self.top[self.seed] = eig.vectors[:, 0]
        self.cost["eigen_matvecs"].append(eig.matvecs)
        top_value = float(eig.values[0]) if self.passes is obj else \
            float(top @ GramOperator(obj, z, metric).hvp(top) / (top @ top))
        self._pieces["lambda_max"] += time.perf_counter() - middle
        return trace, top_value

    def reading(self, theta: Tensor, seed: int = 0) -> PhiReading:
        """`read_at_phi` at theta (D,) with this reader's pieces; `seed` keys the warm starts."""
        start = time.perf_counter()
        self.seed, self._pieces = seed, dict.fromkeys(PIECES, 0.0)
        firsts = []

        def warm_project(point: Tensor) -> tuple[Tensor, float]:
            """Pi(theta) from this seed's last checkpoint's first CG solution, Pi(z - x) from minus theta's."""
            x0 = self.starts.get(seed) if not firsts else (None if firsts[0] is None else -firsts[0])
            out = self.project(point, x0)
            firsts.append(self.coefficients)
            return out
        def reflected(x: Tensor) -> tuple[float, ...]:
            begin = time.perf_counter()
            terms = self.correction.reflected_terms(x)
            self._pieces["flow"] += time.perf_counter() - begin
            return terms
        reading = read_at_phi(theta, self.correction, warm_project, self.sharpness,
                              reflected if self.tolerances.reflected == "formula" else None)
        self.starts[seed] = firsts[0]
        self.cost["flow_ranks"].append(self.correction.cost["ranks"])
        self.cost["seconds"].append(time.perf_counter() - start)
        self.cost["pieces"].append(dict(self._pieces, flow=self._pieces["flow"] + self.correction.cost["seconds"]))
        return reading
