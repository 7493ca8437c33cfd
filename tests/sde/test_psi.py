"""psi and its integral F against independent references: exact series, quadrature, E1, limits."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import exp1

from sde import psi, psi_integral


def psi_exact(x: float) -> float:
    """psi in exact rational arithmetic from its Taylor series (small x) or the plain formula."""
    if abs(x) < 2:
        xf = Fraction(x)
        total, term = Fraction(0), Fraction(1)
        for n in range(1, 60):
            term = term * xf
            total += (-1) ** (n + 1) * term / math.factorial(n + 1)
        return float(total)
    return (math.exp(-x) - 1 + x) / x


@pytest.mark.parametrize("x", [1e-300, 1e-20, 1e-12, 1e-6, 1e-3, 0.1, 0.3, 0.49, 0.5, 0.51, 1.0, 1.9,
                               3.0, 10.0, 40.0, 1e3, 1e8])
def test_psi_matches_exact_series_and_formula(x):
    # 4 ulp-ish: the closed form just above the series switch loses a factor ~5 to cancellation.
    assert psi(x) == pytest.approx(psi_exact(x), rel=1e-15, abs=0)


def test_psi_on_tensors_keeps_dtype_shape_and_limits():
    x = torch.tensor([[0.0, 1e-20], [1e6, 2.0]], dtype=torch.float64)
    out = psi(x)
    assert out.dtype == torch.float64 and out.shape == (2, 2)
    assert torch.isfinite(out).all()
    assert out[0, 0] == 0.0
    assert out[0, 1] == pytest.approx(0.5e-20, rel=1e-15)          # psi ~ x/2
    assert 1 - out[1, 0].item() == pytest.approx(1e-6, rel=1e-9)     # 1 - psi ~ 1/x (exactly 1/x - e^-x/x)
    x32 = torch.tensor([0.0, 1e-20, 1e-3, 0.7, 1e6], dtype=torch.float32)
    out32 = psi(x32)
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
    ref = torch.tensor([psi_exact(float(v)) for v in x32.double()], dtype=torch.float64)
    torch.testing.assert_close(out32.double(), ref, rtol=2e-6, atol=0)


def test_psi_limits_asymptotics():
    for x in [1e-10, 1e-7]:
        assert psi(x) / (x / 2) == pytest.approx(1.0, abs=x)          # psi = x/2 - x^2/6 + ...
    for x in [1e4, 1e7]:
        assert (1 - psi(x)) * x == pytest.approx(1.0, abs=1e-9)        # 1 - psi = 1/x - e^-x/x


def test_psi_gradient_is_finite_and_correct():
    x = torch.tensor([0.0, 1e-12, 0.25, 0.5, 3.0, 1e6], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(psi(x).sum(), x)
    assert torch.isfinite(g).all()
    # psi'(x) = (1 - (1 + x) e^-x) / x^2 ... away from 0; psi'(0) = 1/2.
    xd = x.detach()
    ref = torch.where(xd > 1e-3, (1 - (1 + xd) * torch.exp(-xd)) / xd.clamp(min=1e-3) ** 2, 0.5 - xd / 3)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-15)


def test_psi_is_increasing_from_zero_to_one():
    x = torch.logspace(-8, 8, 2001, dtype=torch.float64)
    y = psi(x)
    assert (y.diff() > 0).all() and (y > 0).all() and (y < 1).all()


@pytest.mark.parametrize("x", [1e-6, 0.01, 0.5, 1.0, 1.999, 2.0, 2.001, 5.0, 20.0, 100.0])
def test_psi_integral_matches_quadrature(x):
    def integrand(s):  # float64 psi independent of sde.psi: plain expm1 form, 3-term series near 0
        return (math.expm1(-s) + s) / s if s > 1e-4 else s / 2 - s * s / 6 + s ** 3 / 24
    ref, err = quad(integrand, 0.0, x, epsabs=0, epsrel=1e-13, limit=200)
    assert psi_integral(x) == pytest.approx(ref, rel=2e-13)


@pytest.mark.parametrize("x", [2.0, 3.0, 30.0, 1e3, 1e6])
def test_psi_integral_matches_exponential_integral(x):
    # F(x) = x - (gamma + log x + E1(x)): an independent special-function reference (scipy).
    ref = x - (np.euler_gamma + math.log(x) + exp1(x))
    assert psi_integral(x) == pytest.approx(ref, rel=1e-14)


def test_psi_integral_tensor_small_limit_and_derivative():
    x = torch.tensor([0.0, 1e-20, 1e-4, 1.5, 2.5, 50.0], dtype=torch.float64, requires_grad=True)
    F = psi_integral(x)
    assert F[0] == 0.0 and torch.isfinite(F).all()
    assert F[1].item() == pytest.approx(1e-40 / 4, rel=1e-12)      # F ~ x^2/4
    assert F[2].item() == pytest.approx(1e-8 / 4 - 1e-12 / 18, rel=1e-12)
    (g,) = torch.autograd.grad(F.sum(), x)                          # F' = psi
    torch.testing.assert_close(g, psi(x.detach()), rtol=1e-12, atol=1e-30)
