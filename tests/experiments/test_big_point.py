"""experiments.big_point: the Nystrom-preconditioned matrix-free prediction equals the exact path.

Setting: 20 real CIFAR-10 images at 4x4, the float64 GELU MLP 48 -> 24 -> 10 of test_manifold
(D = 1,426, N C = 200), placed on Gamma by the matrix-free projection (tol 1e-20, so the
Gauss-Newton Hessian equals the true one to ~1e-10). CG rtol 1e-13 bounds the projection error
by 1e-13 sqrt(cond) ~ 1e-10 relative here, so rtol 1e-7 on the rates. Runtime: ~10 s on one thread.
"""
import pytest
import torch

from experiments.big_point import predict_rates_preconditioned
from experiments.manifold import GramPreconditionerMF, cifar_subset, project_to_manifold_cg
from sde.label_noise import gauss_newton_geometry, predict_label_noise_rates, sharpness_gradients
from sde.label_noise_mf import predict_label_noise_rates_cg
from sde.rules import QSR, SGD, LocalSGD
from tests.experiments.test_manifold import _objective


@pytest.fixture(scope="module")
def on_gamma(cifar10_dir):
    x, y = cifar_subset(cifar10_dir, 20, image_size=4)
    obj = _objective(x, y)
    zeta, report = project_to_manifold_cg(obj, tol=1e-20, max_gauss_newton=60, cg_rtol=1e-12, preconditioner_rank=40)
    return obj, zeta


def test_preconditioned_prediction_equals_exact_and_block_jacobi_paths(on_gamma):
    obj, zeta = on_gamma
    rules = [SGD(4), QSR(2, 2)]
    pre = GramPreconditionerMF.at(obj, zeta, rank=40)
    got = predict_rates_preconditioned(obj, zeta, rules, sigma=0.3, preconditioner=pre, rtol=1e-13,
                                       generator=torch.Generator().manual_seed(0))
    plain = predict_label_noise_rates_cg(obj, zeta, rules, sigma=0.3, rtol=1e-13,
                                         generator=torch.Generator().manual_seed(0))
    geo = gauss_newton_geometry(obj, zeta)
    grads = sharpness_gradients(obj, geo)
    for rule, mf, bj in zip(rules, got.rates, plain.rates):
        exact = predict_label_noise_rates(obj, geo, rule, sigma=0.3, gradients=grads)
        assert mf.trace_rate == pytest.approx(exact.trace_rate, rel=1e-7)
        assert mf.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=1e-7)
        assert mf.trace_rate == pytest.approx(bj.trace_rate, rel=1e-7)
        assert mf.trace == pytest.approx(geo.trace, rel=1e-12)
        torch.testing.assert_close(mf.drift, exact.drift, rtol=0, atol=1e-7 * exact.drift.norm().item())
    assert got.rates[1].trace_rate == pytest.approx(2 * got.rates[0].trace_rate, rel=1e-12)
    # the deflated preconditioner needs fewer iterations than block-Jacobi for the same tolerance
    assert got.cg_iterations[0] < plain.cg_iterations[0]
    with pytest.raises(ValueError, match="SGD and QSR"):
        predict_rates_preconditioned(obj, zeta, [LocalSGD(2, 2, 0.5)], sigma=0.3, preconditioner=pre)
    with pytest.raises(ValueError, match="not on Gamma"):
        predict_rates_preconditioned(obj, zeta + 0.1, rules, sigma=0.3, preconditioner=pre)


def test_preconditioned_local_sgd_rates_match_exact_path_within_stderr(on_gamma):
    """Local SGD (K = 2, beta = 0.5) through the Nystrom-preconditioned projector: within 4 standard
    errors of the exact Gram-eigendecomposition path (the stochastic part is the Lanczos trace)."""
    obj, zeta = on_gamma
    from experiments.big_point import predict_local_sgd_rates_preconditioned
    rule = LocalSGD(2, 2, 0.5)
    pre = GramPreconditionerMF.at(obj, zeta, rank=40)
    (got,) = predict_local_sgd_rates_preconditioned(obj, zeta, [rule], sigma=0.3, preconditioner=pre,
                                                    num_probes=30, deflate=20, rtol=1e-13,
                                                    generator=torch.Generator().manual_seed(0))
    exact = predict_label_noise_rates(obj, gauss_newton_geometry(obj, zeta), rule, sigma=0.3)
    assert 0 < got["trace_rate_stderr"] < 0.05 * abs(exact.trace_rate)
    assert abs(got["trace_rate"] - exact.trace_rate) <= 4 * got["trace_rate_stderr"] + 1e-9 * abs(exact.trace_rate)
    assert abs(got["lambda_max_rate"] - exact.lambda_max_rate) <= (4 * got["lambda_max_rate_stderr"]
                                                                    + 1e-9 * abs(exact.lambda_max_rate))
    with pytest.raises(ValueError, match="Local SGD rules"):
        predict_local_sgd_rates_preconditioned(obj, zeta, [SGD(4)], sigma=0.3, preconditioner=pre)


def test_projector_reuses_and_warm_starts_solves_and_sweep_reads_one_run(on_gamma):
    """`PreconditionedTangentProjector` returns a solved v's projection without CG, warm-starts a
    nearby v (same projection as a cold solve), and `sgd_trace_rate_sweep` reads every tolerance from
    one CG run: its rates converge to the exact SGD trace rate with non-increasing magnitude."""
    from experiments.big_point import PreconditionedTangentProjector, sgd_trace_rate_sweep
    obj, zeta = on_gamma
    geo = gauss_newton_geometry(obj, zeta)
    pre = GramPreconditionerMF.at(obj, zeta, rank=40)
    logged = []
    proj = PreconditionedTangentProjector(obj, zeta, pre, rtol=1e-12, log=logged.append, log_every=5)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pv, n_cold = proj.project(v)
    torch.testing.assert_close(pv, geo.tangent_project(v), rtol=0, atol=1e-8 * v.norm().item())
    again, n_again = proj.project(v.clone())
    assert n_again == 0 and torch.equal(again, pv)
    w = v + 1e-5 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pw, n_warm = proj.project(w)
    assert 0 < n_warm < n_cold
    torch.testing.assert_close(pw, geo.tangent_project(w), rtol=0, atol=1e-8 * w.norm().item())
    assert logged[0] == {"solve": 0, "iteration": 0, "rel_residual": 1.0, "sq_norm": pytest.approx(float(v @ v))}
    assert {row["solve"] for row in logged} == {0, 1}                 # the reused solve logs nothing

    rows = sgd_trace_rate_sweep(obj, zeta, pre, (1e-2, 1e-6, 1e-12), batch=4, sigma=0.3, every=10)
    exact = predict_label_noise_rates(obj, geo, SGD(4), sigma=0.3)
    marks = [r for r in rows if r["rtol"] is not None]
    assert [r["rtol"] for r in marks] == [1e-2, 1e-6, 1e-12] and all(r["reached"] for r in marks)
    assert marks[-1]["trace_rate"] == pytest.approx(exact.trace_rate, rel=1e-7)
    ordered = sorted(rows, key=lambda r: r["cg_iterations"])
    mags = [abs(r["trace_rate"]) for r in ordered]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(mags, mags[1:]))
    assert abs(marks[0]["trace_rate"]) > abs(exact.trace_rate) * (1 + 1e-9)   # a loose tolerance overestimates
    unreached = sgd_trace_rate_sweep(obj, zeta, pre, (1e-2, 1e-30), batch=4, sigma=0.3, max_iter=3)
    assert unreached[-1] == {"rtol": 1e-30, "reached": False, "cg_iterations": 3}
