"""experiments.comparison.path: the predicted path of the label-noise slow drift on Gamma, both noise models.

Settings of test_projection. References: the exact rates at zeta (`sde.label_noise.predict_rates`), Simpson's
rule on the path's own rates, `fit_slope`, an independent sharpness reading at the end point, and the exact time
rescalings of the drift (c = sigma^2, QSR = K x SGD).
"""
import dataclasses

import pytest
import torch

from experiments.comparison.noise import GaussianLabelNoise
from experiments.comparison.path import NodeRates, fit_slope, integrate_drift_path, predicted_path
from experiments.comparison.projection import sharpness_at
from sde.label_noise import predict_rates
from sde.rules import QSR, SGD, LocalSGD
from tests.experiments.comparison.test_projection import tiny_points


@pytest.fixture(scope="module")
def points(cifar10_dir):
    return tiny_points(cifar10_dir)


def test_label_noise_is_normal_on_gamma_so_the_slow_sde_has_no_diffusion(points):
    """Sigma = c (1/N) sum_i Jt_i^T Jt_i on Gamma: every column of Jt^T is normal, so P Sigma P = 0 and the slow
    SDE is an ODE (the premise of the path); the expected loss has zero gradient there."""
    for point in points.values():
        geo = point.geometry
        projected = torch.stack([geo.tangent_project(r) for r in geo.reduced])
        assert float(projected.norm() / geo.reduced.norm()) < 1e-8       # Gram-solve round-off only
        assert float(point.objective.grad(point.zeta).norm()) < 1e-9


@pytest.mark.parametrize("name, rule, ns", [("gaussian", SGD(2), (4, 8, 16)),
                                            ("gaussian", LocalSGD(2, 1, 0.5), (4, 8, 16)),
                                            ("flip", SGD(2), (4, 8)), ("flip", LocalSGD(2, 1, 0.5), (4, 8))],
                         ids=["gaussian-sgd", "gaussian-local", "flip-sgd", "flip-local"])
def test_path_integrates_the_exact_drift(points, name, rule, ns):
    """Nodes on Gamma, first node = the exact rates at zeta, Heun second order, trace change = integral of the
    rates, fitted_slope = the measurement's fit, and the rate really changes along the path."""
    point = points[name]
    start = predict_rates(point.objective, point.geometry, rule, noise_scale=point.noise.noise_scale)
    t1 = 0.1 * start.trace / abs(start.trace_rate)                  # tr H falls by about 10%
    paths = [predicted_path(point, rule, t1=t1, dt=t1 / n) for n in ns]
    coarse, finest = paths[0], paths[-1]
    for p in paths:
        assert p.max_residual <= 1e-10
        assert point.noise.distance(point.objective.forward(p.end, point.objective.data[0][0]), point.targets) <= 1e-10
    assert len(coarse.times) == 5 and float(coarse.times[-1]) == pytest.approx(t1, rel=1e-14)
    assert float(coarse.trace_rate[0]) == pytest.approx(start.trace_rate, rel=1e-12)
    assert float(coarse.lambda_max_rate[0]) == pytest.approx(start.lambda_max_rate, rel=1e-12)
    assert float(coarse.trace[0]) == pytest.approx(start.trace, rel=1e-12)
    tr_end, lm_end = sharpness_at(point.objective, point.noise, paths[1].end)   # read independently at the end
    assert float(paths[1].trace[-1]) == pytest.approx(tr_end, rel=1e-10)
    assert float(paths[1].lambda_max[-1]) == pytest.approx(lm_end, rel=1e-8)
    drop = float(finest.trace[0] - finest.trace[-1])
    assert 0.05 * start.trace < drop < 0.15 * start.trace
    err_coarse = abs(float(coarse.trace[-1] - finest.trace[-1]))
    assert err_coarse < 1e-3 * drop
    if len(paths) == 3:     # Heun is second order: the error falls ~4x when dt halves (vs dt/4: ratio 5)
        assert 2.5 * 4 / 3 < err_coarse / abs(float(paths[1].trace[-1] - finest.trace[-1])) < 6 * 4 / 3
    # Simpson on the fine path's rates gives its trace change (the rates are grad tr H . drift)
    r, h = finest.trace_rate, float(finest.times[1] - finest.times[0])
    simpson = h / 3 * float(r[0] + r[-1] + 4 * r[1:-1:2].sum() + 2 * r[2:-1:2].sum())
    assert simpson == pytest.approx(float(finest.trace[-1] - finest.trace[0]), rel=1e-4 if len(ns) == 3 else 1e-3)
    assert torch.allclose(finest.at(finest.times), finest.trace, rtol=1e-14, atol=0)
    checkpoints = torch.linspace(0, t1, 5, dtype=torch.float64)
    assert coarse.fitted_slope(checkpoints) == pytest.approx(finest.fitted_slope(checkpoints), rel=1e-3)
    fitted = finest.fitted_slope(checkpoints)
    assert fitted == pytest.approx(fit_slope(checkpoints, finest.at(checkpoints)[:, None]).mean, rel=1e-14)
    assert float(finest.trace_rate.min()) <= fitted <= float(finest.trace_rate.max())
    assert abs(fitted / start.trace_rate - 1) > 0.01
    if isinstance(rule, SGD):   # SGD's drift is a gradient flow of tr H on Gamma: tr H only falls
        assert bool((finest.trace_rate < 0).all()) and bool((finest.trace[1:] < finest.trace[:-1]).all())


def test_path_time_rescalings_are_exact(points):
    """The drift is proportional to c = sigma^2, and QSR's eta -> 0 drift is K x SGD's (same total batch): the
    path at (3 sigma, t) is the path at (sigma, 9 t), QSR(K=2) at t is SGD(B=2) at 2 t."""
    point = points["gaussian"]
    start = predict_rates(point.objective, point.geometry, SGD(2), noise_scale=0.01)
    t1 = 0.05 * start.trace / abs(start.trace_rate)
    base = predicted_path(point, SGD(2), t1=t1, dt=t1 / 4)
    loud = predicted_path(dataclasses.replace(point, noise=GaussianLabelNoise(0.3)), SGD(2), t1=t1 / 9, dt=t1 / 36)
    qsr = predicted_path(point, QSR(2, 1, alpha=0.1), t1=t1 / 2, dt=t1 / 8)
    for other, factor in ((loud, 9.0), (qsr, 2.0)):
        torch.testing.assert_close(other.times * factor, base.times, rtol=1e-13, atol=0)
        torch.testing.assert_close(other.trace, base.trace, rtol=1e-9, atol=0)
        torch.testing.assert_close(other.trace_rate / factor, base.trace_rate, rtol=1e-8, atol=0)
        torch.testing.assert_close(other.lambda_max_rate / factor, base.lambda_max_rate, rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_matrix_free_path_equals_the_dense_one(points, name):
    """At a matrix-free point (exact Gram eigendecomposition, no geometry) the path takes the same Heun steps by CG
    projections and, for SGD, matrix-free rates: nodes, rates and the fitted slope equal the dense path's. Local
    SGD (a psi term: no drift vector matrix-free) is evaluated densely and projected by CG: the same path too."""
    from experiments.comparison.point import point_at
    dense = points[name]
    mf = point_at(dense.objective, dense.noise, dense.zeta, method="cg", exact_preconditioner=True)
    assert mf.geometry is None
    rule = SGD(2)
    start = predict_rates(dense.objective, dense.geometry, rule, noise_scale=dense.noise.noise_scale)
    t1 = 0.05 * start.trace / abs(start.trace_rate)
    want, got = (predicted_path(p, rule, t1=t1, dt=t1 / 2) for p in (dense, mf))
    torch.testing.assert_close(got.times, want.times, rtol=0, atol=0)
    for key in ("trace", "lambda_max", "trace_rate", "lambda_max_rate"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-9, atol=0)
    torch.testing.assert_close(got.end, want.end, rtol=0, atol=1e-8 * float(want.end.norm()))
    checkpoints = torch.linspace(0, t1, 3, dtype=torch.float64)
    assert got.fitted_slope(checkpoints) == pytest.approx(want.fitted_slope(checkpoints), rel=1e-9)
    assert abs(got.fitted_slope(checkpoints) / start.trace_rate - 1) > 0.03     # the path moved the rate (7-10%)
    want, got = (predicted_path(p, LocalSGD(2, 1, 0.5), t1=t1, dt=t1 / 2) for p in (dense, mf))
    torch.testing.assert_close(got.trace_rate, want.trace_rate, rtol=1e-9, atol=0)
    torch.testing.assert_close(got.end, want.end, rtol=0, atol=1e-8 * float(want.end.norm()))


def test_path_guards_and_the_generic_integrator(points):
    point = points["gaussian"]
    with pytest.raises(ValueError, match="t1 and dt"):
        predicted_path(point, SGD(2), t1=0.0)
    with pytest.raises(ValueError, match="t1 and dt"):
        predicted_path(point, SGD(2), t1=1.0, dt=float("nan"))
    with pytest.raises(ValueError, match="left Gamma"):
        predicted_path(dataclasses.replace(point, zeta=point.zeta + 0.1), SGD(2), t1=1.0)
    with pytest.raises(ValueError, match="rule"):
        predicted_path(point, "sgd", t1=1.0)
    line = integrate_drift_path(torch.zeros(3, dtype=torch.float64), _line_rates, lambda z: z, t1=1.0, dt=0.25)
    torch.testing.assert_close(line.trace, 5.0 - 2.0 * line.times)      # a linear toy path: exact
    assert line.fitted_slope(torch.tensor([0.0, 0.3, 0.6, 0.9])) == pytest.approx(-2.0, rel=1e-14)
    with pytest.raises(ValueError, match="times must lie"):
        line.at(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="key"):
        line.at(torch.tensor([0.5]), "loss")
    with pytest.raises(ValueError, match="increasing"):
        dataclasses.replace(line, times=line.times.flip(0))


def _line_rates(z):
    return NodeRates(trace=5.0 - 2.0 * float(z[0]), lambda_max=1.0, trace_rate=-2.0, lambda_max_rate=0.0,
                     drift=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), residual=0.0)


def test_fit_slope_recovers_lines_with_offsets():
    t = torch.linspace(0, 1, 6)
    values = 3.0 + torch.tensor([-2.0, -1.0, 0.5])[None, :] * t[:, None]
    values[0] += 7.0                                             # a bad t = 0 reading, skipped
    fit = fit_slope(t, values, skip=1)
    torch.testing.assert_close(fit.per_seed, torch.tensor([-2.0, -1.0, 0.5], dtype=torch.float64))
    assert fit.mean == pytest.approx(-2.5 / 3) and fit.std > 0
    with pytest.raises(ValueError, match="at least 2"):
        fit_slope(t[:2], values[:2], skip=1)
