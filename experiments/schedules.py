"""Learning-rate and synchronization schedules, as pure functions of the step count.

Step counts are per worker: step t is the t-th SGD step every worker takes (0-based), and an
epoch is `steps_per_epoch` steps. A synchronization schedule says, at the start of a round,
how many local steps H the round lasts and whether its closing averaging is global.

- `ConstantH(H)`: Local SGD with a fixed period (Lin et al. 2020; Gu et al. 2023).
- `PostLocal(H, switch_step)`: H = 1 (minibatch SGD) before the switch, H after (Lin et al.).
- `QSR(H_base, alpha)`: H_s = max(H_base, floor((alpha / eta_s)^2)) with eta_s the rate at the
  start of round s (Gu et al. 2024, the Quadratic Synchronization Rule).
- `Hierarchical(H1, H2)`: rounds of H1 steps averaged inside a process, every H2-th round
  averaged across all processes (Lin et al. 2020, hierarchical Local SGD).
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

from experiments.config import TrainConfig
from sde.discrete import qsr_local_steps


@dataclass(frozen=True)
class LRSchedule:
    """eta(t): linear warm-up from `warmup_from` to `peak` over `warmup_steps`, then
    "constant", "step" (times `factor` at each of `milestones`) or "cosine" (to `min_lr` at
    `total_steps`)."""
    peak: float
    total_steps: int
    kind: str = "constant"
    warmup_steps: int = 0
    warmup_from: float = 0.0
    milestones: tuple[int, ...] = ()
    factor: float = 0.1
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_from + (self.peak - self.warmup_from) * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        if self.kind == "step":
            return self.peak * self.factor ** bisect_right(self.milestones, step)
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr schedule kind {self.kind!r}")


def build_lr_schedule(cfg: TrainConfig, *, steps_per_epoch: int, total_steps: int) -> LRSchedule:
    """The schedule `cfg` describes (peak rate after the scaling rule, see TrainConfig)."""
    return LRSchedule(
        peak=cfg.peak_lr, total_steps=total_steps, kind=cfg.lr_schedule,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        warmup_from=cfg.lr if cfg.lr_scaling == "linear" else 0.0,
        milestones=tuple(round(f * total_steps) for f in cfg.decay_at),
        factor=cfg.decay_factor, min_lr=cfg.min_lr)


# ---------------------------------------------------------------------------- synchronization
@dataclass(frozen=True)
class Round:
    """One round: `steps` local steps, then an averaging (across processes iff `is_global`)."""
    steps: int
    is_global: bool = True


@dataclass(frozen=True)
class ConstantH:
    H: int

    def round_at(self, round_index: int, step: int, lr: float) -> Round:
        return Round(self.H)


@dataclass(frozen=True)
class PostLocal:
    H: int
    switch_step: int

    def round_at(self, round_index: int, step: int, lr: float) -> Round:
        return Round(1 if step < self.switch_step else self.H)


@dataclass(frozen=True)
class QSR:
    H_base: int
    alpha: float

    def period(self, lr: float) -> int:
        """H = max(H_base, floor((alpha / lr)^2)) (Gu et al. 2024): `sde.QSR.local_steps`, the one rounding rule."""
        if lr <= 0:
            return 2 ** 62  # a zero rate never synchronizes again; the trainer clips to the end
        return qsr_local_steps(lr, self.alpha, self.H_base)

    def round_at(self, round_index: int, step: int, lr: float) -> Round:
        return Round(self.period(lr))


@dataclass(frozen=True)
class Hierarchical:
    H1: int
    H2: int

    def round_at(self, round_index: int, step: int, lr: float) -> Round:
        return Round(self.H1, is_global=(round_index + 1) % self.H2 == 0)


def build_sync_schedule(cfg: TrainConfig, *, steps_per_epoch: int):
    """The synchronization schedule `cfg` describes."""
    if cfg.sync == "constant":
        return ConstantH(cfg.local_steps)
    if cfg.sync == "post-local":
        return PostLocal(cfg.local_steps, round(cfg.switch_epoch * steps_per_epoch))
    if cfg.sync == "qsr":
        return QSR(cfg.local_steps, cfg.qsr_alpha)
    if cfg.sync == "hierarchical":
        return Hierarchical(cfg.local_steps, cfg.global_rounds)
    raise ValueError(f"unknown sync {cfg.sync!r}")


def plan_rounds(sync, lr: LRSchedule, total_steps: int, *, start_round: int = 0,
                start_step: int = 0):
    """Yield (round_index, first_step, Round) until `total_steps`; the last round is clipped."""
    r, step = start_round, start_step
    while step < total_steps:
        rnd = sync.round_at(r, step, lr(step))
        steps = min(rnd.steps, total_steps - step)
        # a clipped last round still ends with a global averaging so the final model is one
        yield r, step, Round(steps, rnd.is_global or step + steps == total_steps)
        r, step = r + 1, step + steps
