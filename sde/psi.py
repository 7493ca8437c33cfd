"""psi(x) = (exp(-x) - 1 + x) / x and its integral F(x) = int_0^x psi (Gu et al., ICLR 2023).

psi weights each Hessian eigen-pair in the drift-II term of Local SGD's slow SDE, with
x = eta H (lambda_i + lambda_j) = beta (lambda_i + lambda_j); F appears in the label-noise closed
form tr F(2 beta Hessian) of THEORY.md. psi rises from 0 to 1, psi(x) ~ x/2 near 0 and
1 - psi(x) ~ 1/x for large x.

Both functions accept Python floats (returning floats) or tensors of any floating dtype and
shape (returning the same dtype and shape). They are branch-free (`torch.where` over safe
arguments), so they work under `torch.func.vmap` and have finite gradients everywhere.
Intended domain: x >= 0 (negative x down to about -1 is also accurate).
"""
from __future__ import annotations

import torch
from torch import Tensor

_EULER_GAMMA = 0.5772156649015329

# |x| below this uses the Taylor series psi(x) = sum_{n>=1} (-1)^{n+1} x^n / (n+1)!; above it
# 1 + expm1(-x)/x, whose cancellation costs at most a factor ~5 in relative error at x = 0.5.
_PSI_SERIES_BELOW = 0.5
_PSI_SERIES_TERMS = 18          # 0.5^18 / 19! ~ 3e-23: far below float64 resolution of psi ~ x/2
# F(x) = sum_{n>=2} (-1)^n x^n / (n n!) for x < 2; for x >= 2, F(x) = x - Ein(x) with
# Ein(x) = gamma + log x + E1(x), E1 from its continued fraction (evaluated bottom-up).
_F_SERIES_BELOW = 2.0
_F_SERIES_TERMS = 34            # 2^34 / (34 * 34!) ~ 2e-30; largest term ~1 so no real cancellation
_E1_FRACTION_TERMS = 80         # converged to ~1e-16 relative at x = 2 (tests check it)


def _as_tensor(x) -> tuple[Tensor, bool]:
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        return x, False
    return torch.tensor(float(x), dtype=torch.float64), True


def _psi_series(x: Tensor) -> Tensor:
    """sum_{n=1}^{N} (-1)^{n+1} x^n / (n+1)!, terms built by their running ratio -x/(n+1)."""
    term = x / 2.0
    total = term
    for n in range(2, _PSI_SERIES_TERMS + 1):
        term = term * (-x) / (n + 1)
        total = total + term
    return total


def psi(x):
    """psi(x) = (exp(-x) - 1 + x) / x, psi(0) = 0; elementwise on a tensor or a float."""
    t, scalar = _as_tensor(x)
    small = t.abs() < _PSI_SERIES_BELOW
    safe = torch.where(small, torch.ones_like(t), t)
    closed = 1.0 + torch.expm1(-safe) / safe
    series = _psi_series(torch.where(small, t, torch.zeros_like(t)))
    out = torch.where(small, series, closed)
    return float(out) if scalar else out


def _psi_integral_series(x: Tensor) -> Tensor:
    """F(x) = sum_{n>=2} (-1)^n x^n / (n n!), the series of x - Ein(x) without its cancelling x."""
    term = x * x / 2.0        # x^n / n!, n = 2
    total = term / 2.0
    for n in range(3, _F_SERIES_TERMS + 1):
        term = term * (-x) / n
        total = total + term / n
    return total


def _e1_continued_fraction(x: Tensor) -> Tensor:
    """E1(x) for x >= 1: e^-x / (x + 1 - 1^2/(x + 3 - 2^2/(x + 5 - ...))), built bottom-up."""
    tail = x + (2 * _E1_FRACTION_TERMS + 1)
    for n in range(_E1_FRACTION_TERMS, 0, -1):
        tail = x + (2 * n - 1) - (n * n) / tail
    return torch.exp(-x) / tail


def psi_integral(x):
    """F(x) = int_0^x psi(s) ds = x - Ein(x), elementwise; F(x) ~ x^2/4 near 0, ~ x - log x for large x."""
    t, scalar = _as_tensor(x)
    small = t < _F_SERIES_BELOW
    large_arg = torch.where(small, torch.ones_like(t), t)
    ein_large = _EULER_GAMMA + torch.log(large_arg) + _e1_continued_fraction(large_arg)
    series = _psi_integral_series(torch.where(small, t, torch.zeros_like(t)))
    out = torch.where(small, series, t - ein_large)
    return float(out) if scalar else out
