"""dynamics.noise: the gradient-noise covariance in a basis, against explicit per-sample gradients.

References are built by a plain Python loop of torch.autograd.grad over single samples (no vmap),
then Sigma = (1/N) sum_i (g_i - g)(g_i - g)^T densely. Budget: about 10 s on one thread.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynamics.noise import NoiseProbe, noise_probe
from dynamics.objective import Objective
from tests.reference import classification_batches, dense_loss_hessian, tiny_cnn_bn, tiny_mlp

F64 = torch.float64
EXACT = 1e-10  # float64 sums of O(1) terms: round-off is ~1e-15; 1e-10 leaves room, catches any bug


def explicit_sigma(obj: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """(Sigma (D, D), mean gradient (D,)) from a loop of autograd.grad over single samples."""
    theta = obj.params.clone().requires_grad_(True)
    rows = []
    for x, y in obj.data:
        for i in range(len(x)):
            (g_i,) = torch.autograd.grad(obj.batch_loss(theta, x[i:i + 1], y[i:i + 1]), theta)
            rows.append(g_i)
    G = torch.stack(rows)
    g = G.mean(0)
    return (G - g).T @ (G - g) / len(G), g


def random_basis(D: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, k, generator=gen, dtype=F64)).Q


def close(a, b, scale=1.0):
    return abs(a - b) <= EXACT * max(1.0, scale)


@pytest.fixture(scope="module", params=["mlp", "cnn_bn_eval"])
def case(request):
    if request.param == "mlp":
        obj = Objective(tiny_mlp(), nn.CrossEntropyLoss(),
                        classification_batches(17, image=False, sizes=[10, 7]))
    else:
        obj = Objective(tiny_cnn_bn(), nn.CrossEntropyLoss(),
                        classification_batches(13, image=True, sizes=[13]), bn="eval")
    sigma, g = explicit_sigma(obj)
    return obj, sigma, g, random_basis(obj.dim, 4, seed=3)


@pytest.mark.parametrize("method", ["per_sample", "jvp"])
def test_every_field_matches_explicit_covariance(case, method):
    obj, sigma, g, U = case
    P = torch.eye(obj.dim, dtype=F64) - U @ U.T
    lam = torch.tensor([3.0, 2.0, 1.5, -0.5], dtype=F64)
    r = noise_probe(obj, U, method=method, chunk_size=3, eigenvalues=lam)
    assert isinstance(r, NoiseProbe) and r.method == method and r.num_samples == obj.num_samples
    S = U.T @ sigma @ U
    torch.testing.assert_close(r.cov_in_basis, S, rtol=0, atol=EXACT)
    torch.testing.assert_close(r.mean_in_basis, U.T @ g, rtol=0, atol=EXACT)
    torch.testing.assert_close(r.mixed, P @ sigma @ U, rtol=0, atol=EXACT)
    assert close(r.mixed_norm, torch.linalg.matrix_norm(P @ sigma @ U).item())
    assert close(r.trace_normal, S.trace().item())
    # alignment, from its definitions in the Alignment docstring
    inner = (S.diagonal() * lam).sum()
    assert close(r.alignment.cosine, (inner / (S.norm() * lam.norm())).item())
    assert close(r.alignment.scale, (inner / lam.dot(lam)).item())
    corr = torch.corrcoef(torch.stack([S.diagonal(), lam]))[0, 1].item()
    assert close(r.alignment.diag_correlation, corr)
    exact_trace = sigma.trace().item()
    if method == "per_sample":
        assert close(r.trace_sigma, exact_trace) and r.trace_stderr == 0.0
        assert close(r.trace_tangent, (P @ sigma @ P).trace().item())
        assert close(r.normal_fraction, S.trace().item() / exact_trace)
    else:
        # Hutchinson on the tangent block: replay the documented draw (seed 0, one randint call)
        gen = torch.Generator().manual_seed(0)
        Z = (2 * torch.randint(0, 2, (obj.dim, 32), generator=gen, dtype=torch.int8) - 1).to(F64)
        per_probe = ((P @ Z) * (sigma @ (P @ Z))).sum(0)
        assert close(r.trace_tangent, per_probe.mean().item())
        assert close(r.trace_stderr, (per_probe.std() / math.sqrt(32)).item())
        assert close(r.trace_sigma, S.trace().item() + per_probe.mean().item())


def test_both_methods_give_the_same_normal_block(case):
    obj, _, _, U = case
    a = noise_probe(obj, U, method="per_sample")
    b = noise_probe(obj, U, method="jvp", direction_chunk=5)
    torch.testing.assert_close(a.cov_in_basis, b.cov_in_basis, rtol=0, atol=EXACT)
    torch.testing.assert_close(a.mixed, b.mixed, rtol=0, atol=EXACT)
    assert close(a.trace_normal, b.trace_normal)


class BatchCentered(nn.Module):
    """Subtracts the batch mean: a network that does NOT treat samples independently."""
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_batched_forward_equals_single_sample_evaluation_and_refuses_mixing_networks(case):
    obj, _, _, U = case
    a = noise_probe(obj, U, method="jvp", batched_forward=True)
    b = noise_probe(obj, U, method="jvp", batched_forward=False)
    torch.testing.assert_close(a.cov_in_basis, b.cov_in_basis, rtol=0, atol=EXACT)
    torch.testing.assert_close(a.mixed, b.mixed, rtol=0, atol=EXACT)
    assert close(a.trace_sigma, b.trace_sigma)
    model = nn.Sequential(tiny_mlp(), BatchCentered())
    mixing = Objective(model, nn.CrossEntropyLoss(), classification_batches(9, image=False))
    with pytest.raises(ValueError, match="batched_forward=False"):
        noise_probe(mixing, random_basis(mixing.dim, 2, seed=0), method="jvp")


def test_hutchinson_trace_is_unbiased_within_its_standard_error():
    obj = Objective(tiny_mlp(), nn.CrossEntropyLoss(), classification_batches(17, image=False))
    sigma, _ = explicit_sigma(obj)
    U = random_basis(obj.dim, 3, seed=4)
    exact = sigma.trace().item()
    errors = []
    for m in (50, 800):
        r = noise_probe(obj, U, method="jvp", num_probes=m, with_mixed=False,
                        generator=torch.Generator().manual_seed(11))
        # the estimate is a mean of m i.i.d. terms: |error| < 4 SE fails with prob. < 1e-4 (CLT)
        assert abs(r.trace_sigma - exact) < 4 * r.trace_stderr
        errors.append(r.trace_stderr)
    # SE ~ 1/sqrt(m): 16x the probes -> 4x smaller; the sample std itself varies by ~10-20%
    assert 2.5 < errors[0] / errors[1] < 6.0


@pytest.mark.parametrize("method", ["per_sample", "jvp"])
def test_uneven_batches_and_chunks_give_identical_results(method):
    model = tiny_mlp(seed=2)
    whole = Objective(model, nn.CrossEntropyLoss(), classification_batches(16, image=False))
    split = Objective(model, nn.CrossEntropyLoss(),
                      classification_batches(16, image=False, sizes=[5, 8, 3]))
    U = random_basis(whole.dim, 5, seed=6)
    a = noise_probe(whole, U, method=method, chunk_size=64)
    b = noise_probe(split, U, method=method, chunk_size=3)  # chunks 3,2 | 3,3,2 | 3
    for f in ("cov_in_basis", "mean_in_basis", "mixed"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=1e-12)
    for f in ("trace_sigma", "trace_normal", "trace_tangent", "trace_stderr", "mixed_norm"):
        assert abs(getattr(a, f) - getattr(b, f)) < 1e-12


def label_noise_objective(sigma_label: float, n_inputs: int = 10):
    """Squared loss 1/2 (f - y)^2, every input twice with targets f(x) +- sigma_label.

    At this theta every residual is +-sigma_label and the pairs cancel, so grad L = 0, the
    Hessian is the Gauss-Newton matrix (1/N) sum_i grad f_i grad f_i^T (residual terms cancel),
    and Sigma = sigma_label^2 Hessian exactly (THEORY.md, label noise).
    """
    model = tiny_mlp(seed=5, d_out=1)
    x = torch.randn(n_inputs, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    with torch.no_grad():
        f = model(x).squeeze(-1)
    loss = lambda out, y: 0.5 * ((out.squeeze(-1) - y) ** 2).mean()
    data = [(torch.cat([x, x]), torch.cat([f + sigma_label, f - sigma_label]))]
    return Objective(model, loss, data)


@pytest.mark.parametrize("method", ["per_sample", "jvp"])
def test_label_noise_sigma_is_proportional_to_hessian(method):
    s2 = 0.3 ** 2
    obj = label_noise_objective(0.3)
    H = dense_loss_hessian(obj)
    sigma, g = explicit_sigma(obj)
    torch.testing.assert_close(sigma, s2 * H, rtol=0, atol=EXACT)  # the construction holds
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)
    rank = int((evals > 1e-10 * evals[0]).sum())
    assert rank == 10  # one direction per distinct input (scalar output)
    for k in (4, rank):
        U, lam = evecs[:, :k], evals[:k]
        r = noise_probe(obj, U, method=method, eigenvalues=lam)
        torch.testing.assert_close(r.cov_in_basis, s2 * torch.diag(lam), rtol=0, atol=EXACT)
        assert abs(r.alignment.cosine - 1) < EXACT
        assert abs(r.alignment.scale - s2) < EXACT
        assert abs(r.alignment.diag_correlation - 1) < EXACT
        assert r.mixed_norm < EXACT  # P H U = 0 for eigenvectors: no mixed block
        if method == "per_sample" or k == rank:  # at k = rank, P Sigma P = 0: every probe is 0
            assert close(r.trace_sigma, s2 * H.trace().item())
            assert close(r.normal_fraction, (lam.sum() / H.trace()).item())
        if k == rank:
            assert abs(r.trace_tangent) < EXACT and r.normal_fraction == pytest.approx(1, abs=EXACT)


def test_without_mixed_and_in_float32():
    model = tiny_mlp(seed=1)
    data = classification_batches(12, image=False)
    obj = Objective(model, nn.CrossEntropyLoss(), data)
    U = random_basis(obj.dim, 3, seed=2)
    ref = noise_probe(obj, U)
    r = noise_probe(obj, U, with_mixed=False)
    assert r.mixed is None and r.mixed_norm is None
    torch.testing.assert_close(r.cov_in_basis, ref.cov_in_basis, rtol=0, atol=EXACT)
    obj32 = Objective(tiny_mlp(seed=1).float(), nn.CrossEntropyLoss(),
                      [(x.float(), y) for x, y in data])
    r32 = noise_probe(obj32, U)  # float64 basis is cast to the objective's dtype
    assert r32.cov_in_basis.dtype == torch.float32 and r32.mixed.dtype == torch.float32
    # float32 round-off on O(1) entries: ~1e-6 relative
    torch.testing.assert_close(r32.cov_in_basis.double(), ref.cov_in_basis, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused_with_the_defect_named():
    obj = Objective(tiny_mlp(), nn.CrossEntropyLoss(), classification_batches(8, image=False))
    D = obj.dim
    U = random_basis(D, 3, seed=0)
    with pytest.raises(ValueError, match="not orthonormal.*column norms"):
        noise_probe(obj, U * 1.01)
    skew = U.clone()
    skew[:, 1] = (U[:, 0] + U[:, 1]) / math.sqrt(2)
    with pytest.raises(ValueError, match="not orthonormal"):
        noise_probe(obj, skew)
    with pytest.raises(ValueError, match=f"{D - 1} rows.*D = {D}"):
        noise_probe(obj, U[:-1])
    with pytest.raises(ValueError, match="2-D"):
        noise_probe(obj, U[:, 0])
    with pytest.raises(ValueError, match=f"k = {D + 1} columns"):
        noise_probe(obj, torch.eye(D, D + 1, dtype=F64))
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \(3,\)"):
        noise_probe(obj, U, eigenvalues=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="method"):
        noise_probe(obj, U, method="vmap")
    with pytest.raises(ValueError, match="num_probes"):
        noise_probe(obj, U, method="jvp", num_probes=1)
    with pytest.raises(ValueError, match="chunk_size"):
        noise_probe(obj, U, chunk_size=0)
    bn_train = Objective(tiny_cnn_bn(), nn.CrossEntropyLoss(),
                         classification_batches(6, image=True), bn="train")
    with pytest.raises(ValueError, match="bn='train'"):
        noise_probe(bn_train, random_basis(bn_train.dim, 2, seed=0), method="jvp")
