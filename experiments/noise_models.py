"""Label-noise models: one protocol for what the comparison pipeline needs to know about the noise.

A `LabelNoise` owns the loss a network is trained on, the manifold Gamma of its minimizers, and the
engine that predicts and measures the sharpness drift there; `experiments.compare` only talks to
this protocol, so it never asks which noise it holds. Two implementations:

- `GaussianLabelNoise(sigma)`: squared loss L = (1/N) sum_i 1/2 ||f_i - y_i||^2 on one-hot targets,
  every drawn target perturbed by N(0, sigma^2 I_C) at every draw (Li, Wang & Arora, ICLR 2022).
  Gamma = {f_i = onehot(y_i)} (N C equations). Engines: `experiments.manifold` (point),
  `sde.label_noise` (prediction), `experiments.continuation` (measurement), `experiments.drift_check`
  (one comparison row).
- `FlippedLabels(p)`: cross-entropy, every drawn label flipped with probability p to a uniform other
  class. Gamma = {softmax(f_i) = q_i}, q_i the expected soft target (N (C - 1) equations).
  Engines: `sde.flipped_labels` (prediction, closed form Sigma = H on Gamma) and
  `experiments.flipped_labels` (point, measurement, comparison row).

`parse_noise("gaussian:0.1")` / `parse_noise("flip:0.1")` build one from the command line's string.
Images (N, ...) float; C, the number of classes, is the network's output count. Targets: integer
labels (N,) in [0, C), or float (N, C): any real targets for the squared loss, one-hot rows for
flipped labels (`targets` checks and normalizes them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from dynamics.objective import Objective

__all__ = ["LabelNoise", "GaussianLabelNoise", "FlippedLabels", "parse_noise", "NOISE_MODELS"]


class LabelNoise(Protocol):
    """What the comparison pipeline asks of a label-noise model (see the module docstring)."""

    def __str__(self) -> str: ...                                    # the command-line form, e.g. "flip:0.1"

    def equations(self, n: int, classes: int) -> int: ...            # dimension of the normal space of Gamma

    def targets(self, labels: Tensor, classes: int) -> Tensor: ...   # checked, in the engine's form

    def objective(self, model: nn.Module, x: Tensor, targets: Tensor, classes: int) -> Objective: ...

    def fit(self, obj: Objective, *, steps: int, lr: float) -> Tensor: ...   # full-batch Adam toward Gamma

    def project(self, obj: Objective, theta: Tensor, *, tol: float) -> tuple[Tensor, float]: ...

    def point_tools(self, obj: Objective, zeta: Tensor) -> tuple[object, object, object]: ...

    def predict(self, obj: Objective, geometry, gradients, rule): ...   # rates at zeta (.trace_rate, ...)

    def config(self, rule, eta: float, classes: int, **schedule): ...

    def compare(self, obj: Objective, labels: Tensor, zeta: Tensor, config, **engine) -> object: ...


def _check_labels(labels: Tensor, classes: int) -> Tensor:
    """Integer labels (N,) in [0, classes), as int64; ValueError naming what does not fit."""
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"targets must be integer labels (N,) or float targets (N, C), got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels lie in [{int(labels.min())}, {int(labels.max())}] but the network has {classes} "
                         f"outputs: one output per class is needed")
    return labels.long()


def _float_targets(targets: Tensor, classes: int) -> bool:
    if not targets.is_floating_point():
        return False
    if targets.dim() != 2 or targets.shape[1] != classes:
        raise ValueError(f"float targets of shape {tuple(targets.shape)} do not fit the network's {classes} "
                         f"outputs: (N, {classes}) needed")
    return True


@dataclass(frozen=True)
class GaussianLabelNoise:
    """Squared loss with Gaussian label noise of std `sigma` on every target coordinate (module docstring)."""
    sigma: float

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"gaussian label noise needs sigma > 0, got {self.sigma!r}")

    def __str__(self) -> str:
        return f"gaussian:{self.sigma:g}"

    def equations(self, n: int, classes: int) -> int:
        """N C: every output of every image is pinned to its one-hot target on Gamma."""
        return n * classes

    def targets(self, labels: Tensor, classes: int) -> Tensor:
        """Integer labels (N,) in [0, C) (one-hot targets), or any float targets (N, C), in float64."""
        return labels.to(torch.float64) if _float_targets(labels, classes) else _check_labels(labels, classes)

    def objective(self, model: nn.Module, x: Tensor, targets: Tensor, classes: int) -> Objective:
        from experiments.manifold import squared_loss_objective
        return squared_loss_objective(model, x, self.targets(targets, classes))

    def fit(self, obj: Objective, *, steps: int, lr: float) -> Tensor:
        from experiments.manifold import train_to_interpolation
        return train_to_interpolation(obj, steps=steps, lr=lr, target_loss=1e-5)

    def project(self, obj: Objective, theta: Tensor, *, tol: float) -> tuple[Tensor, float]:
        """Gauss-Newton onto {L = 0} (`experiments.manifold.project_to_manifold`); (zeta, final loss L)."""
        from experiments.manifold import project_to_manifold
        zeta, report = project_to_manifold(obj, theta, tol=tol, raise_on_failure=False)
        return zeta, report.loss

    def point_tools(self, obj: Objective, zeta: Tensor):
        """(geometry, sharpness gradients, Gram preconditioner) at zeta, built once per point."""
        from experiments.manifold import GramPreconditioner
        from sde.label_noise import gauss_newton_geometry, sharpness_gradients
        geometry = gauss_newton_geometry(obj, zeta)
        return geometry, sharpness_gradients(obj, geometry), GramPreconditioner.at(obj, zeta)

    def predict(self, obj: Objective, geometry, gradients, rule):
        """`sde.label_noise.predict_label_noise_rates` (exact Jacobian path) for `rule` at zeta."""
        from sde.label_noise import predict_label_noise_rates
        return predict_label_noise_rates(obj, geometry, rule, sigma=self.sigma, gradients=gradients)

    def config(self, rule, eta: float, classes: int, **schedule):
        from experiments.continuation import ContinuationConfig
        return ContinuationConfig(rule=rule, eta=eta, sigma=self.sigma, **schedule)

    def compare(self, obj: Objective, labels: Tensor, zeta: Tensor, config, **engine):
        """`experiments.drift_check.compare_rule` (a `DriftComparison`)."""
        from experiments.drift_check import compare_rule
        return compare_rule(obj, zeta, config, **engine)


@dataclass(frozen=True)
class FlippedLabels:
    """Cross-entropy with every drawn label flipped with probability `p` to a uniform other class."""
    p: float

    def __post_init__(self):
        if not (isinstance(self.p, (int, float)) and 0 < self.p < 1):
            raise ValueError(f"flipped labels need 0 < p < (C-1)/C, got {self.p!r}")

    def __str__(self) -> str:
        return f"flip:{self.p:g}"

    def equations(self, n: int, classes: int) -> int:
        """N (C - 1): softmax(f_i) = q_i pins the centred outputs of every image."""
        return n * (classes - 1)

    def targets(self, labels: Tensor, classes: int) -> Tensor:
        """Integer labels (N,) in [0, C), or one-hot float rows (N, C) turned into labels; p < (C-1)/C
        (above it a wrong class is likelier than the true one)."""
        if classes < 2 or not self.p < (classes - 1) / classes:
            raise ValueError(f"flipped labels need 0 < p < (C-1)/C = {(classes - 1) / classes:.4g} for the "
                             f"network's C = {classes} outputs, got p = {self.p:g}")
        if _float_targets(labels, classes):
            hot = labels.argmax(1)
            if not torch.equal(labels, torch.zeros_like(labels).scatter(1, hot[:, None], 1.0)):
                raise ValueError("flipped labels need class labels: float targets must be one-hot rows")
            return hot
        return _check_labels(labels, classes)

    def objective(self, model: nn.Module, x: Tensor, targets: Tensor, classes: int) -> Objective:
        from sde.flipped_labels import soft_target_objective
        return soft_target_objective(model, x, self.targets(targets, classes), self.p, num_classes=classes)

    def fit(self, obj: Objective, *, steps: int, lr: float) -> Tensor:
        from experiments.flipped_labels import train_to_soft_targets
        return train_to_soft_targets(obj, steps=steps, lr=lr)

    def project(self, obj: Objective, theta: Tensor, *, tol: float) -> tuple[Tensor, float]:
        """Metric-weighted Gauss-Newton onto Gamma (`project_to_flip_manifold`); (zeta, ||centred(f - log q)||)."""
        from experiments.flipped_labels import project_to_flip_manifold
        zeta, report = project_to_flip_manifold(obj, theta, tol=tol, raise_on_failure=False)
        return zeta, report.residual

    def point_tools(self, obj: Objective, zeta: Tensor):
        from experiments.flipped_labels import flip_preconditioner
        from sde.flipped_labels import flip_geometry, flip_sharpness_gradients
        geometry = flip_geometry(obj, zeta)
        return geometry, flip_sharpness_gradients(obj, geometry), flip_preconditioner(obj, zeta)

    def predict(self, obj: Objective, geometry, gradients, rule):
        """`sde.flipped_labels.closed_form_rates` (Sigma = H on Gamma) for `rule` at zeta."""
        from sde.flipped_labels import closed_form_rates
        return closed_form_rates(obj, geometry, rule, gradients=gradients)

    def config(self, rule, eta: float, classes: int, **schedule):
        from experiments.flipped_labels import FlipContinuationConfig
        return FlipContinuationConfig(rule=rule, eta=eta, p=self.p, classes=classes, **schedule)

    def compare(self, obj: Objective, labels: Tensor, zeta: Tensor, config, **engine):
        """`experiments.flipped_labels.compare_flip_rule` (a `FlipComparison`)."""
        from experiments.flipped_labels import compare_flip_rule
        return compare_flip_rule(obj, labels, zeta, config, **engine)


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
