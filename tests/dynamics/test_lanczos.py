"""top_eigenpairs (thick-restart Lanczos) and power_iteration against torch.linalg.eigh of the
dense Hessian of tiny float64 nets, and on explicit matrices with designed spectra."""
import pytest
import torch
from torch import nn

from dynamics import MatrixOperator, Objective, power_iteration, top_eigenpairs
from tests.reference import classification_batches, dense_loss_hessian, tiny_cnn_bn, tiny_mlp


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=["mlp", "cnn-eval", "cnn-train"])
def net(request):
    if request.param == "mlp":
        obj = Objective(tiny_mlp(), nn.CrossEntropyLoss(), classification_batches(12, image=False))
    else:
        obj = Objective(tiny_cnn_bn(), nn.CrossEntropyLoss(),
                        classification_batches(12, image=True, sizes=[7, 5]), bn=request.param[4:])
    H = dense_loss_hessian(obj)
    values, vectors = torch.linalg.eigh(H)
    return obj, H, values.flip(0), vectors.flip(1)


def designed_matrix(values, seed=0):
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen(seed), dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(values, dtype=torch.float64)) @ Q.T


def test_top3_eigenpairs_match_dense_eigh(net):
    obj, H, values, vectors = net
    tol = 1e-8
    result = top_eigenpairs(obj, 3, tol=tol, generator=gen(1))
    top_values, top_vectors = result  # tuple unpacking is part of the contract
    assert result.converged
    # Ritz value error <= residual^2 / gap ~ 1e-16: agreement to 1e-10 relative is conservative.
    torch.testing.assert_close(top_values, values[:3], rtol=1e-10, atol=0)
    # Eigenvector error ~ residual / gap <= 1e-8 * 2.2 / 0.1: compare up to sign at 1e-6.
    overlaps = (top_vectors * vectors[:, :3]).sum(0).abs()
    torch.testing.assert_close(overlaps, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    # Reported residuals are the true ||H u - theta u||, and they meet the tolerance.
    true_residuals = torch.linalg.vector_norm(H @ top_vectors - top_vectors * top_values, dim=0)
    torch.testing.assert_close(result.residuals, true_residuals, rtol=1e-3, atol=1e-13)
    assert (true_residuals <= tol * top_values.abs() * 1.01).all()
    assert result.matvecs < obj.dim  # far fewer than a dense Hessian


def test_thick_restart_gives_the_same_pairs(net):
    _, H, values, _ = net
    op = MatrixOperator(H)  # the algorithm on the same spectrum, without the HVP overhead
    result = top_eigenpairs(op, 3, tol=1e-8, max_basis=6, generator=gen(2))
    assert result.converged
    torch.testing.assert_close(result.values, values[:3], rtol=1e-10, atol=0)


def test_power_iteration_and_lm_lanczos_find_the_largest_magnitude_eigenvalue(net):
    obj, H, values, _ = net
    target = values[values.abs().argmax()]  # negative for the MLP (-1.18 vs lambda_max 0.88)
    power = power_iteration(MatrixOperator(H), tol=1e-6, max_matvecs=5000, generator=gen(3))
    lanczos = top_eigenpairs(obj, 1, which="LM", tol=1e-6, generator=gen(3))
    assert power.converged and lanczos.converged
    # Rayleigh quotient error <= residual^2 / gap ~ 1e-12 relative; 1e-9 is safe.
    torch.testing.assert_close(power.values, target.reshape(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(lanczos.values, target.reshape(1), rtol=1e-9, atol=0)
    assert lanczos.matvecs <= power.matvecs


def test_largest_magnitude_picks_a_negative_eigenvalue():
    spectrum = [-5.0, 4.0, 3.0, 2.0] + torch.linspace(-1, 1, 46).tolist()
    op = MatrixOperator(designed_matrix(spectrum))
    lm = top_eigenpairs(op, 2, which="LM", tol=1e-10, generator=gen())
    torch.testing.assert_close(lm.values, torch.tensor([-5.0, 4.0], dtype=torch.float64), rtol=1e-12, atol=0)
    la = top_eigenpairs(op, 2, which="LA", tol=1e-10, generator=gen())
    torch.testing.assert_close(la.values, torch.tensor([4.0, 3.0], dtype=torch.float64), rtol=1e-12, atol=0)
    # Power iteration also converges to the largest magnitude.
    power = power_iteration(op, tol=1e-6, max_matvecs=2000, generator=gen())
    torch.testing.assert_close(power.values, torch.tensor([-5.0], dtype=torch.float64), rtol=1e-9, atol=0)
    # The reported matvecs are the operator applications actually made.
    op.calls = 0
    result = top_eigenpairs(op, 3, tol=1e-8, max_basis=8, generator=gen(4))
    assert result.matvecs == op.calls


def test_all_eigenvalues_when_k_equals_d_and_budget_exhaustion():
    spectrum = torch.linspace(-2.0, 3.0, 12, dtype=torch.float64)
    op = MatrixOperator(designed_matrix(spectrum, seed=5))
    values, vectors = top_eigenpairs(op, 12, generator=gen())
    torch.testing.assert_close(values, spectrum.flip(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    # Clustered top of a 400-dimensional spectrum: 5 matvecs cannot converge, and say so.
    slow = MatrixOperator(designed_matrix(torch.cat([torch.tensor([1.0]), torch.linspace(0, 0.999, 399)])))
    result = top_eigenpairs(slow, 1, tol=1e-10, max_matvecs=5, generator=gen())
    assert not result.converged and result.matvecs == 5 and result.residuals[0] > 1e-10


def test_float32_operator_keeps_its_dtype():
    op = MatrixOperator(designed_matrix([3.0, 2.0, 1.0, 0.5, 0.1]).float())
    values, vectors = top_eigenpairs(op, 2, tol=1e-5, generator=gen())
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(values, torch.tensor([3.0, 2.0]), rtol=1e-5, atol=0)


def test_bad_arguments_raise_clear_errors():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="dimension D = 4"):
        top_eigenpairs(op, 5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_eigenpairs(op, 0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        top_eigenpairs(op, 1, tol=0.0)
    with pytest.raises(ValueError, match="which must be"):
        top_eigenpairs(op, 1, which="SA")
    with pytest.raises(ValueError, match="v0 must have shape"):
        top_eigenpairs(op, 1, v0=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero or not finite"):
        power_iteration(op, v0=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="not an operator"):
        top_eigenpairs(torch.eye(4), 1)
    with pytest.raises(ValueError, match="max_matvecs"):
        top_eigenpairs(op, 2, max_matvecs=1)
