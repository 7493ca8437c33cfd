"""Training rules whose slow SDEs `sde.slow_sde` computes: SGD, Local SGD and Local SGD with QSR.

Each rule is a frozen dataclass validated on construction and exposes `.workers` (K) and
`.total_batch` (B = K x B_loc, the number of samples one synchronous step of all workers draws).
Time unit throughout `sde`: slow time t = eta^2 x (steps taken by one worker).

- `SGD(batch_size)`: mini-batch SGD with batch B (Li, Wang & Arora, ICLR 2022).
- `LocalSGD(workers, local_batch, beta)`: K workers, each with batch B_loc, averaging every
  H = beta / eta local steps, so one round lasts H eta^2 = beta eta of slow time and eta H = beta
  enters psi (Gu et al., ICLR 2023). beta -> 0 recovers SGD with batch B, beta -> inf gives the
  QSR drift.
- `QSR(workers, local_batch, alpha=None)`: Local SGD with H = (alpha / eta)^2 (Gu et al., ICLR 2024).
  One round lasts alpha^2 of slow time, which is what makes psi -> 1: its drift is K times the
  drift of SGD with batch B (= the drift of SGD with batch B_loc) and its diffusion is SGD's with
  batch B. alpha does not enter the SDE; it is kept (optional) for `round_duration`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


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


@dataclass(frozen=True)
class SGD:
    """Mini-batch SGD with batch `batch_size` (B) drawn with replacement; one worker."""

    batch_size: int

    def __post_init__(self):
        _check_count("batch_size", self.batch_size)

    @property
    def workers(self) -> int:
        return 1

    @property
    def total_batch(self) -> int:
        return int(self.batch_size)


@dataclass(frozen=True)
class LocalSGD:
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
        """Slow time of one round, H eta^2 = beta eta."""
        _check_positive("eta", eta)
        return float(self.beta * eta)


@dataclass(frozen=True)
class QSR:
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

    def round_duration(self) -> float:
        """Slow time of one round, H eta^2 = alpha^2 (needs alpha)."""
        if self.alpha is None:
            raise ValueError("round_duration needs alpha: construct QSR(workers, local_batch, alpha=...)")
        return float(self.alpha ** 2)


Rule = SGD | LocalSGD | QSR


def check_rule(rule) -> None:
    """ValueError unless `rule` is one of SGD, LocalSGD, QSR."""
    if not isinstance(rule, (SGD, LocalSGD, QSR)):
        raise ValueError(f"rule must be sde.SGD, sde.LocalSGD or sde.QSR, got {type(rule).__name__}")
