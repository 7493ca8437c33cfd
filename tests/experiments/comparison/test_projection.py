"""experiments.comparison.projection: the one projection onto Gamma (dense or CG) and the one sharpness reading.

Settings: real CIFAR-10 images avg-pooled to 4x4 with a float64 GELU MLP 48 -> 24 -> 10 (D = 1,426; 10 images:
N C = 100, 20 images: 200) under Gaussian label noise, and a tiny float64 network 4 -> 8 -> 3 on 4 random
inputs under flipped labels (C = 3, p = 0.2). Dense references: the output Jacobian, torch.linalg solves and
eigenvalues, the dense Hessian of the expected loss (torch.func.hessian).
"""
import pytest
import torch
from torch import nn
from torch.func import hessian

from dynamics.jacobian import GramSolveNotConverged, gram_solve_cg, output_jacobian
from experiments.comparison.noise import FlippedLabels, GaussianLabelNoise, simplex_targets
from experiments.comparison.point import fit, objective
from experiments.comparison.projection import (GramPreconditioner, GramPreconditionerMF, gram_solve,
                                               objective_targets, outputs_and_targets, project, reduced_jacobian,
                                               sharpness_at)
from experiments.data import cifar_subset

GAUSS, FLIP = GaussianLabelNoise(0.1), FlippedLabels(0.2)


def tiny_mlp(seed=0, width=24, outputs=10):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, width), nn.GELU(), nn.Linear(width, outputs)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.1))
    return model


def gaussian_objective(root, n):
    x, y = cifar_subset(root, n, image_size=4)
    return objective(tiny_mlp(), x, GAUSS.targets(y, 10), GAUSS)


def flip_problem():
    """(objective, zeta on Gamma to 1e-12, labels): 4 random inputs, network 4 -> 8 -> 3, C = 3, p = 0.2."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.7)
    x = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    obj = objective(model, x, FLIP.targets(y, 3), FLIP)
    theta = obj.params
    for _ in range(300):                                     # near Gamma, then project
        theta = theta - 0.5 * obj.grad(theta)
    return obj, project(obj, FLIP, theta, tol=1e-12)[0], y


def tiny_points(root):
    """{"gaussian": point of 10 images on Gamma to L <= 1e-24, "flip": the tiny flipped-label point}."""
    from experiments.comparison.point import point_at
    obj = gaussian_objective(root, 10)
    fobj, fzeta, _ = flip_problem()
    return {"gaussian": point_at(obj, GAUSS, project(obj, GAUSS, tol=1e-24, max_gauss_newton=60)[0]),
            "flip": point_at(fobj, FLIP, fzeta)}


def expected_loss(obj, noise):
    x, targets = obj.data[0]
    return lambda t: noise.loss(obj.forward(t, x), targets)


@pytest.fixture(scope="module")
def small(cifar10_dir):
    return gaussian_objective(cifar10_dir, 20)


@pytest.fixture(scope="module")
def on_gamma(cifar10_dir):
    obj = gaussian_objective(cifar10_dir, 10)
    zeta, report = project(obj, GAUSS, tol=1e-24, max_gauss_newton=60)
    return obj, zeta, report


@pytest.fixture(scope="module")
def flip():
    return flip_problem()


def _dense_gram(obj, theta):
    _, jac = output_jacobian(obj, theta)
    flat = jac.reshape(-1, obj.dim)
    return flat, flat @ flat.T


def test_dense_projection_reaches_gamma_and_preconditioned_path_agrees(on_gamma):
    obj, zeta, report = on_gamma
    assert report.converged and report.distance <= 1e-10 and obj.loss(zeta).item() <= 1e-10
    assert report.initial_distance > 1.0 and report.cg_iterations == ()       # it started far from Gamma
    kick = 1e-3 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense, rep_dense = project(obj, GAUSS, zeta + kick, gd_steps=5, gd_lr=0.02)
    pcg, rep_pcg = project(obj, GAUSS, zeta + kick, gd_steps=5, gd_lr=0.02,
                           preconditioner=GramPreconditioner.at(obj, GAUSS, zeta))
    assert rep_dense.distance <= 1e-10 and rep_pcg.distance <= 1e-10
    torch.testing.assert_close(pcg, dense, rtol=0, atol=1e-9)
    assert rep_dense.moved == pytest.approx(float((dense - zeta - kick).norm()), rel=1e-12)
    # a preconditioner of another point and one CG iteration: CG stops short, the dense solve takes over
    far = GramPreconditioner.at(obj, GAUSS, obj.params)
    jac, rhs = reduced_jacobian(obj, GAUSS, zeta)[1], torch.ones(100, dtype=torch.float64)
    solved = gram_solve(jac, rhs, far, max_iter=1)
    assert float((jac @ (jac.T @ solved) - rhs).norm()) <= 1e-8 * float(rhs.norm())
    torch.testing.assert_close(solved, gram_solve(jac, rhs, None), rtol=0, atol=0)


def test_gram_eigendecomposition_by_row_blocks(on_gamma):
    """GramPreconditioner.at builds Jt Jt^T from Jacobian row blocks: under a memory limit that leaves room for only
    a few samples per block, its eigenpairs are those of the dense Gram (values descending, V diag V^T = K to 1e-10
    of |K|, apply = K^-1); a limit below the Gram matrix itself is refused, naming the estimate, before any work."""
    obj, zeta, _ = on_gamma
    jt = reduced_jacobian(obj, GAUSS, zeta)[1]
    gram = jt @ jt.T
    rows, item = gram.shape[0], 8
    tight = 2 * rows * rows * item + 8 * item * 10 * obj.dim         # the Gram, its eigenvectors, ~8 samples' rows
    pre = GramPreconditioner.at(obj, GAUSS, zeta, chunk_size=2, memory_limit=tight)
    assert bool((pre.values[:-1] >= pre.values[1:]).all())
    torch.testing.assert_close(pre.values[:5], torch.linalg.eigvalsh(gram).flip(0)[:5], rtol=1e-12, atol=0)
    rebuilt = pre.vectors @ torch.diag(pre.values) @ pre.vectors.T
    assert float((rebuilt - gram).norm()) <= 1e-10 * float(gram.norm())
    r = torch.randn(10, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    solved = pre.apply(r).reshape(-1)
    assert float((gram @ solved - r.reshape(-1)).norm()) <= 1e-6 * float(r.norm())
    with pytest.raises(ValueError, match=r"N m = 100 .* needs about .* GiB .* > the memory limit"):
        GramPreconditioner.at(obj, GAUSS, zeta, memory_limit=rows * rows * item)


def test_gram_eigendecomposition_cache_is_read_only_for_its_own_problem(on_gamma, tmp_path, monkeypatch):
    """GramPreconditioner.at(cache=): the first call builds and writes the file; a second call at the same theta
    reads it (the Gram matrix is never formed: gram_matrix raises) with the same tensors bit for bit; at a
    different theta, or under another noise model, the file is another problem's and the eigendecomposition is
    built afresh (equal to an uncached build there) and the file replaced; an unreadable file is named."""
    import experiments.comparison.projection as projection
    obj, zeta, _ = on_gamma
    cache = tmp_path / "gram_eigen.pt"
    first = GramPreconditioner.at(obj, GAUSS, zeta, cache=cache)
    plain = GramPreconditioner.at(obj, GAUSS, zeta)
    assert cache.is_file()
    torch.testing.assert_close(first.vectors, plain.vectors, rtol=0, atol=0)
    build = projection.gram_matrix

    def no_build(*args, **kwargs):
        raise AssertionError("the Gram matrix was rebuilt")
    monkeypatch.setattr(projection, "gram_matrix", no_build)
    read = GramPreconditioner.at(obj, GAUSS, zeta, cache=cache)
    torch.testing.assert_close(read.values, first.values, rtol=0, atol=0)
    torch.testing.assert_close(read.vectors, first.vectors, rtol=0, atol=0)
    moved = zeta + 1e-3 * torch.randn(zeta.shape, generator=torch.Generator().manual_seed(5), dtype=zeta.dtype)
    for noise, theta in ((GAUSS, moved), (GaussianLabelNoise(0.2), zeta)):
        with pytest.raises(AssertionError, match="rebuilt"):
            GramPreconditioner.at(obj, noise, theta, cache=cache)
    monkeypatch.setattr(projection, "gram_matrix", build)
    there = GramPreconditioner.at(obj, GAUSS, moved, cache=cache)
    assert float((there.values - first.values).abs().max()) > 1e-6 * float(first.values[0])
    torch.testing.assert_close(there.values, GramPreconditioner.at(obj, GAUSS, moved).values, rtol=0, atol=0)
    monkeypatch.setattr(projection, "gram_matrix", no_build)
    torch.testing.assert_close(GramPreconditioner.at(obj, GAUSS, moved, cache=cache).values, there.values,
                               rtol=0, atol=0)
    cache.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read the cached Gram eigendecomposition .*gram_eigen.pt"):
        GramPreconditioner.at(obj, GAUSS, zeta, cache=cache)


def test_truncated_pseudo_inverse_projects_at_a_rank_deficient_point(cifar10_dir):
    """20 images, hidden width 12: one-hot targets force 1^T W_last = 0 on Gamma, so Jt has exactly N - 13 = 7 null
    directions there (RESULTS.md 2b). Near zeta, CG under the full inverse (those 7 eigenvalues floored at 1e-13)
    needs > 5x the iterations of CG under `truncated()`, which converges on the row space; the Gauss-Newton
    projection under it reaches Gamma moving less than the offset from zeta."""
    x, y = cifar_subset(cifar10_dir, 20, image_size=4)
    obj = objective(tiny_mlp(width=12), x, GAUSS.targets(y, 10), GAUSS)
    zeta, _ = project(obj, GAUSS, fit(obj, GAUSS, steps=3000, lr=1e-2), tol=1e-24, max_gauss_newton=60)
    pre = GramPreconditioner.at(obj, GAUSS, zeta)
    pseudo = pre.truncated(1e-12)
    assert pseudo.rank == 200 - 7 and pre.rank is None
    gen = torch.Generator().manual_seed(2)
    theta = zeta + 1e-2 * torch.randn(obj.dim, generator=gen, dtype=torch.float64) / obj.dim ** 0.5
    metric = GAUSS.metric(objective_targets(obj))
    r = GAUSS.residual(outputs_and_targets(obj, theta)[0], objective_targets(obj))
    try:
        full = gram_solve_cg(obj, theta, r, pre, rtol=1e-6, max_iter=400, metric=metric)[1]
    except GramSolveNotConverged:
        full = 401
    _, its = gram_solve_cg(obj, theta, r, pseudo, rtol=1e-6, max_iter=400, metric=metric)
    z, report = project(obj, GAUSS, theta, tol=1e-24, method="cg", preconditioner=pseudo, cg_rtol=1e-8,
                        refresh_after=None, max_gauss_newton=60)
    offset = float((theta - zeta).norm())
    assert report.converged and report.moved <= offset      # measured 0.58 x the offset
    assert its * 5 <= full                               # measured: 5 against 109


def test_simplex_targets_give_a_full_rank_jacobian_where_one_hot_targets_do_not(cifar10_dir):
    """The setting of the test above (20 images, width 12, same Adam fit) with `simplex_targets` on 9 outputs:
    no null direction at zeta (kept rank 180 of 180 at rank tol 1e-12, against 193 of 200 for one-hot; smallest /
    largest Gram eigenvalue 7e-6), so CG under the plain (full) inverse converges as fast as the one-hot point's under
    the truncated one (measured 5 iterations)."""
    x, y = cifar_subset(cifar10_dir, 20, image_size=4)
    obj = objective(tiny_mlp(width=12, outputs=9), x, simplex_targets(y, 10), GAUSS)
    zeta, _ = project(obj, GAUSS, fit(obj, GAUSS, steps=3000, lr=1e-2), tol=1e-24, max_gauss_newton=60)
    pre = GramPreconditioner.at(obj, GAUSS, zeta)
    assert pre.truncated(1e-12).rank == 180 and float(pre.values[-1] / pre.values[0]) > 1e-9
    gen = torch.Generator().manual_seed(2)
    theta = zeta + 1e-2 * torch.randn(obj.dim, generator=gen, dtype=torch.float64) / obj.dim ** 0.5
    r = GAUSS.residual(outputs_and_targets(obj, theta)[0], objective_targets(obj))
    _, its = gram_solve_cg(obj, theta, r, pre, rtol=1e-6, max_iter=400, metric=GAUSS.metric(objective_targets(obj)))
    assert its <= 10


def test_projection_guards(on_gamma, cifar10_dir):
    obj, zeta, _ = on_gamma
    with pytest.raises(RuntimeError, match="projection onto Gamma failed"):
        project(obj, GAUSS, zeta + 0.5, max_gauss_newton=1)
    _, rep = project(obj, GAUSS, zeta + 0.5, max_gauss_newton=1, raise_on_failure=False)
    assert not rep.converged and rep.gauss_newton_steps == 1
    with pytest.raises(ValueError, match="gd_lr"):
        project(obj, GAUSS, zeta, gd_steps=3)
    with pytest.raises(ValueError, match="method"):
        project(obj, GAUSS, zeta, method="lu")
    with pytest.raises(ValueError, match="cg_rtol"):
        project(obj, GAUSS, method="cg", cg_rtol=1.5)
    x, y = cifar_subset(cifar10_dir, 40, image_size=4)                   # N C = 400 equations, D = 70
    few = objective(nn.Sequential(nn.Flatten(), nn.Linear(48, 1), nn.GELU(), nn.Linear(1, 10)).double(), x,
                    GAUSS.targets(y, 10), GAUSS)
    for method in ("dense", "cg"):
        with pytest.raises(ValueError, match="exceed D"):
            project(few, GAUSS, method=method, max_gauss_newton=2)


def test_flip_projection_from_a_perturbed_point(flip):
    obj, zeta, y = flip
    theta = zeta + 0.05 * torch.randn(zeta.shape, generator=torch.Generator().manual_seed(5), dtype=zeta.dtype)
    proj, report = project(obj, FLIP, theta, tol=1e-10, gd_steps=3, gd_lr=0.2)
    assert report.initial_distance > 1e-3 and report.converged and report.distance <= 1e-10
    x, q = obj.data[0]
    assert torch.allclose(torch.softmax(obj.forward(proj, x), -1), q, atol=1e-10, rtol=0)
    # the distance is ||centred(f - log q)||, the residual its metric-weighted form: both zero on Gamma
    out = outputs_and_targets(obj, proj)[0]
    centred = (out - q.log()) - (out - q.log()).mean(-1, keepdim=True)
    assert FLIP.distance(out, q) == pytest.approx(float(centred.norm()), rel=1e-9)
    with pytest.raises(RuntimeError, match="projection onto Gamma failed"):
        project(obj, FLIP, theta, tol=1e-10, max_gauss_newton=1)


@pytest.mark.parametrize("noise", ["gaussian", "flip"])
def test_sharpness_at_matches_the_dense_hessian(on_gamma, flip, noise):
    if noise == "gaussian":
        (obj, zeta, _), model = on_gamma, GAUSS
    else:
        (obj, zeta, _), model = flip, FLIP
    values = torch.linalg.eigvalsh(hessian(expected_loss(obj, model))(zeta))
    trace, lmax = sharpness_at(obj, model, zeta)
    rel = 1e-8 if noise == "gaussian" else 1e-10          # the tolerances of the two tests merged here
    assert trace == pytest.approx(float(values.clamp_min(0).sum()), rel=rel)
    assert lmax == pytest.approx(float(values[-1]), rel=rel)
    reference = GramPreconditioner.at(obj, model, zeta).vectors[:, :2]
    assert sharpness_at(obj, model, zeta, reference=reference)[1] == pytest.approx(float(values[-1]), rel=1e-9)
    _, jt = reduced_jacobian(obj, model, zeta)
    assert jt.shape[0] == model.equations(obj.num_samples, obj.data[0][1].shape[1])


def test_per_sample_preconditioner_matches_dense_gram(small):
    obj = small
    theta = obj.params
    _, gram = _dense_gram(obj, theta)
    # M^-1 is symmetric positive definite, and with rank N C - 1 the Nystrom part captures the scaled Gram's
    # top: all but two preconditioned eigenvalues collapse onto lambda_l
    for rank in (0, 199):
        pre = GramPreconditionerMF.at(obj, GAUSS, theta, rank=rank, block=64,
                                      generator=torch.Generator().manual_seed(0))
        m_inv = torch.stack([pre.apply(e.reshape(20, 10)).reshape(-1) for e in torch.eye(200, dtype=torch.float64)], 1)
        torch.testing.assert_close(m_inv, m_inv.T, rtol=0, atol=1e-10 * m_inv.abs().max().item())
        vals = torch.linalg.eigvals(m_inv @ gram).real.sort().values
        assert vals[0] > 0
        kappa = (vals[-1] / vals[0]).item()
        if rank == 0:
            plain = kappa
        else:
            assert (vals[-2] / vals[1]).item() < 1.01 and kappa < plain / 10
    with pytest.raises(ValueError, match="rank"):
        GramPreconditionerMF.at(obj, GAUSS, theta, rank=200)


def test_cg_gram_solve_equals_dense_solve(small):
    obj = small
    theta = obj.params
    _, gram = _dense_gram(obj, theta)
    r = torch.randn(20, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pre = GramPreconditionerMF.at(obj, GAUSS, theta, rank=50)
    a, iters = gram_solve_cg(obj, theta, r, pre, rtol=1e-12, max_iter=2000)
    exact = torch.linalg.solve(gram, r.reshape(-1))
    # relative residual 1e-12 bounds the error by 1e-12 x cond(G) (cond ~ 1e5 here)
    torch.testing.assert_close(a.reshape(-1), exact, rtol=0, atol=1e-6 * exact.abs().max().item())
    assert (gram @ a.reshape(-1) - r.reshape(-1)).norm() <= 1e-11 * r.norm()
    assert 1 <= iters < 200                                           # exact arithmetic: at most N C steps
    with pytest.raises(GramSolveNotConverged, match="did not converge"):
        gram_solve_cg(obj, theta, r, pre, rtol=1e-12, max_iter=1)


def test_cg_projection_lands_on_gamma_and_equals_dense_projection(small):
    obj = small
    start = obj.params
    dense, rep_dense = project(obj, GAUSS, start, tol=1e-20, max_gauss_newton=60)
    cg, rep_cg = project(obj, GAUSS, start, tol=1e-20, max_gauss_newton=60, method="cg", cg_rtol=1e-13,
                         preconditioner_rank=40)
    assert rep_cg.converged and obj.loss(cg).item() <= 1e-20 and rep_cg.initial_distance > 1.0
    assert len(rep_cg.cg_iterations) == rep_cg.gauss_newton_steps == rep_dense.gauss_newton_steps
    torch.testing.assert_close(cg, dense, rtol=0, atol=1e-9)          # the same minimum-norm iteration
    # near Gamma, a loose inexact-Newton tolerance and a preconditioner built elsewhere: the projection of a
    # kicked point agrees with the dense one to the tolerance of L (1e-10 -> residual ~1e-5 per output)
    kick = 1e-3 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = project(obj, GAUSS, dense + kick, tol=1e-22, max_gauss_newton=60)
    pre = GramPreconditionerMF.at(obj, GAUSS, dense, rank=20)
    got, rep = project(obj, GAUSS, dense + kick, tol=1e-22, max_gauss_newton=60, method="cg", cg_rtol=1e-3,
                       preconditioner=pre)
    assert rep.converged and rep.gauss_newton_steps >= 2
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
    # the first step's CG solution is reported; as a warm start it solves that step with no iteration
    again, warm = project(obj, GAUSS, dense + kick, tol=1e-22, max_gauss_newton=60, method="cg", cg_rtol=1e-3,
                          preconditioner=pre, x0=rep.coefficients)
    assert warm.cg_iterations[0] == 0 and rep.cg_iterations[0] > 0 and torch.equal(again, got)
    with pytest.raises(RuntimeError, match="CG iterations"):
        project(obj, GAUSS, method="cg", max_gauss_newton=1, cg_rtol=1e-3, preconditioner_rank=20)


def test_float32_gram_products_still_land_on_gamma_in_float64(small):
    """passes=obj.to(torch.float32): CG's Gram products in float32, residuals and steps in float64. From the start
    (distance > 1) the projection reaches L <= 1e-20, which float32 residuals cannot (outputs rounded to ~1e-7: L
    ~ 1e-14), and a kicked point's projection ends where the float64 CG's does (same cg_rtol and preconditioner)
    to 2e-8, both 1.3e-7 from the exact projection."""
    obj = small
    pre = GramPreconditionerMF.at(obj, GAUSS, obj.params, rank=20)
    far, report = project(obj, GAUSS, obj.params, tol=1e-20, max_gauss_newton=60, method="cg", cg_rtol=1e-3,
                          preconditioner=pre, passes=obj.to(torch.float32))
    assert report.converged and obj.loss(far).item() <= 1e-20 and report.initial_distance > 1.0
    # with its Nystrom preconditioner built in float32 too: CG needs about the float64 build's iterations (+8%)
    counts = [sum(project(obj, GAUSS, obj.params, tol=1e-20, max_gauss_newton=60, method="cg", cg_rtol=1e-3,
                          preconditioner_rank=20, passes=passes)[1].cg_iterations)
              for passes in (None, obj.to(torch.float32))]
    assert counts[1] <= 1.2 * counts[0]
    kick = 1e-3 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = project(obj, GAUSS, far + kick, tol=1e-22, max_gauss_newton=60)
    ends = []
    for passes in (None, obj.to(torch.float32)):
        got, rep = project(obj, GAUSS, far + kick, tol=1e-22, max_gauss_newton=60, method="cg", cg_rtol=1e-3,
                           preconditioner=pre, passes=passes)
        assert rep.converged and got.dtype == torch.float64
        ends.append(got)
    # each ends ~1.3e-7 from the exact projection (cg_rtol 1e-3 and a preconditioner built off Gamma); the
    # float32 products move the end point by ~4e-9 more, 30x less than that
    torch.testing.assert_close(ends[1], ends[0], rtol=0, atol=2e-8)
    torch.testing.assert_close(ends[1], ref, rtol=0, atol=2e-7)


def test_a_looser_first_cg_step_saves_iterations_and_moves_the_end_along_gamma_by_rtol_x_offset_squared(small):
    """first_cg_rtol loosens the first Gauss-Newton step's CG only: from a point |x| = 0.14 off Gamma under
    block-Jacobi (CG needs ~110 iterations a step at cg_rtol 1e-8), the first step takes less than half its
    iterations and the later steps as many, the projection still reaches tol, and its end moves along Gamma by
    at most 2 rtol |x|^2 (inexact Newton: 3.3e-4 at 1e-2, 1.8e-3 at 1e-1). Outside (0, 1) it is refused."""
    obj = small
    far, _ = project(obj, GAUSS, obj.params, tol=1e-24, max_gauss_newton=60)
    theta = far + 1e-2 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = project(obj, GAUSS, theta, tol=1e-24, max_gauss_newton=60)
    offset2 = float((theta - ref).norm()) ** 2
    pre = GramPreconditionerMF.at(obj, GAUSS, far, rank=0)
    options = dict(tol=1e-22, method="cg", cg_rtol=1e-8, preconditioner=pre, max_gauss_newton=60)
    _, tight = project(obj, GAUSS, theta, **options)
    for rtol in (1e-2, 1e-1):
        z, loose = project(obj, GAUSS, theta, first_cg_rtol=rtol, **options)
        assert loose.converged and loose.distance <= 1e-22
        assert loose.cg_iterations[0] < tight.cg_iterations[0] / 2
        assert sum(loose.cg_iterations) < sum(tight.cg_iterations)
        assert float((z - ref).norm()) <= 2 * rtol * offset2
    with pytest.raises(ValueError, match="first_cg_rtol"):
        project(obj, GAUSS, theta, first_cg_rtol=1.0, **options)


def test_cg_warm_start_and_callback_track_the_tangent_projection(small):
    """r = J v: the callback's J^T a_k is the CG iterate's J^T a, ||v - J^T a_k||^2 decreases monotonically to
    ||P v||^2 (Craig's method), a warm start from a nearby right-hand side saves iterations, and the Tikhonov
    shift solves (J J^T + mu I) a = r."""
    obj = small
    theta = obj.params
    flat, gram = _dense_gram(obj, theta)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pv = v - flat.T @ torch.linalg.solve(gram, flat @ v)                    # dense tangent projection
    pre = GramPreconditionerMF.at(obj, GAUSS, theta, rank=20)
    seen = []
    a, iters = gram_solve_cg(obj, theta, (flat @ v).reshape(20, 10), pre, rtol=1e-12, max_iter=2000,
                             callback=lambda it, rel, jta: seen.append((it, rel, float((v - jta) @ (v - jta)),
                                                                        jta.clone())))
    assert [s[0] for s in seen] == list(range(iters + 1)) and seen[0][1] == 1.0
    torch.testing.assert_close(seen[-1][3], flat.T @ a.reshape(-1), rtol=0, atol=1e-10 * v.norm().item())
    sq = torch.tensor([s[2] for s in seen], dtype=torch.float64)
    assert sq[0] == pytest.approx(float(v @ v), rel=1e-14)
    assert (sq[1:] <= sq[:-1] + 1e-12 * sq[0]).all()                   # monotone up to rounding
    assert sq[-1].item() == pytest.approx(float(pv @ pv), rel=1e-9)
    a0, zero = gram_solve_cg(obj, theta, (flat @ v).reshape(20, 10), pre, rtol=1e-8, max_iter=2000, x0=a)
    assert zero == 0 and torch.equal(a0, a)
    w = v + 1e-4 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rw = (flat @ w).reshape(20, 10)
    cold, n_cold = gram_solve_cg(obj, theta, rw, pre, rtol=1e-11, max_iter=2000)
    warm, n_warm = gram_solve_cg(obj, theta, rw, pre, rtol=1e-11, max_iter=2000, x0=a)
    assert n_warm < n_cold
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-6 * cold.abs().max().item())
    with pytest.raises(ValueError, match="x0"):
        gram_solve_cg(obj, theta, rw, pre, rtol=1e-8, max_iter=10, x0=a.reshape(-1))
    mu = 1e-3 * torch.linalg.eigvalsh(gram)[0].item()     # moves the solution by ~1e-3: the shift is applied
    shifted, _ = gram_solve_cg(obj, theta, rw, pre, rtol=1e-12, max_iter=2000, shift=mu)
    exact = torch.linalg.solve(gram + mu * torch.eye(200, dtype=torch.float64), rw.reshape(-1))
    torch.testing.assert_close(shifted.reshape(-1), exact, rtol=0, atol=1e-6 * exact.abs().max().item())
    assert (shifted - cold).abs().max() > 1e-5 * exact.abs().max()
    assert gram_solve_cg(obj, theta, rw, pre, rtol=1e-10, max_iter=10, x0=shifted, shift=mu)[1] == 0
    with pytest.raises(ValueError, match="shift"):
        gram_solve_cg(obj, theta, rw, pre, rtol=1e-8, max_iter=10, shift=-1.0)


def test_matrix_free_route_with_the_flip_metric(flip):
    """Flipped labels through the matrix-free route: the preconditioner of Jt Jt^T (reduced blocks, Nystrom on
    lift / reduce of Gram products) is symmetric and, at rank N m - 1, clusters the spectrum; the CG projection
    lands on Gamma where the dense one does (to O(|offset|^3): the dense route takes chord steps)."""
    obj, zeta, _ = flip
    _, jt = reduced_jacobian(obj, FLIP, zeta)
    gram = jt @ jt.T                                                       # (8, 8): N m = 4 x 2
    pre = GramPreconditionerMF.at(obj, FLIP, zeta, rank=7, block=3)
    m_inv = torch.stack([pre.apply(e.reshape(4, 2)).reshape(-1) for e in torch.eye(8, dtype=torch.float64)], 1)
    torch.testing.assert_close(m_inv, m_inv.T, rtol=0, atol=1e-10 * m_inv.abs().max().item())
    vals = torch.linalg.eigvals(m_inv @ gram).real.sort().values
    assert vals[0] > 0 and (vals[-2] / vals[1]).item() < 1.01
    kick = 1e-3 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense, _ = project(obj, FLIP, zeta + kick, tol=1e-13)
    cg, rep = project(obj, FLIP, zeta + kick, tol=1e-13, method="cg", cg_rtol=1e-12, preconditioner=pre)
    assert rep.converged and rep.distance <= 1e-13 and len(rep.cg_iterations) == rep.gauss_newton_steps >= 2
    torch.testing.assert_close(cg, dense, rtol=0, atol=1e-8)
