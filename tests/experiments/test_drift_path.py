"""experiments.drift_path: the predicted path of the label-noise slow drift on Gamma (squared loss).

Tiny real setting of tests/experiments/test_drift_check.py: 10 CIFAR-10 images at 4x4, float64 GELU
MLP 48 -> 24 -> 10 (D = 1,426 > N C = 100) on Gamma by Gauss-Newton. References: the closed-form rates
at zeta (`sde.label_noise`), Simpson's rule on the path's own rates, the measurement's `fit_slope`,
the exact time rescalings of the drift (sigma^2 and QSR = K x SGD), and `run_continuation`'s times.
"""
import dataclasses
import math

import pytest
import torch

from experiments.continuation import ContinuationConfig, fit_slope, run_continuation, sharpness_on_manifold
from experiments.drift_check import compare_rule
from experiments.drift_path import NodeRates, integrate_drift_path, label_noise_drift_path
from experiments.manifold import cifar_subset, project_to_manifold
from sde.label_noise import gauss_newton_geometry, predict_label_noise_rates
from sde.rules import QSR, SGD, LocalSGD
from tests.experiments.test_drift_check import tiny_mlp_objective

SIGMA = 0.1


def assert_path_integrates_its_rates(coarse, fine, t1: float, *, simpson_rel: float) -> None:
    """Checks shared by every `PredictedPath` instance (squared loss here, cross-entropy in
    test_flipped_labels): Simpson's rule on the fine path's rates gives its trace change (the rates are
    grad trH . drift), Hermite interpolation hits the nodes, the fitted slope converges in dt and is
    the measurement's `fit_slope` of the interpolated readings."""
    r, h = fine.trace_rate, float(fine.times[1] - fine.times[0])
    simpson = h / 3 * float(r[0] + r[-1] + 4 * r[1:-1:2].sum() + 2 * r[2:-1:2].sum())
    assert simpson == pytest.approx(float(fine.trace[-1] - fine.trace[0]), rel=simpson_rel)
    assert torch.allclose(fine.at(fine.times), fine.trace, rtol=1e-14, atol=0)
    checkpoints = torch.linspace(0, t1, 5, dtype=torch.float64)
    assert coarse.fitted_slope(checkpoints) == pytest.approx(fine.fitted_slope(checkpoints), rel=1e-3)
    direct = fit_slope(checkpoints, fine.at(checkpoints)[:, None]).mean
    assert fine.fitted_slope(checkpoints) == pytest.approx(direct, rel=1e-14)


@pytest.fixture(scope="module")
def tiny(cifar10_dir):
    x, y = cifar_subset(cifar10_dir, 10, image_size=4)
    obj = tiny_mlp_objective(x, y)
    zeta, _ = project_to_manifold(obj, tol=1e-24, max_gauss_newton=60)
    return obj, zeta


def test_label_noise_is_normal_on_gamma_so_the_slow_sde_has_no_diffusion(tiny):
    """Sigma = sigma^2 (1/N) sum_i J_i^T J_i on Gamma (zero residuals): every column of J^T is normal,
    so S_par = P Sigma P = 0 and the slow SDE is an ODE (the premise of the path)."""
    obj, zeta = tiny
    geo = gauss_newton_geometry(obj, zeta)
    rows = geo.jacobian.reshape(-1, obj.dim)
    projected = torch.stack([geo.tangent_project(r) for r in rows])
    # round-off of the Gram solve only (condition number of G ~ 1e6 here): far below 1
    assert float(projected.norm() / rows.norm()) < 1e-8
    # the per-sample gradients vanish, so the resampling part of Sigma is zero as well
    assert float(obj.grad(zeta).norm()) < 1e-9


@pytest.mark.parametrize("rule", [SGD(2), LocalSGD(2, 1, 0.5)], ids=["sgd", "local"])
def test_label_noise_path_integrates_the_closed_form_drift(tiny, rule):
    """Nodes on Gamma, first node = closed form at zeta, Heun second order, trace change = integral of
    the rates, fitted_slope = the measurement's fit, and the rate really changes along the path."""
    obj, zeta = tiny
    start = predict_label_noise_rates(obj, gauss_newton_geometry(obj, zeta), rule, sigma=SIGMA)
    t1 = 0.1 * start.trace / abs(start.trace_rate)                  # tr H falls by about 10%
    paths = {n: label_noise_drift_path(obj, zeta, rule, sigma=SIGMA, t1=t1, dt=t1 / n) for n in (4, 8, 16)}
    coarse, fine, finest = paths[4], paths[8], paths[16]
    for p in paths.values():
        assert p.max_residual <= 1e-10 and obj.loss(p.end).item() <= 1e-10
    assert len(coarse.times) == 5 and float(coarse.times[-1]) == pytest.approx(t1, rel=1e-14)
    assert float(coarse.trace_rate[0]) == pytest.approx(start.trace_rate, rel=1e-12)
    assert float(coarse.lambda_max_rate[0]) == pytest.approx(start.lambda_max_rate, rel=1e-12)
    assert float(coarse.trace[0]) == pytest.approx(start.trace, rel=1e-12)
    # the last node is read at the end point: an independent sharpness read agrees
    tr_end, lm_end = sharpness_on_manifold(obj, fine.end)
    assert float(fine.trace[-1]) == pytest.approx(tr_end, rel=1e-10)
    assert float(fine.lambda_max[-1]) == pytest.approx(lm_end, rel=1e-8)
    drop = float(finest.trace[0] - finest.trace[-1])
    assert 0.05 * start.trace < drop < 0.15 * start.trace
    # Heun is second order: the end-point error falls ~4x when dt halves (2.5-6 allows the O(dt^3) term)
    err4 = abs(float(coarse.trace[-1] - finest.trace[-1]))
    err8 = abs(float(fine.trace[-1] - finest.trace[-1]))
    assert err4 < 1e-3 * drop
    assert 2.5 * 4 / 3 < err4 / err8 < 6 * 4 / 3     # errors measured against dt/4: ratio (1 - 1/16)/(1/4 - 1/16) = 5
    assert_path_integrates_its_rates(coarse, finest, t1, simpson_rel=1e-4)
    # the point of the path: over a 10% drop the rate changes, and the fitted slope is not the rate at zeta
    fitted = finest.fitted_slope(torch.linspace(0, t1, 5, dtype=torch.float64))
    assert float(finest.trace_rate.min()) <= fitted <= float(finest.trace_rate.max())
    assert abs(fitted / start.trace_rate - 1) > 0.01
    if isinstance(rule, SGD):   # SGD's drift is a gradient flow of tr H on Gamma: tr H only falls
        assert bool((finest.trace_rate < 0).all()) and bool((finest.trace[1:] < finest.trace[:-1]).all())


def test_path_time_rescalings_are_exact(tiny):
    """The drift is proportional to sigma^2, and QSR's eta -> 0 drift is K x SGD's (same total batch):
    the path at (3 sigma, t) is the path at (sigma, 9 t), QSR(K=2) at t is SGD(B=2) at 2 t."""
    obj, zeta = tiny
    start = predict_label_noise_rates(obj, gauss_newton_geometry(obj, zeta), SGD(2), sigma=SIGMA)
    t1 = 0.05 * start.trace / abs(start.trace_rate)
    base = label_noise_drift_path(obj, zeta, SGD(2), sigma=SIGMA, t1=t1, dt=t1 / 4)
    loud = label_noise_drift_path(obj, zeta, SGD(2), sigma=3 * SIGMA, t1=t1 / 9, dt=t1 / 36)
    qsr = label_noise_drift_path(obj, zeta, QSR(2, 1, alpha=0.1), sigma=SIGMA, t1=t1 / 2, dt=t1 / 8)
    for other, factor in ((loud, 9.0), (qsr, 2.0)):
        torch.testing.assert_close(other.times * factor, base.times, rtol=1e-13, atol=0)
        torch.testing.assert_close(other.trace, base.trace, rtol=1e-9, atol=0)
        torch.testing.assert_close(other.trace_rate / factor, base.trace_rate, rtol=1e-8, atol=0)
        torch.testing.assert_close(other.lambda_max_rate / factor, base.lambda_max_rate, rtol=1e-8, atol=0)


def test_checkpoint_times_are_the_runs_and_compare_rule_fits_the_path(tiny):
    obj, zeta = tiny
    # H = 3 steps per round, a reading every 2 rounds; the 7th round is run but not read
    local = ContinuationConfig(LocalSGD(2, 1, 0.03), eta=0.01, sigma=SIGMA, rounds=7, checkpoint_every=2, seeds=1,
                               max_relative_change=10.0)
    assert local.checkpoint_times.dtype == torch.float64
    assert local.checkpoint_times.tolist() == pytest.approx([k * 6 * 0.01 ** 2 for k in range(4)], rel=1e-15)
    res = run_continuation(obj, zeta, local, generator=torch.Generator().manual_seed(0))
    assert res.trace.shape == (4, 1) and res.trace.dtype == torch.float64
    assert torch.equal(res.times, local.checkpoint_times)

    cfg = ContinuationConfig(SGD(2), eta=0.01, sigma=SIGMA, rounds=4, steps_per_round_sgd=10, seeds=2,
                             max_relative_change=10.0)
    row = compare_rule(obj, zeta, cfg, path_dt=0.001)
    times = cfg.checkpoint_times
    path = label_noise_drift_path(obj, zeta, cfg.rule, sigma=SIGMA, t1=float(times[-1]), dt=0.001)
    assert row.predicted_trace_rate_path == pytest.approx(path.fitted_slope(times), rel=1e-9)
    assert row.predicted_lambda_max_rate_path == pytest.approx(path.fitted_slope(times, "lambda_max"), rel=1e-9)
    # a window of 0.004 slow time: the path's fitted slope is the rate at zeta to first order in it
    assert row.predicted_trace_rate_path == pytest.approx(row.predicted_trace_rate, rel=0.02)
    assert row.trace_ratio_path == pytest.approx(row.measured_trace_rate / row.predicted_trace_rate_path)
    # without path_dt the row is what it was: NaN path fields
    plain = compare_rule(obj, zeta, dataclasses.replace(cfg, rounds=2))
    assert math.isnan(plain.predicted_trace_rate_path) and math.isnan(plain.trace_ratio_path)


def test_path_guards(tiny):
    obj, zeta = tiny
    with pytest.raises(ValueError, match="t1 and dt"):
        label_noise_drift_path(obj, zeta, SGD(2), sigma=SIGMA, t1=0.0)
    with pytest.raises(ValueError, match="t1 and dt"):
        label_noise_drift_path(obj, zeta, SGD(2), sigma=SIGMA, t1=1.0, dt=float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        label_noise_drift_path(obj, zeta, SGD(2), sigma=0.0, t1=1.0)
    with pytest.raises(ValueError, match="not on Gamma"):
        label_noise_drift_path(obj, zeta + 0.1, SGD(2), sigma=SIGMA, t1=1.0)
    # a linear toy path through the generic integrator: exact, and the guards of PredictedPath
    line = integrate_drift_path(torch.zeros(3, dtype=torch.float64),
                                lambda z: _line_rates(z), lambda z: z, t1=1.0, dt=0.25)
    torch.testing.assert_close(line.trace, 5.0 - 2.0 * line.times)
    assert line.fitted_slope(torch.tensor([0.0, 0.3, 0.6, 0.9])) == pytest.approx(-2.0, rel=1e-14)
    with pytest.raises(ValueError, match="times must lie"):
        line.at(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="key"):
        line.at(torch.tensor([0.5]), "loss")
    with pytest.raises(ValueError, match="increasing"):
        dataclasses.replace(line, times=line.times.flip(0))


def _line_rates(z):
    drift = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    return NodeRates(trace=5.0 - 2.0 * float(z[0]), lambda_max=1.0, trace_rate=-2.0, lambda_max_rate=0.0,
                     drift=drift, residual=0.0)


def test_cli_rejects_a_bad_path_dt_before_the_setup(tmp_path, capsys):
    from experiments.drift_check import main
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "rows.jsonl"), "--path-dt", "-0.01", "--data", str(tmp_path / "missing")])
    assert "--path-dt must be positive" in capsys.readouterr().err
    assert not (tmp_path / "rows.jsonl").exists()
