"""Extreme Hessian eigenpairs by thick-restart Lanczos with full reorthogonalization.

Everything here is matrix-free: `obj` is any symmetric linear operator exposing
`.hvp(v)` for v of shape (D,), `.dim` (D), `.dtype` and `.device` -- a `dynamics.Objective`,
or a `MatrixOperator` wrapping an explicit symmetric matrix (tests, `sde`'s matrix-free path).

Lanczos vectors are stored in the operator's dtype and reorthogonalized twice against the
whole basis at every step (classical Gram-Schmidt, "twice is enough"), so no spurious copies
of converged eigenvalues appear. The projected matrix (tridiagonal, with one arrow row after a
restart) is kept and diagonalized in float64. When the basis reaches `max_basis` vectors the
method restarts thickly (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric
eigenvalue problems"): it keeps the best Ritz vectors and the current residual direction, so
memory stays D x (max_basis + 1) while the Krylov information is not thrown away.

A Ritz pair (theta, u) is converged when ||H u - theta u|| <= tol * |theta|; the residual
norm is read from the Lanczos relation, ||H u - theta u|| = |beta_m y_m| (exact with full
reorthogonalization, up to rounding).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["EigenResult", "MatrixOperator", "top_eigenpairs", "power_iteration", "lanczos_tridiagonal"]


class SymmetricOperator(Protocol):
    dim: int
    dtype: torch.dtype
    device: torch.device

    def hvp(self, v: Tensor) -> Tensor: ...


class MatrixOperator:
    """An explicit symmetric (D, D) matrix seen through the operator interface of `Objective`.

    `.calls` counts the matrix-vector products done, so tests can check reported matvecs.
    Only the symmetric part (A + A^T) / 2 is used.
    """

    def __init__(self, matrix: Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(f"matrix must be square (D, D) with D >= 1, got {tuple(matrix.shape)}")
        self.matrix = (matrix + matrix.T) / 2
        self.dim = matrix.shape[0]
        self.dtype, self.device = matrix.dtype, matrix.device
        self.calls = 0

    def hvp(self, v: Tensor) -> Tensor:
        self.calls += 1 if v.dim() == 1 else v.shape[1]
        return self.matrix @ v.to(self.dtype)


class EigenResult(tuple):
    """`(values, vectors)` with extra attributes, so `values, vectors = top_eigenpairs(...)` works.

    values: (k,) in the operator's dtype, descending (by magnitude for which="LM").
    vectors: (D, k) orthonormal columns. Attributes: `matvecs` (operator applications used),
    `converged` (all k residuals <= tol |value|), `residuals` ((k,) float64, ||H u - value u||).
    """

    def __new__(cls, values: Tensor, vectors: Tensor, *, matvecs: int, converged: bool,
                residuals: Tensor):
        self = super().__new__(cls, (values, vectors))
        self.matvecs, self.converged, self.residuals = matvecs, converged, residuals
        return self

    @property
    def values(self) -> Tensor:
        return self[0]

    @property
    def vectors(self) -> Tensor:
        return self[1]

    def __repr__(self) -> str:
        return (f"EigenResult(values={self[0].tolist()}, matvecs={self.matvecs}, "
                f"converged={self.converged})")


def check_operator(obj) -> None:
    """Raise ValueError unless obj looks like a symmetric operator (hvp, dim, dtype, device)."""
    missing = [a for a in ("hvp", "dim", "dtype", "device") if not hasattr(obj, a)]
    if missing:
        raise ValueError(f"{type(obj).__name__} is not an operator: it lacks {', '.join(missing)} "
                         "(pass a dynamics.Objective or a MatrixOperator)")


def random_vector(obj, generator: torch.Generator | None, distribution: str = "gaussian") -> Tensor:
    """One random (D,) vector in obj's dtype/device, drawn from `generator` (seed 0 if None)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if distribution == "gaussian":
        v = torch.randn(obj.dim, generator=gen, dtype=obj.dtype, device=gen.device)
    elif distribution == "rademacher":
        v = torch.randint(0, 2, (obj.dim,), generator=gen, device=gen.device).to(obj.dtype) * 2 - 1
    else:
        raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
    return v.to(obj.device)


def orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """w minus its projection on the orthonormal columns of basis, done twice; returns (w, coeffs)."""
    if basis.shape[1] == 0:
        return w, w.new_zeros(0)
    h = basis.T @ w
    w = w - basis @ h
    h2 = basis.T @ w
    return w - basis @ h2, h + h2


def _start_vector(obj, generator, v0) -> Tensor:
    if v0 is None:
        v = random_vector(obj, generator)
    else:
        if v0.shape != (obj.dim,):
            raise ValueError(f"v0 must have shape ({obj.dim},), got {tuple(v0.shape)}")
        v = v0.detach().to(dtype=obj.dtype, device=obj.device)
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the start vector is zero or not finite")
    return v / norm


def lanczos_tridiagonal(obj, v0: Tensor, steps: int) -> tuple[Tensor, Tensor, int]:
    """Plain Lanczos from v0 with full reorthogonalization, for up to `steps` matvecs.

    Returns (alpha (m,), beta (m - 1,), m) in float64 with m <= steps: the tridiagonal
    T = Q^T H Q of the Krylov basis. Stops early (m < steps) when the Krylov space becomes
    invariant (beta ~ 0); the Gauss quadrature of stochastic Lanczos is then exact.
    """
    check_operator(obj)
    steps = min(int(steps), obj.dim)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    q = _start_vector(obj, None, v0)
    basis = torch.empty(obj.dim, steps, dtype=obj.dtype, device=obj.device)
    basis[:, 0] = q
    alphas, betas = [], []
    scale = 0.0
    for j in range(steps):
        w = obj.hvp(basis[:, j]).to(obj.dtype)
        w, h = orthogonalize(w, basis[:, :j + 1])
        alphas.append(float(h[j]))
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alphas[-1]), beta)
        if j + 1 == steps or beta <= 1e3 * torch.finfo(obj.dtype).eps * scale:
            break
        betas.append(beta)
        basis[:, j + 1] = w / beta
    m = len(alphas)
    return (torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas[:m - 1], dtype=torch.float64), m)


def _wanted_order(theta: Tensor, which: str) -> Tensor:
    key = theta.abs() if which == "LM" else theta
    return torch.argsort(key, descending=True)


def _validate(obj, k: int, which: str, tol: float, max_matvecs: int) -> None:
    check_operator(obj)
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' (largest algebraic) or 'LM' (largest magnitude), got {which!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > obj.dim:
        raise ValueError(f"k = {k} eigenpairs requested but the operator has dimension D = {obj.dim}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_matvecs < k:
        raise ValueError(f"max_matvecs = {max_matvecs} is below k = {k}")


def top_eigenpairs(obj, k: int = 1, *, which: str = "LA", tol: float = 1e-6, max_matvecs: int = 1000,
                   max_basis: int | None = None, generator: torch.Generator | None = None,
                   v0: Tensor | None = None, callback=None) -> EigenResult:
    """The k algebraically largest ("LA") or largest-magnitude ("LM") eigenpairs of obj's Hessian.

    Args:
        obj: symmetric operator (module docstring), e.g. `dynamics.Objective`.
        k: number of eigenpairs, 1 <= k <= D.
        which: "LA" (values descending) or "LM" (ordered by |value|, descending).
        tol: relative residual target ||H u - theta u|| <= tol |theta| for each of the k pairs.
        max_matvecs: budget of operator applications; if it runs out, the best Ritz pairs are
            returned with `converged=False`.
        max_basis: Lanczos vectors kept before a thick restart (memory D x (max_basis + 1));
            default min(D, max(2k + 20, 40)).
        generator: draws the random start vector (seed 0 if None); v0: explicit start vector.
        callback: optional `callback(matvecs, values (k,), residuals (k,))`, called after every
            Rayleigh-Ritz solve (convergence histories, benchmarks).

    Returns:
        EigenResult: (values (k,), vectors (D, k)) with `.matvecs`, `.converged`, `.residuals`.
    """
    _validate(obj, k, which, tol, max_matvecs)
    D = obj.dim
    m_max = min(D, max_basis if max_basis is not None else max(2 * k + 20, 40))
    if m_max < min(D, k + 2):
        raise ValueError(f"max_basis = {max_basis} must be at least k + 2 = {k + 2}")
    basis = torch.empty(D, m_max + 1, dtype=obj.dtype, device=obj.device)
    basis[:, 0] = _start_vector(obj, generator, v0)
    T = torch.zeros(m_max + 1, m_max + 1, dtype=torch.float64)
    eps = torch.finfo(obj.dtype).eps
    j, matvecs, scale = 0, 0, 0.0

    def ritz(j):
        theta, Y = torch.linalg.eigh(T[:j, :j])
        order = _wanted_order(theta, which)
        theta, Y = theta[order], Y[:, order]
        resid = (T[j, j - 1] * Y[j - 1, :]).abs()
        return theta, Y, resid

    def done(theta, resid):
        floor = eps * max(scale, 1e-300)
        return bool((resid[:k] <= tol * torch.clamp(theta[:k].abs(), min=floor)).all())

    while True:
        converged = False
        while j < m_max:
            w = obj.hvp(basis[:, j]).to(obj.dtype)
            matvecs += 1
            w, h = orthogonalize(w, basis[:, :j + 1])
            T[j, j] = float(h[j])
            beta = float(torch.linalg.vector_norm(w))
            scale = max(scale, abs(float(h[j])), beta)
            if j + 1 == D:
                beta = 0.0  # the basis spans R^D: the Ritz pairs are exact
                basis[:, j + 1] = 0.0
            elif beta <= 1e3 * eps * scale:
                # Invariant Krylov space: continue with a fresh direction orthogonal to the basis.
                w, _ = orthogonalize(random_vector(obj, generator), basis[:, :j + 1])
                basis[:, j + 1] = w / torch.linalg.vector_norm(w)
                beta = 0.0
            else:
                basis[:, j + 1] = w / beta
            T[j + 1, j] = T[j, j + 1] = beta
            j += 1
            if j >= k:
                theta, Y, resid = ritz(j)
                if callback is not None:
                    callback(matvecs, theta[:k].clone(), resid[:k].clone())
                if done(theta, resid):
                    converged = True
                    break
            if matvecs >= max_matvecs or j == D:
                break
        theta, Y, resid = ritz(j)
        converged = converged or done(theta, resid) or j == D
        if converged or matvecs >= max_matvecs or j < k:
            break
        # Thick restart: keep the best `keep` Ritz vectors and the residual direction q_{j+1}.
        keep = min(j - 1, max(k + (m_max - k) // 2, k + 1))
        ritz_vectors = basis[:, :j] @ Y[:, :keep].to(obj.dtype)
        couplings = T[j, j - 1] * Y[j - 1, :keep]
        basis[:, :keep] = ritz_vectors
        basis[:, keep] = basis[:, j]
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[:keep])
        T[keep, :keep] = couplings
        T[:keep, keep] = couplings
        j = keep

    count = min(k, j)
    vectors = basis[:, :j] @ Y[:, :count].to(obj.dtype)
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=0, keepdim=True)
    return EigenResult(theta[:count].to(obj.dtype), vectors, matvecs=matvecs, converged=converged,
                       residuals=resid[:count].clone())


def power_iteration(obj, *, tol: float = 1e-6, max_matvecs: int = 1000,
                    generator: torch.Generator | None = None, v0: Tensor | None = None) -> EigenResult:
    """The classical baseline: v <- Hv / ||Hv||, Rayleigh quotient theta = v^T H v.

    Converges to the largest-MAGNITUDE eigenvalue at rate |lambda_2 / lambda_1| per matvec.
    Stops when ||H v - theta v|| <= tol |theta| (the residual is free: Hv is already computed).
    Returns an EigenResult with k = 1.
    """
    _validate(obj, 1, "LM", tol, max_matvecs)
    v = _start_vector(obj, generator, v0)
    converged, matvecs = False, 0
    for _ in range(max_matvecs):
        w = obj.hvp(v).to(obj.dtype)
        matvecs += 1
        theta = torch.dot(v, w)
        resid = torch.linalg.vector_norm(w - theta * v)
        if resid <= tol * theta.abs():
            converged = True
            break
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            break
        v = w / norm
    return EigenResult(theta.reshape(1), v.reshape(-1, 1), matvecs=matvecs, converged=converged,
                       residuals=resid.reshape(1).to(torch.float64))
