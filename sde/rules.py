"""Training rules whose slow SDEs `sde.slow_sde` computes: SGD, Local SGD and Local SGD with QSR.

Each rule is a frozen dataclass validated on construction and exposes `.workers` (K) and
`.total_batch` (B = K x B_loc, the number of samples one synchronous step of all workers draws).
Time unit throughout `sde`: slow time t = eta^2 x (steps taken by one worker).

- `SGD(batch_size)`: mini-batch SGD with batch B (Li, Wang & Arora, ICLR 2022).
- `LocalSGD(workers, local_batch, beta)`: K workers, each with batch B_loc, averaging every
  H = beta / eta local steps, so one round lasts H eta^2 = beta eta of slow time and eta H = beta
  enters psi (Gu et al., ICLR 2023). beta -> 0 recovers SGD with batch B, beta -> inf gives the
  QSR drift.
- `QSR(workers, local_batch, alpha=None)`: Local SGD with H = floor((alpha / eta)^2) (Gu et al.,
  ICLR 2024). One round lasts about alpha^2 of slow time, which is what makes psi -> 1: its drift is
  K times the drift of SGD with batch B (= the drift of SGD with batch B_loc) and its diffusion is
  SGD's with batch B. alpha does not enter the eta -> 0 SDE; it sets H and the finite-eta drift.

What each rule means is answered here and nowhere else (callers never test a rule's type):

- `local_steps(eta)`: H, steps per worker between averagings (SGD: 1). The ONE rounding rule:
  Local SGD H = max(1, round(beta / eta)) (nearest integer, so beta / eta = 39.999999 gives 40);
  QSR H = max(1, floor((alpha / eta)^2)) as in Gu et al. 2024, Algorithm 1 (with 1e-9 of slack so
  that (0.08 / 0.01)^2 = 64.00000000000001 or 63.99999999999999 both give 64).
- `averages`: whether workers are averaged every H steps (False for SGD, whose steps are its rounds).
- `drift_coefficients(eta=None)`: (c_I, c_II, beta) of the drift c_I/(2B) d3L[S_hat] +
  c_II/(2B) d3L[Psi_hat] (psi at beta (lambda_i + lambda_j)); beta None when there is no psi term.
- `drift_weight(s, eta=None)`: w(s) = c_I + c_II psi(beta s) for s = lambda_i + lambda_j, the weight
  of a Hessian eigen-pair in the drift (label noise: s = 2 lambda_i).
- `at_eta(eta)`: the rule whose slow SDE describes this rule run at a finite eta: itself for SGD and
  Local SGD; for QSR the Local SGD with beta = eta H (H = `local_steps(eta)`, the rule actually run).
  `QSR.as_local_sgd(eta, whole_steps=False)` gives beta = alpha^2 / eta instead (H not rounded).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .psi import psi


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive real number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


_FLOOR_SLACK = 1e-9     # absorbs the rounding error of (alpha / eta)^2 when it is a whole number


class _RuleTheory:
    """Shared meaning of a rule given its `drift_coefficients` (see the module docstring)."""

    def drift_weight(self, s, *, eta: float | None = None):
        """w(s) = c_I + c_II psi(beta s), s = lambda_i + lambda_j (tensor of any shape, or float)."""
        c_I, c_II, beta = self.drift_coefficients(eta)
        if beta is None or c_II == 0:
            return torch.full_like(s, c_I) if isinstance(s, torch.Tensor) else c_I
        return c_I + c_II * psi(beta * s)

    def at_eta(self, eta: float):
        """The rule run at step eta, as the rule whose slow SDE describes it (QSR: Local SGD, beta = eta H)."""
        _check_positive("eta", eta)
        return self


@dataclass(frozen=True)
class SGD(_RuleTheory):
    """Mini-batch SGD with batch `batch_size` (B) drawn with replacement; one worker."""

    batch_size: int

    def __post_init__(self):
        _check_count("batch_size", self.batch_size)

    @property
    def workers(self) -> int:
        return 1

    @property
    def local_batch(self) -> int:
        """Batch of the one worker (= B)."""
        return int(self.batch_size)

    @property
    def total_batch(self) -> int:
        return int(self.batch_size)

    averages = False

    def local_steps(self, eta: float) -> int:
        """H = 1: every SGD step is synchronous."""
        _check_positive("eta", eta)
        return 1

    def drift_coefficients(self, eta: float | None = None) -> tuple[float, float, float | None]:
        """(c_I, c_II, beta) = (1, 0, None) (Li, Wang & Arora 2022)."""
        return 1.0, 0.0, None


@dataclass(frozen=True)
class LocalSGD(_RuleTheory):
    """Local SGD: K = `workers` workers, batch `local_batch` each, H = beta / eta local steps.

    `beta` = eta x H is the slow-time length of a round divided by eta; it is the argument
    scale of psi in drift-II (THEORY.md).
    """

    workers: int
    local_batch: int
    beta: float

    def __post_init__(self):
        _check_count("workers (K)", self.workers)
        _check_count("local_batch", self.local_batch)
        _check_positive("beta", self.beta)

    @property
    def total_batch(self) -> int:
        return int(self.workers * self.local_batch)

    def round_duration(self, eta: float) -> float:
        """Slow time of one round, H eta^2 = beta eta (H not rounded)."""
        _check_positive("eta", eta)
        return float(self.beta * eta)

    averages = True

    def local_steps(self, eta: float) -> int:
        """H = max(1, round(beta / eta)): the nearest whole number of steps to eta H = beta (Gu et al. 2023)."""
        _check_positive("eta", eta)
        return max(1, round(self.beta / eta))

    def drift_coefficients(self, eta: float | None = None) -> tuple[float, float, float | None]:
        """(c_I, c_II, beta) = (1, K - 1, beta) (Gu et al., ICLR 2023); eta does not enter."""
        return 1.0, float(self.workers - 1), float(self.beta)


@dataclass(frozen=True)
class QSR(_RuleTheory):
    """Local SGD with the Quadratic Synchronization Rule H = (alpha / eta)^2.

    Its slow SDE has the diffusion of SGD with batch B = K x B_loc and K times that SGD's drift.
    """

    workers: int
    local_batch: int
    alpha: float | None = None

    def __post_init__(self):
        _check_count("workers (K)", self.workers)
        _check_count("local_batch", self.local_batch)
        if self.alpha is not None:
            _check_positive("alpha", self.alpha)

    @property
    def total_batch(self) -> int:
        return int(self.workers * self.local_batch)

    def _alpha(self) -> float:
        if self.alpha is None:
            raise ValueError("this needs QSR's alpha (H = floor((alpha / eta)^2)): "
                             "construct QSR(workers, local_batch, alpha=...)")
        return float(self.alpha)

    def round_duration(self) -> float:
        """Slow time of one round, H eta^2 = alpha^2 (needs alpha; H not rounded)."""
        return self._alpha() ** 2

    averages = True

    def local_steps(self, eta: float, h_base: int = 1) -> int:
        """H = max(H_base, floor((alpha / eta)^2)), the Quadratic Synchronization Rule of Gu et al.,
        ICLR 2024 (floor, as in the paper; 1e-9 of slack for whole numbers hit inexactly)."""
        _check_positive("eta", eta)
        _check_count("h_base", h_base)
        return max(int(h_base), math.floor((self._alpha() / eta) ** 2 + _FLOOR_SLACK))

    def drift_coefficients(self, eta: float | None = None) -> tuple[float, float, float | None]:
        """eta None: (K, 0, None), the eta -> 0 limit (Gu et al. 2024). Given eta: Local SGD's
        (1, K - 1, alpha^2 / eta), the finite-eta drift with H = (alpha / eta)^2 not rounded."""
        if eta is None:
            return float(self.workers), 0.0, None
        return self.as_local_sgd(eta, whole_steps=False).drift_coefficients()

    def as_local_sgd(self, eta: float, *, whole_steps: bool = True) -> LocalSGD:
        """QSR at step eta as Local SGD: beta = eta H with H = `local_steps(eta)` (the rule actually
        run), or, with whole_steps=False, beta = alpha^2 / eta (H not rounded)."""
        _check_positive("eta", eta)
        beta = eta * self.local_steps(eta) if whole_steps else self._alpha() ** 2 / eta
        return LocalSGD(self.workers, self.local_batch, beta)

    def at_eta(self, eta: float) -> LocalSGD:
        """The Local SGD actually run at eta: beta = eta H, H = floor((alpha / eta)^2)."""
        return self.as_local_sgd(eta)


Rule = SGD | LocalSGD | QSR


def check_rule(rule) -> None:
    """ValueError unless `rule` is one of SGD, LocalSGD, QSR."""
    if not isinstance(rule, (SGD, LocalSGD, QSR)):
        raise ValueError(f"rule must be sde.SGD, sde.LocalSGD or sde.QSR, got {type(rule).__name__}")
