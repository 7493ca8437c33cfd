"""experiments.flipped_labels: projection onto the soft-target manifold, its second-order match with
Phi, sharpness readings, continuation runs with flipped labels (tiny float64 network, no data files)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.func import hessian

from experiments.continuation import fit_slope
from experiments.flipped_labels import (FlipContinuationConfig, PhiCorrection, compare_flip_rule, flip_configs,
                                        flip_preconditioner,
                                        flip_drift_path, flip_sharpness_on_manifold, phi_reading,
                                        project_to_flip_manifold, run_flip_continuation, weighted_residual)
from sde import blocks
from sde.flipped_labels import (closed_form_rates, dense_flip_problem, flip_geometry, flip_sharpness_gradients,
                                soft_targets)
from sde.projection import project
from sde.rules import QSR, SGD, LocalSGD
from tests.experiments.test_drift_path import assert_path_integrates_its_rates

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sde"))
from test_flipped_labels import C, N, P_FLIP, _tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def test_projection_from_a_perturbed_point(tiny):
    model, x, y, obj, zeta, _ = tiny
    theta = zeta + 0.05 * torch.randn(zeta.shape, generator=torch.Generator().manual_seed(5), dtype=zeta.dtype)
    start = float(weighted_residual(obj, theta)[1].norm())
    proj, report = project_to_flip_manifold(obj, theta, tol=1e-10, gd_steps=3, gd_lr=0.2)
    assert start > 1e-3 and report.converged and report.residual <= 1e-10
    assert torch.allclose(torch.softmax(obj.forward(proj, x), -1), soft_targets(y, P_FLIP, C), atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="projection onto Gamma failed"):
        project_to_flip_manifold(obj, theta, tol=1e-10, max_gauss_newton=1)
    with pytest.raises(ValueError, match="gd_lr"):
        project_to_flip_manifold(obj, theta, gd_steps=2)


def test_gauss_newton_second_order_is_twice_phis(tiny):
    """(Pi(z + e v) + Pi(z - e v) - 2 z) / e^2 -> 2 P d2Phi[v v^T] for a Hessian eigenvector v: the
    Gauss-Newton projection is NOT Phi at second order (why `phi_reading` corrects it); d2Phi itself
    (sde.blocks.d2phi) is confirmed against an adaptive Runge-Kutta gradient flow."""
    _, _, _, obj, zeta, _ = tiny
    problem = dense_flip_problem(obj)
    H = hessian(problem.loss)(zeta)
    eig = blocks.hessian_eigen(H, rank=N * (C - 1))
    P = blocks.tangent_projector(eig)
    errors = []
    for idx in (-1, -3, -6):                      # three normal eigen-directions
        v = eig.vectors[:, idx]
        expected = P @ blocks.d2phi(problem.loss, zeta, torch.outer(v, v), eig)
        eps = 1e-3
        plus, _ = project_to_flip_manifold(obj, zeta + eps * v, tol=1e-13)
        minus, _ = project_to_flip_manifold(obj, zeta - eps * v, tol=1e-13)
        second = P @ (plus + minus - 2 * zeta) / eps ** 2
        errors.append(float((second - 2 * expected).norm() / expected.norm()))
    # O(eps^2) = 1e-6 truncation plus chord-step error O(eps^3)/eps^2
    assert max(errors) < 1e-3, errors
    v = eig.vectors[:, -1]
    eps = 1e-2
    flow = [project(problem, zeta + sgn * eps * v, method="flow", tol=1e-12, rtol=1e-12, atol=1e-14) for sgn in (1, -1)]
    expected = P @ blocks.d2phi(problem.loss, zeta, torch.outer(v, v), eig)
    second = P @ (flow[0] + flow[1] - 2 * zeta) / eps ** 2
    assert float((second - expected).norm() / expected.norm()) < 1e-4     # O(eps^2) = 1e-4


def test_phi_reading_matches_gradient_flow_to_third_order(tiny):
    _, _, _, obj, zeta, _ = tiny
    problem = dense_flip_problem(obj)
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    correction = PhiCorrection.at(obj, geometry, flip_sharpness_gradients(obj, geometry))
    direction = torch.randn(zeta.shape, generator=torch.Generator().manual_seed(0), dtype=zeta.dtype)
    errors, biases = [], []
    for scale in (1e-2, 1e-3):
        theta = zeta + scale * direction
        corrected, raw, _, residual = phi_reading(obj, theta, correction)
        assert residual <= 1e-10
        truth = flip_sharpness_on_manifold(obj, project(problem, theta, method="flow", tol=1e-12, rtol=1e-12,
                                                        atol=1e-14))
        errors.append(max(abs(c - t) for c, t in zip(corrected, truth)))
        biases.append(abs(raw[0] - truth[0]))
    # the Gauss-Newton reading is off at O(scale^2), the corrected one at O(scale^3)
    assert biases[1] < biases[0] / 50 and errors[1] < errors[0] / 300, (errors, biases)
    assert errors[1] < 1e-2 * biases[1] and errors[0] < 1e-2 * biases[0]


def test_sharpness_reading_matches_geometry(tiny):
    _, _, _, obj, zeta, _ = tiny
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    tr, lm = flip_sharpness_on_manifold(obj, zeta)
    tr2, lm2 = flip_sharpness_on_manifold(obj, zeta, reference=geometry.gram_vectors[:, :2])
    eigs = torch.linalg.eigvalsh(hessian(dense_flip_problem(obj).loss)(zeta))
    assert tr == pytest.approx(float(eigs.clamp_min(0).sum()), rel=1e-10)
    assert lm == pytest.approx(float(eigs[-1]), rel=1e-10) and lm2 == pytest.approx(lm, rel=1e-9)


@pytest.mark.parametrize("rule", [SGD(2), LocalSGD(2, 1, 0.05), QSR(2, 1, alpha=0.03)], ids=["sgd", "local", "qsr"])
def test_continuation_runs_and_reads_on_gamma(tiny, rule):
    _, _, y, obj, zeta, _ = tiny
    cfg = FlipContinuationConfig(rule, eta=0.01, p=P_FLIP, rounds=4, seeds=2, steps_per_round_sgd=10,
                                 max_relative_change=10.0)
    geometry = flip_geometry(obj, zeta, max_residual=1e-10)
    correction = PhiCorrection.at(obj, geometry, flip_sharpness_gradients(obj, geometry))
    res = run_flip_continuation(obj, y, zeta, cfg, generator=torch.Generator().manual_seed(0), correction=correction)
    assert res.trace.shape == (5, 2) and res.times.shape == (5,)
    assert float(res.projection_loss.max()) <= 1e-10
    assert res.times[-1] == pytest.approx(4 * cfg.local_steps * 0.01 ** 2)
    assert res.trace[1:].ne(res.trace[0]).all()           # the iterate moved along Gamma
    assert res.raw_trace[1:].ne(res.trace[1:]).all()       # corrected and raw readings differ
    assert fit_slope(res.times, res.trace).per_seed.shape == (2,)
    # geometry and preconditioner built once and passed in: bit-identical readings, one progress line per checkpoint
    lines = []
    shared = run_flip_continuation(obj, y, zeta, cfg, generator=torch.Generator().manual_seed(0), correction=correction,
                                   geometry=geometry, preconditioner=flip_preconditioner(obj, zeta),
                                   progress=lines.append)
    assert torch.equal(shared.trace, res.trace) and torch.equal(shared.lambda_max, res.lambda_max)
    assert len(lines) == 4 and "round 4/4" in lines[-1]


def test_config_validation(tiny):
    _, _, y, obj, zeta, _ = tiny
    with pytest.raises(ValueError, match="p must be"):
        FlipContinuationConfig(SGD(2), eta=0.01, p=0.95, rounds=1)
    with pytest.raises(ValueError, match="eta must be positive"):
        FlipContinuationConfig(SGD(2), eta=0.0, p=0.1, rounds=1)
    with pytest.raises(ValueError, match="alpha"):
        FlipContinuationConfig(QSR(2, 1), eta=0.01, p=0.1, rounds=1)
    with pytest.raises(ValueError, match="eta x lambda_max"):
        run_flip_continuation(obj, y, zeta, FlipContinuationConfig(SGD(2), eta=5.0, p=0.1, rounds=1),
                              generator=torch.Generator())
    with pytest.raises(ValueError, match="not on Gamma"):
        run_flip_continuation(obj, y, zeta + 0.1, FlipContinuationConfig(SGD(2), eta=0.01, p=0.1, rounds=1),
                              generator=torch.Generator())


def test_flip_configs_slow_times():
    cfgs = flip_configs(0.02, 0.1, seeds=2, checkpoints=4)
    assert cfgs["sgd"].rounds * cfgs["sgd"].local_steps * 0.02 ** 2 == pytest.approx(0.2)
    assert cfgs["local"].local_steps == 20 and cfgs["qsr"].local_steps == 16
    assert cfgs["local"].rounds * 20 * 0.02 ** 2 == pytest.approx(0.1, rel=0.05)   # whole rounds
    with pytest.raises(ValueError, match="divisible"):
        flip_configs(0.02, 0.1, seeds=2, checkpoints=4, batch=6)


@pytest.mark.parametrize("rule", [SGD(2), LocalSGD(2, 1, 0.5)], ids=["sgd", "local"])
def test_drift_path_integrates_the_closed_form_drift(tiny, rule):
    """The predicted path stays on Gamma, starts at the closed-form rates, is second order in dt (Heun),
    its trace change equals the integral of its rates, and `fitted_slope` is the measurement's fit."""
    _, _, _, obj, zeta, _ = tiny
    start = closed_form_rates(obj, flip_geometry(obj, zeta, max_residual=1e-10), rule)
    t1 = 0.1 * start.trace / abs(start.trace_rate)                  # tr H falls by about 10%
    coarse = flip_drift_path(obj, zeta, rule, t1=t1, dt=t1 / 4)
    fine = flip_drift_path(obj, zeta, rule, t1=t1, dt=t1 / 8)
    assert coarse.max_residual <= 1e-10 and fine.max_residual <= 1e-10
    assert len(coarse.times) == 5 and float(coarse.times[-1]) == pytest.approx(t1)
    assert float(coarse.trace_rate[0]) == pytest.approx(start.trace_rate, rel=1e-12)
    assert float(coarse.trace[0]) == pytest.approx(start.trace, rel=1e-12)
    drop = float(fine.trace[0] - fine.trace[-1])
    assert 0.05 * start.trace < drop < 0.15 * start.trace
    # Heun: halving dt changes the end point by ~1/4 of the coarse error; both far below the drop
    err_coarse = abs(float(coarse.trace[-1] - fine.trace[-1]))
    assert err_coarse < 1e-3 * drop
    assert_path_integrates_its_rates(coarse, fine, t1, simpson_rel=1e-3)
    with pytest.raises(ValueError, match="times must lie"):
        fine.at(torch.tensor([2 * t1], dtype=torch.float64))
    with pytest.raises(ValueError, match="t1 and dt"):
        flip_drift_path(obj, zeta, rule, t1=0.0)


def test_compare_flip_rule_fits_the_predicted_path(tiny):
    _, _, y, obj, zeta, _ = tiny
    cfg = FlipContinuationConfig(LocalSGD(2, 1, 0.05), eta=0.01, p=P_FLIP, rounds=4, seeds=2, max_relative_change=10.0)
    row = compare_flip_rule(obj, y, zeta, cfg, path_dt=0.002)
    assert row.checkpoint_times == pytest.approx([k * 5 * 0.01 ** 2 for k in range(5)])
    assert len(row.trace_mean_per_checkpoint) == 5 and row.trace_mean_per_checkpoint[0] == pytest.approx(row.trace)
    times = torch.tensor(row.checkpoint_times, dtype=torch.float64)
    path = flip_drift_path(obj, zeta, cfg.rule, t1=float(times[-1]), dt=0.002)
    assert row.predicted_trace_rate_path == pytest.approx(path.fitted_slope(times), rel=1e-12)
    # a short window: the path's fitted slope is the rate at zeta to first order in the window
    assert row.predicted_trace_rate_path == pytest.approx(row.predicted_trace_rate, rel=0.02)
    assert row.trace_ratio_path == pytest.approx(row.measured_trace_rate / row.predicted_trace_rate_path)
    assert math.isnan(compare_flip_rule(obj, y, zeta, cfg).predicted_trace_rate_path)   # NaN without path_dt


def test_phi_correction_from_jacobian_derivatives_is_exact_for_cross_entropy(tiny):
    """The soft-target geometry's `reduce` (R_i Q^T J_i) gives the exact d_g Hessian along tangent g."""
    from tests.experiments.test_phi_reading import assert_correction_is_exact
    _, _, _, obj, zeta, _ = tiny
    geometry = flip_geometry(obj, zeta)
    assert_correction_is_exact(obj, geometry, flip_sharpness_gradients(obj, geometry),
                               dense_flip_problem(obj).loss, zeta)
