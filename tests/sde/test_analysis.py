"""sde.analysis: regime beta, eta -> 0 extrapolation with errors, spectral multiplier, sphere law."""
import math

import numpy as np
import pytest
import torch

from sde import QSR, SGD, LocalSGD, psi
from sde.analysis import (effective_beta, extrapolate_to_zero, spectrum_beta, sphere_cosine_cdf, sphere_cosine_density,
                          trace_weighted_multiplier)
from sde.discrete import richardson


# ------------------------------------------------------------------------------ effective_beta
def test_effective_beta_of_the_three_regimes():
    eta = 0.02
    assert effective_beta(eta, local_steps=8) == pytest.approx(0.16, rel=1e-15)
    assert effective_beta(eta, beta=0.3) == 0.3
    assert effective_beta(eta, alpha=0.2) == pytest.approx(0.2 ** 2 / eta, rel=1e-15)
    # QSR with the unrounded period H = (alpha/eta)^2 is the constant-H formula at that H
    assert effective_beta(eta, alpha=0.2) == pytest.approx(effective_beta(eta, local_steps=(0.2 / eta) ** 2))
    # as eta shrinks: constant H -> 0, H = beta/eta fixed, QSR -> inf
    assert effective_beta(1e-4, local_steps=8) < 1e-3 < 1e2 < effective_beta(1e-4, alpha=0.2)


@pytest.mark.parametrize("kwargs", [{}, {"local_steps": 4, "beta": 0.1}, {"alpha": -1.0}, {"beta": 0.0}])
def test_effective_beta_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        effective_beta(0.1, **kwargs)
    with pytest.raises(ValueError):
        effective_beta(0.0, beta=0.1)


# ------------------------------------------------------------------------------ extrapolation
def test_extrapolation_is_exact_on_a_line_and_agrees_with_richardson():
    etas = np.array([0.04, 0.02, 0.01, 0.005])
    values = 1.25 - 3.0 * etas
    out = extrapolate_to_zero(etas, values, np.full(4, 0.01))
    assert out.value == pytest.approx(1.25, abs=1e-12)
    assert out.coefficients[1] == pytest.approx(-3.0, abs=1e-10)
    assert out.residual_chi2 == pytest.approx(0.0, abs=1e-18)
    noisy = values + np.array([0.01, -0.02, 0.015, 0.0])
    stderrs = np.array([0.01, 0.02, 0.01, 0.03])
    r0, _ = richardson(etas, noisy, degree=1, weights=1 / stderrs)
    assert extrapolate_to_zero(etas, noisy, stderrs).value == pytest.approx(r0, rel=1e-12)
    quad = 0.5 + 2.0 * etas - 30.0 * etas ** 2
    assert extrapolate_to_zero(etas, quad, np.ones(4), degree=2).value == pytest.approx(0.5, abs=1e-10)


def test_extrapolation_stderr_matches_monte_carlo():
    rng = np.random.default_rng(0)
    etas = np.array([0.08, 0.04, 0.02, 0.01])
    stderrs = np.array([0.002, 0.003, 0.004, 0.006])
    reps = 4000
    r0s, chi2s = [], []
    for _ in range(reps):
        values = 2.0 + 1.5 * etas + stderrs * rng.standard_normal(4)
        out = extrapolate_to_zero(etas, values, stderrs)
        r0s.append(out.value)
        chi2s.append(out.residual_chi2)
    predicted = extrapolate_to_zero(etas, 2.0 + 1.5 * etas, stderrs).stderr
    # the fit read at an eta it did not see (0.005, below the four): its value's sample std across the draws
    at = [extrapolate_to_zero(etas, 2.0 + 1.5 * etas + stderrs * z, stderrs, at=0.005).value
          for z in np.random.default_rng(1).standard_normal((reps, 4))]
    held_out = extrapolate_to_zero(etas, 2.0 + 1.5 * etas, stderrs, at=0.005)
    assert held_out.value == pytest.approx(2.0075, abs=1e-12) and held_out.stderr < predicted
    assert np.std(at, ddof=1) == pytest.approx(held_out.stderr, rel=0.05)
    # the sample std of 4000 Gaussian draws has relative standard error 1/sqrt(2 x 4000) = 1.1%: 5% is > 4 sigma
    assert np.std(r0s, ddof=1) == pytest.approx(predicted, rel=0.05)
    assert np.mean(r0s) == pytest.approx(2.0, abs=5 * predicted / math.sqrt(reps))
    # chi2 with 4 - 2 = 2 degrees of freedom has mean 2 and std 2: its mean over 4000 is 2 +/- 0.03
    assert np.mean(chi2s) == pytest.approx(2.0, abs=0.15)


def test_extrapolation_rejects_bad_input():
    with pytest.raises(ValueError):
        extrapolate_to_zero([0.1, 0.05], [1.0, 1.0], [0.1, 0.1])          # under-determined
    with pytest.raises(ValueError):
        extrapolate_to_zero([0.1, 0.05, 0.02], [1, 1, 1], [0.1, 0.0, 0.1])
    with pytest.raises(ValueError):
        extrapolate_to_zero([0.1, 0.05, 0.02], [1, 1], [0.1, 0.1])


# ------------------------------------------------------------------------------ spectral multiplier
def test_trace_weighted_multiplier_limits_and_a_hand_computed_spectrum():
    lam = torch.tensor([[0.5, 2.0, 10.0, -0.3]], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.2, 0.05, 0.05]], dtype=torch.float64)
    K, beta = 4, 0.25
    assert trace_weighted_multiplier(lam, q, SGD(32)) == pytest.approx(1.0, rel=1e-15)
    assert trace_weighted_multiplier(lam, q, QSR(K, 8)) == pytest.approx(K, rel=1e-15)
    pos = [(0.5, 0.7), (2.0, 0.2), (10.0, 0.05)]       # the negative eigenvalue carries no trace mass
    expected = sum(qq * ll * (1 + (K - 1) * psi(2 * beta * ll)) for ll, qq in pos) / sum(qq * ll for ll, qq in pos)
    got = trace_weighted_multiplier(lam, q, LocalSGD(K, 8, beta))
    assert got == pytest.approx(expected, rel=1e-13)
    assert 1 < got < K
    # a single eigenvalue gives back its own weight 1 + (K-1) psi(2 beta lambda)
    single = trace_weighted_multiplier(torch.tensor([3.0]), torch.tensor([1.0]), LocalSGD(K, 8, beta))
    assert single == pytest.approx(1 + (K - 1) * psi(2 * beta * 3.0), rel=1e-14)


def test_trace_weighted_multiplier_rejects_bad_input():
    with pytest.raises(ValueError):
        trace_weighted_multiplier(torch.ones(3), torch.ones(2), SGD(1))
    with pytest.raises(ValueError):
        trace_weighted_multiplier(-torch.ones(3), torch.ones(3), SGD(1))
    with pytest.raises(ValueError):
        trace_weighted_multiplier(torch.ones(3), -torch.ones(3), SGD(1))


# ------------------------------------------------------------------------------ sphere law
@pytest.mark.parametrize("kt", [0.05, 0.5, 3.0])
def test_sphere_cosine_density_moments(kt):
    x = torch.linspace(-1, 1, 200001, dtype=torch.float64)
    p = sphere_cosine_density(x, kt)
    # zonal harmonics are eigenfunctions: E[P_l(X)] = exp(-l(l+1) kappa t / 2); trapezoid error ~ 1e-9 here
    assert float(torch.trapezoid(p, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(x * p, x)) == pytest.approx(math.exp(-kt), abs=1e-6)
    p2 = (3 * x ** 2 - 1) / 2
    assert float(torch.trapezoid(p2 * p, x)) == pytest.approx(math.exp(-3 * kt), abs=1e-6)
    assert float(p.min()) > -1e-8                     # a density (tiny negatives only from rounding)


@pytest.mark.parametrize("kt", [0.1, 1.0])
def test_sphere_cosine_cdf_is_the_integral_of_the_density(kt):
    ends = sphere_cosine_cdf(torch.tensor([-1.0, 1.0], dtype=torch.float64), kt)
    assert float(ends[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(ends[1]) == pytest.approx(1.0, abs=1e-12)
    x = torch.linspace(-0.9, 0.9, 19, dtype=torch.float64)
    h = 1e-5
    fd = (sphere_cosine_cdf(x + h, kt) - sphere_cosine_cdf(x - h, kt)) / (2 * h)
    torch.testing.assert_close(fd, sphere_cosine_density(x, kt), rtol=1e-6, atol=1e-8)


def test_sphere_cosine_cdf_matches_an_independent_brownian_simulation():
    """Brownian motion on S^2 with generator (1/2) Laplacian (kappa = 1), by many small
    tangent Gaussian steps and renormalization, reaches the closed-form law at t = 0.7."""
    g = torch.Generator().manual_seed(0)
    n, steps, t = 10000, 350, 0.7
    dt = t / steps
    z = torch.zeros(n, 3, dtype=torch.float64)
    z[:, 2] = 1
    for _ in range(steps):
        xi = torch.randn(n, 3, generator=g, dtype=torch.float64)
        xi = xi - (xi * z).sum(1, keepdim=True) * z
        z = z + math.sqrt(dt) * xi
        z = z / z.norm(dim=1, keepdim=True)
    samples = torch.sort(z[:, 2]).values
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float((sphere_cosine_cdf(samples, 1.0 * t) - empirical).abs().max())
    # KS statistic of 10000 exact samples: median 0.83/sqrt(n) = 0.008, 1% critical value
    # 1.63/sqrt(n) = 0.016; the step dt = 2e-3 adds an O(dt) bias well below that. 0.025 leaves
    # room for the bias while a wrong law (e.g. kappa off by 10%, KS ~ 0.03) fails.
    assert ks < 0.025


def test_spectrum_beta_splits_the_trace_at_the_quantile():
    """Spectrum 0 (ignored), 1, 1, 1, 1, 4 (tr 8): the eigenvalues <= 1 hold half of the trace, so beta = 1/2 and
    2 beta lambda is 1 there and 4 on the top direction; at quantile 0.6 the 1's (0.5) do not suffice: beta = 1/8.
    On a random spectrum the trace share with 2 beta lambda <= 1 is >= the quantile and the share below is not."""
    assert spectrum_beta([0.0, 1, 1, 4, 1, 1]) == 0.5 and spectrum_beta([1, 1, 1, 1, 4], quantile=0.6) == 0.125
    lam = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3 * 50
    for q in (0.3, 0.5, 0.8):
        beta = spectrum_beta(lam, quantile=q)
        star = 1 / (2 * beta)                               # lambda* up to rounding
        below, up_to = lam < star * (1 - 1e-12), lam <= star * (1 + 1e-12)
        assert float(lam[up_to].sum() / lam.sum()) >= q > float(lam[below].sum() / lam.sum())
    with pytest.raises(ValueError, match="no positive"):
        spectrum_beta([0.0, -1.0])
    with pytest.raises(ValueError, match="quantile"):
        spectrum_beta([1.0], quantile=1.0)


def test_sphere_law_rejects_bad_input():
    with pytest.raises(ValueError):
        sphere_cosine_density(torch.tensor([1.5]), 1.0)
    with pytest.raises(ValueError):
        sphere_cosine_cdf(torch.tensor([0.0]), 0.0)
