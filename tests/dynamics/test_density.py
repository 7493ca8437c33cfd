"""spectral_density (SLQ): Gauss quadrature exactness, normalization, node range, and interval
masses against the dense eigenvalues of a tiny network Hessian."""
import math

import pytest
import torch
from torch import nn

from dynamics import MatrixOperator, Objective, spectral_density
from tests.reference import classification_batches, dense_loss_hessian, tiny_cnn_bn


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cnn():
    obj = Objective(tiny_cnn_bn(), nn.CrossEntropyLoss(), classification_batches(12, image=True),
                    hvp_mode="reverse")
    H = dense_loss_hessian(obj)
    return obj, H, torch.linalg.eigvalsh(H)


def test_quadrature_is_exact_for_low_degree_polynomials(cnn):
    obj, H, eigenvalues = cnn
    slq = spectral_density(obj, num_probes=3, lanczos_steps=8, generator=gen(1))
    assert slq.matvecs == 24
    torch.testing.assert_close(slq.weights.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # Replay the same Rademacher probes z: D sum_j w_j node_j^p = z^T H^p z exactly for p < 16.
    g = gen(1)
    probes = [torch.randint(0, 2, (obj.dim,), generator=g).double() * 2 - 1 for _ in range(3)]
    for p in (1, 3, 7):
        Hp = torch.linalg.matrix_power(H, p)
        exact = torch.stack([z @ Hp @ z for z in probes])
        quad = obj.dim * (slq.weights * slq.nodes ** p).sum(1)
        torch.testing.assert_close(quad, exact, rtol=1e-9, atol=1e-12)
    # Nodes are Ritz values: inside [lambda_min, lambda_max] (up to rounding).
    assert slq.nodes.min() >= eigenvalues[0] - 1e-10 and slq.nodes.max() <= eigenvalues[-1] + 1e-10


def test_density_integrates_to_one_and_masses_match_dense_eigenvalues(cnn):
    obj, H, eigenvalues = cnn
    slq = spectral_density(MatrixOperator(H), num_probes=40, lanczos_steps=30, generator=gen(2))
    sigma = 0.02
    grid = torch.linspace(float(eigenvalues[0]) - 10 * sigma, float(eigenvalues[-1]) + 10 * sigma, 4001)
    # Trapezoid rule on a grid of step << sigma: error ~1e-10; the tails beyond 10 sigma ~1e-23.
    assert float(torch.trapezoid(slq.density(grid, sigma), grid)) == pytest.approx(1.0, abs=1e-6)
    assert slq.mass(-1e3, 1e3) == pytest.approx(1.0, abs=1e-12)
    assert slq.expectation(lambda x: x) * obj.dim == pytest.approx(float(torch.trace(H)), rel=0.1)
    # Interval edges sit in the middle of gaps of the dense spectrum, where Gauss quadrature
    # with 30 nodes resolves the split (a cut inside the dense cluster near 0 does not: 0.6
    # measured against 0.5). Tolerance 0.06: a Rademacher probe's
    # mass for a spectral projector of rank r has sd <= sqrt(2 r) / D <= 0.09, over 40 probes
    # 0.014; 4 sd is 0.06.
    # Cuts: the two largest gaps (isolating the outliers at the top) and the largest gap inside
    # the middle half of the spectrum (splitting the bulk about 74% / 26%).
    gaps = eigenvalues[1:] - eigenvalues[:-1]
    D = len(eigenvalues)
    bulk = D // 4 + int(torch.argmax(gaps[D // 4: 3 * D // 4]))
    cut_indices = torch.topk(gaps, 2).indices.tolist() + [bulk]
    cuts = sorted(float((eigenvalues[i] + eigenvalues[i + 1]) / 2) for i in cut_indices)
    edges = [float(eigenvalues[0]) - 1.0] + cuts + [float(eigenvalues[-1]) + 1.0]
    for low, high in zip(edges[:-1], edges[1:]):
        fraction = float(((eigenvalues >= low) & (eigenvalues <= high)).double().mean())
        assert slq.mass(low, high) == pytest.approx(fraction, abs=0.06)
        assert slq.mass(low, high, sigma=1e-6) == pytest.approx(slq.mass(low, high), abs=1e-6)


def test_full_lanczos_recovers_every_eigenvalue():
    values = torch.linspace(-1.0, 2.0, 15, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(15, 15, generator=gen(3), dtype=torch.float64))
    slq = spectral_density(MatrixOperator(Q @ torch.diag(values) @ Q.T), num_probes=2,
                           lanczos_steps=50, generator=gen(4))
    assert slq.nodes.shape == (2, 15)  # steps are capped at D
    torch.testing.assert_close(slq.nodes, values.expand(2, 15), rtol=0, atol=1e-10)
    # Weights are the squared components of the probe in the eigenbasis: each 1/D on average.
    assert float(slq.weights.mean()) == pytest.approx(1 / 15, rel=1e-12)


def test_early_breakdown_pads_with_zero_weights():
    # A rank-2 matrix seen from a probe: the Krylov space is invariant after <= 3 steps.
    op = MatrixOperator(torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, -1.0], dtype=torch.float64)))
    slq = spectral_density(op, num_probes=1, lanczos_steps=6, generator=gen())
    assert slq.matvecs == 3
    torch.testing.assert_close(slq.weights[0, :3].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (slq.weights[0, 3:] == 0).all()
    # Probe mass: 3/6 at eigenvalue 2, 2/6 at 0, 1/6 at -1 (Rademacher components all 1/6).
    assert slq.mass(1.5, 2.5) == pytest.approx(0.5, abs=1e-12)
    assert slq.mass(-1.5, -0.5) == pytest.approx(1 / 6, abs=1e-12)


def test_bad_arguments_raise_clear_errors():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(op, num_probes=0, lanczos_steps=3)
    with pytest.raises(ValueError, match="lanczos_steps"):
        spectral_density(op, num_probes=1, lanczos_steps=0)
    slq = spectral_density(op, num_probes=1, lanczos_steps=2)
    with pytest.raises(ValueError, match="sigma"):
        slq.density(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="low <= high"):
        slq.mass(1.0, 0.0)
