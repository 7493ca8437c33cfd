"""dynamics.jacobian against dense float64 references (torch.func on the whole batch) on a tiny tanh MLP.

The data list has batches of 3 and 2 samples, so every primitive's batch / chunk loop is exercised.
References: J = jacrev of the stacked outputs, DJ = jacfwd(jacrev), all (N, C, D) / (N, C, D, D).
"""
import pytest
import torch
from torch.func import jacfwd, jacrev

from dynamics.jacobian import (gram_times_block, jacobian_derivative_times, jacobian_derivative_transpose_times,
                               jacobian_frobenius_pass, jacobian_pairing_grad, jacobian_times,
                               jacobian_transpose_times, output_jacobian, output_jacobian_derivative,
                               per_sample_gram_blocks)
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


def test_bad_input(dense):
    obj, theta, _, J, _, rand = dense
    with pytest.raises(ValueError, match="direction must have shape"):
        output_jacobian_derivative(obj, theta, theta[:3])
    with pytest.raises(ValueError, match="pairing must have shape"):
        jacobian_pairing_grad(obj, theta, J[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_gram_blocks(obj, theta, chunk_size=0)
