"""Label-noise models behind one protocol: the loss, noisy draws, the residual and metric of Gamma, the scale c.

Both have a minimizer manifold Gamma = {r_i = 0}, r_i = R_i Q^T (f_i - g(target_i)) in R^m, on which
Hessian(L) = Jt^T Jt / N (Jt_i = R_i Q^T J_i) and the one-draw gradient noise is Sigma = c H (THEORY.md, "Label
noise"; the theory for any `OutputMetric` is `sde.label_noise`). Targets are float (N, C) expected targets.
- `GaussianLabelNoise(sigma)`: squared loss 1/2 ||f - y||^2, every drawn target + N(0, sigma^2 I) (Li, Wang &
  Arora, ICLR 2022). Q = R_i = I (m = C), c = sigma^2.
  `simplex_targets` codes the classes for it as the C vertices of a regular simplex in R^(C-1): a network of
  C - 1 outputs, where one-hot targets on C outputs make Jt rank-deficient (its docstring).
- `FlippedLabels(p)`: cross-entropy, every drawn label flipped with probability p to a uniform other class; the
  expected targets are soft, q_i (1 - p on the label). Q (C, C-1) orthonormal, orthogonal to 1,
  R_i = (Q^T A_i Q)^{1/2}, A_i = diag(q_i) - q_i q_i^T (m = C - 1), c = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from experiments.datasets import flip_labels
from sde.label_noise import OutputMetric, centred_basis, metric_roots

__all__ = ["LabelNoise", "GaussianLabelNoise", "FlippedLabels", "parse_noise", "NOISE_MODELS", "simplex_targets"]


class LabelNoise(Protocol):
    """What the pipeline asks of a label-noise model (module docstring). Shapes: N samples, C classes."""
    noise_scale: float          # c with Sigma = c H on Gamma
    on_gamma: float             # default tolerance of `distance` for "on Gamma"
    fit_gap: float              # Adam toward Gamma stops at loss - minimum_loss <= fit_gap
    chord_contraction: float | None   # Jacobian reuse of `projection.project` (None: fresh every step)

    def __str__(self) -> str: ...                                           # "gaussian:0.1" / "flip:0.1"
    def equations(self, n: int, classes: int) -> int: ...                   # N m
    def targets(self, labels: Tensor, classes: int) -> Tensor: ...          # (N, C) float expected targets
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor: ...         # batch mean
    def draw(self, targets: Tensor, generator: torch.Generator) -> Tensor: ...   # (..., C) one noisy draw
    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor: ...     # (N, m), zero on Gamma
    def distance(self, outputs: Tensor, targets: Tensor) -> float: ...      # the stopping measure
    def metric(self, targets: Tensor) -> OutputMetric: ...
    def minimum_loss(self, targets: Tensor) -> float: ...                   # the loss on Gamma


def _one_hot(labels: Tensor, classes: int, dtype=torch.float64) -> Tensor:
    """Integer labels (...) in [0, C) -> one-hot (..., C) float64; ValueError naming what does not fit."""
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"targets must be integer labels (N,) or float targets (N, C), got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels lie in [{int(labels.min())}, {int(labels.max())}] but the network has {classes} "
                         f"outputs: one output per class is needed")
    return torch.zeros(*labels.shape, classes, dtype=dtype, device=labels.device).scatter(
        -1, labels.long().unsqueeze(-1), 1.0)


def simplex_targets(labels: Tensor, classes: int) -> Tensor:
    """Integer labels (N,) in [0, C) -> float64 targets (N, C - 1): e_label in the orthonormal basis Q of the
    sum-zero plane (`centred_basis`), i.e. the vertices of a regular simplex centred at 0.

    Why: with one-hot targets on C outputs every image's outputs sum to 1 on Gamma, which forces 1^T W_last = 0
    once N exceeds the last hidden width + 1, and then Jt has N - width - 1 null directions (RESULTS.md 2b):
    Gauss-Newton and CG stall on them and the normal relaxation is slow along them. The squared loss of a
    (C - 1)-output network f against these targets equals the one-hot squared loss of the C outputs
    Q f + 1/C (an isometry onto the plane sum = 1), and no direction v has v^T y constant over the classes, so
    that degeneracy cannot arise. Gaussian label noise on these targets is the one-hot noise projected on the plane."""
    hot = _one_hot(labels, classes)
    return hot @ centred_basis(classes, hot.dtype, hot.device)


def _float_targets(targets: Tensor, classes: int) -> bool:
    if targets.is_floating_point() and (targets.dim() != 2 or targets.shape[1] != classes):
        raise ValueError(f"float targets of shape {tuple(targets.shape)} do not fit the network's {classes} "
                         f"outputs: (N, {classes}) needed")
    return targets.is_floating_point()


@dataclass(frozen=True)
class GaussianLabelNoise:
    """Squared loss with Gaussian label noise of std `sigma` on every target coordinate (module docstring)."""
    sigma: float
    on_gamma: float = 1e-8
    fit_gap: float = 1e-5       # `point.fit` stops Adam at L <= fit_gap
    chord_contraction: float | None = None   # `projection.project`: a fresh Jacobian every Gauss-Newton step

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"gaussian label noise needs sigma > 0, got {self.sigma!r}")

    def __str__(self) -> str:
        return f"gaussian:{self.sigma:g}"

    @property
    def noise_scale(self) -> float:
        return float(self.sigma) ** 2

    def equations(self, n: int, classes: int) -> int:
        """N C: every output of every image is pinned to its target on Gamma."""
        return n * classes

    def targets(self, labels: Tensor, classes: int) -> Tensor:
        """Integer labels (N,) in [0, C) (one-hot targets), or any float targets (N, C); float64."""
        return labels.to(torch.float64) if _float_targets(labels, classes) else _one_hot(labels, classes)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean over the batch of 1/2 sum_c (outputs - targets)^2."""
        return 0.5 * (outputs - targets).pow(2).sum(-1).mean()

    def draw(self, targets: Tensor, generator: torch.Generator) -> Tensor:
        """targets + sigma N(0, 1): one randn of targets' shape."""
        return targets + self.sigma * torch.randn(targets.shape, generator=generator, dtype=targets.dtype)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs - targets

    def distance(self, outputs: Tensor, targets: Tensor) -> float:
        return self.loss(outputs, targets).item()        # L itself

    def metric(self, targets: Tensor) -> OutputMetric:
        return OutputMetric(basis=None, roots=None)

    def minimum_loss(self, targets: Tensor) -> float:
        return 0.0


@dataclass(frozen=True)
class FlippedLabels:
    """Cross-entropy with every drawn label flipped with probability `p` to a uniform other class."""
    p: float
    on_gamma: float = 1e-8
    fit_gap: float = 1e-7       # `point.fit` stops Adam within fit_gap of the minimum (mean entropy of q)
    chord_contraction: float | None = 0.1    # `projection.project`: chord steps while the distance falls 10x
    noise_scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.p, (int, float)) and 0 < self.p < 1):
            raise ValueError(f"flipped labels need 0 < p < (C-1)/C, got {self.p!r}")

    def __str__(self) -> str:
        return f"flip:{self.p:g}"

    def equations(self, n: int, classes: int) -> int:
        """N (C - 1): softmax(f_i) = q_i pins the centred outputs of every image."""
        return n * (classes - 1)

    def targets(self, labels: Tensor, classes: int) -> Tensor:
        """Soft targets q (N, C) float64 (1 - p on the label, p / (C - 1) elsewhere) from integer labels (N,)
        or one-hot float rows; p < (C-1)/C (above it a wrong class is likelier than the true one)."""
        if classes < 2 or not self.p < (classes - 1) / classes:
            raise ValueError(f"flipped labels need 0 < p < (C-1)/C = {(classes - 1) / classes:.4g} for the "
                             f"network's C = {classes} outputs, got p = {self.p:g}")
        if _float_targets(labels, classes):
            hot = labels.argmax(1)
            if not torch.equal(labels, torch.zeros_like(labels).scatter(1, hot[:, None], 1.0)):
                raise ValueError("flipped labels need class labels: float targets must be one-hot rows")
            labels = hot
        hot = _one_hot(labels, classes)
        return hot * (1 - self.p) + (1 - hot) * (self.p / (classes - 1))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean over the batch of -sum_c targets_c log softmax(outputs)_c (soft or one-hot targets)."""
        return -(targets * torch.log_softmax(outputs, dim=-1)).sum(-1).mean()

    def draw(self, targets: Tensor, generator: torch.Generator) -> Tensor:
        """One-hot of the flipped labels of argmax(q) (`experiments.datasets.flip_labels`: rand, then randint)."""
        labels = flip_labels(targets.argmax(-1), self.p, targets.shape[-1], generator)
        return torch.zeros_like(targets).scatter(-1, labels.unsqueeze(-1), 1.0)

    def residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """R_i Q^T (f_i - log q_i), (N, C - 1)."""
        return self.metric(targets.to(outputs.dtype)).reduce(outputs - targets.log())

    def distance(self, outputs: Tensor, targets: Tensor) -> float:
        """||Q^T (f - log q)|| = ||centred(f - log q)||."""
        Q = centred_basis(targets.shape[-1], outputs.dtype, outputs.device)
        return float(((outputs - targets.log()) @ Q).norm())

    def metric(self, targets: Tensor) -> OutputMetric:
        Q = centred_basis(targets.shape[-1], targets.dtype, targets.device)
        return OutputMetric(basis=Q, roots=metric_roots(targets, Q))

    def minimum_loss(self, targets: Tensor) -> float:
        """The mean entropy of q."""
        return float(-(targets * targets.log()).sum(1).mean())


NOISE_MODELS: dict[str, Callable[[float], LabelNoise]] = {"gaussian": GaussianLabelNoise, "flip": FlippedLabels}


def parse_noise(text: str) -> LabelNoise:
    """"gaussian:SIGMA" or "flip:P" -> the noise model; ValueError naming the known forms otherwise."""
    name, _, value = str(text).partition(":")
    forms = "gaussian:SIGMA or flip:P (e.g. gaussian:0.1, flip:0.1)"
    if name not in NOISE_MODELS or not value:
        raise ValueError(f"unknown label noise {text!r}: expected {forms}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"label noise {text!r}: {value!r} is not a number ({forms})") from None
    return NOISE_MODELS[name](number)
