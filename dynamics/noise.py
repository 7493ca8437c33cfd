"""The gradient-noise covariance seen through an orthonormal basis and its complement.

Sigma(theta) = (1/N) sum_i (g_i - g)(g_i - g)^T is the covariance of ONE sample's gradient
g_i = grad l_i(theta) around the full gradient g = grad L(theta) (THEORY.md, "Setting"; Li, Wang
& Arora, ICLR 2022). Given an orthonormal basis U of shape (D, k) of the normal space (typically
top Hessian eigenvectors; the tangent space is its orthogonal complement, projector
P = I - U U^T), `noise_probe` returns the blocks of THEORY.md in that basis:

- `cov_in_basis` = U^T Sigma U, (k, k): the normal block S_perp = U (U^T Sigma U) U^T,
- `mixed` = P Sigma U, (D, k): the mixed block S_par_perp = P Sigma P_perp = (P Sigma U) U^T,
  so `mixed_norm` = ||P Sigma U||_F = ||S_par_perp||_F,
- `trace_sigma` = tr Sigma, `trace_normal` = tr(U^T Sigma U), `trace_tangent` = tr(P Sigma P).

Two methods (N samples, k basis columns):
- "per_sample": per-sample gradients by vmap (`Objective.iter_per_sample_grads`), chunk by
  chunk, then matrix products. Every trace is exact (`trace_stderr` = 0). Memory
  O(D k + N k + chunk_size x D) plus one chunk's per-sample backward.
- "jvp": no per-sample gradient is ever formed. Forward-mode JVPs of the per-sample losses along
  the basis columns give the (N, k) projections g_i . u_j; one reverse pass per chunk with those
  projections as cotangents gives Sigma U (hence `mixed`). tr Sigma cannot be had exactly this
  way: trace_tangent = tr(P Sigma P) is a Hutchinson estimate with `num_probes` Rademacher vectors
  z projected to P z (unbiased since E[P z z^T P] = P; the normal part is exact, which removes
  the largest share of the variance), reported with its standard error `trace_stderr`.
  Each chunk goes through the network as one batch with the loss split per sample
  (`batched_forward`, checked first); it costs about (k + num_probes) forward-mode passes plus
  k backward passes per chunk and never holds a chunk_size x D block. Measured on CPU
  (benchmarks/results/bench_noise.md): for ResNet-20 it was 35-60x slower than "per_sample" and
  HEAVIER in memory (tangent activations per direction dominate); for a 0.86M-parameter MLP it
  was under 2x slower and lighter. Use it where parameters per activation are many, or as an
  independent check of "per_sample".

Per-chunk statistics are merged with the pairwise update of Chan, Golub & LeVeque (1979), so the
result does not depend on how the data list is split into batches and chunks.
Normalization layers: per-sample gradients are only meaningful with running statistics, so the
objective must use bn="eval" (DESIGN.md, "Known traps").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from dynamics.objective import Objective

METHODS = ("per_sample", "jvp")


@dataclass(frozen=True)
class Alignment:
    """How close U^T Sigma U is to the Hessian block diag(lambda) in the same basis.

    - `cosine` = <S, Lambda>_F / (||S||_F ||Lambda||_F) with S = U^T Sigma U (off-diagonal entries
      included) and Lambda = diag(eigenvalues): 1 exactly when S = c Lambda with c > 0, as with
      label noise at a minimum (Sigma = sigma^2 Hessian, THEORY.md).
    - `scale` = <S, Lambda>_F / ||Lambda||_F^2, the least-squares c in S ~ c Lambda (sigma^2 for
      label noise).
    - `diag_correlation`: Pearson correlation of diag(S) with the eigenvalues; None when k < 2 or
      either vector is constant.
    """
    cosine: float
    scale: float
    diag_correlation: float | None


@dataclass(frozen=True)
class NoiseProbe:
    """Result of `noise_probe` (shapes for a basis U of shape (D, k)).

    cov_in_basis: (k, k) U^T Sigma U.  mean_in_basis: (k,) U^T grad L.
    trace_sigma, trace_normal, trace_tangent: tr Sigma, tr U^T Sigma U, tr P Sigma P.
    trace_stderr: standard error of trace_sigma and trace_tangent (0.0 when exact).
    normal_fraction: trace_normal / trace_sigma.
    mixed: (D, k) P Sigma U, or None when not requested.  mixed_norm: its Frobenius norm.
    alignment: `Alignment` when Hessian eigenvalues were given, else None.
    """
    cov_in_basis: Tensor
    mean_in_basis: Tensor
    trace_sigma: float
    trace_normal: float
    trace_tangent: float
    trace_stderr: float
    normal_fraction: float
    mixed: Tensor | None
    mixed_norm: float | None
    alignment: Alignment | None
    method: str
    num_samples: int
    num_probes: int


class _Moments:
    """Running mean of g_i (D,) and of projections c_i (k,), sum_i |g_i - g|^2 and the cross
    moment sum_i (g_i - g)(c_i - c)^T (D, k), merged chunk by chunk (Chan, Golub & LeVeque)."""

    def __init__(self):
        self.n = 0
        self.mean_g = self.mean_c = self.m2 = self.cross = None

    def merge(self, n, mean_g, mean_c, m2, cross):
        if self.n == 0:
            self.n, self.mean_g, self.mean_c, self.m2, self.cross = n, mean_g, mean_c, m2, cross
            return
        total = self.n + n
        w = self.n * n / total
        dg, dc = mean_g - self.mean_g, mean_c - self.mean_c
        if self.m2 is not None:
            self.m2 = self.m2 + m2 + w * dg.dot(dg)
        if self.cross is not None:
            self.cross = self.cross + cross + w * torch.outer(dg, dc)
        self.mean_g = self.mean_g + dg * (n / total)
        self.mean_c = self.mean_c + dc * (n / total)
        self.n = total


def _check_basis(obj: Objective, basis: Tensor, tol: float | None) -> Tensor:
    if not isinstance(basis, Tensor) or basis.dim() != 2:
        shape = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
        raise ValueError(f"basis must be a 2-D tensor of shape (D, k) = ({obj.dim}, k), got {shape}")
    D, k = basis.shape
    if D != obj.dim:
        raise ValueError(f"basis has {D} rows but the objective has D = {obj.dim} parameters")
    if k < 1:
        raise ValueError("basis has no columns (k = 0)")
    if k > D:
        raise ValueError(f"basis has k = {k} columns but at most D = {D} vectors can be orthonormal")
    if basis.device != obj.device:
        raise ValueError(f"basis is on {basis.device} but the objective is on {obj.device}")
    basis = basis.to(obj.dtype)
    if tol is None:
        tol = 1e-8 if obj.dtype == torch.float64 else 1e-4
    gram = basis.T @ basis
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    defect = (gram - eye).abs().max().item()
    if not defect <= tol:
        norms = gram.diagonal().sqrt()
        off = (gram - torch.diag(gram.diagonal())).abs().max().item()
        raise ValueError(
            f"basis is not orthonormal: max |U^T U - I| = {defect:.3g} > tol {tol:.3g} (column norms "
            f"in [{norms.min().item():.6g}, {norms.max().item():.6g}], largest |u_i . u_j| for i != j "
            f"= {off:.3g}); orthonormalize it first, e.g. torch.linalg.qr(basis).Q")
    return basis


def _sample_chunks(obj: Objective, chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y in obj.data:
        for start in range(0, len(x), chunk_size):
            yield x[start:start + chunk_size], y[start:start + chunk_size]


def _per_sample_loss_fn(obj: Objective, x: Tensor, y: Tensor, batched: bool):
    """theta -> (n,) per-sample losses of the chunk (x, y).

    batched=False: each sample goes through the network alone (vmap). batched=True: the chunk
    goes through as one batch and only the loss is split per sample, which is the same function
    when the network treats samples independently (every layer does in eval mode) and ~3x
    faster under forward-mode AD on CPU (no grouped convolutions from nested vmap).
    """
    def sample_loss(out_i, y_i):
        return obj.loss_fn(out_i.unsqueeze(0), y_i.unsqueeze(0))

    if batched:
        return lambda theta: vmap(sample_loss)(obj.forward(theta, x), y)

    def one(theta, xi, yi):
        return obj.batch_loss(theta, xi.unsqueeze(0), yi.unsqueeze(0))
    return lambda theta: vmap(one, in_dims=(None, 0, 0))(theta, x, y)


def _check_batched_forward(obj: Objective, theta: Tensor) -> None:
    """Refuse batched_forward if a batch's per-sample losses differ from single-sample ones."""
    x, y = obj.data[0]
    x, y = x[:8], y[:8]
    with torch.no_grad():
        batched = _per_sample_loss_fn(obj, x, y, True)(theta)
        alone = _per_sample_loss_fn(obj, x, y, False)(theta)
    rtol = 1e-9 if theta.dtype == torch.float64 else 1e-3
    if not torch.allclose(batched, alone, rtol=rtol, atol=rtol * alone.abs().max().item()):
        raise ValueError("the network does not treat the samples of a batch independently (per-"
                         "sample losses differ between batched and single-sample evaluation); "
                         "use batched_forward=False")


def _blocks(t: Tensor, size: int | None, dim: int) -> list[Tensor]:
    """t split along dim into pieces of at most `size` (None: one piece)."""
    return [t] if size is None else list(torch.split(t, size, dim=dim))


def _pass_per_sample(obj, theta, U, chunk_size, with_mixed):
    moments, projections = _Moments(), []
    for G in obj.iter_per_sample_grads(theta, chunk_size=chunk_size):
        c = G @ U
        mean_g, mean_c = G.mean(0), c.mean(0)
        Gc = G - mean_g
        cross = Gc.T @ (c - mean_c) if with_mixed else None
        moments.merge(len(G), mean_g, mean_c, (Gc * Gc).sum(), cross)
        projections.append(c)
    return moments, torch.cat(projections)


def _direction_blocks(U: Tensor, Z: Tensor, size: int | None) -> Iterator[Tensor]:
    """Columns of [U, P Z] in blocks of at most `size`; the probes Z (D, m) are stored as int8
    and projected block by block, so no (D, m) floating-point matrix is ever held."""
    for block in _blocks(U, size, 1):
        yield block
    for block in _blocks(Z, size, 1):
        z = block.to(U.dtype)
        yield z - U @ (U.T @ z)


def _pass_jvp(obj, theta, U, Z, chunk_size, direction_chunk, with_mixed, batched):
    """Projections of every g_i on U and on P Z by JVPs; Sigma-U cross moments by VJPs."""
    k = U.shape[1]
    moments, projections = _Moments(), []
    for x, y in _sample_chunks(obj, chunk_size):
        f = _per_sample_loss_fn(obj, x, y, batched)
        along = vmap(lambda v: jvp(f, (theta,), (v,))[1], in_dims=1, out_dims=1)
        c = torch.cat([along(block) for block in _direction_blocks(U, Z, direction_chunk)], dim=1)
        n = len(x)
        mean_c = c[:, :k].mean(0)
        if with_mixed:
            _, pullback = vjp(f, theta)
            mean_g = pullback(torch.full((n,), 1.0 / n, dtype=c.dtype, device=c.device))[0]
            # sum_i g_i (c_i - mean c) = sum_i (g_i - mean g)(c_i - mean c): one pullback per column.
            weights = (c[:, :k] - mean_c).T
            cross = torch.cat([vmap(lambda w: pullback(w)[0])(block)
                               for block in _blocks(weights, direction_chunk, 0)]).T
        else:
            mean_g, cross = torch.zeros_like(theta), None
        moments.merge(n, mean_g, mean_c, None, cross)
        projections.append(c)
    return moments, torch.cat(projections)


def _alignment(cov: Tensor, eigenvalues: Tensor) -> Alignment:
    lam = eigenvalues
    inner = cov.diagonal().dot(lam)
    cosine = (inner / (torch.linalg.matrix_norm(cov) * lam.norm())).item()
    scale = (inner / lam.dot(lam)).item()
    s = cov.diagonal()
    corr = None
    if len(lam) >= 2:
        ds, dl = s - s.mean(), lam - lam.mean()
        denom = (ds.norm() * dl.norm()).item()
        if denom > 0:
            corr = (ds.dot(dl)).item() / denom
    return Alignment(cosine=cosine, scale=scale, diag_correlation=corr)


def noise_probe(obj: Objective, basis: Tensor, *, method: str = "per_sample", chunk_size: int = 64,
                theta: Tensor | None = None, eigenvalues: Tensor | None = None,
                with_mixed: bool = True, num_probes: int = 32,
                generator: torch.Generator | None = None, direction_chunk: int | None = None,
                batched_forward: bool = True, orthonormal_tol: float | None = None) -> NoiseProbe:
    """Blocks of the single-sample gradient-noise covariance Sigma(theta) in an orthonormal basis.

    Args:
        obj: the objective (bn="eval"); its data list defines the N samples.
        basis: (D, k) orthonormal columns U spanning the normal space, cast to obj's dtype.
        method: "per_sample" (exact traces) or "jvp" (Hutchinson tangent trace), module docstring.
        chunk_size: samples per vmap call (memory ~ chunk_size x D, or chunk_size x activations x
            directions for "jvp").
        theta: flat (D,) point, default the model's parameters.
        eigenvalues: (k,) Hessian eigenvalues belonging to the basis columns -> `alignment`.
        with_mixed: compute P Sigma U (D, k); else `mixed` and `mixed_norm` are None.
        num_probes: Rademacher probes for the "jvp" tangent trace (>= 2; ignored by "per_sample").
        generator: draws the probes (default: a new generator seeded 0, so results repeat).
            The probes are 2 * torch.randint(0, 2, (D, num_probes), dtype=int8) - 1 in one call
            (held as int8), each projected to P z.
        direction_chunk: "jvp" only: directions per vmapped JVP/VJP (None: all k + num_probes at
            once). Memory of this path: the int8 probes (D x num_probes bytes) plus, per block,
            direction_chunk x (D + chunk_size x activations) floats; smaller is lighter, slower.
        batched_forward: "jvp" only: run each chunk through the network as one batch and split
            only the loss per sample (checked on a few samples first; ValueError if the network
            mixes samples), else evaluate every sample alone by vmap (slower).
        orthonormal_tol: allowed max |U^T U - I| (default 1e-8 in float64, else 1e-4).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if obj.bn == "train":
        raise ValueError("noise_probe needs per-sample gradients, which are undefined with "
                         "bn='train' (one sample normalized by its own statistics); build the "
                         "Objective with bn='eval'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if direction_chunk is not None and direction_chunk < 1:
        raise ValueError(f"direction_chunk must be >= 1 or None, got {direction_chunk}")
    if method == "jvp" and num_probes < 2:
        raise ValueError(f"the jvp method needs num_probes >= 2 for a trace and its standard "
                         f"error, got {num_probes}")
    U = _check_basis(obj, basis, orthonormal_tol)
    k = U.shape[1]
    if eigenvalues is not None:
        if not isinstance(eigenvalues, Tensor) or eigenvalues.shape != (k,):
            shape = tuple(eigenvalues.shape) if isinstance(eigenvalues, Tensor) else eigenvalues
            raise ValueError(f"eigenvalues must have shape ({k},) to match the basis, got {shape}")
        eigenvalues = eigenvalues.to(device=U.device, dtype=U.dtype)
    theta = (obj.params if theta is None else theta).detach()
    if theta.shape != (obj.dim,):
        raise ValueError(f"theta must have shape ({obj.dim},), got {tuple(theta.shape)}")
    N = obj.num_samples

    if method == "per_sample":
        moments, C = _pass_per_sample(obj, theta, U, chunk_size, with_mixed)
        Cc = C - C.mean(0)
        cov = Cc.T @ Cc / N
        trace_sigma = (moments.m2 / N).item()
        trace_normal = cov.trace().item()
        trace_tangent, stderr, probes = trace_sigma - trace_normal, 0.0, 0
    else:
        if generator is None:
            generator = torch.Generator(device=obj.device).manual_seed(0)
        Z = torch.randint(0, 2, (obj.dim, num_probes), generator=generator, device=obj.device,
                          dtype=torch.int8)
        Z = 2 * Z - 1
        if batched_forward:
            _check_batched_forward(obj, theta)
        moments, C = _pass_jvp(obj, theta, U, Z, chunk_size, direction_chunk, with_mixed,
                               batched_forward)
        Cc = C - C.mean(0)
        cov = Cc[:, :k].T @ Cc[:, :k] / N
        per_probe = (Cc[:, k:] ** 2).mean(0)  # z^T P Sigma P z for each probe
        trace_normal = cov.trace().item()
        trace_tangent = per_probe.mean().item()
        stderr = (per_probe.std() / math.sqrt(num_probes)).item()
        trace_sigma, probes = trace_normal + trace_tangent, num_probes
        C = C[:, :k]

    mixed = mixed_norm = None
    if with_mixed:
        sigma_u = moments.cross / N
        mixed = sigma_u - U @ (U.T @ sigma_u)
        mixed_norm = torch.linalg.matrix_norm(mixed).item()
    return NoiseProbe(
        cov_in_basis=cov, mean_in_basis=C.mean(0), trace_sigma=trace_sigma,
        trace_normal=trace_normal, trace_tangent=trace_tangent, trace_stderr=stderr,
        normal_fraction=trace_normal / trace_sigma if trace_sigma != 0 else math.nan,
        mixed=mixed, mixed_norm=mixed_norm,
        alignment=None if eigenvalues is None else _alignment(cov, eigenvalues),
        method=method, num_samples=N, num_probes=probes)
