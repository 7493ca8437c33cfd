"""A point zeta of Gamma for a user's network, data and label noise, and what every comparison there reuses.

`build_point`: `check_model` (bad input before any work), full-batch Adam toward Gamma (`fit`), `project`, then
`point_at` builds once per point the geometry (with the noise model's metric), the tangent sharpness gradients,
the Gram preconditioner and the Phi correction. method "cg": no (N m, D) array, a `GramPreconditionerMF` only.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dynamics.matrix_function import SpectralOperator
from dynamics.objective import Objective
from experiments.comparison.noise import parse_noise
from experiments.comparison.phi import PhiCorrection
from experiments.comparison.projection import (GramPreconditioner, GramPreconditionerMF, objective_targets,
                                               outputs_and_targets, project)
from experiments.metrics import atomic_write_bytes
from sde.label_noise import gauss_newton_geometry, sharpness_gradients

__all__ = ["Point", "check_model", "check_on_gamma", "objective", "fit", "point_at", "build_point"]


@dataclass(frozen=True)
class Point:
    """zeta (D,) on Gamma and its tools. targets (N, C) the expected targets (the objective's), residual the
    noise model's distance to Gamma at zeta; geometry, gradients, correction None for a matrix-free point."""
    noise: object
    objective: Objective
    targets: Tensor
    zeta: Tensor
    residual: float
    geometry: object
    gradients: object
    preconditioner: object
    correction: PhiCorrection | None
    seconds: float
    classes: int
    labels: Tensor | None = None

    @property
    def trace(self) -> float:
        """tr H at zeta: from the geometry, or from the exact Gram eigenvalues / N; NaN with a Nystrom sketch."""
        if self.geometry is not None:
            return float(self.geometry.trace)
        return float(self._gram_eigenvalues().sum()) / len(self.targets)

    @property
    def lambda_max(self) -> float:
        if self.geometry is not None:
            return float(self.geometry.lambda_max)
        return float(self._gram_eigenvalues()[0]) / len(self.targets)

    @property
    def gram_spectrum(self) -> SpectralOperator | None:
        """G = Jt Jt^T / N's eigendecomposition at zeta over the preconditioner's kept rank, where the point holds it
        exactly, else None (a Nystrom sketch): with it the predictions' psi traces need no Lanczos
        (`predict_rates_matrix_free(spectrum=)`)."""
        if not isinstance(self.preconditioner, GramPreconditioner):
            return None
        kept = slice(self.preconditioner.rank)
        return SpectralOperator(self.preconditioner.values[kept] / len(self.targets),
                                self.preconditioner.vectors[:, kept])

    def _gram_eigenvalues(self) -> Tensor:
        """The exact Gram eigenvalues (descending) of a matrix-free point, or [NaN] where only a sketch is held."""
        if isinstance(self.preconditioner, GramPreconditioner):
            return self.preconditioner.values
        return torch.tensor([math.nan], dtype=torch.float64)

    @property
    def reference(self) -> Tensor:
        """(N m, k <= 16) top Gram eigenvectors at zeta, the seed of `sharpness_at`'s Rayleigh-Ritz."""
        return self.preconditioner.vectors[:, :16]


def check_model(model: nn.Module, images: Tensor, labels: Tensor, noise) -> tuple[int, Tensor]:
    """(C, expected targets (N, C) float64), or ValueError before any work when the network cannot have the Gamma
    the theory assumes: BatchNorm, Dropout, outputs not one per class of the targets, more equations than D."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"the network has BatchNorm ({name or 'the model'}: {type(module).__name__}): with "
                             "batch statistics each output depends on the whole batch, so Gamma is not the set "
                             "of per-sample minimizers the theory assumes; use GroupNorm / LayerNorm or none")
        if isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(f"the network has Dropout ({name}): the loss is random, Gamma is not defined; remove it")
    probe = images[:2]
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # noqa: BLE001 - the user's network on the user's images
        raise ValueError(f"the network fails on images of shape {tuple(probe.shape[1:])}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if out.dim() != 2 or out.shape[0] != len(probe) or out.shape[1] < 2:
        raise ValueError(f"the network gives outputs of shape {tuple(out.shape)} for {len(probe)} images; "
                         f"{noise} needs ({len(probe)}, C), one output per class, C >= 2")
    classes = out.shape[1]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} targets")
    try:
        targets = noise.targets(labels, classes)
    except ValueError as exc:
        raise ValueError(f"the network gives outputs of shape {tuple(out.shape)} for {len(probe)} images; "
                         f"{noise}: {exc}") from None
    dim = sum(p.numel() for p in model.parameters())
    if noise.equations(len(images), classes) > dim:
        raise ValueError(f"{len(images)} images give {noise.equations(len(images), classes)} equations on Gamma "
                         f"({noise}) but the network has D = {dim} parameters: Gamma is a manifold only when "
                         "equations <= D; use fewer images or a larger network")
    return classes, targets


def check_on_gamma(obj: Objective, noise, theta: Tensor, tol: float | None = None) -> float:
    """The noise model's distance to Gamma at theta; ValueError if above tol (default noise.on_gamma)."""
    tol = noise.on_gamma if tol is None else tol
    distance = noise.distance(*outputs_and_targets(obj, theta.detach()))
    if not distance <= tol:
        raise ValueError(f"zeta is not on Gamma ({noise}: distance {distance:.3e} > {tol:.1e}): project it first")
    return distance


def objective(model: nn.Module, images: Tensor, targets: Tensor, noise) -> Objective:
    """The expected loss (1/N) sum_i noise.loss(f_i, targets_i) over one batch of (images, targets (N, C))."""
    return Objective(model, noise.loss, [(images, targets.to(images.dtype))])


def fit(obj: Objective, noise, *, steps: int = 3000, lr: float = 3e-3, gap: float | None = None,
        dtype: torch.dtype | None = None, patience: int | None = None) -> Tensor:
    """Full-batch Adam from the model's parameters until L - noise.minimum_loss <= gap (default noise.fit_gap)
    or `steps`: the flat parameters reached, in obj's dtype (the model is not modified). dtype: run Adam on a copy
    of the objective in this dtype (torch.float32: ~3x faster CPU convolutions; only the start of the float64
    projection that follows, so zeta is as exact).

    patience: also stop once the lowest loss seen has not halved in `patience` steps, and return the iterate
    that reached it (with patience, the best iterate also when `steps` run out). At a fixed step size Adam ends
    on a plateau where its loss oscillates (N = 2,000 at 32x32: gap 1e-4 to 6e-4 over the last ~1,400 of 3,000
    steps, RESULTS.md 2d); from there the Gauss-Newton projection does the rest, to another point of Gamma than
    from the plateau's end (the plateau's steps also move the iterate along the valley)."""
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be a positive number of steps, got {patience}")
    gap = noise.fit_gap if gap is None else gap
    floor = noise.minimum_loss(objective_targets(obj))
    work = obj if dtype is None else obj.to(dtype)
    theta = work.params.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    best, best_theta, level, since = math.inf, None, math.inf, 0
    for _ in range(steps):
        loss, g = work.loss_and_grad(theta.detach())
        excess = loss.item() - floor
        if excess <= gap:
            return theta.detach().to(obj.dtype)
        if excess < best:
            best, best_theta = excess, theta.detach().clone()
        level, since = (best, 0) if best <= level / 2 else (level, since + 1)
        if patience is not None and since >= patience:
            break
        theta.grad = g
        opt.step()
    return (theta if patience is None or best_theta is None else best_theta).detach().to(obj.dtype)


def point_at(obj: Objective, noise, zeta: Tensor, *, method: str = "dense", labels: Tensor | None = None,
             preconditioner=None, tol: float | None = None, seconds: float = 0.0, exact_preconditioner: bool = False,
             memory_limit: int | None = None, eigen_cache: str | Path | None = None, **mf) -> Point:
    """The `Point` at zeta (ValueError if its distance to Gamma exceeds tol, default noise.on_gamma): dense,
    geometry, gradients, `GramPreconditioner` and `PhiCorrection`; "cg", a `GramPreconditionerMF` (kwargs `mf`), or
    with exact_preconditioner the exact Gram eigendecomposition (`GramPreconditioner.at` by Jacobian row blocks,
    within `memory_limit` bytes, default the machine's RAM, checked first), which the matrix-free readings need
    anyway (`reading_mf.with_eigendecomposition`); eigen_cache: a file keeping that eigendecomposition between
    processes (`GramPreconditioner.at(cache=)`)."""
    start = time.perf_counter()
    zeta = zeta.detach()
    residual = check_on_gamma(obj, noise, zeta, tol)
    targets = objective_targets(obj)
    geometry = gradients = correction = None
    if method == "dense":
        geometry = gauss_newton_geometry(obj, zeta, metric=noise.metric(targets), residual=residual)
        gradients = sharpness_gradients(obj, geometry)
        correction = PhiCorrection.at(obj, geometry, gradients)
        preconditioner = preconditioner or GramPreconditioner.at(obj, noise, zeta, memory_limit=memory_limit)
    elif method == "cg":
        if preconditioner is None and exact_preconditioner:
            preconditioner = GramPreconditioner.at(obj, noise, zeta, memory_limit=memory_limit, cache=eigen_cache)
        elif preconditioner is None:
            rank = min(mf.pop("rank", 200), noise.equations(*targets.shape) - 1)
            preconditioner = GramPreconditionerMF.at(obj, noise, zeta, rank=rank, **mf)
    else:
        raise ValueError(f"method must be 'dense' or 'cg', got {method!r}")
    return Point(noise=noise, objective=obj, targets=targets, zeta=zeta, residual=residual, geometry=geometry,
                 gradients=gradients, preconditioner=preconditioner, correction=correction,
                 seconds=seconds + time.perf_counter() - start, classes=targets.shape[1], labels=labels)


def build_point(model, images: Tensor, labels: Tensor, *, noise, train_steps: int = 3000, lr: float = 3e-3,
                tol: float = 1e-10, seed: int = 0, method: str = "dense", progress: Callable[[str], None] | None = None,
                cache: str | Path | None = None, fit_dtype: torch.dtype | None = None,
                exact_preconditioner: bool = False, memory_limit: int | None = None,
                pass_dtype: torch.dtype | None = None, eigen_cache: str | Path | None = None,
                fit_patience: int | None = None, **projection) -> Point:
    """Train `model` (a module, or a factory called with image_size, torch seeded by `seed`) toward Gamma by
    full-batch Adam (`train_steps`, 0 for none; in `fit_dtype` if given, e.g. torch.float32; stopped at a plateau
    after `fit_patience` steps if given, `fit`), project onto Gamma
    (distance <= tol; "cg": its Gram products in `pass_dtype` if given, `project`'s passes; `projection` kwargs go to
    `project`, e.g. cg_rtol) and build the point there (`point_at`). Images (N, 3, s, s) and the model in
    float64; labels integer (N,) or float (N, C) (`LabelNoise.targets`). noise: a model or "gaussian:0.1".
    cache: a file keeping zeta between runs, keyed by the setup (noise, options, data and start sizes; atomic).
    exact_preconditioner ("cg"): the point's preconditioner is the exact Gram eigendecomposition at zeta, not a
    Nystrom one (`point_at`, within `memory_limit` bytes; kept between processes in the file `eigen_cache`)."""
    noise = parse_noise(noise) if isinstance(noise, str) else noise
    start = time.perf_counter()
    images = images.to(torch.float64)
    if isinstance(model, nn.Module):
        net = model
    elif callable(model):
        from experiments.probe import build_from_factory
        net = build_from_factory(model, image_size=images.shape[-1], seed=seed)
    else:
        raise ValueError(f"model must be an nn.Module or a function returning one, got {type(model).__name__}")
    net = net.to(torch.float64)
    classes, targets = check_model(net, images, labels, noise)
    obj = objective(net, images, targets, noise)
    say = progress or (lambda line: None)
    key = {"noise": str(noise), "train_steps": train_steps, "lr": lr, "tol": tol, "method": method, "seed": seed,
           "shape": list(images.shape), "dim": obj.dim, "sizes": [float(images.norm()), float(obj.params.norm()),
                                                                  float(targets.norm())],
           **({"fit_dtype": str(fit_dtype)} if fit_dtype is not None else {}),
           **({"pass_dtype": str(pass_dtype)} if pass_dtype is not None else {}),
           **({"fit_patience": fit_patience} if fit_patience is not None else {})}
    saved = torch.load(cache, weights_only=True) if cache is not None and Path(cache).exists() else {}
    if saved.get("setup") == key:
        zeta = saved["zeta"]
        say(f"point: zeta loaded from {cache}")
    else:
        say(f"point: Adam on {noise} for up to {train_steps} steps (N = {len(images)}, D = {obj.dim})")
        theta = (fit(obj, noise, steps=train_steps, lr=lr, dtype=fit_dtype, patience=fit_patience) if train_steps
                 else obj.params)
        zeta, report = project(obj, noise, theta, tol=tol, method=method, raise_on_failure=False,
                               passes=None if pass_dtype is None else obj.to(pass_dtype), **projection)
        its = f" (CG iterations {', '.join(map(str, report.cg_iterations))})" if report.cg_iterations else ""
        if not report.converged:
            raise ValueError(f"the point is not on Gamma: distance {report.distance:.3e} > {tol:.0e} after "
                             f"{report.gauss_newton_steps} Gauss-Newton steps{its} ({noise}); train longer or use "
                             "fewer images")
        say(f"point: projected to distance {report.distance:.2e} in {report.gauss_newton_steps} Gauss-Newton "
            f"steps{its}")
        if cache is not None:
            buffer = io.BytesIO()
            torch.save({"setup": key, "zeta": zeta}, buffer)
            atomic_write_bytes(cache, buffer.getvalue())
    say("point: on Gamma; geometry, Phi correction and preconditioner")
    point = point_at(obj, noise, zeta, method=method, labels=labels, tol=tol, seconds=time.perf_counter() - start,
                     exact_preconditioner=exact_preconditioner, memory_limit=memory_limit, eigen_cache=eigen_cache,
                     **({"rank": projection.get("preconditioner_rank", 200), "generator": projection.get("generator")}
                        if method == "cg" else {}))
    say(f"point: tr H = {point.trace:.6g}, lambda_max = {point.lambda_max:.6g} ({point.seconds:.0f} s)")
    return point
