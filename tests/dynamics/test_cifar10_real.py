"""The dynamics probes on the REAL CIFAR-10: HVP, Lanczos eigenpairs and the noise probe.

256 training images through `experiments.data.load_cifar10`, average-pooled to 8x8 and
normalized, into a float64 conv net with BatchNorm (eval mode, running statistics set from the
data) small enough (D = 770) for a dense Hessian by the autograd loop. Budget: about 15 s on one idle core
(the dense Hessian, 770 backward passes, is most of it).
"""
from __future__ import annotations

import torch
from torch import nn

from dynamics.lanczos import top_eigenpairs
from dynamics.noise import noise_probe
from dynamics.objective import Objective
from experiments.data import load_cifar10, normalize
from tests.reference import dense_loss_hessian

F64 = torch.float64
N_IMAGES = 256


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # default nn init; the test's own draws use explicit generators
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, momentum=1.0), nn.Tanh(),
        nn.Flatten(), nn.Linear(64, 10)).double()


def test_probes_on_real_cifar10(cifar10_dir):
    images, labels = load_cifar10(cifar10_dir, "train")
    assert images.shape == (50_000, 3, 32, 32) and labels[0].item() == 6  # first image: a frog
    x = nn.functional.avg_pool2d(normalize(images[:N_IMAGES], dtype=F64), 4)  # (256, 3, 8, 8)
    y = labels[:N_IMAGES]
    model = small_net(seed=0)
    model.train()
    with torch.no_grad():
        model(x)  # momentum 1: running statistics := this data's batch statistics
    model.eval()
    obj = Objective(model, nn.CrossEntropyLoss(), [(x[:100], y[:100]), (x[100:], y[100:])])
    assert obj.dim == 770 and obj.num_samples == N_IMAGES

    # Dense Hessian by the autograd loop, confirmed by central differences of the gradient.
    H = dense_loss_hessian(obj)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-10)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(obj.dim, 3, generator=gen, dtype=F64)
    V = V / V.norm(dim=0)
    HV = H @ V
    theta, h = obj.params, 1e-4
    fd = torch.stack([(obj.grad(theta + h * v) - obj.grad(theta - h * v)) / (2 * h) for v in V.T], 1)
    # O(h^2) truncation times third derivatives of O(1) plus eps/h rounding: ~1e-8 relative
    torch.testing.assert_close(fd, HV, rtol=1e-6, atol=1e-6 * HV.abs().max().item())
    # The toolkit's HVP (forward-over-reverse) against the dense Hessian: exact up to round-off.
    torch.testing.assert_close(obj.hvp(V), HV, rtol=0, atol=1e-10 * HV.abs().max().item())

    # Top eigenpairs by Lanczos against eigh of the dense Hessian.
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = 5
    gaps = (evals[:k] - evals[1:k + 1]) / evals[0]
    assert gaps.min() > 1e-3  # well separated, so each eigenvector is defined up to sign
    values, vectors = top_eigenpairs(obj, k=k, tol=1e-9, max_matvecs=600, generator=gen)
    # residual tol 1e-9: eigenvalue error ~ tol^2 |lambda|, eigenvector error ~ tol / gap
    torch.testing.assert_close(values, evals[:k], rtol=1e-8, atol=0)
    overlaps = (vectors.T @ evecs[:, :k]).diagonal().abs()
    torch.testing.assert_close(overlaps, torch.ones(k, dtype=F64), rtol=0, atol=1e-8)

    # Noise probe against the covariance of explicit per-sample gradients (autograd loop).
    t = theta.clone().requires_grad_(True)
    G = torch.stack([torch.autograd.grad(obj.batch_loss(t, x[i:i + 1], y[i:i + 1]), t)[0]
                     for i in range(N_IMAGES)])
    Gc = G - G.mean(0)
    sigma = Gc.T @ Gc / N_IMAGES
    U, lam = evecs[:, :8], evals[:8]
    P_sigma_U = sigma @ U - U @ (U.T @ sigma @ U)
    scale = sigma.abs().max().item()
    for method in ("per_sample", "jvp"):
        r = noise_probe(obj, U, method=method, eigenvalues=lam, chunk_size=48)
        torch.testing.assert_close(r.cov_in_basis, U.T @ sigma @ U, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(r.mixed, P_sigma_U, rtol=0, atol=1e-10 * scale)
        assert abs(r.trace_normal - (U.T @ sigma @ U).trace().item()) < 1e-10 * scale
        if method == "per_sample":
            assert abs(r.trace_sigma - sigma.trace().item()) < 1e-10 * sigma.trace().item()
        else:  # Hutchinson on the tangent block: |error| < 4 SE fails with prob. < 1e-4 (CLT)
            assert abs(r.trace_sigma - sigma.trace().item()) < 4 * r.trace_stderr
