"""Functions of a symmetric operator by Lanczos: f(A) v, and stochastic traces tr(f(A) B).

`A` and `B` are symmetric linear operators in the sense of `dynamics.lanczos`: objects with
`.hvp(v)` for v of shape (D,), `.dim` (D), `.dtype` and `.device` (a `dynamics.Objective`, a
`MatrixOperator`, or any small class such as the Gram operators of `sde.label_noise_mf`).

f(A) v (`apply_function`). m steps of Lanczos from q_1 = v / ||v|| with full
reorthogonalization (twice, classical Gram-Schmidt) give an orthonormal Krylov basis Q_m (D, m)
and the tridiagonal T_m = Q_m^T A Q_m; then

    f(A) v ~= ||v|| Q_m f(T_m) e_1,          f(T_m) = Y diag(f(theta)) Y^T  (float64 eigh)

(Saad 1992; Golub & Meurant, "Matrices, Moments and Quadrature", 2010). The approximation is
exact for polynomials of degree < m, so for an entire f (exp, psi) the error falls faster than
geometrically once m exceeds about sqrt(width of the spectrum x scale of f). Stopping rule: the
Krylov coefficients c_m = ||v|| f(T_m) e_1 are recomputed after every step and the iteration
stops when ||c_m - c_{m'}|| <= tol ||c_m|| (the change since the last check m' = m - 1, or
m - 4 beyond 32 steps where the O(m^3) small eigenproblem is solved only every 4th step: a
standard, conservative a-posteriori estimate of the error of the previous iterate), or when
the Krylov space is invariant (then the result is exact). Memory: D x (steps) for the basis. `f` may return several functions at once ((m,) -> (m, p)): one
Krylov basis serves all of them (e.g. psi(2 beta x) for several beta).

tr(f(A) B) (`trace_function_product`). For Rademacher (or Gaussian) probes z with
E[z z^T] = I, E[z^T f(A) B z] = tr(f(A) B), and each sample costs one Lanczos run and one
product with B. Two variance reductions, both leaving the estimator unbiased:
- deflation: given k eigenpairs (lambda_i, v_i) of A, V = [v_i], P = I - V V^T,
      tr(f(A) B) = sum_i f(lambda_i) v_i^T B v_i + tr(f(P A P) P B P),
  the first part exact (k products with B), the second estimated with probes P z and Lanczos
  run orthogonally to V. The dominant directions of A leave the stochastic part (Hutch++ in
  spirit; Meyer, Musco, Musco & Woodruff, SOSA 2021).
- control variate: if tr B is known, x = z^T P B P z has the known mean tr B - sum_i v_i^T B v_i,
  and the estimate is the least-squares line of the samples y = (f(PAP) Pz)^T (B P z) against x
  read at that mean. It removes the part of f(A) that acts like a multiple of the identity
  (psi(2 beta x) -> 1 for large beta). Its standard error is the leave-one-out jackknife of the
  whole estimator (slope refitted n times): the textbook regression formula assumes equal
  residual variances and was seen to understate the error ~1.5x on a real network, where
  quadratic-form samples are heavy-tailed. Without a control variate the standard error is the
  sample std over sqrt(n) (the jackknife of a mean is exactly that).
Lanczos truncation adds a bias of relative size ~tol, far below the stochastic error.

Every random draw comes from the explicit `generator`. Dtype and device come from A.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from dynamics.lanczos import check_operator, random_vector

__all__ = ["FunctionApplication", "apply_function", "SpectralOperator", "FunctionTraceEstimate",
           "trace_function_product"]

MatrixFunction = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FunctionApplication:
    """f(A) v: `value` (D,) or (D, p) in A's dtype, after `steps` products with A.

    `converged`: the stopping rule was met (or the Krylov space became invariant, `exact`);
    `error_estimate`: relative change of the Krylov coefficients since the previous check
    (the previous step up to 32 steps, then every 4th step; 0 if exact).
    """
    value: Tensor
    steps: int
    converged: bool
    error_estimate: float
    exact: bool = False


class SpectralOperator:
    """A symmetric operator known by its eigendecomposition, A = V diag(values) V^T with V (D, r) orthonormal and
    A = 0 on V's orthogonal complement (r = D: all of it), e.g. the Gram eigendecomposition a matrix-free point
    keeps as its preconditioner. Operator interface of `dynamics.lanczos`, plus `function_times`: f(A) v exactly,
    which `apply_function` (and so `trace_function_product`) uses instead of Lanczos."""

    def __init__(self, values: Tensor, vectors: Tensor):
        if vectors.dim() != 2 or values.shape != (vectors.shape[1],) or vectors.shape[1] > vectors.shape[0]:
            raise ValueError(f"values (r,) and vectors (D, r) with r <= D expected, got {tuple(values.shape)} and "
                             f"{tuple(vectors.shape)}")
        self.values, self.vectors = values.to(vectors.dtype), vectors
        self.dim, self.dtype, self.device = vectors.shape[0], vectors.dtype, vectors.device
        self.calls = 0

    def hvp(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.vectors @ (self.values * (self.vectors.T @ v.to(self.dtype)))

    def function_times(self, v: Tensor, f: MatrixFunction) -> Tensor:
        """f(A) v, (D, p) for f: (m,) -> (m, p): V f(values) V^T v + f(0) (v - V V^T v)."""
        fv = _evaluate(f, self.values.to(torch.float64).cpu()).to(self.device, self.dtype)         # (r, p)
        coefficients = self.vectors.T @ v.to(self.dtype)
        rest = _evaluate(f, torch.zeros(1, dtype=torch.float64))[0].to(self.device, self.dtype)    # (p,)
        return self.vectors @ (fv * coefficients[:, None]) + (v - self.vectors @ coefficients)[:, None] * rest


def _evaluate(f: MatrixFunction, theta: Tensor) -> Tensor:
    """f on float64 eigenvalues (m,), as a float64 (m, p) matrix; ValueError on a bad shape."""
    out = f(theta)
    if not isinstance(out, Tensor):
        raise ValueError(f"f must return a tensor, got {type(out).__name__}")
    out = out.to(torch.float64)
    if out.dim() == 1:
        out = out[:, None]
    if out.dim() != 2 or out.shape[0] != theta.shape[0]:
        raise ValueError(f"f must map eigenvalues (m,) to (m,) or (m, p), got {tuple(out.shape)} for m = {theta.shape[0]}")
    if not torch.isfinite(out).all():
        raise ValueError("f returned non-finite values on the Ritz values")
    return out


def _orthogonalize(w: Tensor, basis: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor]:
    """w minus its components on basis (D, j) and on `extra` (D, k), twice; returns (w, basis coeffs)."""
    h = w.new_zeros(basis.shape[1])
    for _ in range(2):
        if extra is not None:
            w = w - extra @ (extra.T @ w)
        if basis.shape[1]:
            c = basis.T @ w
            w = w - basis @ c
            h = h + c
    return w, h


def _check_orthogonal_to(A, orthogonal_to: Tensor | None) -> Tensor | None:
    if orthogonal_to is None:
        return None
    if orthogonal_to.dim() != 2 or orthogonal_to.shape[0] != A.dim:
        raise ValueError(f"orthogonal_to must have shape ({A.dim}, k), got {tuple(orthogonal_to.shape)}")
    return orthogonal_to.to(dtype=A.dtype, device=A.device) if orthogonal_to.shape[1] else None


def apply_function(A, v: Tensor, f: MatrixFunction, *, tol: float = 1e-10, max_steps: int = 300,
                   orthogonal_to: Tensor | None = None) -> FunctionApplication:
    """f(A) v by Lanczos with full reorthogonalization (module docstring); exactly, with 0 steps, when A knows its
    spectrum (`.function_times`, a `SpectralOperator`).

    Args:
        A: symmetric operator (`.hvp`, `.dim`, `.dtype`, `.device`).
        v: (D,) start vector.
        f: maps float64 eigenvalues (m,) to (m,) or (m, p) (p functions at once), e.g.
            `lambda x: torch.exp(-x)`. It is only evaluated at Ritz values of A.
        tol: stop when the last step changed the Krylov coefficients by <= tol relative.
        max_steps: at most this many products with A (capped at D); `converged=False` if reached.
        orthogonal_to: optional (D, k) orthonormal columns; v's components on them are removed
            and every Lanczos vector is kept orthogonal to them, i.e. the result is
            f(P A P) P v with P = I - W W^T (deflation).
    Returns:
        FunctionApplication with value (D,) if f returns (m,), else (D, p).
    """
    check_operator(A)
    if v.shape != (A.dim,):
        raise ValueError(f"v must have shape ({A.dim},), got {tuple(v.shape)}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    extra = _check_orthogonal_to(A, orthogonal_to)
    probe_value = f(torch.zeros(1, dtype=torch.float64))
    single = isinstance(probe_value, Tensor) and probe_value.dim() == 1
    p = _evaluate(f, torch.zeros(1, dtype=torch.float64)).shape[1]
    v = v.detach().to(dtype=A.dtype, device=A.device)
    if extra is not None:
        v, _ = _orthogonalize(v, v.new_zeros(A.dim, 0), extra)
    norm = float(torch.linalg.vector_norm(v))
    if not math.isfinite(norm):
        raise ValueError("the start vector is not finite")
    if norm == 0.0:
        zero = v.new_zeros(A.dim) if single else v.new_zeros(A.dim, p)
        return FunctionApplication(zero, 0, True, 0.0, exact=True)
    if hasattr(A, "function_times"):            # A knows its spectrum (`SpectralOperator`): no Krylov space
        value = A.function_times(v, f)
        if extra is not None:                   # exact when `orthogonal_to` spans eigenvectors of A (deflation)
            value = value - extra @ (extra.T @ value)
        return FunctionApplication(value[:, 0] if single else value, 0, True, 0.0, exact=True)

    steps_cap = min(max_steps, A.dim)
    basis = torch.empty(A.dim, min(steps_cap, 32), dtype=A.dtype, device=A.device)   # grows by doubling
    basis[:, 0] = v / norm
    T = torch.zeros(steps_cap, steps_cap, dtype=torch.float64)
    eps = torch.finfo(A.dtype).eps
    scale, previous, error = 0.0, None, math.inf
    converged = exact = False
    m = 0
    for j in range(steps_cap):
        w = A.hvp(basis[:, j]).to(A.dtype)
        w, h = _orthogonalize(w, basis[:, :j + 1], extra)
        T[j, j] = float(h[j])
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(float(h[j])), beta)
        m = j + 1
        invariant = beta <= 1e3 * eps * scale or m == A.dim
        # the small eigenproblem costs O(m^3): every step up to 32, then every 4th step
        if invariant or m <= 32 or m % 4 == 0 or m == steps_cap:
            theta, Y = torch.linalg.eigh(T[:m, :m])
            coeffs = norm * (Y @ (_evaluate(f, theta) * Y[0, :, None]))      # (m, p) = ||v|| f(T) e1
            if previous is not None:
                change = coeffs.clone()
                change[:previous.shape[0]] -= previous
                error = float(torch.linalg.matrix_norm(change) / max(float(torch.linalg.matrix_norm(coeffs)), 1e-300))
            previous = coeffs
            if invariant:   # invariant Krylov space: f(T) e1 is exact
                converged = exact = True
                error = 0.0
                break
            if error <= tol:
                converged = True
                break
        if m == steps_cap:
            break
        if m == basis.shape[1]:
            basis = torch.cat([basis, torch.empty(A.dim, min(m, steps_cap - m), dtype=A.dtype, device=A.device)], 1)
        basis[:, m] = w / beta
        T[m, m - 1] = T[m - 1, m] = beta
    value = basis[:, :m] @ previous.to(A.dtype)
    return FunctionApplication(value[:, 0] if single else value, m, converged, error, exact)


@dataclass(frozen=True)
class FunctionTraceEstimate:
    """Estimates of tr(f_p(A) B_q) for p functions and q operators B, with standard errors.

    value, stderr, exact_part: float64 (p, q); value = exact_part (deflated directions) + the
    stochastic remainder. samples: (n, p, q) the remainder samples (f(PAP) Pz)^T (B_q P z);
    control_samples: (n, q) the samples z^T P B_q P z (None without a control variate);
    control_coefficient: (p, q) the fitted slopes (zeros without). matvecs: products with A
    (Lanczos for all probes); b_matvecs: products with each B (deflation + probes);
    lanczos_steps: (n,) steps per probe; converged: every Lanczos run met its tolerance.
    `float(est)` / `est.item()` work when p = q = 1.
    """
    value: Tensor
    stderr: Tensor
    exact_part: Tensor
    samples: Tensor
    control_samples: Tensor | None
    control_coefficient: Tensor
    num_probes: int
    matvecs: int
    b_matvecs: int
    lanczos_steps: Tensor
    converged: bool

    def item(self) -> float:
        if self.value.numel() != 1:
            raise ValueError(f"item() needs a single estimate, have shape {tuple(self.value.shape)}")
        return float(self.value)

    __float__ = item


def _control_variate(samples: Tensor, controls: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """(estimate (p, q), slope (p, q)): least-squares line of samples (n, p, q) on controls (n, q) read at `known` (q,)."""
    mean = samples.mean(0)
    xc = controls - controls.mean(0)
    sxx = (xc ** 2).sum(0)
    safe = torch.where(sxx > 0, sxx, torch.ones_like(sxx))
    slope = torch.where(sxx > 0, ((samples - mean) * xc[:, None, :]).sum(0) / safe, torch.zeros_like(mean))
    return mean + slope * (known - controls.mean(0)), slope


def _as_operators(B, dim: int) -> list:
    ops = list(B) if isinstance(B, (list, tuple)) else [B]
    if not ops:
        raise ValueError("B must be an operator or a non-empty sequence of operators")
    for op in ops:
        check_operator(op)
        if op.dim != dim:
            raise ValueError(f"every B must have the dimension of A (D = {dim}), got {op.dim}")
    return ops


def trace_function_product(A, f: MatrixFunction, B, *, num_probes: int, generator: torch.Generator | None = None,
                           deflate: tuple[Tensor, Tensor] | None = None, b_trace=None, tol: float = 1e-10,
                           max_steps: int = 300, distribution: str = "rademacher") -> FunctionTraceEstimate:
    """Stochastic Lanczos estimate of tr(f(A) B) (module docstring), unbiased up to Lanczos tolerance.

    Args:
        A: symmetric operator; f: eigenvalues (m,) -> (m,) or (m, p), as in `apply_function`.
        B: a symmetric operator of the same dimension, or a sequence of q of them (one Lanczos
            run per probe serves all of them).
        num_probes: n >= 2 (>= 3 with a control variate) probes, drawn from `generator`
            (seed 0 if None) as `distribution` ("rademacher" or "gaussian") vectors.
        deflate: optional (values (k,), vectors (D, k)) eigenpairs of A with orthonormal
            vectors, typically `dynamics.top_eigenpairs(A, k)`; their part is computed exactly.
        b_trace: optional exact tr B (a float, or one per B); enables the control variate.
        tol, max_steps: per-probe Lanczos stopping rule (`apply_function`).
    """
    check_operator(A)
    ops = _as_operators(B, A.dim)
    q = len(ops)
    if b_trace is not None:
        b_trace = [float(t) for t in (b_trace if isinstance(b_trace, (list, tuple)) else [b_trace])]
        if len(b_trace) != q:
            raise ValueError(f"b_trace needs one value per B ({q}), got {len(b_trace)}")
    minimum = 2 if b_trace is None else 3
    if not isinstance(num_probes, int) or num_probes < minimum:
        raise ValueError(f"num_probes must be an integer >= {minimum} (for a standard error"
                         f"{' with a control variate' if b_trace is not None else ''}), got {num_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    p = _evaluate(f, torch.zeros(1, dtype=torch.float64)).shape[1]

    # exact part on the deflated eigenpairs
    exact_part = torch.zeros(p, q, dtype=torch.float64)
    vectors, b_matvecs = None, 0
    b_diag = torch.zeros(q, dtype=torch.float64)
    if deflate is not None:
        values, vectors = deflate
        if vectors.dim() != 2 or vectors.shape[0] != A.dim or values.shape != (vectors.shape[1],):
            raise ValueError(f"deflate must be (values (k,), vectors ({A.dim}, k)), got "
                             f"{tuple(values.shape)} and {tuple(vectors.shape)}")
        vectors = vectors.to(dtype=A.dtype, device=A.device)
        if vectors.shape[1]:
            fv = _evaluate(f, values.detach().to(torch.float64).cpu())            # (k, p)
            for b, op in enumerate(ops):
                quad = torch.tensor([float(vectors[:, i] @ op.hvp(vectors[:, i]).to(A.dtype))
                                     for i in range(vectors.shape[1])], dtype=torch.float64)   # (k,)
                b_diag[b] = quad.sum()
                exact_part[:, b] = fv.T @ quad
            b_matvecs += vectors.shape[1]
        else:
            vectors = None

    samples = torch.zeros(num_probes, p, q, dtype=torch.float64)
    controls = torch.zeros(num_probes, q, dtype=torch.float64)
    steps = torch.zeros(num_probes, dtype=torch.int64)
    matvecs, converged = 0, True
    for i in range(num_probes):
        z = random_vector(A, gen, distribution)
        if vectors is not None:
            z = z - vectors @ (vectors.T @ z)
            z = z - vectors @ (vectors.T @ z)
        fz = apply_function(A, z, f, tol=tol, max_steps=max_steps, orthogonal_to=vectors)
        value = fz.value.reshape(A.dim, p)
        matvecs += fz.steps
        steps[i] = fz.steps
        converged = converged and fz.converged
        for b, op in enumerate(ops):
            bz = op.hvp(z).to(A.dtype)
            samples[i, :, b] = (value.T @ bz).to(torch.float64).cpu()
            controls[i, b] = float(z @ bz)
        b_matvecs += 1

    n = num_probes
    mean = samples.mean(0)                                                    # (p, q)
    slope = torch.zeros(p, q, dtype=torch.float64)
    if b_trace is None:
        stderr = samples.std(0, unbiased=True) / math.sqrt(n)
        remainder = mean
        control_samples = None
    else:
        known = torch.tensor(b_trace, dtype=torch.float64) - b_diag            # E[z^T P B P z], (q,)
        remainder, slope = _control_variate(samples, controls, known)
        # leave-one-out jackknife of the whole estimator (slope refitted each time): robust to
        # the heavy-tailed, heteroscedastic samples of quadratic forms
        keep = ~torch.eye(n, dtype=torch.bool)
        loo = torch.stack([_control_variate(samples[keep[i]], controls[keep[i]], known)[0] for i in range(n)])
        stderr = torch.sqrt((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0))
        control_samples = controls
    return FunctionTraceEstimate(value=exact_part + remainder, stderr=stderr, exact_part=exact_part,
                                 samples=samples, control_samples=control_samples, control_coefficient=slope,
                                 num_probes=n, matvecs=matvecs, b_matvecs=b_matvecs, lanczos_steps=steps,
                                 converged=converged)
