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
Images and labels: float images (N, ...) and int64 labels (N,) in [0, C); C = 10 for now (the
engines assume CIFAR-10's ten classes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor, nn

from dynamics.objective import Objective

__all__ = ["LabelNoise", "GaussianLabelNoise", "FlippedLabels", "parse_noise", "NOISE_MODELS", "NUM_CLASSES"]

NUM_CLASSES = 10


class LabelNoise(Protocol):
    """What the comparison pipeline asks of a label-noise model (see the module docstring)."""

    def __str__(self) -> str: ...                                    # the command-line form, e.g. "flip:0.1"

    def equations(self, n: int, classes: int) -> int: ...            # dimension of the normal space of Gamma

    def objective(self, model: nn.Module, x: Tensor, labels: Tensor) -> Objective: ...

    def fit(self, obj: Objective, *, steps: int, lr: float) -> Tensor: ...   # full-batch Adam toward Gamma

    def project(self, obj: Objective, theta: Tensor, *, tol: float) -> tuple[Tensor, float]: ...

    def point_tools(self, obj: Objective, zeta: Tensor) -> tuple[object, object, object]: ...

    def predict(self, obj: Objective, geometry, gradients, rule): ...   # rates at zeta (.trace_rate, ...)

    def config(self, rule, eta: float, **schedule): ...

    def compare(self, obj: Objective, labels: Tensor, zeta: Tensor, config, **engine) -> object: ...


def _check_labels(labels: Tensor, classes: int) -> None:
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices of shape (N,), got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]")


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

    def objective(self, model: nn.Module, x: Tensor, labels: Tensor) -> Objective:
        from experiments.manifold import squared_loss_objective
        _check_labels(labels, NUM_CLASSES)
        return squared_loss_objective(model, x, labels)

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

    def config(self, rule, eta: float, **schedule):
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
        if not (isinstance(self.p, (int, float)) and 0 < self.p < 1 - 1 / NUM_CLASSES):
            raise ValueError(f"flipped labels need 0 < p < {1 - 1 / NUM_CLASSES:g} (C = {NUM_CLASSES}: "
                             f"above it a wrong class is likelier than the true one), got {self.p!r}")

    def __str__(self) -> str:
        return f"flip:{self.p:g}"

    def equations(self, n: int, classes: int) -> int:
        """N (C - 1): softmax(f_i) = q_i pins the centred outputs of every image."""
        return n * (classes - 1)

    def objective(self, model: nn.Module, x: Tensor, labels: Tensor) -> Objective:
        from sde.flipped_labels import soft_target_objective
        _check_labels(labels, NUM_CLASSES)
        return soft_target_objective(model, x, labels, self.p, num_classes=NUM_CLASSES)

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

    def config(self, rule, eta: float, **schedule):
        from experiments.flipped_labels import FlipContinuationConfig
        return FlipContinuationConfig(rule=rule, eta=eta, p=self.p, **schedule)

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
