"""experiments.comparison.continuation: the one measurement engine, for both noise models.

Settings of test_projection (10 real CIFAR-10 images at 4x4, MLP 48 -> 24 -> 10, Gaussian noise; the tiny
4 -> 8 -> 3 network under flipped labels). References: a hand-written single-model Local SGD loop on the same
random stream, a direct `read_at_phi`, the exact prediction (`sde.label_noise.predict_rates`), and
`predicted_path`. Runtime: about a minute, most of it the SGD run against the prediction.
"""
import math
import warnings

import pytest
import torch

from experiments.comparison.continuation import (ContinuationConfig, RegimeWarning, extrapolate_to_zero_eta,
                                                 measure, run_continuation, run_schedule)
from experiments.comparison.noise import GaussianLabelNoise
from experiments.comparison.path import fit_slope, predicted_path
from experiments.comparison.phi import read_at_phi
from experiments.comparison.point import point_at
from experiments.comparison.projection import GramPreconditioner, project, sharpness_at
from experiments.comparison.reading_mf import ReadingTolerances
from experiments.schedules import QSR as QSRSchedule
from sde.discrete import local_steps_for_beta, qsr_local_steps
from sde.label_noise import predict_rates
from sde.rules import QSR, SGD, LocalSGD
from tests.experiments.comparison.test_projection import tiny_points


@pytest.fixture(scope="module")
def points(cifar10_dir):
    return tiny_points(cifar10_dir)


def hand_written_run(point, rule, eta, rounds, seeds, generator):
    """Local SGD model by model (autograd per model, explicit averaging), drawing in the engine's order: per
    step the batch indices of all seeds x workers, then their noisy targets (Gaussian: one randn; flipped
    labels: one rand for the flips, one randint for the shifts). The averaged iterate (seeds, D) per round."""
    obj, noise = point.objective, point.noise
    x, targets = obj.data[0]
    K, b, H = rule.workers, rule.local_batch, rule.local_steps(eta)
    theta = [point.zeta.clone() for _ in range(seeds * K)]
    out = []
    for _ in range(rounds):
        for _ in range(H):
            idx = torch.randint(0, len(x), (seeds * K, b), generator=generator)
            y = targets[idx]
            if isinstance(noise, GaussianLabelNoise):
                y = y + noise.sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype)
            else:
                label = y.argmax(-1)
                flip = torch.rand(label.shape, generator=generator) < noise.p
                shift = torch.randint(1, y.shape[-1], label.shape, generator=generator)
                y = torch.eye(y.shape[-1], dtype=y.dtype)[torch.where(flip, (label + shift) % y.shape[-1], label)]
            for m in range(seeds * K):
                t = theta[m].clone().requires_grad_(True)
                loss = noise.loss(obj.forward(t, x[idx[m]]), y[m])
                theta[m] = theta[m] - eta * torch.autograd.grad(loss, t)[0]
        avg = [torch.stack(theta[s * K:(s + 1) * K]).mean(0) for s in range(seeds)]
        theta = [avg[m // K].clone() for m in range(seeds * K)]
        out.append(torch.stack(avg))
    return out


@pytest.mark.parametrize("name, eta", [("gaussian", 0.004), ("flip", 0.01)])
def test_engine_is_a_hand_written_local_sgd_read_at_phi(points, name, eta):
    """The stacked seeds x workers loop (sde.discrete.run_local_sgd with the noise model's sampler) equals the
    model-by-model loop, and each reading at Phi equals a direct `read_at_phi` of the hand-written iterate."""
    point = points[name]
    obj, noise = point.objective, point.noise
    rule, rounds = LocalSGD(2, 2, 2 * eta), 3
    cfg = ContinuationConfig(rule, eta=eta, rounds=rounds, seeds=2, max_relative_change=10.0, gd_steps=0)
    res = run_continuation(point, cfg, generator=torch.Generator().manual_seed(0))
    iterates = hand_written_run(point, rule, eta, rounds, 2, torch.Generator().manual_seed(0))

    def gn(theta):
        z, report = project(obj, noise, theta, preconditioner=point.preconditioner)
        return z, report.distance
    read = lambda z: sharpness_at(obj, noise, z, reference=point.reference)     # noqa: E731
    for k, avg in enumerate(iterates, start=1):
        for s in range(2):
            direct = read_at_phi(avg[s], point.correction, gn, read)
            assert float(res.trace[k, s]) == pytest.approx(direct.corrected[0], rel=1e-10)
            assert float(res.lambda_max[k, s]) == pytest.approx(direct.corrected[1], rel=1e-10)
            assert float(res.raw_trace[k, s]) == pytest.approx(direct.raw[0], rel=1e-10)
            assert float(res.projection_distance[k, s]) == pytest.approx(float((direct.projection - point.zeta).norm()),
                                                                         rel=1e-6)
    assert (res.trace[1:] - res.raw_trace[1:]).abs().min() > 1e-12          # the correction is not zero
    assert torch.equal(res.trace[0], res.raw_trace[0]) and float(res.projection_residual.max()) <= 1e-10
    # phi=False on the same draws: gd_steps = 0, so it reads the Gauss-Newton projection, the raw reading
    plain = run_continuation(point, cfg, generator=torch.Generator().manual_seed(0), phi=False)
    torch.testing.assert_close(plain.trace, res.raw_trace, rtol=1e-12, atol=0)
    torch.testing.assert_close(plain.raw_trace, plain.trace, rtol=0, atol=0)
    # with gradient-descent steps first, the projection differs: equal to first order only
    gd = run_continuation(point, ContinuationConfig(rule, eta=eta, rounds=rounds, seeds=2, max_relative_change=10.0),
                          generator=torch.Generator().manual_seed(0), phi=False)
    assert torch.allclose(gd.trace, res.raw_trace, rtol=1e-3)


def test_config_rounding_and_schedule():
    """H = rule.local_steps(eta), one rounding rule everywhere (QSR floor((alpha/eta)^2), Local SGD round(beta/eta))
    at learning rates where floor and round differ ((0.08/0.006)^2 = 177.8, (0.08/0.0125)^2 = 40.96, 0.05/0.0115 =
    4.35): the engine, `run_schedule`, the trainer's schedule and `sde.discrete` agree; checkpoint times."""
    for eta, h in ((0.006, 177), (0.0125, 40), (0.004, 400)):
        qsr = QSR(4, 2, alpha=0.08)
        assert ContinuationConfig(qsr, eta=eta, rounds=1).local_steps == h == qsr.local_steps(eta)
        assert qsr_local_steps(eta, 0.08) == h == QSRSchedule(1, 0.08).period(eta)
        assert qsr.at_eta(eta).beta == pytest.approx(eta * h, rel=1e-15)        # the prediction at the run's H
        config = ContinuationConfig(qsr, eta, **run_schedule(qsr, eta, slow_time=0.2, checkpoints=2, seeds=1))
        assert config.local_steps == h
    assert ContinuationConfig(LocalSGD(4, 2, 0.4), eta=0.004, rounds=1).local_steps == 100
    assert ContinuationConfig(LocalSGD(4, 2, 0.3), eta=0.1, rounds=1).local_steps == 3      # 2.9999999999999996
    assert ContinuationConfig(LocalSGD(4, 2, 0.05), eta=0.0115, rounds=1).local_steps == 4
    assert local_steps_for_beta(0.05, 0.0115) == 4 and local_steps_for_beta(0.3, 0.1) == 3
    assert ContinuationConfig(SGD(8), eta=0.01, rounds=1, steps_per_round_sgd=7).local_steps == 7
    with pytest.raises(ValueError, match="alpha"):
        ContinuationConfig(QSR(4, 2), eta=0.004, rounds=1)
    with pytest.raises(ValueError, match="eta must be positive"):
        ContinuationConfig(SGD(2), eta=0.0, rounds=1)
    with pytest.raises(ValueError, match="rounds"):
        ContinuationConfig(SGD(2), eta=0.1, rounds=0)
    # H = 3 steps per round, a reading every 2 rounds; the 7th round is run but not read
    local = ContinuationConfig(LocalSGD(2, 1, 0.03), eta=0.01, rounds=7, checkpoint_every=2)
    assert local.checkpoint_times.dtype == torch.float64
    assert local.checkpoint_times.tolist() == pytest.approx([k * 6 * 0.01 ** 2 for k in range(4)], rel=1e-15)
    sgd = ContinuationConfig(SGD(8), 0.02, **run_schedule(SGD(8), 0.02, slow_time=0.2, checkpoints=4, seeds=2))
    assert sgd.rounds * sgd.local_steps * 0.02 ** 2 == pytest.approx(0.2) and sgd.seeds == 2
    loc = ContinuationConfig(LocalSGD(4, 2, 0.4), 0.02, **run_schedule(LocalSGD(4, 2, 0.4), 0.02, slow_time=0.1,
                                                                          checkpoints=4, seeds=2))
    assert loc.local_steps == 20 and loc.rounds * 20 * 0.02 ** 2 == pytest.approx(0.1, rel=0.05)   # whole rounds
    assert loc.rounds // loc.checkpoint_every == 4
    assert run_schedule(QSR(4, 2, alpha=0.08), 0.02, slow_time=0.06, checkpoints=4, seeds=1)["rounds"] == 9


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_guards_before_any_step(points, name):
    point = points[name]
    with pytest.raises(ValueError, match="eta x lambda_max"):
        run_continuation(point, ContinuationConfig(SGD(2), eta=5.0, rounds=1), generator=torch.Generator())
    moved = point_at(point.objective, point.noise, point.zeta + 0.1, tol=math.inf)
    with pytest.raises(ValueError, match="not on Gamma"):
        run_continuation(moved, ContinuationConfig(SGD(2), eta=0.001, rounds=1), generator=torch.Generator())
    other = GramPreconditioner(values=point.preconditioner.values[:5], vectors=point.preconditioner.vectors[:5, :5])
    with pytest.raises(ValueError, match="build it at this zeta"):
        run_continuation(point.__class__(**{**point.__dict__, "preconditioner": other}),
                         ContinuationConfig(SGD(2), eta=0.001, rounds=1), generator=torch.Generator())
    tight = ContinuationConfig(SGD(2), eta=0.004, rounds=1, seeds=1, steps_per_round_sgd=20, max_relative_change=1e-9)
    with pytest.warns(RegimeWarning, match="changed by"):
        run_continuation(point, tight, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rule", [SGD(2), LocalSGD(2, 1, 0.05), QSR(2, 1, alpha=0.03)], ids=["sgd", "local", "qsr"])
def test_flip_runs_read_on_gamma_with_progress(points, rule, capsys):
    point = points["flip"]
    cfg = ContinuationConfig(rule, eta=0.01, rounds=4, seeds=2, steps_per_round_sgd=10, max_relative_change=10.0)
    lines = []
    res = run_continuation(point, cfg, generator=torch.Generator().manual_seed(0), progress=lines.append)
    assert res.trace.shape == (5, 2) and res.times.shape == (5,)
    assert float(res.projection_residual.max()) <= 1e-10
    assert res.times[-1] == pytest.approx(4 * cfg.local_steps * 0.01 ** 2)
    assert res.trace[1:].ne(res.trace[0]).all()           # the iterate moved along Gamma
    assert res.raw_trace[1:].ne(res.trace[1:]).all()       # corrected and raw readings differ
    assert len(lines) == 4 and "round 4/4" in lines[-1] and f"t = {4 * cfg.local_steps * 0.01 ** 2:.4g}" in lines[-1]
    assert capsys.readouterr().out == ""                   # the library prints nothing itself


def test_short_sgd_continuation_measures_predicted_slope(points):
    """SGD (B = 2, eta = 0.004, sigma = 0.1, 2,000 steps, 8 seeds, readings after 20 gradient-descent steps)
    against the exact prediction. Tolerance 15%: the measured rate carries O(eta) corrections the eta -> 0 theory
    omits (eta lambda_max / 2 = 3.8%, eta tr H / (2 B C) = 3.8%; +8.6% together here), and the seed-to-seed std
    of the mean slope is ~1%. A wrong factor in B, sigma^2 or the 1/4 (or a sign) misses the band by far."""
    point = points["gaussian"]
    predicted = predict_rates(point.objective, point.geometry, SGD(2), noise_scale=0.01)
    cfg = ContinuationConfig(SGD(2), eta=0.004, rounds=4, seeds=8, steps_per_round_sgd=500, gd_steps=20,
                             vectorize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegimeWarning)            # must stay in the regime
        result = run_continuation(point, cfg, generator=torch.Generator().manual_seed(1), phi=False)
    assert result.projection_residual.max() <= 1e-10
    fit = fit_slope(result.times, result.trace, skip=0)
    assert predicted.trace_rate < 0
    assert fit.mean / predicted.trace_rate == pytest.approx(1.0, abs=0.15)


def test_sgd_rate_extrapolated_to_zero_eta_within_5_percent(points):
    """Measured / predicted d tr H/dt at eta = 0.004 and 0.002 (8 seeds each), extrapolated linearly to eta = 0,
    within 5% of 1 (seen: 1.086, 1.039 -> 0.99). About 15 s (the vmapped stacked loop)."""
    point = points["gaussian"]
    predicted = predict_rates(point.objective, point.geometry, SGD(2), noise_scale=0.01).trace_rate
    ratios = []
    for eta, steps in ((0.004, 2000), (0.002, 4000)):
        cfg = ContinuationConfig(SGD(2), eta=eta, rounds=4, seeds=8, steps_per_round_sgd=steps // 4, gd_steps=20,
                                 vectorize=True)
        result = run_continuation(point, cfg, generator=torch.Generator().manual_seed(1), phi=False)
        ratios.append(fit_slope(result.times, result.trace, skip=0).mean / predicted)
    assert ratios[0] > ratios[1] > 1.0                           # the O(eta) excess shrinks with eta
    assert extrapolate_to_zero_eta([0.004, 0.002], ratios) == pytest.approx(1.0, abs=0.05)


def test_extrapolation_to_zero_eta_is_exact_on_lines():
    assert extrapolate_to_zero_eta([0.002, 0.004, 0.008], [1 + 20 * e for e in (0.002, 0.004, 0.008)]) \
        == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two"):
        extrapolate_to_zero_eta([0.1], [1.0])


@pytest.mark.parametrize("name, rule, eta, dt", [("gaussian", SGD(2), 0.01, 0.001),
                                                 ("flip", LocalSGD(2, 1, 0.05), 0.01, 0.002)])
def test_measure_fits_the_run_and_the_predicted_path(points, name, rule, eta, dt):
    point = points[name]
    cfg = ContinuationConfig(rule, eta=eta, rounds=4, steps_per_round_sgd=10, seeds=2, max_relative_change=10.0)
    m = measure(point, cfg, seed=3, path_dt=dt)
    res = run_continuation(point, cfg, generator=torch.Generator().manual_seed(3))
    fit = fit_slope(res.times, res.trace)
    assert m.trace_rate == fit.mean and m.trace_rate_std == fit.std
    assert m.trace_rate_per_seed == tuple(fit.per_seed.tolist())
    assert m.raw_trace_rate == fit_slope(res.times, res.raw_trace).mean
    assert m.lambda_max_rate == fit_slope(res.times, res.lambda_max).mean
    assert m.checkpoint_times == pytest.approx([k * cfg.local_steps * eta ** 2 for k in range(5)])
    assert m.trace_mean_per_checkpoint[0] == pytest.approx(point.trace, rel=1e-10)
    assert m.slow_time == m.checkpoint_times[-1] and m.local_steps == cfg.local_steps and m.seeds == 2
    path = predicted_path(point, rule.at_eta(eta), t1=m.slow_time, dt=dt)
    times = torch.tensor(m.checkpoint_times, dtype=torch.float64)
    assert m.path_trace_rate == pytest.approx(path.fitted_slope(times), rel=1e-12)
    assert m.path_lambda_max_rate == pytest.approx(path.fitted_slope(times, "lambda_max"), rel=1e-12)
    # a short window: the path's fitted slope is the rate at zeta to first order in the window
    rate = predict_rates(point.objective, point.geometry, rule.at_eta(eta), noise_scale=point.noise.noise_scale)
    assert m.path_trace_rate == pytest.approx(rate.trace_rate, rel=0.02)
    assert math.isnan(measure(point, cfg).path_trace_rate)                    # NaN without path_dt


def test_a_matrix_free_point_is_read_matrix_free(points):
    """A point built with method "cg" runs through the same engine, read by `reading_mf.MatrixFreeReader`: the same
    draws give the dense point's readings to the CG and Lanczos tolerances."""
    dense = points["gaussian"]
    mf = point_at(dense.objective, dense.noise, dense.zeta, method="cg", rank=40)
    cfg = ContinuationConfig(LocalSGD(2, 2, 0.008), eta=0.004, rounds=2, seeds=2, max_relative_change=10.0)
    got = run_continuation(mf, cfg, generator=torch.Generator().manual_seed(0))
    ref = run_continuation(dense, cfg, generator=torch.Generator().manual_seed(0))
    for field in ("trace", "lambda_max", "raw_trace"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-6, atol=0)
    assert float(got.projection_residual.max()) <= 1e-10


def _loosened_runs(points, **loose):
    """The same draws of a Local SGD run at the tiny Gaussian point, read with the default `ReadingTolerances`
    and with `loose` ones: (tight, loose) `ContinuationResult`s."""
    dense = points["gaussian"]
    mf = point_at(dense.objective, dense.noise, dense.zeta, method="cg", rank=40)
    runs = []
    for tolerances in (ReadingTolerances(), ReadingTolerances(**loose)):
        cfg = ContinuationConfig(LocalSGD(2, 2, 0.008), eta=0.004, rounds=2, seeds=2, max_relative_change=10.0,
                                 tolerances=tolerances)
        runs.append(run_continuation(mf, cfg, generator=torch.Generator().manual_seed(0)))
    return runs


def test_flow_rtol_reaches_the_matrix_free_reader(points):
    """ReadingTolerances.flow_rtol is the readings' flow-term truncation: at 1e-4 the same draws keep fewer ranks
    than at the default 1e-10, and the readings at Phi move by far less than the flow term (the Lyapunov factor's
    dropped part is bounded by rtol x its trace); the raw readings do not move. Outside (0, 1) it is refused."""
    tight, loose = _loosened_runs(points, flow_rtol=1e-4)
    assert max(loose.reading_cost["flow_ranks"]) < min(tight.reading_cost["flow_ranks"])
    torch.testing.assert_close(loose.raw_trace, tight.raw_trace, rtol=1e-12, atol=0)
    flow = (tight.raw_trace - tight.trace)[1:].abs()             # the correction the flow term is part of
    assert float((loose.trace - tight.trace).abs().max()) <= 1e-3 * float(flow.max())
    with pytest.raises(ValueError, match="flow_rtol"):
        ReadingTolerances(flow_rtol=1.0)


def test_first_cg_rtol_reaches_the_projections(points):
    """ReadingTolerances.first_cg_rtol reaches each projection's first Gauss-Newton solve: at 0.5 the same draws
    read differently, every projection still ends on Gamma to 1e-10, and the readings move by at most rtol x the
    second-order correction (the end point moves along Gamma by rtol x O(|x|^2); the iteration savings are
    test_projection's). Outside (0, 1) it is refused."""
    rtol = 0.5
    tight, loose = _loosened_runs(points, first_cg_rtol=rtol)
    assert float(loose.projection_residual.max()) <= 1e-10
    moved = float((loose.trace - tight.trace).abs().max())
    assert 0 < moved <= rtol * float((tight.raw_trace - tight.trace).abs().max())
    with pytest.raises(ValueError, match="first_cg_rtol"):
        ReadingTolerances(first_cg_rtol=0.0)


def test_reflected_formula_reaches_the_readings(points):
    """ReadingTolerances(reflected="formula") reaches the continuation's readings: the same draws make half the
    projections, the raw readings do not move, and the readings at Phi move by at most 1e-2 of the second-order
    correction (O(|x|^3) and O(|z - zeta| |x|^2) against its O(|x|^2))."""
    tight, formula = _loosened_runs(points, reflected="formula")
    assert 2 * len(formula.reading_cost["projection_cg"]) == len(tight.reading_cost["projection_cg"])
    torch.testing.assert_close(formula.raw_trace, tight.raw_trace, rtol=1e-12, atol=0)
    moved = float((formula.trace - tight.trace).abs().max())
    assert 0 < moved <= 1e-2 * float((tight.raw_trace - tight.trace).abs().max())     # measured 5e-3
    dense = points["gaussian"]                      # a dense point's readings have no such settings: refused
    cfg = ContinuationConfig(SGD(8), eta=0.004, rounds=1, seeds=1, tolerances=ReadingTolerances(reflected="formula"))
    with pytest.raises(ValueError, match="set matrix-free readings; this point is dense"):
        run_continuation(dense, cfg, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_float32_gradients_make_the_same_runs_to_rounding(points, name):
    """ContinuationConfig(gradient_dtype=torch.float32): each stochastic gradient is taken in float32 while the
    iterates, averaging and noise draws stay float64, so the same draws give readings that differ (the gradients
    were rounded) by at most 1e-4 of the window's change of tr H (measured 1.6e-5 Gaussian, 7.6e-6 flipped labels)."""
    runs = []
    for dtype in (None, torch.float32):
        cfg = ContinuationConfig(LocalSGD(2, 2, 0.008), eta=0.004, rounds=4, seeds=2, max_relative_change=10.0,
                                 gradient_dtype=dtype)
        runs.append(run_continuation(points[name], cfg, generator=torch.Generator().manual_seed(0)))
    high, low = runs
    change = float((high.trace[-1] - high.trace[0]).abs().max())
    moved = float((low.trace - high.trace).abs().max())
    assert change > 0 and 0 < moved <= 1e-4 * change
    with pytest.raises(ValueError, match="gradient_dtype must be a floating dtype"):
        ContinuationConfig(SGD(8), eta=0.004, rounds=1, gradient_dtype=torch.int32)
