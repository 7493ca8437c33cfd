"""experiments.comparison.point: bad input refused before any work, and points of Gamma built for both noise models
(dense and matrix-free). Settings of test_projection; references: the noise model's distance, `sharpness_at`,
the dense projection."""
import math

import pytest
import torch
from torch import nn

from experiments.comparison.noise import FlippedLabels, GaussianLabelNoise
from experiments.comparison.point import build_point, check_model, fit, objective, point_at
from experiments.comparison.projection import GramPreconditioner, GramPreconditionerMF, project, sharpness_at
from experiments.data import cifar_subset
from tests.experiments.comparison.test_projection import GAUSS, tiny_mlp


@pytest.fixture(scope="module")
def data(cifar10_dir):
    return cifar_subset(cifar10_dir, 10, image_size=4)


def test_check_model_refuses_what_has_no_gamma(data):
    x, y = data
    conv = lambda *mid: nn.Sequential(nn.Conv2d(3, 4, 3), *mid, nn.Flatten(), nn.Linear(16, 10)).double()  # noqa: E731
    with pytest.raises(ValueError, match="BatchNorm"):
        check_model(conv(nn.BatchNorm2d(4)), x, y, GAUSS)
    with pytest.raises(ValueError, match="Dropout"):
        check_model(conv(nn.Dropout(0.1)), x, y, GAUSS)
    with pytest.raises(ValueError, match="fails on images"):
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(7, 10)).double(), x, y, GAUSS)
    with pytest.raises(ValueError, match="one output per class"):
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 1)).double(), x, y, GAUSS)
    with pytest.raises(ValueError, match="one output per class"):            # labels up to 9, 5 outputs
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double(), x, y, GAUSS)
    with pytest.raises(ValueError, match="10 images but 9 targets"):
        check_model(tiny_mlp(), x, y[:9], GAUSS)
    with pytest.raises(ValueError, match="equations <= D"):                 # 100 equations, D = 70
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 1), nn.GELU(), nn.Linear(1, 10)).double(), x, y, GAUSS)
    classes, targets = check_model(tiny_mlp(), x, y, FlippedLabels(0.1))
    assert classes == 10 and torch.equal(targets, FlippedLabels(0.1).targets(y, 10))


@pytest.mark.parametrize("noise", [GaussianLabelNoise(0.1), FlippedLabels(0.1)], ids=["gaussian", "flip"])
def test_build_point_lands_on_gamma_with_its_tools(data, noise):
    x, y = data
    lines = []
    point = build_point(tiny_mlp(), x, y, noise=str(noise), train_steps=300, progress=lines.append)
    obj = point.objective
    assert point.noise == noise and point.classes == 10 and torch.equal(point.labels, y)
    assert point.residual <= 1e-10 and noise.distance(obj.forward(point.zeta, obj.data[0][0]), point.targets) <= 1e-10
    trace, lmax = sharpness_at(obj, noise, point.zeta)
    assert point.trace == pytest.approx(trace, rel=1e-10) and point.lambda_max == pytest.approx(lmax, rel=1e-10)
    assert point.reference.shape == (noise.equations(10, 10), 16)
    assert len(lines) == 4 and lines[1].startswith("point: projected to distance") and lines[-1].startswith("point: tr H = ")
    with pytest.raises(ValueError, match="not on Gamma"):
        point_at(obj, noise, point.zeta + 0.1)
    # fit: full-batch Adam stops once the loss is within the gap of its minimum on Gamma
    theta = fit(obj, noise, steps=5000, gap=1e-3)
    gap = obj.loss(theta).item() - noise.minimum_loss(point.targets)
    assert 0 <= gap <= 1e-3 and fit(obj, noise, steps=0).equal(obj.params)
    # in float32 (a copy of the objective): the float64 theta it returns is within the gap up to float32 rounding
    before = obj.params.clone()
    theta32 = fit(obj, noise, steps=5000, gap=1e-3, dtype=torch.float32)
    gap32 = obj.loss(theta32).item() - noise.minimum_loss(point.targets)
    assert theta32.dtype == torch.float64 and 0 <= gap32 <= 1e-3 * (1 + 1e-4) and obj.params.equal(before)
    assert not theta32.equal(theta)                       # its own trajectory, not the float64 one
    with pytest.raises(ValueError, match="train longer"):
        build_point(tiny_mlp(), x, y, noise=noise, train_steps=1, max_gauss_newton=1)


def test_fit_stops_on_a_plateau_with_its_best_iterate(data):
    """patience: Adam at a step size too large to settle stops once its lowest loss has not halved in that many
    steps, and returns the iterate with that loss, not the last one."""
    x, y = data
    obj = objective(tiny_mlp(), x, GAUSS.targets(y, 10), GAUSS)
    losses, evaluate = [], obj.loss_and_grad

    def recording(theta):                       # fit's one evaluation per step, its loss kept
        loss, grad = evaluate(theta)
        losses.append(loss.item())
        return loss, grad
    obj.loss_and_grad = recording
    theta = fit(obj, GAUSS, steps=4000, lr=0.05, gap=1e-12, patience=100)
    calls, recorded = len(losses), list(losses)
    assert 100 < calls < 4000                                              # stopped on the plateau
    assert min(recorded[-100:]) > min(recorded[:-100]) / 2                 # no halving in its last 100 steps
    assert evaluate(theta)[0].item() == pytest.approx(min(recorded), rel=1e-12)
    assert min(recorded) < recorded[-1]                                   # the best iterate, not the last
    losses.clear()
    fit(obj, GAUSS, steps=calls + 50, lr=0.05, gap=1e-12)                  # without patience: every step
    assert len(losses) == calls + 50 and losses[:calls] == recorded        # the same trajectory until the stop
    with pytest.raises(ValueError, match="patience"):
        fit(obj, GAUSS, patience=0)


def test_build_point_keeps_zeta_in_a_cache_keyed_by_the_setup(data, tmp_path):
    x, y = data
    cache, lines = tmp_path / "zeta.pt", []
    first = build_point(tiny_mlp(), x, y, noise=GAUSS, train_steps=0, cache=cache)
    again = build_point(tiny_mlp(), x, y, noise=GAUSS, train_steps=0, cache=cache, progress=lines.append)
    assert torch.equal(again.zeta, first.zeta) and lines[0] == f"point: zeta loaded from {cache}"
    assert [p.name for p in tmp_path.iterdir()] == ["zeta.pt"]                 # no temporary file left
    lines.clear()
    other = build_point(tiny_mlp(), x, y, noise=GAUSS, train_steps=0, tol=1e-12, cache=cache, progress=lines.append)
    assert lines[0].startswith("point: Adam") and other.residual <= 1e-12       # another setup: computed anew
    lines.clear()
    build_point(tiny_mlp(seed=1), x, y, noise=GAUSS, train_steps=0, tol=1e-12, cache=cache, progress=lines.append)
    assert lines[0].startswith("point: Adam")                                  # another network: computed anew


def test_matrix_free_point_equals_the_dense_one(data):
    """method "cg": the projection by conjugate gradients lands where the dense one does, the point holds a
    `GramPreconditionerMF` and no (N m, D) geometry; flipped labels too (the metric's reduced blocks)."""
    x, y = data
    dense = build_point(tiny_mlp(), x, y, noise=GAUSS, train_steps=0, tol=1e-20, max_gauss_newton=60)
    mf = build_point(tiny_mlp(), x, y, noise=GAUSS, train_steps=0, tol=1e-20, method="cg", cg_rtol=1e-13,
                     preconditioner_rank=40, max_gauss_newton=60)
    torch.testing.assert_close(mf.zeta, dense.zeta, rtol=0, atol=1e-9)
    assert isinstance(mf.preconditioner, GramPreconditionerMF) and mf.geometry is None and mf.correction is None
    flip = build_point(tiny_mlp(), x, y, noise=FlippedLabels(0.1), train_steps=300, method="cg", cg_rtol=1e-6,
                       preconditioner_rank=40)
    assert flip.residual <= 1e-10 and flip.preconditioner.vectors.shape[0] == 90     # N (C - 1) rows
    exact = point_at(mf.objective, GAUSS, mf.zeta, method="cg", exact_preconditioner=True)
    assert isinstance(exact.preconditioner, GramPreconditioner)     # the eigendecomposition, no Nystrom sketch
    torch.testing.assert_close(exact.preconditioner.values, dense.preconditioner.values, rtol=1e-9, atol=0)
    assert exact.trace == pytest.approx(dense.trace, rel=1e-9) and exact.lambda_max == pytest.approx(dense.lambda_max,
                                                                                                     rel=1e-9)
    assert math.isnan(mf.trace) and math.isnan(mf.lambda_max)     # a Nystrom sketch does not know them
    with pytest.raises(ValueError, match="method"):
        point_at(dense.objective, GAUSS, dense.zeta, method="lanczos")
    assert objective(tiny_mlp(), x, dense.targets.float(), GAUSS).data[0][1].dtype == torch.float64
    assert project(dense.objective, GAUSS, dense.zeta)[1].gauss_newton_steps == 0


def test_matrix_free_point_preconditioner_drives_the_tangent_projector(cifar10_dir):
    """A cg point (20 images, N C = 200) on Gamma to L <= 1e-20: its Nystrom-deflated preconditioner in
    `sde.label_noise_mf.TangentProjector` gives the exact route's rates (SGD, QSR to 1e-7; QSR = K x SGD; Local SGD
    within 4 standard errors of its stochastic trace) in fewer CG iterations than block-Jacobi."""
    from sde.label_noise import predict_rates
    from sde.label_noise_mf import TangentProjector, predict_rates_matrix_free
    from sde.rules import QSR, SGD, LocalSGD
    x, y = cifar_subset(cifar10_dir, 20, image_size=4)
    noise = GaussianLabelNoise(0.3)
    point = build_point(tiny_mlp(), x, y, noise=noise, train_steps=0, tol=1e-20, method="cg", cg_rtol=1e-12,
                        preconditioner_rank=40, max_gauss_newton=60)
    dense = point_at(point.objective, noise, point.zeta)
    rules = [SGD(4), QSR(2, 2), LocalSGD(2, 2, 0.5)]
    projector = TangentProjector(point.objective, point.zeta, point.preconditioner, rtol=1e-13)
    got = predict_rates_matrix_free(point.objective, point.zeta, rules, noise_scale=0.09, projector=projector,
                                    generator=torch.Generator().manual_seed(0), deflate=20)
    plain = predict_rates_matrix_free(point.objective, point.zeta, rules[:2], noise_scale=0.09, rtol=1e-13)
    for rule, mf in zip(rules, got):
        exact = predict_rates(dense.objective, dense.geometry, rule, noise_scale=0.09, gradients=dense.gradients)
        assert mf.trace == pytest.approx(dense.trace, rel=1e-12)
        if rule.drift_coefficients()[2] is None:
            assert mf.trace_rate == pytest.approx(exact.trace_rate, rel=1e-7)
            assert mf.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=1e-7)
            torch.testing.assert_close(mf.drift, exact.drift, rtol=0, atol=1e-7 * exact.drift.norm().item())
        else:
            assert 0 < mf.trace_rate_stderr < 0.05 * abs(exact.trace_rate)
            assert abs(mf.trace_rate - exact.trace_rate) <= 4 * mf.trace_rate_stderr + 1e-9 * abs(exact.trace_rate)
            assert abs(mf.lambda_max_rate - exact.lambda_max_rate) <= (4 * mf.lambda_max_rate_stderr
                                                                        + 1e-9 * abs(exact.lambda_max_rate))
    assert got[1].trace_rate == pytest.approx(2 * got[0].trace_rate, rel=1e-12)
    assert plain[0].trace_rate == pytest.approx(got[0].trace_rate, rel=1e-7)
    assert got.cost["cg_iterations"][0] < plain.cost["cg_iterations"][0]
