"""Lanczos matrix functions f(A) v and stochastic traces tr(f(A) B) against dense float64 references.

References are eigendecompositions of explicit symmetric matrices with known spectra. Tolerances:
f(A) v to 1e-10 relative when asked for tol 1e-12 (the stopping rule measures the last step's
change, which for these entire functions is at most a few times the remaining error);
stochastic traces within 4 reported standard errors (fails by chance with probability < 1e-4),
and the standard errors' calibration over 100 independent seeds of 12 probes: the spread of
the 100 estimates over the RMS reported standard error within [0.8, 1.3] (its sampling error is
~0.07; a standard error off by sqrt(2) fails), their mean within 3.5 standard errors of the mean.
(The t-statistics themselves are skewed with so few probes, as quadratic-form samples are.)
Runtime: a few seconds.
"""
import math

import pytest
import torch

from dynamics.lanczos import MatrixOperator
from dynamics.matrix_function import SpectralOperator, apply_function, trace_function_product
from sde.psi import psi


def _operator(eigenvalues: torch.Tensor, seed: int):
    """MatrixOperator with the given spectrum and a random orthonormal eigenbasis; returns (op, Q)."""
    d = eigenvalues.shape[0]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return MatrixOperator(q @ torch.diag(eigenvalues) @ q.T), q


def _dense(f, eigenvalues, q):
    return q @ torch.diag(f(eigenvalues)) @ q.T


@pytest.fixture(scope="module")
def psd_with_kernel():
    # 60 nonzero eigenvalues spread over [1e-3, 40] (log-uniform), 40 zero ones
    lam = torch.cat([torch.logspace(-3, math.log10(40.0), 60, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)])
    op, q = _operator(lam, seed=0)
    return op, q, lam


FUNCTIONS = {"exp": lambda x: torch.exp(-0.3 * x), "psi": lambda x: psi(2 * 0.5 * x),
             "psi_large_beta": lambda x: psi(2 * 5.0 * x)}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_times_vector_matches_dense(psd_with_kernel, name):
    op, q, lam = psd_with_kernel
    f = FUNCTIONS[name]
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = _dense(f, lam, q) @ v
    op.calls = 0
    got = apply_function(op, v, f, tol=1e-12)
    assert got.converged and got.value.shape == (op.dim,)
    assert (got.value - exact).norm() <= 1e-10 * exact.norm()
    assert op.calls == got.steps < 100          # far fewer products than the dimension (100)


def test_error_falls_with_lanczos_steps(psd_with_kernel):
    op, q, lam = psd_with_kernel
    f = FUNCTIONS["exp"]
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = _dense(f, lam, q) @ v
    errors, estimates = [], []
    for steps in (4, 8, 12, 16, 20):
        got = apply_function(op, v, f, tol=1e-300, max_steps=steps)
        assert got.steps == steps and not got.converged
        errors.append(float((got.value - exact).norm() / exact.norm()))
        estimates.append(got.error_estimate)
    # superlinear convergence for an entire function: every 4 steps gain more than 10x
    assert all(b < a / 10 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-7
    # the a-posteriori estimate (change of the last step ~ error of the step before) is conservative:
    # never below a third of the true error, and itself small once converged
    assert all(est >= e / 3 for e, est in zip(errors, estimates)), (errors, estimates)
    assert estimates[-2] < 1e-9


def test_exact_on_invariant_krylov_space_and_polynomials():
    lam = torch.tensor([0.0] * 5 + [1.0] * 5 + [3.0] * 5 + [7.0] * 5, dtype=torch.float64)
    op, q = _operator(lam, seed=3)
    v = torch.randn(20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = FUNCTIONS["psi"]
    got = apply_function(op, v, f, tol=1e-12)
    # 4 distinct eigenvalues: the Krylov space is invariant after 4 steps and the result exact
    assert got.exact and got.steps == 4
    torch.testing.assert_close(got.value, _dense(f, lam, q) @ v, rtol=0, atol=1e-12 * v.norm().item())
    # a polynomial of degree 2 is reproduced exactly by 3 steps
    op2, q2 = _operator(torch.linspace(-2, 5, 30, dtype=torch.float64), seed=5)
    w = torch.randn(30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    poly = apply_function(op2, w, lambda x: 1 - x + 0.5 * x ** 2, tol=1e-300, max_steps=3)
    exact = w - op2.matrix @ w + 0.5 * op2.matrix @ (op2.matrix @ w)
    torch.testing.assert_close(poly.value, exact, rtol=0, atol=1e-11 * exact.norm().item())


def test_several_functions_and_deflation(psd_with_kernel):
    op, q, lam = psd_with_kernel
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    betas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    many = apply_function(op, v, lambda x: psi(2 * x[:, None] * betas), tol=1e-12)
    assert many.value.shape == (op.dim, 3)
    for j, beta in enumerate(betas.tolist()):
        exact = _dense(lambda x: psi(2 * beta * x), lam, q) @ v
        assert (many.value[:, j] - exact).norm() <= 1e-10 * exact.norm()
    # deflation: result is f(P A P) P v with P = I - W W^T, W = top-5 eigenvectors
    order = torch.argsort(lam, descending=True)[:5]
    W = q[:, order]
    P = torch.eye(op.dim, dtype=torch.float64) - W @ W.T
    f = FUNCTIONS["psi"]
    got = apply_function(op, v, f, tol=1e-12, orthogonal_to=W)
    vals, vecs = torch.linalg.eigh(P @ op.matrix @ P)
    exact = vecs @ (f(vals.clamp(min=0)) * (vecs.T @ (P @ v)))
    assert (got.value - exact).norm() <= 1e-10 * exact.norm()
    assert (W.T @ got.value).abs().max() <= 1e-12 * got.value.norm()


def _trace_problem(seed: int, d: int = 40):
    lam = torch.cat([torch.logspace(-2, 1.5, d // 2, dtype=torch.float64), torch.zeros(d - d // 2, dtype=torch.float64)])
    A, q = _operator(lam, seed)
    g = torch.Generator().manual_seed(seed + 100)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    B = MatrixOperator(b + b.T + 3 * torch.eye(d, dtype=torch.float64))
    return A, q, lam, B


def test_trace_of_function_product_is_unbiased_and_deflation_exact():
    A, q, lam, B = _trace_problem(seed=8)
    f = lambda x: psi(2 * 0.7 * x)
    exact = float(torch.trace(_dense(f, lam, q) @ B.matrix))
    for kwargs in ({}, {"b_trace": float(torch.trace(B.matrix))}):
        est = trace_function_product(A, f, B, num_probes=200, generator=torch.Generator().manual_seed(9), **kwargs)
        assert abs(est.item() - exact) <= 4 * float(est.stderr)
        assert est.converged and est.b_matvecs == 200 and est.matvecs == int(est.lanczos_steps.sum())
    # deflating every nonzero eigenpair leaves no stochastic part (f(0) = 0): exact, zero stderr
    top = torch.argsort(lam, descending=True)[:20]
    full = trace_function_product(A, f, B, num_probes=3, generator=torch.Generator().manual_seed(9),
                                  deflate=(lam[top], q[:, top]), b_trace=float(torch.trace(B.matrix)))
    assert full.item() == pytest.approx(exact, rel=1e-10)
    assert float(full.stderr) <= 1e-10 * abs(exact)


def test_spectral_operator_applies_functions_exactly(psd_with_kernel):
    """A known eigendecomposition gives f(A) v exactly with no product (kept rank 60 of 100, the rest A's kernel
    where f(0) acts: exp(-x) has f(0) = 1), and the same stochastic trace as Lanczos on the same probes."""
    A, q, lam = psd_with_kernel
    spectral = SpectralOperator(lam[:60], q[:, :60])
    v = torch.randn(100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(spectral.hvp(v), A.matrix @ v, rtol=1e-12, atol=1e-12)
    for f in (lambda x: torch.exp(-x), lambda x: psi(2 * 0.7 * x)):
        got = apply_function(spectral, v, f)
        assert got.exact and got.steps == 0 and spectral.calls == 1
        torch.testing.assert_close(got.value, _dense(f, lam, q) @ v, rtol=0, atol=1e-12 * float(v.norm()))
    B = MatrixOperator(A.matrix @ A.matrix + torch.eye(100, dtype=torch.float64))
    f = lambda x: psi(2 * 0.7 * x)
    top = torch.argsort(lam, descending=True)[:5]
    runs = [trace_function_product(op, f, B, num_probes=6, generator=torch.Generator().manual_seed(4), tol=1e-13,
                                   deflate=(lam[top], q[:, top]), b_trace=float(torch.trace(B.matrix)))
            for op in (A, spectral)]
    assert runs[1].matvecs == 0 < runs[0].matvecs                    # no Lanczos product on the spectral route
    assert runs[1].item() == pytest.approx(runs[0].item(), rel=1e-10)
    assert float(runs[1].stderr) == pytest.approx(float(runs[0].stderr), rel=1e-8)
    with pytest.raises(ValueError, match="r <= D"):
        SpectralOperator(lam, q[:, :60])


def test_several_functions_and_operators_share_probes():
    A, q, lam, B1 = _trace_problem(seed=10)
    _, _, _, B2 = _trace_problem(seed=11)
    B2 = MatrixOperator(q @ B2.matrix @ q.T)    # a different operator of the same size
    betas = torch.tensor([0.05, 2.0], dtype=torch.float64)
    f = lambda x: psi(2 * x[:, None] * betas)
    est = trace_function_product(A, f, [B1, B2], num_probes=150, generator=torch.Generator().manual_seed(12),
                                 b_trace=[float(torch.trace(B1.matrix)), float(torch.trace(B2.matrix))])
    assert est.value.shape == est.stderr.shape == (2, 2)
    for i, beta in enumerate(betas.tolist()):
        fa = _dense(lambda x: psi(2 * beta * x), lam, q)
        for j, B in enumerate((B1, B2)):
            exact = float(torch.trace(fa @ B.matrix))
            assert abs(float(est.value[i, j]) - exact) <= 4 * float(est.stderr[i, j])
    with pytest.raises(ValueError, match="item"):
        est.item()


@pytest.mark.parametrize("control", [False, True])
def test_standard_error_is_calibrated(control):
    A, q, lam, B = _trace_problem(seed=13, d=24)
    f = lambda x: psi(2 * 0.7 * x)
    exact = float(torch.trace(_dense(f, lam, q) @ B.matrix))
    kwargs = {"b_trace": float(torch.trace(B.matrix))} if control else {}
    top = torch.argsort(lam, descending=True)[:3]
    values, errors = [], []
    for seed in range(100):
        est = trace_function_product(A, f, B, num_probes=12, generator=torch.Generator().manual_seed(seed),
                                     deflate=(lam[top], q[:, top]), tol=1e-8, **kwargs)
        values.append(est.item())
        errors.append(float(est.stderr))
    values, errors = torch.tensor(values, dtype=torch.float64), torch.tensor(errors, dtype=torch.float64)
    spread = float(values.std())
    # unbiased: the mean of 100 estimates is within 3.5 of its standard errors of the exact value
    assert abs(float(values.mean()) - exact) <= 3.5 * spread / 10
    # calibrated: the reported standard error matches the actual spread of the estimates
    assert 0.8 <= spread / float(errors.pow(2).mean().sqrt()) <= 1.3


def test_control_variate_cuts_variance_when_f_is_nearly_constant():
    A, q, lam, B = _trace_problem(seed=14)
    A = MatrixOperator(q @ torch.diag(lam + 1.0) @ q.T)   # spectrum in [1, 33]: psi(2 beta x) ~ 1 at beta = 20
    f = lambda x: psi(2 * 20.0 * x)
    plain = trace_function_product(A, f, B, num_probes=30, generator=torch.Generator().manual_seed(15))
    cv = trace_function_product(A, f, B, num_probes=30, generator=torch.Generator().manual_seed(15),
                                b_trace=float(torch.trace(B.matrix)))
    assert float(cv.stderr) < 0.1 * float(plain.stderr)
    exact = float(torch.trace(_dense(f, lam + 1.0, q) @ B.matrix))
    assert abs(cv.item() - exact) <= 4 * float(cv.stderr)


def test_bad_input():
    A, q, lam, B = _trace_problem(seed=16, d=10)
    f = FUNCTIONS["exp"]
    with pytest.raises(ValueError, match="shape"):
        apply_function(A, torch.ones(3, dtype=torch.float64), f)
    with pytest.raises(ValueError, match="max_steps"):
        apply_function(A, torch.ones(10, dtype=torch.float64), f, max_steps=0)
    with pytest.raises(ValueError, match=r"\(m,\) or \(m, p\)"):
        apply_function(A, torch.ones(10, dtype=torch.float64), lambda x: x[:1])
    with pytest.raises(ValueError, match="orthogonal_to"):
        apply_function(A, torch.ones(10, dtype=torch.float64), f, orthogonal_to=torch.ones(3, 2))
    with pytest.raises(ValueError, match="num_probes"):
        trace_function_product(A, f, B, num_probes=2, b_trace=1.0)
    with pytest.raises(ValueError, match="one value per B"):
        trace_function_product(A, f, [B, B], num_probes=5, b_trace=[1.0])
    with pytest.raises(ValueError, match="dimension"):
        trace_function_product(A, f, MatrixOperator(torch.eye(3, dtype=torch.float64)), num_probes=5)
    zero = apply_function(A, torch.zeros(10, dtype=torch.float64), f)
    assert zero.steps == 0 and zero.exact and zero.value.abs().max() == 0
