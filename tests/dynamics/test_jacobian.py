"""dynamics.jacobian against dense float64 references (torch.func on the whole batch) on a tiny tanh MLP.

The data list has batches of 3 and 2 samples, so every primitive's batch / chunk loop is exercised.
References: J = jacrev of the stacked outputs, DJ = jacfwd(jacrev), all (N, C, D) / (N, C, D, D).
"""
import pytest
import torch
from torch.func import jacfwd, jacrev

from dynamics.jacobian import (BlockJacobi, GramSolveNotConverged, gram_matrix, gram_matrix_bytes, gram_solve_cg,
                               gram_times_block,
                               jacobian_derivative_times, jacobian_derivative_transpose_times, jacobian_frobenius_pass,
                               jacobian_pairing_grad, jacobian_times, jacobian_transpose_times, output_jacobian,
                               output_jacobian_derivative, per_sample_gram_blocks)
from dynamics.objective import Objective
from tests.reference import classification_batches, tiny_mlp

TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def dense():
    obj = Objective(tiny_mlp(seed=1, d_in=5, width=4, d_out=3), lambda out, y: out.pow(2).mean(),
                    classification_batches(5, image=False, seed=2, sizes=[3, 2]))
    theta = obj.params + 0.1
    x = torch.cat([xb for xb, _ in obj.data])
    outputs = lambda t: obj.forward(t, x)          # noqa: E731
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return obj, theta, outputs, jacrev(outputs)(theta), jacfwd(jacrev(outputs))(theta), rand


def test_jacobian_and_its_products(dense):
    obj, theta, outputs, J, _, rand = dense
    N, C, D = J.shape
    out, jac = output_jacobian(obj, theta)
    torch.testing.assert_close(out, outputs(theta), **TOL)
    torch.testing.assert_close(jac, J, **TOL)
    v, a = rand(D), rand(N, C)
    torch.testing.assert_close(jacobian_times(obj, theta, v), J @ v, **TOL)
    torch.testing.assert_close(jacobian_transpose_times(obj, theta, a), torch.einsum("ncd,nc->d", J, a), **TOL)
    torch.testing.assert_close(per_sample_gram_blocks(obj, theta, chunk_size=2), J @ J.transpose(1, 2), **TOL)
    block = rand(4, N, C)
    flat = J.reshape(N * C, D)
    expected = (block.reshape(4, -1) @ flat @ flat.T).reshape(4, N, C)
    torch.testing.assert_close(gram_times_block(obj, theta, block), expected, **TOL)


@pytest.mark.parametrize("chunk_size, block_samples", [(2, None), (1, 2), (2, 3)])
def test_gram_matrix_by_row_blocks(dense, chunk_size, block_samples):
    """M M^T assembled from row blocks of per-sample Jacobians equals the dense product, for M = J and for a
    per-sample reduction to m = 2 outputs (the label-noise metric's shape); the byte estimate counts the result."""
    obj, theta, _, J, _, rand = dense
    N, C, D = J.shape
    flat = J.reshape(N * C, D)
    torch.testing.assert_close(gram_matrix(obj, theta, chunk_size=chunk_size, block_samples=block_samples),
                               flat @ flat.T, **TOL)
    R = rand(N, 2, C)
    reduced = (R @ J).reshape(N * 2, D)
    got = gram_matrix(obj, theta, chunk_size=chunk_size, block_samples=block_samples,
                      reduce=lambda jac, start: R[start:start + len(jac)] @ jac)
    torch.testing.assert_close(got, reduced @ reduced.T, **TOL)
    assert gram_matrix_bytes(N, 2, D, N, chunk_size) >= 8 * (N * 2) ** 2 + 8 * N * 2 * D


def test_jacobian_derivatives(dense):
    obj, theta, _, J, DJ, rand = dense
    N, C, D = J.shape
    u, v, a = rand(D), rand(D), rand(N, C)
    torch.testing.assert_close(output_jacobian_derivative(obj, theta, u), DJ @ u, **TOL)
    torch.testing.assert_close(jacobian_derivative_times(obj, theta, u, v), (DJ @ u) @ v, **TOL)
    torch.testing.assert_close(jacobian_derivative_transpose_times(obj, theta, u, a),
                               torch.einsum("nc,ncd->d", a, DJ @ u), **TOL)
    pairing = rand(N, C, D)
    torch.testing.assert_close(jacobian_pairing_grad(obj, theta, pairing, chunk_size=2),
                               torch.einsum("ncd,ncde->e", pairing, DJ), **TOL)
    frob_grad, blocks, frob = jacobian_frobenius_pass(obj, theta, chunk_size=2)
    torch.testing.assert_close(frob_grad, 2 * torch.einsum("ncd,ncde->e", J, DJ), **TOL)
    torch.testing.assert_close(blocks, J @ J.transpose(1, 2), **TOL)
    assert frob == pytest.approx(float(J.pow(2).sum()), rel=1e-13)
    # with a per-sample transform held fixed (an output metric): M_i = w_i J_i
    w = rand(N).abs() + 0.5
    frob_grad, blocks, frob = jacobian_frobenius_pass(obj, theta, chunk_size=2,
                                                      reduce=lambda jac, s: w[s:s + len(jac), None, None] * jac)
    torch.testing.assert_close(frob_grad, 2 * torch.einsum("n,ncd,ncde->e", w ** 2, J, DJ), **TOL)
    torch.testing.assert_close(blocks, w[:, None, None] ** 2 * J @ J.transpose(1, 2), **TOL)


class Scaled:
    """A duck-typed output metric: reduce = multiplication by a fixed (N, C) array, its own adjoint."""

    def __init__(self, s):
        self.s = s

    def reduce(self, x):
        return self.s * x

    lift = reduce


def test_gram_solve_cg_against_dense_solve(dense):
    obj, theta, _, J, _, rand = dense
    N, C, D = J.shape                                         # N C = 15 < D = 34: J J^T is invertible
    flat = J.reshape(N * C, D)
    r = rand(N, C)
    blocks = J @ J.transpose(1, 2)
    for shift, metric in ((0.0, None), (0.3, None), (0.0, Scaled(rand(N, C).abs() + 0.5))):
        jm = flat if metric is None else metric.s.reshape(-1, 1) * flat
        gram = jm @ jm.T + shift * torch.eye(N * C, dtype=J.dtype)
        lines = []
        a, iters = gram_solve_cg(obj, theta, r, BlockJacobi(blocks), rtol=1e-13, max_iter=200, shift=shift,
                                 metric=metric, callback=lambda it, rel, jta: lines.append((it, rel, jta)))
        torch.testing.assert_close(a.reshape(-1), torch.linalg.solve(gram, r.reshape(-1)), rtol=1e-9, atol=0)
        assert [it for it, _, _ in lines] == list(range(iters + 1)) and lines[-1][1] <= 1e-13
        torch.testing.assert_close(lines[-1][2], jm.T @ a.reshape(-1), rtol=1e-10, atol=1e-12)
        # a warm start at the solution costs no iteration
        assert gram_solve_cg(obj, theta, r, BlockJacobi(blocks), rtol=1e-10, max_iter=5, x0=a, shift=shift,
                             metric=metric)[1] == 0
    with pytest.raises(GramSolveNotConverged, match="did not converge.*max_iter = 2"):
        gram_solve_cg(obj, theta, r, BlockJacobi(blocks), rtol=1e-13, max_iter=2)
    with pytest.raises(ValueError, match="shift"):
        gram_solve_cg(obj, theta, r, BlockJacobi(blocks), rtol=1e-8, max_iter=2, shift=-1.0)
    with pytest.raises(ValueError, match="x0"):
        gram_solve_cg(obj, theta, r, BlockJacobi(blocks), rtol=1e-8, max_iter=2, x0=r[:2])


def test_bad_input(dense):
    obj, theta, _, J, _, rand = dense
    with pytest.raises(ValueError, match="direction must have shape"):
        output_jacobian_derivative(obj, theta, theta[:3])
    with pytest.raises(ValueError, match="pairing must have shape"):
        jacobian_pairing_grad(obj, theta, J[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_gram_blocks(obj, theta, chunk_size=0)
