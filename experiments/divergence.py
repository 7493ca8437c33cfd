"""Watching a run for divergence every step without a host synchronization per step; the
exceptions that end a run early.

`DivergenceWatch.update` runs after every step and only queues device operations: it folds
into one flag (a device tensor) whether the step's losses or the parameter norm are non-finite
or have blown up by more than `factor` over their round-start values (loss: the first step's
mean loss of the round, at least ln C; parameters: the Euclidean norm of this process's
stacked workers at the round start), and the first step at which that happened. `tripped()`
is the cheap per-step question: on the CPU it reads the flag (no device to wait for); on a GPU
it looks at an asynchronous copy of the flag made one step earlier and never blocks, so a run
stops within a step or two of the first bad one. `verdict()` reads the flag once, blocking,
at the end of a round.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

NONFINITE_LOSS, NONFINITE_PARAMS, LOSS_BLOWUP, NORM_BLOWUP = 1, 2, 4, 8
REASONS = {NONFINITE_LOSS: "non-finite training loss",
           NONFINITE_PARAMS: "non-finite parameter norm",
           LOSS_BLOWUP: "training loss blew up",
           NORM_BLOWUP: "parameter norm blew up"}


class DivergenceError(RuntimeError):
    """Training produced a non-finite or blown-up loss or parameter, or a non-finite evaluation."""


class Interrupted(RuntimeError):
    """The run was stopped by a signal after writing a resumable checkpoint (`checkpoint`,
    None if no good state could be saved). `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, *, signum: int, checkpoint=None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def describe(reasons: int) -> str:
    return ", ".join(text for bit, text in REASONS.items() if reasons & bit) or "unknown"


class DivergenceWatch:
    """Per-step divergence flag on `device` (see the module docstring).

    factor: blow-up factor over the round-start loss and parameter norm; 0 checks only for
    non-finite values. num_classes: C, the floor ln C of the reference loss.
    """

    def __init__(self, device: torch.device, *, factor: float, num_classes: int):
        self.device, self.factor = torch.device(device), float(factor)
        self.loss_floor = math.log(max(num_classes, 2))
        self._async = self.device.type == "cuda"
        self._host = torch.zeros(1, dtype=torch.int64, pin_memory=self._async)
        self._event = None
        self.start_round(None)

    def start_round(self, params: Tensor | None) -> None:
        """Reset the flag; take the round-start parameter norm of `params` (K_loc, D)."""
        dev = self.device
        self.reasons = torch.zeros((), dtype=torch.int64, device=dev)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self.ref_norm = None if params is None else torch.linalg.vector_norm(params.detach()).to(torch.float64)
        self.ref_loss = None
        self._host.zero_()
        self._event = None

    def update(self, losses: Tensor, params: Tensor, step: int) -> None:
        """Fold step `step`'s losses (K_loc,) and the parameters after it into the flag."""
        losses = losses.detach().to(torch.float64)
        norm = torch.linalg.vector_norm(params.detach()).to(torch.float64)
        bits = (~torch.isfinite(losses).all()).long() * NONFINITE_LOSS
        bits = bits + (~torch.isfinite(norm)).long() * NONFINITE_PARAMS
        if self.factor > 0:
            if self.ref_loss is None:
                self.ref_loss = torch.clamp(torch.nan_to_num(losses.mean(), nan=0.0, posinf=0.0),
                                            min=self.loss_floor)
            bits = bits + (losses.max() > self.factor * self.ref_loss).long() * LOSS_BLOWUP
            if self.ref_norm is not None:
                bits = bits + (norm > self.factor * self.ref_norm).long() * NORM_BLOWUP
        self.first_bad = torch.where((bits > 0) & (self.first_bad < 0),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        self.reasons = self.reasons | bits
        if self._async:
            self._host.copy_(self.reasons.reshape(1), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def tripped(self) -> bool:
        """Whether a bad step is known now, without waiting for the device."""
        if not self._async:
            return bool(self.reasons)
        return self._event is not None and self._event.query() and bool(self._host[0])

    def verdict(self) -> tuple[int, int]:
        """(reason bits, first bad step or -1), read once (blocking)."""
        return int(self.reasons), int(self.first_bad)
