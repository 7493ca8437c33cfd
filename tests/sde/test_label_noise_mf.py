"""The matrix-free label-noise rates (sde.label_noise_mf) agree with the exact route of sde.label_noise
(tiny tanh MLP, targets y = f(theta0) so that theta0 lies exactly on Gamma; the rate comparisons also run
with the flip metric, cross-entropy against soft targets q = softmax(f(theta0))).

SGD / QSR (eta -> 0): CG rtol 1e-13 bounds the projection error by 1e-13 sqrt(lambda_max / lambda_min)
~ 1e-11 relative; the CG error J^T (a - a*) is normal, so ||P~v||^2 (the trace rate) errs only at second
order: rtol 1e-12 on the trace rate, 1e-8 on lambda_max's (the top eigenvector's tolerance enters).
Rules with a psi term (stochastic Lanczos for tr(psi(2 beta G) DG[u])): with all 12 Gram eigenpairs
deflated nothing is stochastic and the rates must equal the exact route to 1e-8 (CG and eigenpair
tolerances 1e-13 / 1e-12, Lanczos function tolerance 1e-12); with 3 deflated and 40 probes they must lie
within 4 reported standard errors (chance failure < 1e-4 per comparison for a roughly normal estimate),
and those standard errors are below 3% of the rate (measured 0.1-1.6% here). DG[u] is checked against
central differences of G (h = 1e-5: O(h^2) truncation ~1e-10, rtol 1e-7).
Runtime: a few seconds on one thread.
"""
import pytest
import torch

from dynamics.matrix_function import SpectralOperator
from dynamics.jacobian import GramSolveNotConverged, jacobian_frobenius_pass, jacobian_times, jacobian_transpose_times
from dynamics.objective import Objective
from sde.label_noise import (OutputMetric, centred_basis, gauss_newton_geometry, metric_roots, predict_rates,
                             sharpness_gradients)
from sde.label_noise_mf import GramDerivativeOperator, GramOperator, TangentProjector, predict_rates_matrix_free
from sde.rules import QSR, SGD, LocalSGD
from tests.reference import classification_batches, tiny_mlp


C_NOISE = 0.16           # sigma = 0.4


def _exact_rates(obj, zeta, rules, eta=None, metric=None, scale=C_NOISE):
    """The exact (Jacobian / Gram) route's geometry at zeta and its rates for each rule."""
    geo = gauss_newton_geometry(obj, zeta, metric=metric)
    grads = sharpness_gradients(obj, geo)
    return geo, [predict_rates(obj, geo, rule, noise_scale=scale, eta=eta, gradients=grads) for rule in rules]


@pytest.fixture(scope="module")
def on_gamma():
    return _on_gamma()


def _on_gamma():
    model = tiny_mlp(seed=4, d_in=5, width=7, d_out=3)
    x = classification_batches(4, image=False, seed=5, classes=3)[0][0]
    obj = Objective(model, lambda out, y: 0.5 * (out - y).pow(2).sum(-1).mean(), [(x, model(x).detach())])
    return obj, obj.params


def _flip_point():
    """Cross-entropy against soft targets q = softmax(f(theta0)): theta0 on Gamma; the flip metric, c = 1."""
    obj, zeta = _on_gamma()
    x = obj.data[0][0]
    q = torch.softmax(obj.forward(zeta, x), -1)
    flip = Objective(obj.model, lambda out, t: -(t * torch.log_softmax(out, -1)).sum(-1).mean(), [(x, q)])
    Q = centred_basis(3, q.dtype, q.device)
    return flip, zeta, dict(metric=OutputMetric(Q, metric_roots(q, Q)), noise_scale=1.0,
                            loss_on_gamma=float(-(q * q.log()).sum(-1).mean()))


@pytest.fixture(scope="module", params=["gaussian", "flip"])
def point(request):
    """(obj, zeta, options of predict_rates_matrix_free) for each output metric."""
    if request.param == "gaussian":
        return (*_on_gamma(), dict(metric=None, noise_scale=C_NOISE, loss_on_gamma=0.0))
    return _flip_point()


def test_bad_input_is_refused_before_any_work(on_gamma):
    obj, zeta = on_gamma
    with pytest.raises(ValueError, match="not on Gamma"):
        predict_rates_matrix_free(obj, zeta + 0.1, [SGD(4)], noise_scale=C_NOISE)
    flip, zeta, options = _flip_point()             # L = entropy of q on Gamma: loss_on_gamma is needed
    with pytest.raises(ValueError, match="not on Gamma"):
        predict_rates_matrix_free(flip, zeta, [SGD(4)], **{**options, "loss_on_gamma": 0.0})
    with pytest.raises(ValueError, match="noise_scale"):
        predict_rates_matrix_free(obj, zeta, [SGD(4)], noise_scale=0.0)
    with pytest.raises(ValueError, match="metric roots must be"):
        predict_rates_matrix_free(flip, zeta, [SGD(4)], **{**options, "metric": OutputMetric(
            options["metric"].basis, options["metric"].roots[:2])})


def test_cg_projection_rates_equal_exact_path(point):
    obj, zeta, options = point
    rules = [SGD(4), QSR(2, 2), QSR(3, 1)]
    got = predict_rates_matrix_free(obj, zeta, rules, rtol=1e-13, eigen_tol=1e-12,
                                    generator=torch.Generator().manual_seed(0), **options)
    geo, exacts = _exact_rates(obj, zeta, rules, metric=options["metric"], scale=options["noise_scale"])
    for mf, exact in zip(got, exacts):
        assert mf.trace_rate == pytest.approx(exact.trace_rate, rel=1e-12)
        assert mf.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=1e-8)
        torch.testing.assert_close(mf.drift, exact.drift, rtol=0, atol=1e-8 * exact.drift.norm().item())
        assert mf.trace == pytest.approx(geo.trace, rel=1e-12)
        assert mf.lambda_max == pytest.approx(geo.lambda_max, rel=1e-9)
        assert mf.trace_rate_stderr == 0 == mf.lambda_max_rate_stderr and mf.noise_scale == options["noise_scale"]
    # QSR (eta -> 0) is K times SGD with the same total batch: K = 2, B = 4
    assert got[1].trace_rate == pytest.approx(2 * got[0].trace_rate, rel=1e-12)
    # both projections actually iterated; CG in exact arithmetic needs at most N C = 12 steps
    assert all(1 <= it <= 40 for it in got.cost["cg_iterations"])
    assert got.cost["lanczos_matvecs"] == 0 == got.cost["derivative_matvecs"] and got.cost["eigen_matvecs"] > 0


def test_cg_tangent_projection_equals_dense_projector(on_gamma):
    obj, zeta = on_gamma
    _, blocks, frob = jacobian_frobenius_pass(obj, zeta, chunk_size=3)  # chunks smaller than N: exercise the loop
    geo = gauss_newton_geometry(obj, zeta)
    assert frob / obj.num_samples == pytest.approx(geo.trace, rel=1e-12)
    # the preconditioner blocks are the diagonal C x C blocks of the dense Gram matrix J J^T
    torch.testing.assert_close(blocks, torch.einsum("ncd,nkd->nck", geo.jacobian, geo.jacobian))
    lines = []
    projector = TangentProjector.from_blocks(obj, zeta, blocks, rtol=1e-13, log=lines.append, log_every=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(obj.dim, generator=gen, dtype=torch.float64)
        pv, iters = projector.project(v)
        dense = geo.tangent_project(v)
        torch.testing.assert_close(pv, dense, rtol=0, atol=1e-10 * v.norm().item())
        assert jacobian_times(obj, zeta, pv).norm() <= 1e-10 * v.norm() * geo.lambda_max ** 0.5
        assert 1 <= iters <= 40
        # an exact repeat costs no CG; a near repeat starts from the stored coefficients
        again, repeat_iters = projector.project(v.clone())
        assert repeat_iters == 0 and torch.equal(again, pv)
        near, near_iters = projector.project(v + 1e-6 * v.norm() * torch.randn(obj.dim, generator=gen,
                                                                                dtype=torch.float64) / obj.dim ** 0.5)
        start = [line for line in lines if line["solve"] == len(projector.solved) - 1][0]
        assert start["iteration"] == 0 and start["rel_residual"] < 1e-5 and near_iters <= iters
        torch.testing.assert_close(near, pv, rtol=0, atol=1e-5 * v.norm().item())


def test_projector_preconditioner_and_log(on_gamma):
    obj, zeta = on_gamma
    geo = gauss_newton_geometry(obj, zeta)

    class Identity:                     # any object with .apply(r (N, C)) -> (N, C)
        def apply(self, r):
            return r

    lines = []
    projector = TangentProjector(obj, zeta, Identity(), rtol=1e-13, log=lines.append, log_every=1)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pv, iters = projector.project(v)
    torch.testing.assert_close(pv, geo.tangent_project(v), rtol=0, atol=1e-10 * v.norm().item())
    assert [line["iteration"] for line in lines] == list(range(iters + 1)) and lines[-1]["rel_residual"] <= 1e-13
    # Craig's method: ||v - J^T a||^2 falls monotonically to ||P v||^2
    sq = [line["sq_norm"] for line in lines]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(sq, sq[1:]))
    assert sq[-1] == pytest.approx(float(pv @ pv), rel=1e-10)


def test_projector_with_the_flip_metric_equals_dense_projector():
    obj, zeta, options = _flip_point()
    geo = gauss_newton_geometry(obj, zeta, metric=options["metric"])
    projector = TangentProjector(obj, zeta, metric=options["metric"], rtol=1e-13)    # default block-Jacobi
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pv, iters = projector.project(v)
    torch.testing.assert_close(pv, geo.tangent_project(v), rtol=0, atol=1e-10 * v.norm().item())
    assert 1 <= iters <= 40 and projector.preconditioner.inverses.shape == (4, 2, 2)


def test_cg_non_convergence_and_bad_input(on_gamma):
    obj, zeta = on_gamma
    with pytest.raises(GramSolveNotConverged, match="did not converge.*max_iter = 2"):
        predict_rates_matrix_free(obj, zeta, [SGD(4)], noise_scale=C_NOISE, rtol=1e-13, max_iter=2)
    with pytest.raises(ValueError, match="not on Gamma"):
        predict_rates_matrix_free(obj, zeta + 0.1, [SGD(4)], noise_scale=C_NOISE)
    with pytest.raises(ValueError, match="rtol"):
        predict_rates_matrix_free(obj, zeta, [SGD(4)], noise_scale=C_NOISE, rtol=0.0)


def test_gram_operators_match_dense_and_finite_differences(on_gamma):
    obj, zeta = on_gamma
    geo = gauss_newton_geometry(obj, zeta)
    flat = geo.jacobian.reshape(-1, obj.dim)
    n = obj.num_samples
    gram = GramOperator(obj, zeta)
    assert gram.dim == 12
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(gram.dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gram.hvp(a), flat @ (flat.T @ a) / n, rtol=1e-12, atol=0)
    u = geo.tangent_project(torch.randn(obj.dim, generator=gen, dtype=torch.float64))
    dg = GramDerivativeOperator(gram, u)
    h = 1e-5

    def gram_at(theta, vec):
        return jacobian_times(obj, theta, jacobian_transpose_times(obj, theta, vec.reshape(n, -1))).reshape(-1) / n

    fd = (gram_at(zeta + h * u, a) - gram_at(zeta - h * u, a)) / (2 * h)
    torch.testing.assert_close(dg.hvp(a), fd, rtol=1e-7, atol=1e-7 * fd.norm().item())
    b = torch.randn(gram.dim, generator=gen, dtype=torch.float64)
    assert float(b @ dg.hvp(a)) == pytest.approx(float(a @ dg.hvp(b)), rel=1e-10)   # symmetric
    # tr DG[u] = u . grad tr H (the control variate's known mean)
    dense_dg = torch.stack([dg.hvp(e) for e in torch.eye(gram.dim, dtype=torch.float64)], 1)
    grads = sharpness_gradients(obj, geo)
    assert float(dense_dg.trace()) == pytest.approx(float(u @ grads.trace), rel=1e-9)


LOCAL_RULES = [LocalSGD(K, 1, beta) for K in (2, 4) for beta in (0.01, 0.8, 100.0)]


def test_lanczos_rates_equal_exact_path_at_full_deflation(point):
    obj, zeta, options = point
    exact_options = dict(metric=options["metric"], scale=options["noise_scale"])
    rules = [SGD(4), QSR(2, 2), LocalSGD(2, 2, 0.9)] + LOCAL_RULES
    options = dict(options, num_probes=3, deflate=12, rtol=1e-13, eigen_tol=1e-12, function_tol=1e-12)
    got = predict_rates_matrix_free(obj, zeta, rules, generator=torch.Generator().manual_seed(0), **options)
    geo, exacts = _exact_rates(obj, zeta, rules, **exact_options)
    for mf, exact in zip(got, exacts):
        assert mf.trace_rate == pytest.approx(exact.trace_rate, rel=1e-8)
        assert mf.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=1e-8)
        assert mf.trace_rate_stderr <= 1e-9 * abs(exact.trace_rate)
        assert mf.lambda_max == pytest.approx(geo.lambda_max, rel=1e-10)
    torch.testing.assert_close(got[1].drift, 2 * got[0].drift)   # QSR (eta -> 0) = K x SGD
    assert got[2].drift is None and got.cost["converged"]
    # QSR at finite eta is Local SGD at beta = alpha^2 / eta = 0.09 / 0.1, as on the exact route
    qsr = predict_rates_matrix_free(obj, zeta, [QSR(2, 2, alpha=0.3)], eta=0.1,
                                    generator=torch.Generator().manual_seed(0), **options)[0]
    assert qsr.trace_rate == pytest.approx(got[2].trace_rate, rel=1e-8)
    exact_qsr = _exact_rates(obj, zeta, [QSR(2, 2, alpha=0.3)], eta=0.1, **exact_options)[1][0]
    assert qsr.trace_rate == pytest.approx(exact_qsr.trace_rate, rel=1e-8)


def _gram_spectrum(obj, zeta, metric=None) -> SpectralOperator:
    """G's eigendecomposition at zeta, descending, from its dense matrix (what a matrix-free point holds)."""
    gram = GramOperator(obj, zeta, metric)
    dense = torch.stack([gram.hvp(e) for e in torch.eye(gram.dim, dtype=torch.float64)], 1)
    values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
    return SpectralOperator(values.flip(0), vectors.flip(1))


def test_known_spectrum_rates_equal_exact_path_without_lanczos(point):
    """With G's eigendecomposition given, no Lanczos runs: at full deflation the rates are exact (1e-8), with
    float32 derivative passes to 1e-5 (their rounding), and 3 deflated + 40 probes lie within 4 standard errors."""
    obj, zeta, options = point
    spectrum = _gram_spectrum(obj, zeta, options["metric"])
    rules = [SGD(4), LocalSGD(2, 2, 0.9)] + LOCAL_RULES
    geo, exacts = _exact_rates(obj, zeta, rules, metric=options["metric"], scale=options["noise_scale"])
    full = dict(options, num_probes=3, deflate=12, rtol=1e-13, spectrum=spectrum)
    for passes, rel in ((None, 1e-8), (obj.to(torch.float32), 1e-5)):
        got = predict_rates_matrix_free(obj, zeta, rules, passes=passes, **full)
        assert got.cost["lanczos_matvecs"] == 0 and got.cost["eigen_matvecs"] == 1
        for mf, exact in zip(got, exacts):
            assert mf.trace_rate == pytest.approx(exact.trace_rate, rel=rel)
            assert mf.lambda_max_rate == pytest.approx(exact.lambda_max_rate, rel=rel)
    sampled = predict_rates_matrix_free(obj, zeta, rules, num_probes=40, deflate=3, spectrum=spectrum,
                                        generator=torch.Generator().manual_seed(1), **options)
    for mf, exact in zip(sampled[1:], exacts[1:]):
        assert 0 < mf.trace_rate_stderr <= 0.05 * abs(exact.trace_rate)
        assert abs(mf.trace_rate - exact.trace_rate) <= 4 * mf.trace_rate_stderr
    with pytest.raises(ValueError, match="not G's at zeta"):        # another point's eigendecomposition
        predict_rates_matrix_free(obj, zeta, rules, spectrum=_gram_spectrum(obj, 1.01 * zeta, options["metric"]),
                                  **options)


def test_lanczos_rates_within_stderr_of_exact_path_and_limits(on_gamma):
    obj, zeta = on_gamma
    rules = [SGD(2), SGD(4)] + LOCAL_RULES + [LocalSGD(2, 1, 1e-4), LocalSGD(4, 1, 1e4)]
    lines = []
    got = predict_rates_matrix_free(obj, zeta, rules, noise_scale=C_NOISE, num_probes=40, deflate=3,
                                    generator=torch.Generator().manual_seed(1), progress=lines.append)
    assert got.cost["converged"] and got.cost["derivative_matvecs"] == 3 + 40
    assert len(lines) == 3 and "psi traces for 5 beta(s)" in lines[-1]          # 0.01, 0.8, 100, 1e-4, 1e4
    geo, exacts = _exact_rates(obj, zeta, rules[2:8])
    for mf, exact in zip(got[2:8], exacts):
        for value, se, ref in ((mf.trace_rate, mf.trace_rate_stderr, exact.trace_rate),
                               (mf.lambda_max_rate, mf.lambda_max_rate_stderr, exact.lambda_max_rate)):
            assert 0 < se < 0.03 * abs(ref)
            assert abs(value - ref) <= 4 * se
    sgd2, sgd4 = got[0].trace_rate, got[1].trace_rate
    small, large = got[-2], got[-1]
    # beta -> 0: SGD with the same total batch B = 2 (psi(2 beta lambda) <= beta lambda_max ~ 5e-4)
    assert small.trace_rate == pytest.approx(sgd2, rel=1e-3)
    # beta -> inf: K x SGD with B = 4 (1 - psi(2 beta lambda) <= 1 / (2 beta lambda_min) ~ 0.05 on the
    # smallest eigenvalue only; the control variate makes this nearly deterministic)
    assert large.trace_rate == pytest.approx(4 * sgd4, rel=5e-3)
    # Local SGD lies between SGD and K x SGD (same total batch) for every beta
    for rule, mf in zip(rules[2:8], got[2:8]):
        sgd = sgd2 if rule.total_batch == 2 else sgd4
        assert rule.workers * sgd - 4 * mf.trace_rate_stderr <= mf.trace_rate <= sgd + 4 * mf.trace_rate_stderr


def test_lanczos_rates_bad_input(on_gamma):
    obj, zeta = on_gamma
    with pytest.raises(ValueError, match="deflate"):
        predict_rates_matrix_free(obj, zeta, [SGD(4)], noise_scale=C_NOISE, deflate=0)
    with pytest.raises(ValueError, match="num_probes"):
        predict_rates_matrix_free(obj, zeta, [SGD(4)], noise_scale=C_NOISE, num_probes=2)
    with pytest.raises(ValueError, match="alpha"):
        predict_rates_matrix_free(obj, zeta, [QSR(2, 2)], noise_scale=C_NOISE, eta=0.1)
    with pytest.raises(ValueError, match="eta"):
        predict_rates_matrix_free(obj, zeta, [SGD(4)], noise_scale=C_NOISE, eta=-0.1)
