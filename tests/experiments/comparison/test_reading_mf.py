"""experiments.comparison.reading_mf: the matrix-free reading at Phi against the dense one, for both noise models.

Points of test_projection (`tiny_points`): 10 real CIFAR-10 images at 4x4 with the MLP 48 -> 24 -> 10 under Gaussian
label noise (N m = 100, D = 1,426), and the tiny 4 -> 8 -> 3 network under flipped labels (C = 3, N m = 8). Dense
references: `PhiCorrection.flow_terms`, `sharpness_at` (eigvalsh of the dense Gram), `sharpness_gradients`,
`read_at_phi` over the dense projection. The flow term's low-rank Lyapunov factor is checked against the dense
C = [a_i a_j / (kappa_i + kappa_j)]; the rest is exact up to rounding and CG tolerances (float64).
"""
import pytest
import torch

from experiments.comparison.continuation import ContinuationConfig, run_continuation
from experiments.comparison.phi import read_at_phi
from experiments.comparison.point import point_at
from experiments.comparison.projection import project, sharpness_at
from experiments.comparison.reading_mf import (MatrixFreeReader, ProjectionNotConverged, ReadingTolerances,
                                               lyapunov_factors)
from sde.rules import SGD
from tests.experiments.comparison.test_projection import tiny_points

TOL = {"gaussian": 1e-22, "flip": 1e-12}       # projection tolerances (Gaussian: L; flip: ||Q^T (f - log q)||)
AGREE = {"gaussian": 1e-10, "flip": 1e-8}      # whole readings, relative


@pytest.fixture(scope="module")
def points(cifar10_dir):
    """name -> (dense point, matrix-free reader on the "cg" point at the same zeta)."""
    out = {}
    for name, dense in tiny_points(cifar10_dir).items():
        cg = point_at(dense.objective, dense.noise, dense.zeta, method="cg")
        out[name] = dense, MatrixFreeReader(cg, tol=TOL[name], cg_rtol=1e-10, max_gauss_newton=60,
                                            tolerances=ReadingTolerances(flow_rtol=1e-12))
    return out


def offsets(point, count, scale):
    gen = torch.Generator().manual_seed(3)
    out = [torch.randn(point.zeta.shape, generator=gen, dtype=point.zeta.dtype) for _ in range(count)]
    return [scale * x / x.norm() for x in out]


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_flow_terms_match_the_dense_phi_correction(points, name):
    """Random offsets with a tangent part (dropped by both: U^T x, the eigenbasis at zeta) and purely normal ones:
    the low-rank Lyapunov terms equal 1/2 a^T (dH / (lambda_i + lambda_j)) a to 1e-9 relative, with at most 60 ranks
    (the Gaussian point's normal space has 100 dimensions)."""
    dense, reader = points[name]
    geo = dense.geometry
    xs = offsets(dense, 3, 1e-2)
    for x in xs + [x - geo.tangent_project(x) for x in xs]:
        expected = dense.correction.flow_terms(x)
        got = reader.correction.flow_terms(x)
        for e, g in zip(expected, got):
            assert abs(g - e) <= 1e-9 * abs(e)
        assert 1 <= reader.correction.cost["ranks"] <= min(len(reader.correction.kappa), 60)
    tangent = geo.tangent_project(xs[0])
    assert max(abs(t) for t in reader.correction.flow_terms(tangent)) <= 1e-9 * max(
        abs(t) for t in dense.correction.flow_terms(xs[0]))              # a tangent offset has no flow term


def test_lyapunov_factors_against_the_dense_matrix():
    """C = [a_i a_j / (k_i + k_j)] over a spread of 1e10 in k: the factor's dropped part is bounded by rtol x tr C
    (in the nuclear norm: C is PSD), and tightening rtol adds ranks; rtol outside (0, 1) is refused."""
    gen = torch.Generator().manual_seed(0)
    kappa = torch.logspace(-6, 4, 300, dtype=torch.float64)
    a = torch.randn(300, generator=gen, dtype=torch.float64)
    dense = a[:, None] * a[None, :] / (kappa[:, None] + kappa[None, :])
    ranks = []
    for rtol in (1e-6, 1e-12):
        y, sigma2 = lyapunov_factors(a, kappa, rtol=rtol)
        error = torch.linalg.matrix_norm(dense - y @ torch.diag(sigma2) @ y.T, ord="nuc")
        assert error <= 2 * rtol * dense.trace()
        ranks.append(len(sigma2))
    assert ranks[0] < ranks[1] < 100
    with pytest.raises(ValueError, match="rtol"):
        lyapunov_factors(a, kappa, rtol=1.0)


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_sharpness_and_gradients_match_the_dense_route(points, name):
    """tr H = ||Jt||_F^2 / N from chunks and lambda_max by warm-started Lanczos equal `sharpness_at` (dense eigvalsh)
    at zeta and at a projected point; the matrix-free tangent gradients equal `sharpness_gradients`."""
    dense, reader = points[name]
    obj, noise = dense.objective, dense.noise
    for got, want in zip(reader.correction.gradients, (dense.gradients.trace, dense.gradients.lambda_max)):
        assert float((got - want).norm()) <= 1e-9 * float(want.norm())
    z, _ = project(obj, noise, dense.zeta + offsets(dense, 1, 3e-2)[0], tol=TOL[name], max_gauss_newton=60)
    reader.seed = "sharpness test"
    for point in (dense.zeta, z, z):
        for got, want in zip(reader.sharpness(point), sharpness_at(obj, noise, point)):
            assert abs(got - want) <= 1e-10 * abs(want)
    cold, _, warm = reader.cost["eigen_matvecs"][-3:]
    assert warm < cold                                  # the same point again: the kept top vector is already it


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_whole_reading_matches_read_at_phi_with_dense_pieces(points, name):
    """The reading (corrected and raw tr H, lambda_max, the projection) equals `read_at_phi` over the dense
    projection, `sharpness_at` and `PhiCorrection` (Gaussian: to 1e-10 relative; flip: to 1e-8, the dense flip
    projection takes chord steps, which end O(|x|^3) away from fresh-Jacobian ones, |x| = 1e-2 here); the second
    checkpoint of a seed warm-starts its normal-part CG and is as exact. Its `cost` splits each reading's seconds
    into its pieces, each counted once."""
    dense, reader = points[name]
    obj, noise = dense.objective, dense.noise

    def dense_projection(theta):
        z, report = project(obj, noise, theta, tol=TOL[name], max_gauss_newton=60)
        return z, report.distance
    for theta in [dense.zeta + x for x in offsets(dense, 2, 1e-2)]:
        want = read_at_phi(theta, dense.correction, dense_projection, lambda z: sharpness_at(obj, noise, z))
        got = reader.reading(theta, seed=7)
        for g, w in zip(got.corrected + got.raw, want.corrected + want.raw):
            assert abs(g - w) <= AGREE[name] * abs(w)
        size = float((theta - want.projection).norm())
        assert float((got.projection - want.projection).norm()) <= (1e-9 if name == "gaussian" else size ** 2) * size
        assert got.residual <= TOL[name] and got.corrected != got.raw
    assert len(reader.cost["seconds"]) >= 2 and min(reader.cost["projection_cg"][-4:]) > 0
    for total, pieces in zip(reader.cost["seconds"][-2:], reader.cost["pieces"][-2:]):
        assert set(pieces) == {"projection", "trace", "lambda_max", "flow"} and min(pieces.values()) > 0
        assert sum(pieces.values()) <= total          # each second counted once, and within the reading


def _reflected_both_ways(dense, reader, theta, tol):
    """s(Pi(z - x)) - s(z) for s = (tr H, lambda_max), z = Pi(theta), x = theta - z: read at a second dense projection,
    and by `FlowCorrection.reflected_terms(x)`."""
    obj, noise = dense.objective, dense.noise
    z, _ = project(obj, noise, theta, tol=tol, max_gauss_newton=60)
    other, _ = project(obj, noise, 2 * z - theta, tol=tol, max_gauss_newton=60)
    read = [b - a for a, b in zip(sharpness_at(obj, noise, z), sharpness_at(obj, noise, other))]
    return read, reader.correction.reflected_terms(theta - z)


def _relative(got, want) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", ["gaussian", "flip"])
def test_reflected_terms_match_a_second_projection_to_third_order(points, name):
    """-2 g_s . DJt[n]^T c at zeta (`reflected_terms`) against s(Pi(z - x)) - s(z) read at a second projection, at
    offsets from zeta: they differ by O(|x|^3), so the relative difference falls ~10x with a 10x smaller offset
    (measured 5e-4 -> 5e-5 under Gaussian noise, 1.6e-2 -> 1.6e-3 under flipped labels)."""
    dense, reader = points[name]
    errors = [_relative(*_reflected_both_ways(dense, reader, dense.zeta + offsets(dense, 1, scale)[0], TOL[name]))
              for scale in (1e-2, 1e-3)]
    assert errors[0] < 0.05 and 7 < errors[0] / errors[1] < 13, errors


def test_reflected_terms_off_zeta_are_off_by_the_move(points):
    """Away from zeta the formula's pieces (g_s, DJt, n, c) are still zeta's, so at a foot moved along Gamma by |d|
    its relative error is O(|d|), as the flow term's: here 1.9e-2 at |d| = 0.1 and ~3x that at |d| = 0.3 (offsets
    of 1e-2, whose own O(|x|) part is 5e-4)."""
    dense, reader = points["gaussian"]
    obj, noise, geo = dense.objective, dense.noise, dense.geometry
    direction = geo.tangent_project(offsets(dense, 2, 1.0)[1])
    errors = []
    for move in (0.1, 0.3):
        foot, _ = project(obj, noise, dense.zeta + move * direction / direction.norm(), tol=TOL["gaussian"],
                          max_gauss_newton=60)
        errors.append(_relative(*_reflected_both_ways(dense, reader, foot + offsets(dense, 1, 1e-2)[0],
                                                      TOL["gaussian"])))
    assert errors[0] < 0.03 and 2 < errors[1] / errors[0] < 4.5, errors


@pytest.mark.parametrize("name, bound", [("gaussian", 5e-3), ("flip", 0.15)])
def test_a_reading_by_formula_makes_one_projection(points, name, bound):
    """ReadingTolerances(reflected="formula"): a reading makes one projection and one sharpness reading instead of
    two; its raw reading (at Pi(theta)) is the two-projection reader's, and its reading at Phi differs by O(|x|^3):
    at |x| = 1e-2 by <= 5e-3 of the second-order correction under Gaussian noise (measured 2.3e-3), <= 0.15 under
    flipped labels (the tiny network's; measured 7e-2). Another value is refused by name."""
    dense, projected = points[name]
    formula = MatrixFreeReader(projected.point, tol=TOL[name], cg_rtol=1e-10, max_gauss_newton=60,
                               tolerances=ReadingTolerances(flow_rtol=1e-12, reflected="formula"))
    for theta in [dense.zeta + x for x in offsets(dense, 2, 1e-2)]:
        want, got = projected.reading(theta, seed=11), formula.reading(theta, seed=11)
        assert got.raw == pytest.approx(want.raw, rel=1e-13, abs=0) and got.residual <= TOL[name]
        for g, w, raw in zip(got.corrected, want.corrected, want.raw):
            assert abs(g - w) <= bound * abs(w - raw)
    assert len(formula.cost["projection_cg"]) == len(formula.cost["eigen_matvecs"]) == 2
    assert min(pieces["flow"] for pieces in formula.cost["pieces"]) > 0
    with pytest.raises(ValueError, match="reflected must be one of"):
        ReadingTolerances(reflected="reflection")


def test_an_unconverged_projection_is_refused(points):
    """No reading from a projection that stopped short: the error names the CG iterations and the residual
    (a CG solve out of iterations) or the distance reached (out of Gauss-Newton steps)."""
    dense, good = points["gaussian"]
    theta = dense.zeta + offsets(dense, 1, 1e-1)[0]
    short_cg = MatrixFreeReader(good.point, tol=1e-22, cg_rtol=1e-12, cg_max_iter=1)
    with pytest.raises(ProjectionNotConverged, match=r"CG failed .*relative residual .* after max_iter = 1"):
        short_cg.reading(theta)
    short_newton = MatrixFreeReader(good.point, tol=1e-30, cg_rtol=1e-10, max_gauss_newton=2)
    with pytest.raises(ProjectionNotConverged, match=r"distance .* > tol 1.0e-30 .* after 2 Gauss-Newton steps, "
                                                     r"CG iterations \[\d+, \d+\]"):
        short_newton.reading(theta)
    assert short_newton.cost["seconds"] == []          # nothing was read


def test_a_seed_warm_starts_its_next_projection(points):
    """The first Gauss-Newton CG of a seed's reading starts from that seed's previous first solution, the reflected
    projection from minus it: read twice at the same theta, the second reading's projections need fewer CG
    iterations (the first step none), and the reading is the same."""
    dense, _ = points["gaussian"]
    reader = MatrixFreeReader(dense, tol=1e-22, cg_rtol=1e-10, max_gauss_newton=60)
    theta = dense.zeta + offsets(dense, 1, 1e-2)[0]
    first = reader.reading(theta, seed=1)
    cold = reader.cost["projection_cg"][-2:]
    second = reader.reading(theta, seed=1)
    warm = reader.cost["projection_cg"][-2:]
    assert sum(warm) < sum(cold) and warm[0] < cold[0]
    for a, b in zip(first.corrected + first.raw, second.corrected + second.raw):
        assert abs(a - b) <= 1e-12 * abs(b)


def test_float32_passes_keep_the_reading_in_float64(points):
    """pass_dtype=torch.float32 (CG products and preconditioner, flow ranks and Lanczos in float32; residuals, steps,
    tr H and the Rayleigh quotient of lambda_max in float64): the projections still end on Gamma to the float64
    tolerance (a float32 residual would stop near its rounding, L ~ 1e-14 here), lambda_max at the projection
    equals the dense eigvalsh to 1e-10 (a float32 eigenvalue is off by ~1e-7), and the whole reading equals the
    dense one to 1e-10 relative (measured ~1e-11) at the default cg_rtol, its second-order correction to 1e-4 of
    itself (measured ~7e-6: the float32 flow term)."""
    dense, _ = points["gaussian"]
    obj, noise = dense.objective, dense.noise
    low = MatrixFreeReader(point_at(obj, noise, dense.zeta, method="cg"), tol=TOL["gaussian"],
                           pass_dtype=torch.float32, tolerances=ReadingTolerances(flow_rtol=1e-12), max_gauss_newton=60)
    assert low.passes.dtype == low.solver.vectors.dtype == torch.float32 and low.eig_tol == 1e-6

    def dense_projection(theta):
        z, report = project(obj, noise, theta, tol=TOL["gaussian"], max_gauss_newton=60)
        return z, report.distance
    for theta in [dense.zeta + x for x in offsets(dense, 2, 1e-2)]:
        want = read_at_phi(theta, dense.correction, dense_projection, lambda z: sharpness_at(obj, noise, z))
        got = low.reading(theta, seed=0)
        assert got.residual <= TOL["gaussian"]
        assert abs(got.raw[1] - want.raw[1]) <= 1e-10 * want.raw[1]
        for g, w in zip(got.corrected + got.raw, want.corrected + want.raw):
            assert abs(g - w) <= 1e-10 * abs(w)
        for g, w, g_raw, w_raw in zip(got.corrected, want.corrected, got.raw, want.raw):
            assert abs((g - g_raw) - (w - w_raw)) <= 1e-4 * abs(w - w_raw)     # the second-order correction


def test_a_continuation_config_sets_the_readings_pass_dtype(points):
    """`ContinuationConfig(pass_dtype=torch.float32)` reaches the matrix-free reader of `run_continuation`: the same
    runs (same seeds) read with float32 passes give the float64 readings to 1e-9 relative but not bit for bit (the
    passes did change), and their projections end on Gamma to the same tolerance."""
    dense, _ = points["gaussian"]
    cg = point_at(dense.objective, dense.noise, dense.zeta, method="cg")
    results = []
    for dtype in (None, torch.float32):
        config = ContinuationConfig(SGD(8), eta=0.004, rounds=2, seeds=2, steps_per_round_sgd=25, pass_dtype=dtype)
        results.append(run_continuation(cg, config, generator=torch.Generator().manual_seed(5)))
    high, low = results
    assert not torch.equal(high.trace[-1], high.trace[0])                      # the runs moved
    assert not torch.equal(low.lambda_max, high.lambda_max)                  # and were read another way
    for a, b in ((low.trace, high.trace), (low.lambda_max, high.lambda_max)):
        assert float(((a - b).abs() / b.abs()).max()) <= 1e-9
    assert float(low.projection_residual.max()) <= 1e-10 and float(high.projection_residual.max()) <= 1e-10
