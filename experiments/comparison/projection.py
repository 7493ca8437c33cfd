"""ONE projection onto Gamma and ONE sharpness reading at a point of Gamma, for any label-noise model.

The objective's data holds the expected targets (N, C); the noise model gives the reduced residual r (N, m) and
the metric, so Jt = metric.reduce(J) (N m, D) and Hessian(L) = Jt^T Jt / N on Gamma. `project`: optional gradient
descent, then Gauss-Newton minimum-norm steps delta = -Jt^T (Jt Jt^T)^-1 r, halved when the full step raises the
noise model's distance, until it is <= tol. The Jacobian is fresh every step, or, if the noise model sets
`chord_contraction` f, kept (chord steps) while each step shrinks the distance below f times the last: the end
points differ at O(|offset|^3), and so would runs read at Phi (kept so today's rows reproduce). Gram systems:
"dense" (solve, or CG under a `GramPreconditioner` at a nearby point) or "cg" (`dynamics.jacobian.gram_solve_cg`
under a `GramPreconditionerMF`, no (N m, D) array).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from dataclasses import dataclass

import torch
from torch import Tensor

from dynamics.jacobian import (gram_matrix, gram_matrix_bytes, gram_solve_cg, gram_times_block,
                               jacobian_transpose_times, output_jacobian, per_sample_gram_blocks)
from dynamics.objective import Objective
from experiments.metrics import atomic_write

__all__ = ["GramPreconditioner", "GramPreconditionerMF", "physical_memory", "ProjectionReport", "gram_solve",
           "objective_targets", "outputs_and_targets",
           "reduced_jacobian", "project", "sharpness_at"]


def objective_targets(obj: Objective) -> Tensor:
    """The objective's expected targets (N, C), its batches concatenated."""
    return torch.cat([y for _, y in obj.data])


def outputs_and_targets(obj: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(network outputs (N, C) at theta, the objective's targets (N, C))."""
    return torch.cat([obj.forward(theta, x) for x, _ in obj.data]), objective_targets(obj)


def reduced_jacobian(obj: Objective, noise, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(outputs (N, C), Jt (N m, D)) with Jt_i = R_i Q^T J_i: Hessian(L) = Jt^T Jt / N on Gamma."""
    outputs, jac = output_jacobian(obj, theta.detach())
    metric = noise.metric(objective_targets(obj).to(jac.dtype))
    return outputs, metric.reduce(jac).reshape(-1, jac.shape[-1])


def physical_memory() -> int:
    """Bytes of RAM on this machine (the default memory limit of the Gram eigendecomposition)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fingerprint(obj: Objective, noise, theta: Tensor) -> str:
    """SHA-256 of what the Gram matrix at theta depends on: theta, the data and targets, noise and network."""
    digest = hashlib.sha256(f"{noise!r}|{obj.model!r}|{theta.dtype}|{obj.dim}".encode())
    for tensor in (theta, *(t for batch in obj.data for t in batch)):
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _load_eigendecomposition(path: str | os.PathLike, key: str) -> "GramPreconditioner | None":
    """The eigendecomposition cached at path if its fingerprint is key; None if there is no file or it belongs to
    another problem; ValueError naming an unreadable file."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if saved["fingerprint"] != key:
            return None
        return GramPreconditioner(values=saved["values"], vectors=saved["vectors"])
    except (RuntimeError, KeyError, TypeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"cannot read the cached Gram eigendecomposition {path} ({error}); delete it to rebuild it") \
            from error


def _eigh_descending(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of the symmetric gram (n, n), which is overwritten. eigh of -K lists
    K's eigenpairs in descending order, so no flipped copy of the eigenvectors is made. On CPU through LAPACK's
    MRRR driver (scipy `evr`, O(n) workspace): peak K + eigenvectors = 2 n^2 numbers, where torch's divide and
    conquer (`evd`) adds a 2 n^2 workspace (the 2,000-image bench peaked at 15.2 GB with it, n = 18,000)."""
    gram = gram.neg_()
    if gram.device.type != "cpu":
        values, vectors = torch.linalg.eigh(gram)
        return values.neg_(), vectors
    import scipy.linalg
    # gram.T is the same symmetric matrix in Fortran order, so LAPACK works in it without a copy
    values, vectors = scipy.linalg.eigh(gram.numpy().T, driver="evr", overwrite_a=True, check_finite=False)
    return torch.from_numpy(values).neg_(), torch.from_numpy(vectors)


@dataclass(frozen=True)
class GramPreconditioner:
    """Eigendecomposition Jt0 Jt0^T = V diag(values) V^T (N m, N m) at a reference point of Gamma: preconditions the
    Gauss-Newton systems near it (CG in a few iterations), gives the exact normal space and flow term there
    (`reading_mf.FlowCorrection`), and its top eigenvectors seed `sharpness_at`."""
    values: Tensor   # (N m,) descending, unnormalized (= N x Hessian eigenvalues), floored at 1e-13 x the largest
    vectors: Tensor  # (N m, N m)
    rank: int | None = None   # solve on the top `rank` eigenvectors only (`truncated`); None: all

    @staticmethod
    def check_memory(rows: int, outputs: int, dim: int, *, limit: int | None = None, chunk_size: int = 64,
                     itemsize: int = 8) -> int:
        """The least memory `at` needs for rows = N m equations of m outputs each and D = dim: the Gram matrix and
        its eigenvectors (2 rows^2 numbers, the in-place eigensolver's peak) and Jacobian chunks; ValueError naming
        the estimate if it exceeds `limit` bytes (default the machine's RAM). Call it before any long work."""
        limit = physical_memory() if limit is None else limit
        need = gram_matrix_bytes(rows // outputs, outputs, dim, chunk_size, chunk_size, itemsize) + itemsize * rows ** 2
        if need > limit:
            raise ValueError(f"the Gram eigendecomposition at N m = {rows} equations, D = {dim} needs about "
                             f"{need / 2 ** 30:.1f} GiB (Gram matrix and its eigenvectors, 2 (N m)^2 x {itemsize} B, "
                             f"and Jacobian chunks) > the memory limit {limit / 2 ** 30:.1f} GiB")
        return need

    @classmethod
    def at(cls, obj: Objective, noise, theta: Tensor, *, chunk_size: int = 64, memory_limit: int | None = None,
           cache: str | os.PathLike | None = None) -> "GramPreconditioner":
        """Build at theta from row blocks of per-sample Jacobians (`dynamics.jacobian.gram_matrix`): no (N m, D)
        array unless it fits beside the Gram matrix. The Gram matrix, its eigenvectors (2 (N m)^2 numbers, eigh's
        measured peak) and one Jacobian chunk must fit in `memory_limit` bytes (default: the machine's RAM), else
        ValueError naming the estimate before any work; the row block takes half of what is left.
        cache: a file keeping the eigendecomposition between processes (at N m = 18,000 it is 2.6 GB and saves the
        ~12 min the eigendecomposition takes on 2 cores); read when its fingerprint (theta, data, targets, noise,
        network) is this problem's, else built and written atomically. ValueError naming an unreadable file."""
        theta = theta.detach()
        if cache is not None:
            key = _fingerprint(obj, noise, theta)
            saved = _load_eigendecomposition(cache, key)
            if saved is not None:
                return saved
            built = cls.at(obj, noise, theta, chunk_size=chunk_size, memory_limit=memory_limit)
            atomic_write(cache, lambda f: torch.save({"fingerprint": key, "values": built.values,
                                                      "vectors": built.vectors}, f))
            return built
        targets = objective_targets(obj)
        metric = noise.metric(targets.to(theta.dtype))
        n, rows = len(targets), noise.equations(*targets.shape)
        m, item = rows // n, theta.element_size()
        limit = physical_memory() if memory_limit is None else memory_limit
        need = cls.check_memory(rows, m, obj.dim, limit=limit, chunk_size=chunk_size, itemsize=item)
        block = min(n, chunk_size + (limit - need) // 2 // (item * m * obj.dim))
        gram = gram_matrix(obj, theta, chunk_size=chunk_size, block_samples=block, reduce=metric.reduce_chunk)
        values, vectors = _eigh_descending(gram)
        return cls(values=values.clamp_min(values[0].abs() * 1e-13 + 1e-300), vectors=vectors)

    def truncated(self, rank_tol: float = 1e-12) -> "GramPreconditioner":
        """The pseudo-inverse over eigenvalues > rank_tol x the largest (the same tensors, no copy). Where Jt0 is
        rank-deficient on Gamma (one-hot targets and N > last-layer width + 1, RESULTS.md 2b) the full inverse
        amplifies that null cluster by 1e13 and CG stalls; the truncated one solves the Gauss-Newton system on
        Jt0's row space, and `residual_norm` makes CG stop on that part of the residual (the rest is O(|x|^2)
        at a distance |x| from Gamma and is removed by the next Gauss-Newton steps)."""
        return dataclasses.replace(self, rank=int((self.values > rank_tol * self.values[0]).sum()))

    def to(self, dtype: torch.dtype) -> "GramPreconditioner":
        """A copy in `dtype` (self if already): e.g. float32 for CG under float32 Gram products, whose applies then
        read half the memory (at N m = 18,000 the eigenvectors are 2.6 GB in float64, read twice per apply)."""
        if dtype == self.vectors.dtype:
            return self
        return dataclasses.replace(self, vectors=self.vectors.to(dtype), values=self.values.to(dtype))

    def solve(self, r: Tensor) -> Tensor:
        """(Jt0 Jt0^T)^-1 r (pseudo-inverse when truncated) for flat r (N m,), returned in r's dtype."""
        vectors, values = self.vectors[:, :self.rank], self.values[:self.rank]
        return (vectors @ ((vectors.T @ r.to(vectors.dtype)) / values)).to(r.dtype)

    def apply(self, r: Tensor) -> Tensor:
        """The same for r (N, m): the preconditioner interface of `dynamics.jacobian.gram_solve_cg`."""
        return self.solve(r.reshape(-1)).reshape(r.shape)

    def residual_norm(self, r: Tensor) -> Tensor:
        """|r| on the solved subspace (all of it unless truncated): the norm of `gram_solve_cg`'s stopping test."""
        if self.rank is None:
            return r.norm()
        return (self.vectors[:, :self.rank].T @ r.reshape(-1).to(self.vectors.dtype)).norm().to(r.dtype)


def gram_solve(jac: Tensor, r: Tensor, pre: GramPreconditioner | None, *, rtol: float = 1e-11,
               max_iter: int = 200) -> Tensor:
    """a (N m,) with (Jt Jt^T) a = r for jac = Jt (N m, D): dense solve, or CG preconditioned by `pre`.

    The preconditioner (built at a nearby point of Gamma) only speeds the solve: when CG has not reached rtol
    after max_iter iterations (an iterate far from where `pre` was built, e.g. an SGD iterate at a 500-image
    point) the system is solved densely instead, never left half-solved."""
    if pre is None:
        gram = jac @ jac.T
        return torch.linalg.solve(gram + 1e-14 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype), r)
    a, res = torch.zeros_like(r), r.clone()
    z = pre.solve(res)
    p, rz = z, res @ z
    for _ in range(max_iter):
        ap = jac @ (jac.T @ p)
        step = rz / (p @ ap)
        a, res = a + step * p, res - step * ap
        if res.norm() <= rtol * r.norm():
            return a
        z = pre.solve(res)
        rz_new = res @ z
        p, rz = z + (rz_new / rz) * p, rz_new
    return gram_solve(jac, r, None)


@dataclass(frozen=True)
class GramPreconditionerMF:
    """Matrix-free preconditioner M^-1 = S Q S of G = Jt Jt^T (N m, N m), Jt = metric.reduce(J).

    S: symmetric inverse square roots of the per-sample blocks Jt_i Jt_i^T (block-Jacobi, (N, m, m)). Q: randomized
    Nystrom deflation of A = S G S (Frangella, Tropp & Udell, SIMAX 2023, mu = 0): with A's top-l approximate
    eigenpairs (U, lambda), Q = lambda_l U diag(1/lambda) U^T + (I - U U^T). rank 0: block-Jacobi alone.
    """
    block_inv_sqrt: Tensor   # (N, C, C)
    vectors: Tensor          # (N C, l) orthonormal
    values: Tensor           # (l,) descending, positive

    @classmethod
    def at(cls, obj: Objective, noise, theta: Tensor, *, rank: int = 200, chunk_size: int = 64, block: int = 16,
           generator: torch.Generator | None = None, passes: Objective | None = None) -> "GramPreconditionerMF":
        """Build at theta: one per-sample-Jacobian pass and `rank` Gram products (`block` at a time), their
        Jacobian passes on `passes` (default obj; e.g. obj.to(torch.float32): a preconditioner needs no more), the rest in
        theta's dtype."""
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        theta, metric = theta.detach(), noise.metric(objective_targets(obj).to(theta.dtype))
        passes = obj if passes is None else passes
        low = theta.to(passes.dtype)
        blocks = metric.reduce_blocks(per_sample_gram_blocks(passes, low, chunk_size=chunk_size).to(theta.dtype))

        def gram(w: Tensor) -> Tensor:                  # (N, m, k) -> (N, m, k)
            lifted = metric.lift(w.permute(1, 2, 0)).permute(2, 0, 1).to(passes.dtype)
            product = gram_times_block(passes, low, lifted).to(theta.dtype)
            return metric.reduce(product.permute(1, 2, 0)).permute(2, 0, 1)
        values, vectors = torch.linalg.eigh(blocks)
        floor = values.amax(-1, keepdim=True) * 1e-12
        inv_sqrt = torch.where(values > floor, values.clamp_min(1e-300).rsqrt(), torch.zeros_like(values))
        s = (vectors * inv_sqrt.unsqueeze(-2)) @ vectors.transpose(-1, -2)
        n, c = blocks.shape[:2]
        if rank == 0:
            empty = torch.zeros(n * c, 0, dtype=theta.dtype, device=theta.device)
            return cls(block_inv_sqrt=s, vectors=empty, values=empty[0])
        if rank >= n * c:
            raise ValueError(f"rank must be below N C = {n * c}, got {rank}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        omega, _ = torch.linalg.qr(torch.randn(n * c, rank, generator=gen, dtype=theta.dtype).to(theta.device))
        scale = lambda m: (s @ m.reshape(-1, n, c).unsqueeze(-1)).squeeze(-1)   # noqa: E731 (k, N, m) -> same
        y = torch.cat([scale(gram(scale(omega[:, j:j + block].T.reshape(-1, n, c))))
                       .reshape(-1, n * c).T for j in range(0, rank, block)], dim=1)      # A omega, (N C, l)
        shift = torch.finfo(y.dtype).eps * y.norm()
        y = y + shift * omega
        chol = torch.linalg.cholesky(omega.T @ y, upper=True)
        u, sing, _ = torch.linalg.svd(torch.linalg.solve_triangular(chol, y, upper=True, left=False),
                                      full_matrices=False)
        lam = (sing ** 2 - shift).clamp_min(0)
        keep = lam > lam[0] * 1e-12
        return cls(block_inv_sqrt=s, vectors=u[:, keep], values=lam[keep])

    def apply(self, r: Tensor) -> Tensor:
        """M^-1 r for r (N, C)."""
        scale = lambda x: (self.block_inv_sqrt @ x.unsqueeze(-1)).squeeze(-1)   # noqa: E731
        z = scale(r).reshape(-1)
        if len(self.values):
            coef = self.vectors.T @ z
            z = z - self.vectors @ coef + self.vectors @ (coef * (self.values[-1] / self.values))
        return scale(z.reshape(r.shape))


@dataclass(frozen=True)
class ProjectionReport:
    """How `project` ended: distance to Gamma before / after, steps, |theta_end - theta_0| (`moved`), success,
    the CG iterations of each Gauss-Newton step and the first step's CG solution a (N, m) (method "cg")."""
    distance: float
    initial_distance: float
    gd_steps: int
    gauss_newton_steps: int
    moved: float
    converged: bool
    cg_iterations: tuple[int, ...] = ()
    coefficients: Tensor | None = None


def project(obj: Objective, noise, theta: Tensor | None = None, *, tol: float = 1e-10, method: str = "dense",
            gd_steps: int = 0, gd_lr: float | None = None, max_gauss_newton: int = 30, preconditioner=None,
            cg_rtol: float = 1e-4, cg_max_iter: int = 5000, preconditioner_rank: int = 200,
            refresh_after: int | None = 500, generator: torch.Generator | None = None,
            x0: Tensor | None = None, raise_on_failure: bool = True, passes: Objective | None = None,
            first_cg_rtol: float | None = None) -> tuple[Tensor, ProjectionReport]:
    """(theta, default the model's parameters, projected onto Gamma; `ProjectionReport`) (module docstring).

    "dense": `preconditioner` a `GramPreconditioner` at a nearby point of Gamma, or None (dense solves). "cg":
    inexact Newton, Gram systems solved to `cg_rtol` under a `GramPreconditionerMF` (None: built at the first step,
    rank min(preconditioner_rank, N m - 1), and again after a step of more than `refresh_after` CG iterations).
    x0: warm start (N, m) of the first step's CG ("cg"). passes ("cg"): the objective CG's Gram products (and the
    Nystrom preconditioner's build) run on, e.g. obj.to(torch.float32) (`dynamics.jacobian.gram_solve_cg`, 5-8x
    faster CPU convolutions); residuals, distances and each step J^T a stay in obj's dtype, so the steps are normal at their
    iterate and the end point is on Gamma to tol as before (a less exact solve only slows the Gauss-Newton
    contraction). first_cg_rtol ("cg"): the first Gauss-Newton step's CG tolerance (None: cg_rtol), a forcing term
    of inexact Newton (Eisenstat & Walker, SISC 1996): near Gamma that step's distance after it is set by its
    quadratic remainder, not by the CG residual, so a looser first solve costs the later steps nothing (N = 2,000:
    1e-2 instead of 1e-4 cuts a projection's CG iterations from 47 to 28, BENCHMARKS.md
    bench_reading_cost_tolerances).
    ValueError if the equations exceed D; RuntimeError naming steps and distance (raise_on_failure) if > tol."""
    theta0 = (obj.params if theta is None else theta).detach().clone()
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if gd_steps and (gd_lr is None or gd_lr <= 0):
        raise ValueError("gd_steps > 0 needs a positive gd_lr")
    if method not in ("dense", "cg"):
        raise ValueError(f"method must be 'dense' or 'cg', got {method!r}")
    if method == "cg" and not 0 < cg_rtol < 1:
        raise ValueError(f"cg_rtol must be in (0, 1), got {cg_rtol}")
    if first_cg_rtol is not None and not 0 < first_cg_rtol < 1:
        raise ValueError(f"first_cg_rtol must be in (0, 1), got {first_cg_rtol}")
    outputs, targets = outputs_and_targets(obj, theta0)
    metric = noise.metric(targets.to(theta0.dtype))
    equations = noise.equations(*outputs.shape)
    if equations > obj.dim:
        raise ValueError(f"{equations} equations on Gamma ({noise}) exceed D = {obj.dim} parameters: "
                         "Gamma is not a manifold of interpolating solutions here")
    distance = lambda t: noise.distance(outputs_and_targets(obj, t)[0], targets)   # noqa: E731
    theta, initial = theta0.clone(), noise.distance(outputs, targets)
    for _ in range(gd_steps):
        theta = theta - gd_lr * obj.grad(theta)
    steps, dist, iterations, jt, chord, first = 0, distance(theta), [], None, noise.chord_contraction, None
    while dist > tol and steps < max_gauss_newton:
        if method == "dense":
            if jt is None:
                out, jt = reduced_jacobian(obj, noise, theta)
            else:                       # a chord step: the Jacobian of an earlier step, the residual here
                out = outputs_and_targets(obj, theta)[0]
            step = jt.T @ gram_solve(jt, noise.residual(out, targets).reshape(-1), preconditioner)
        else:
            if preconditioner is None:
                preconditioner = GramPreconditionerMF.at(obj, noise, theta, rank=min(preconditioner_rank,
                                                                                     equations - 1),
                                                         generator=generator, passes=passes)
            r = noise.residual(outputs_and_targets(obj, theta)[0].detach(), targets)
            rtol = cg_rtol if steps or first_cg_rtol is None else first_cg_rtol
            a, its = gram_solve_cg(obj, theta, r, preconditioner, rtol=rtol, max_iter=cg_max_iter, metric=metric,
                                   x0=None if steps else x0, passes=passes)
            first = a if first is None else first
            iterations.append(its)
            if refresh_after is not None and its > refresh_after:
                preconditioner = None
            step = jacobian_transpose_times(obj, theta, metric.lift(a))
        candidate = theta - step
        new = distance(candidate)
        if new > dist:                  # damped step when the full step overshoots (far from Gamma)
            candidate = theta - 0.5 * step
            new = distance(candidate)
        if chord is None or new > chord * dist:
            jt = None                   # fresh Jacobian next step (always, or when the contraction is slow)
        theta, dist, steps = candidate, new, steps + 1
    report = ProjectionReport(distance=dist, initial_distance=initial, gd_steps=gd_steps, gauss_newton_steps=steps,
                              moved=float((theta - theta0).norm()), converged=dist <= tol,
                              cg_iterations=tuple(iterations), coefficients=first)
    if raise_on_failure and not report.converged:
        raise RuntimeError(f"projection onto Gamma failed: distance {dist:.3e} > tol {tol:.1e} ({noise}) after "
                           f"{steps} Gauss-Newton steps (start {initial:.3e}; CG iterations {iterations})")
    return theta, report


def sharpness_at(obj: Objective, noise, theta: Tensor, *, reference: Tensor | None = None) -> tuple[float, float]:
    """(tr H, lambda_max) at a point of Gamma from H = Jt^T Jt / N (exact there).

    tr H = ||Jt||_F^2 / N. lambda_max: dense eigvalsh of Jt Jt^T / N, or, given `reference` (N m, k) top Gram
    eigenvectors at a nearby point, Rayleigh-Ritz on span(V, G V, G^2 V) (~1e-10 relative near it).
    """
    _, jt = reduced_jacobian(obj, noise, theta)
    n = obj.num_samples
    trace = float(jt.pow(2).sum() / n)
    if reference is None:
        return trace, float(torch.linalg.eigvalsh(jt @ jt.T / n)[-1])
    g1 = jt @ (jt.T @ reference)
    g2 = jt @ (jt.T @ g1)
    q, _ = torch.linalg.qr(torch.cat([reference, g1, g2], dim=1))
    return trace, float(torch.linalg.eigvalsh(q.T @ (jt @ (jt.T @ q) / n))[-1])
