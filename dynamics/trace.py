"""Stochastic Hessian trace at a fixed matvec budget, each estimate with an honest standard error.

Three unbiased estimators of tr H, all matrix-free (one Hessian-vector product = one matvec):

- Hutchinson (1989): tr H = E[z^T H z] for probes with E[z z^T] = I (Rademacher or Gaussian);
  the estimate is the mean of `num_matvecs` samples, the standard error their sample standard
  deviation over sqrt(num_matvecs). Var(z^T H z) = 2 (||H||_F^2 - sum_i H_ii^2) for Rademacher z.

- Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): s = m // 3 matvecs on a sketch H S, an
  orthonormal basis Q of it, s more on the exact part tr(Q^T H Q), and the rest on Hutchinson
  for the deflated residual (I - QQ^T) H (I - QQ^T). The standard error is that of the
  residual samples, conditional on Q (honest because the probes are independent of Q).

- "krylov": Lanczos-deflated Hutchinson, in the spirit of Chen & Hallman ("Krylov-aware
  stochastic trace estimation", SIAM J. Matrix Anal. Appl. 2023): k = m // 2 Lanczos steps
  (full reorthogonalization) from one random start give an orthonormal Krylov basis Q and, for
  free, its exact part tr(Q^T H Q) = sum_j q_j^T (H q_j) -- the products Lanczos needs anyway.
  The other m - k matvecs are Hutchinson probes of the deflated residual; the standard error is
  theirs, conditional on Q, as for Hutch++. A Krylov space of dimension k finds the isolated top
  eigenvalues (the C ~ 10 outliers of a trained classifier's Hessian) far more accurately than a
  one-pass sketch of the same size, and it costs k rather than 2k matvecs, so when the Frobenius
  mass of H sits in a few outliers the residual -- and the standard error -- is much smaller.
  On a flat spectrum nothing can be deflated and the variance is that of Hutchinson with
  m - k probes (about sqrt(2) times Hutchinson's standard error at equal matvecs).

Not offered: XTrace (Epperly, Tropp & Webber, SIAM J. Matrix Anal. Appl. 2024). Implemented for
symmetric indefinite H and compared on dense 600 x 600 matrices with decaying, flat and outlier
spectra at 12, 48 and 96 matvecs (100-200 seeds), it was no more accurate than "krylov" (RMS
error 1.0-1.4x krylov's except on the flat spectrum at 12 matvecs, 0.9x), and its error estimate
(sample std of the leave-one-out estimates, which share probes) was less well calibrated: the
sd of (estimate - exact) / stderr was 1.2-1.4 on the decaying spectrum at 48-96 matvecs (krylov
0.97-0.99) and 2.5-3.0 on the outlier spectrum at 12 (krylov 1.3). See BENCHMARKS.md, bench_trace.

The standard error of every method here is sample std / sqrt(g) of g i.i.d. samples, so with few
samples it is itself noisy: (estimate - exact) / stderr follows roughly a Student t with g - 1
degrees of freedom (its sd is sqrt(3) = 1.7 for g = 4, 1.3 for g = 6, ~1 for g >= 20).
Probes are drawn one at a time from the generator and, for an `Objective` or `MatrixOperator`,
applied in blocks (`obj.hvp` on (D, k), which reuses each batch's graph in reverse mode); a block
of k columns counts k matvecs. Other operators only need `.hvp` on (D,) vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dynamics.lanczos import MatrixOperator, orthogonalize, check_operator, random_vector
from dynamics.objective import Objective

__all__ = ["TraceEstimate", "hessian_trace", "METHODS"]

METHODS = ("krylov", "hutch++", "hutchinson")
_KRYLOV_FRACTION = 0.5  # share of the budget spent on Lanczos steps (see _krylov)
_BLOCK = 16             # probe columns per obj.hvp call
_MINIMUM = {"hutchinson": 2, "hutch++": 4, "krylov": 4}


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate: `value` +/- `stderr` (float), after `matvecs` operator applications.

    `samples` (float64, (g,)) are the Hutchinson samples z^T H' z (H' = H for Hutchinson, the
    deflated residual (I - QQ^T) H (I - QQ^T) for Hutch++ and "krylov"); `exact_part` is
    tr(Q^T H Q) (0 for Hutchinson), so value = exact_part + samples.mean(); `rank` is the number
    of columns of Q (0 for Hutchinson).
    """

    value: float
    stderr: float
    matvecs: int
    method: str
    samples: Tensor
    exact_part: float = 0.0
    rank: int = 0

    def running_mean(self) -> Tensor:
        """exact_part + the running mean of the samples, shape (g,): convergence diagnostics."""
        counts = torch.arange(1, len(self.samples) + 1, dtype=torch.float64)
        return self.exact_part + torch.cumsum(self.samples, 0) / counts


def _probe(obj, generator, distribution: str) -> Tensor:
    return random_vector(obj, generator, distribution)


def _apply(obj, V: Tensor) -> Tensor:
    """H V for V of shape (D, k): k matvecs, in column blocks of at most _BLOCK for the operators
    documented to take (D, k) blocks (Objective, MatrixOperator), one column at a time otherwise."""
    if isinstance(obj, (Objective, MatrixOperator)):
        cols = [obj.hvp(V[:, i:i + _BLOCK]).reshape(obj.dim, -1) for i in range(0, V.shape[1], _BLOCK)]
    else:
        cols = [obj.hvp(V[:, i]).reshape(obj.dim, 1) for i in range(V.shape[1])]
    return torch.cat(cols, dim=1).to(obj.dtype)


def _hutchinson_samples(obj, count: int, generator, distribution: str,
                        deflate: Tensor | None = None) -> Tensor:
    """count samples z^T H' z, H' = (I - QQ^T) H (I - QQ^T) with Q = deflate (or H' = H).
    Probes are drawn one after another and applied _BLOCK at a time (memory D x _BLOCK)."""
    samples = []
    for start in range(0, count, _BLOCK):
        Z = torch.stack([_probe(obj, generator, distribution)
                         for _ in range(min(_BLOCK, count - start))], dim=1)
        if deflate is not None and deflate.shape[1]:
            Z = Z - deflate @ (deflate.T @ Z)
        samples.append((Z * _apply(obj, Z)).sum(0).to(torch.float64))
    return torch.cat(samples)


def _stderr(samples: Tensor) -> float:
    return float(samples.std(unbiased=True) / math.sqrt(len(samples)))


def _deflated(obj, Q: Tensor, exact: float, budget: int, used: int, gen, distribution: str,
              method: str) -> TraceEstimate:
    samples = _hutchinson_samples(obj, budget - used, gen, distribution, deflate=Q)
    return TraceEstimate(exact + float(samples.mean()), _stderr(samples), budget, method,
                         samples, exact, Q.shape[1])


def _hutchplusplus(obj, budget: int, gen, distribution: str) -> TraceEstimate:
    sketch = max(1, min(budget // 3, obj.dim))
    S = torch.stack([_probe(obj, gen, distribution) for _ in range(sketch)], dim=1)
    Q, _ = torch.linalg.qr(_apply(obj, S))
    HQ = _apply(obj, Q)
    exact = float((Q * HQ).sum())
    return _deflated(obj, Q, exact, budget, 2 * sketch, gen, distribution, "hutch++")


def _krylov(obj, budget: int, gen, distribution: str) -> TraceEstimate:
    """k = budget // 2 Lanczos steps (fewer if the Krylov space becomes invariant), the rest
    on residual probes; the exact part is sum_j q_j^T H q_j over the Lanczos vectors.

    The even split was fixed on dense test spectra before any network measurement: over
    splits k/m in {1/3, 1/2, 2/3, 3/4} it was within ~15% of the best standard error at
    m = 48, 96 (1/3 was best there, once the outliers are deflated more probes pay) and the
    best or near it at m = 12 (few probes, so larger k gives a noisier stderr), and on a flat
    spectrum it costs sqrt(2) against Hutchinson at worst.
    """
    steps = min(max(1, int(budget * _KRYLOV_FRACTION)), budget - 2, obj.dim)
    q = _probe(obj, gen, distribution)
    basis = torch.empty(obj.dim, steps, dtype=obj.dtype, device=obj.device)
    basis[:, 0] = q / torch.linalg.vector_norm(q)
    exact, scale, k = 0.0, 0.0, 0
    for j in range(steps):
        w = obj.hvp(basis[:, j]).to(obj.dtype)
        k = j + 1
        alpha = float(torch.dot(basis[:, j], w))
        exact += alpha
        if k == steps:
            break
        w, _ = orthogonalize(w, basis[:, :k])
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alpha), beta)
        if beta <= 1e3 * torch.finfo(obj.dtype).eps * scale:  # invariant subspace found
            break
        basis[:, k] = w / beta
    return _deflated(obj, basis[:, :k], exact, budget, k, gen, distribution, "krylov")


def hessian_trace(obj, *, num_matvecs: int, method: str = "krylov",
                  generator: torch.Generator | None = None,
                  distribution: str = "rademacher") -> TraceEstimate:
    """Estimate tr Hessian(L) with `num_matvecs` Hessian-vector products.

    Args:
        obj: symmetric operator (`dynamics.Objective`, `MatrixOperator`, ...) of dimension D.
        num_matvecs: budget, spent exactly; Hutchinson needs >= 2 (for a standard error),
            the others >= 4.
        method: "krylov" (default: Lanczos-deflated Hutchinson, the smallest error and
            standard error of the three on every spectrum tested with outliers or decay),
            "hutch++" (the default before 2026-12; pass it to reproduce older records) or
            "hutchinson". See the module docstring.
        generator: every probe, sketch and start vector is drawn from it (seed 0 if None).
        distribution: "rademacher" (default, lower variance) or "gaussian".

    Returns a `TraceEstimate` (value, stderr, matvecs, method, samples, exact_part, rank).
    """
    check_operator(obj)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    minimum = _MINIMUM[method]
    if not isinstance(num_matvecs, int) or num_matvecs < minimum:
        raise ValueError(f"num_matvecs = {num_matvecs!r} is too small: {method} needs at least "
                         f"{minimum} to report a standard error")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if method == "hutchinson":
        samples = _hutchinson_samples(obj, num_matvecs, gen, distribution)
        return TraceEstimate(float(samples.mean()), _stderr(samples), num_matvecs, method, samples)
    return {"hutch++": _hutchplusplus, "krylov": _krylov}[method](obj, num_matvecs, gen, distribution)
