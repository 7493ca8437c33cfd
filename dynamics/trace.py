"""Stochastic Hessian trace: Hutchinson and Hutch++, each with an honest standard error.

Hutchinson (1989): tr H = E[z^T H z] for probes with E[z z^T] = I (Rademacher or Gaussian);
the estimate is the mean of `num_matvecs` samples and its standard error the sample standard
deviation over sqrt(num_matvecs).

Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): spend s matvecs on a sketch H S, take
an orthonormal basis Q of it, spend s more on the exact part tr(Q^T H Q), and the remaining
g = num_matvecs - 2 s on Hutchinson for the deflated residual (I - QQ^T) H (I - QQ^T). The
exact part has no variance, so the reported standard error is that of the Hutchinson part
alone (sample std of its g samples over sqrt(g)); it is conditional on the sketch, which is
what makes it honest: the estimator is unbiased given Q. With a decaying spectrum the top
directions are removed exactly and the residual variance is far smaller than Hutchinson's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dynamics.lanczos import check_operator, random_vector

__all__ = ["TraceEstimate", "hessian_trace"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate: `value` +/- `stderr` (float), after `matvecs` operator applications.

    `samples` (float64, (g,)) are the Hutchinson samples z^T H' z (H' = H for Hutchinson, the
    deflated residual for Hutch++); `exact_part` is tr(Q^T H Q) for Hutch++ (0 for Hutchinson),
    so value = exact_part + samples.mean().
    """

    value: float
    stderr: float
    matvecs: int
    method: str
    samples: Tensor
    exact_part: float = 0.0

    def running_mean(self) -> Tensor:
        """exact_part + the running mean of the samples, shape (g,): convergence diagnostics."""
        counts = torch.arange(1, len(self.samples) + 1, dtype=torch.float64)
        return self.exact_part + torch.cumsum(self.samples, 0) / counts


def _probe(obj, generator, distribution: str) -> Tensor:
    return random_vector(obj, generator, distribution)


def _hutchinson_samples(obj, count: int, generator, distribution: str,
                        deflate: Tensor | None = None) -> Tensor:
    samples = torch.empty(count, dtype=torch.float64)
    for i in range(count):
        z = _probe(obj, generator, distribution)
        if deflate is not None:
            z = z - deflate @ (deflate.T @ z)
        samples[i] = float(torch.dot(z, obj.hvp(z).to(obj.dtype)))
    return samples


def _stderr(samples: Tensor) -> float:
    return float(samples.std(unbiased=True) / math.sqrt(len(samples)))


def hessian_trace(obj, *, num_matvecs: int, method: str = "hutch++",
                  generator: torch.Generator | None = None,
                  distribution: str = "rademacher") -> TraceEstimate:
    """Estimate tr Hessian(L) with exactly `num_matvecs` Hessian-vector products.

    Args:
        obj: symmetric operator (`dynamics.Objective`, `MatrixOperator`, ...).
        num_matvecs: budget; Hutchinson needs >= 2 (for a standard error), Hutch++ >= 4
            (1 sketch column, 1 exact product, 2 residual probes).
        method: "hutch++" (default) or "hutchinson".
        generator: every probe and sketch vector is drawn from it (seed 0 if None).
        distribution: "rademacher" (default, lower variance) or "gaussian".
    """
    check_operator(obj)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    minimum = 4 if method == "hutch++" else 2
    if not isinstance(num_matvecs, int) or num_matvecs < minimum:
        raise ValueError(f"num_matvecs = {num_matvecs!r} is too small: {method} needs at least "
                         f"{minimum} to report a standard error")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    if method == "hutchinson":
        samples = _hutchinson_samples(obj, num_matvecs, gen, distribution)
        return TraceEstimate(float(samples.mean()), _stderr(samples), num_matvecs, method, samples)

    sketch = max(1, min(num_matvecs // 3, obj.dim))
    residual_probes = num_matvecs - 2 * sketch
    S = torch.stack([_probe(obj, gen, distribution) for _ in range(sketch)], dim=1)
    HS = torch.stack([obj.hvp(S[:, i]).to(obj.dtype) for i in range(sketch)], dim=1)
    Q, _ = torch.linalg.qr(HS)
    HQ = torch.stack([obj.hvp(Q[:, i]).to(obj.dtype) for i in range(sketch)], dim=1)
    exact = float((Q * HQ).sum())
    samples = _hutchinson_samples(obj, residual_probes, gen, distribution, deflate=Q)
    return TraceEstimate(exact + float(samples.mean()), _stderr(samples), num_matvecs, method,
                         samples, exact)
