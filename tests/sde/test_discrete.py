"""Discrete SGD / Local SGD / QSR against the slow SDEs (THEORY.md) on the diagonal linear
network with label noise, whose slow quantity p_i = u_i v_i obeys the closed form
d log p_i/dt = -4 sigma^2 m_i w(lambda_i) / B (sde.toys.DiagonalNet).

Method: for each rule, 2000 seeds in one tensor, slow time T ~ 1 (t = eta^2 x steps per
worker), four learning rates eta in {0.1, 1/15, 0.05, 0.04}; the measured rate
mean_seeds[log p_i(T) - log p_i(0)] / T is extrapolated to eta = 0 by a least-squares line
r(eta) = r0 + c eta (Richardson) and r0 is compared with the SDE prediction (the closed-form
ODE integrated by RK4 to the same T).

Tolerance 3%: the standard error of r0 (propagated from the per-eta standard errors through
the linear fit) is 0.3-0.8% of the rate, and the O(eta^2) remainder of the fit was measured
below 1.5% on these settings, so 3% is >= 3 standard errors beyond the known bias while a
wrong weight (e.g. Local SGD without drift-II, 20-60% off) fails by far.

Budget: about 75 s on one thread in total, split across the parametrized cases.
"""
import math

import numpy as np
import pytest
import torch

from sde.discrete import (local_steps_for_beta, per_sample, qsr_local_steps, richardson, run_local_sgd,
                          run_sgd)
from sde.rules import QSR, SGD, LocalSGD
from sde.toys import DiagonalNet, RankOneFactorization

ETAS = [0.1, 1 / 15, 0.05, 0.04]
SEEDS = 2000
T = 1.0
TOL = 0.03


pytestmark = pytest.mark.usefixtures("float64_default")


def _net():
    X = torch.tensor([[0.8, 0.0], [0.0, 1.0]], dtype=torch.float64)
    return DiagonalNet(X, torch.tensor([0.5, -0.3], dtype=torch.float64), sigma=1.0)


P0 = (0.4, 0.3)


def _predicted_rate(net, rule, t_end):
    """(log p(t_end) - log p(0)) / t_end from the closed-form ODE, RK4 with step <= 1e-2
    (the rate varies on a time scale ~1, so the RK4 error is ~1e-9)."""
    logp0 = torch.log(torch.tensor(P0, dtype=torch.float64))
    rate = lambda lp: net.log_rate(net.point_on_gamma(torch.exp(lp)), rule)
    n = max(1, math.ceil(t_end / 1e-2))
    h, lp = t_end / n, logp0
    for _ in range(n):
        k1 = rate(lp); k2 = rate(lp + h / 2 * k1); k3 = rate(lp + h / 2 * k2); k4 = rate(lp + h * k3)
        lp = lp + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return ((lp - logp0) / t_end).numpy()


def _measure(workers, local_batch, local_steps_of_eta, prediction_rule, seed):
    """Per eta: measured rate (2,), its standard error (2,), prediction at the run's T (2,)."""
    net = _net()
    z0 = net.point_on_gamma(torch.tensor(P0, dtype=torch.float64))
    rates, errors, predictions = [], [], []
    for i, eta in enumerate(ETAS):
        H = local_steps_of_eta(eta)
        n_rounds = max(1, round(T / (eta ** 2 * H)))
        run = run_local_sgd(net.sample_gradient, z0, eta=eta, workers=workers, local_batch=local_batch,
                            local_steps=H, n_rounds=n_rounds, n_seeds=SEEDS,
                            generator=torch.Generator().manual_seed(1000 * seed + i),
                            observe=lambda th: torch.log(net.products(th)), observe_every=n_rounds)
        t_end = float(run.times[-1])
        per_seed = (run.values[-1] - run.values[0]) / t_end
        rates.append(per_seed.mean(0).numpy())
        errors.append((per_seed.std(0) / math.sqrt(SEEDS)).numpy())
        predictions.append(_predicted_rate(net, prediction_rule, t_end))
    return np.array(rates), np.array(errors), np.array(predictions)


def _extrapolate(rates, errors):
    """r0 per coordinate and its standard error through the weighted linear fit."""
    out, se = [], []
    for c in range(rates.shape[1]):
        r0, _ = richardson(ETAS, rates[:, c])
        design = np.vander(np.array(ETAS), 2, increasing=True)
        pinv = np.linalg.pinv(design)
        out.append(r0)
        se.append(float(np.sqrt(np.sum((pinv[0] * errors[:, c]) ** 2))))
    return np.array(out), np.array(se)


@pytest.fixture(scope="module")
def sgd():
    rates, errors, predictions = _measure(1, 4, lambda eta: 1, SGD(4), seed=1)
    r0, se = _extrapolate(rates, errors)
    return r0, se, predictions[-1]


def test_sgd_rate(sgd):
    r0, se, prediction = sgd
    assert np.all(se < 0.01 * np.abs(prediction)), se       # the statistics are fine enough for 3%
    np.testing.assert_allclose(r0, prediction, rtol=TOL)
    np.testing.assert_allclose(prediction, [-4 * 0.32 / 4, -4 * 0.5 / 4], rtol=1e-9)  # -4 sigma^2 m_i / B


LOCAL_CASES = {
    "K2-beta0.2": (2, 2, 0.2),
    "K2-beta0.8": (2, 2, 0.8),
    "K4-beta0.2": (4, 1, 0.2),
}


@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_local_sgd_rate_and_ratio_to_sgd(case, sgd):
    K, b_loc, beta = LOCAL_CASES[case]
    rule = LocalSGD(K, b_loc, beta)
    for eta in ETAS:
        assert abs(local_steps_for_beta(beta, eta) * eta - beta) < 1e-12    # eta H = beta exactly
    rates, errors, predictions = _measure(K, b_loc, lambda eta: local_steps_for_beta(beta, eta), rule,
                                          seed=2 + list(LOCAL_CASES).index(case))
    r0, se = _extrapolate(rates, errors)
    np.testing.assert_allclose(r0, predictions[-1], rtol=TOL)
    sgd_r0, _, sgd_prediction = sgd
    predicted_ratio = predictions[-1] / sgd_prediction
    assert np.all(predicted_ratio > 1.1)          # drift-II is a visible effect here
    np.testing.assert_allclose(r0 / sgd_r0, predicted_ratio, rtol=TOL)


def test_constant_h_collapses_to_sgd(sgd):
    rates, errors, _ = _measure(2, 2, lambda eta: 2, SGD(4), seed=7)
    r0, se = _extrapolate(rates, errors)
    sgd_r0, _, sgd_prediction = sgd
    np.testing.assert_allclose(r0, sgd_prediction, rtol=TOL)
    # at finite eta constant H is faster than SGD (beta = 2 eta > 0): the collapse is a limit
    assert np.all(rates[0] / sgd_prediction > 1.1)


def test_qsr_reaches_k_times_sgd(sgd):
    rule = QSR(2, 2, alpha=1.0)
    rates, errors, predictions = _measure(2, 2, lambda eta: qsr_local_steps(eta, 1.0), rule, seed=8)
    r0, se = _extrapolate(rates, errors)
    np.testing.assert_allclose(r0, predictions[-1], rtol=TOL)
    sgd_r0, _, sgd_prediction = sgd
    np.testing.assert_allclose(predictions[-1], 2 * sgd_prediction, rtol=1e-9)
    np.testing.assert_allclose(r0 / sgd_r0, 2.0, rtol=TOL)


def test_schedules():
    assert [local_steps_for_beta(0.8, eta) for eta in ETAS] == [8, 12, 16, 20]
    assert local_steps_for_beta(0.01, 0.1) == 1
    assert [qsr_local_steps(eta, 1.0) for eta in ETAS] == [100, 225, 400, 625]
    assert qsr_local_steps(0.5, 0.2, h_base=4) == 4          # max(H_base, floor(0.16)) = H_base
    assert qsr_local_steps(0.07, 0.2, h_base=4) == 8         # floor((0.2/0.07)^2) = floor(8.16)
    with pytest.raises(ValueError):
        qsr_local_steps(0.1, -1.0)


def test_run_records_slow_time_and_averages_workers():
    """Deterministic sampler g(theta) = theta: each local step scales by (1 - eta), so after a
    round every worker (and their average) is theta0 (1 - eta)^H; slow time is eta^2 x steps."""
    sampler = lambda theta, batch, gen: theta
    run = run_local_sgd(sampler, torch.ones(3), eta=0.1, workers=3, local_batch=1, local_steps=4,
                        n_rounds=5, n_seeds=2, generator=torch.Generator(), observe_every=2)
    assert run.steps.tolist() == [0, 8, 16]
    torch.testing.assert_close(run.times, torch.tensor([0.0, 0.08, 0.16]), rtol=1e-12, atol=0)
    torch.testing.assert_close(run.values[-1], torch.full((2, 3), 0.9 ** 16), rtol=1e-12, atol=0)


def test_per_sample_adapter_has_covariance_over_batch():
    """A one-sample sampler with N(0, 1) noise averaged over B = 4 draws has variance 1/4."""
    one = lambda theta, gen: theta + torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    minibatch = per_sample(one)
    g = torch.Generator().manual_seed(0)
    draws = minibatch(torch.zeros(50_000, 2), 4, g)
    # variance of 5e4 Gaussian draws: relative s.e. sqrt(2/5e4) = 0.6%; 4% is > 6 s.e.
    torch.testing.assert_close(draws.var(0), torch.full((2,), 0.25), rtol=0.04, atol=0)
    run = run_sgd(minibatch, torch.zeros(2), eta=0.1, batch_size=4, n_steps=3, n_seeds=5, generator=g)
    assert run.values.shape == (4, 5, 2)


def test_bad_input():
    net = _net()
    g = torch.Generator()
    with pytest.raises(ValueError, match="workers"):
        run_local_sgd(net.sample_gradient, torch.zeros(4), eta=0.1, workers=0, local_batch=1,
                      local_steps=1, n_rounds=1, n_seeds=1, generator=g)
    with pytest.raises(ValueError, match="eta"):
        run_sgd(net.sample_gradient, torch.zeros(4), eta=0.0, batch_size=1, n_steps=1, n_seeds=1, generator=g)
    with pytest.raises(ValueError, match="theta0"):
        run_sgd(net.sample_gradient, torch.zeros(3, 4), eta=0.1, batch_size=1, n_steps=1, n_seeds=2, generator=g)
    with pytest.raises(ValueError, match="learning rates"):
        richardson([0.1, 0.05], [1.0, 2.0])


def test_factorization_balance_rate_sgd_and_local_sgd():
    """Rank-one factorization (three distinct Hessian eigenvalues on Gamma, so Local SGD weights
    them differently): Delta = |u|^2 - |v|^2 is conserved by gradient flow, so reading it at the
    iterate equals reading it at Phi(iterate); its slow rate is the closed form
    RankOneFactorization.balance_rate. Same method and 3% tolerance as above (s.e. of r0 ~0.5%)."""
    mf = RankOneFactorization(torch.tensor([1.0, 0.5, -0.7]), torch.tensor([0.8, -0.4]), sigma=1.0)
    z0 = mf.point_on_gamma(1.5)
    d0 = mf.balance(z0)

    def predicted(rule, t_end):
        n = max(1, math.ceil(t_end / 1e-2))
        h, d = t_end / n, d0
        f = lambda d: mf.balance_rate(mf.point_with_balance(d), rule)
        for _ in range(n):
            k1 = f(d); k2 = f(d + h / 2 * k1); k3 = f(d + h / 2 * k2); k4 = f(d + h * k3)
            d = d + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return float((d - d0) / t_end)

    r0s, predictions = {}, {}
    for name, workers, local_batch, steps, rule in [("sgd", 1, 4, lambda eta: 1, SGD(4)),
                                                     ("local", 2, 2, lambda eta: local_steps_for_beta(0.8, eta),
                                                      LocalSGD(2, 2, 0.8))]:
        rates, prediction = [], None
        for i, eta in enumerate(ETAS):
            H = steps(eta)
            n_rounds = max(1, round(T / (eta ** 2 * H)))
            run = run_local_sgd(mf.sample_gradient, z0, eta=eta, workers=workers, local_batch=local_batch,
                                local_steps=H, n_rounds=n_rounds, n_seeds=SEEDS,
                                generator=torch.Generator().manual_seed(50 + i), observe=mf.balance,
                                observe_every=n_rounds)
            t_end = float(run.times[-1])
            rates.append(float(((run.values[-1] - run.values[0]) / t_end).mean()))
            prediction = predicted(rule, t_end)
        r0s[name], _ = richardson(ETAS, rates)
        predictions[name] = prediction
        assert r0s[name] == pytest.approx(prediction, rel=TOL)
    ratio = predictions["local"] / predictions["sgd"]
    assert ratio > 1.2
    assert r0s["local"] / r0s["sgd"] == pytest.approx(ratio, rel=TOL)
