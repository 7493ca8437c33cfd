"""Full-state checkpoints of a Local SGD run, written atomically, checked on resume.

A checkpoint holds everything the run needs to continue bit for bit: every worker's
parameters, momentum and buffers (all K workers, gathered from every process, so a run can
resume on another number of processes), the per-worker generator states (augmentation and
label noise), the round and step counters (the learning-rate and synchronization schedules
are pure functions of them, and the sampler of (seed, epoch)), the number of evaluations
written and the running training-loss sums. It also stores the config and its fingerprint:
resuming with a config that computes something else raises ValueError before any training.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from experiments.config import RUN_ONLY_FIELDS, TrainConfig
from experiments.metrics import atomic_write_bytes

FORMAT = "localsgd-checkpoint-v1"
LAST = "last.pt"


def save_checkpoint(path: str | os.PathLike, state: dict, cfg: TrainConfig) -> Path:
    """Write `state` plus the config and its fingerprint to `path` atomically."""
    payload = {"format": FORMAT, "config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), **state}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder / its checkpoints/ folder holding last.pt."""
    p = Path(path)
    for candidate in (p, p / LAST, p / "checkpoints" / LAST):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {p} (looked for the file, {p / LAST} and "
                            f"{p / 'checkpoints' / LAST})")


def load_checkpoint(path: str | os.PathLike, cfg: TrainConfig | None = None) -> dict:
    """Read a checkpoint (CPU tensors); with `cfg`, refuse one written by another config."""
    file = resolve_checkpoint(path)
    state = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{file} is not a Local SGD checkpoint ({FORMAT})")
    if cfg is not None and state["fingerprint"] != cfg.fingerprint():
        saved = state["config"]
        now = cfg.to_dict()
        diff = sorted(k for k in now if k not in RUN_ONLY_FIELDS and
                      _norm(saved.get(k)) != _norm(now[k]))
        raise ValueError(f"cannot resume from {file}: it was written by a different config "
                         f"(fields that differ: {', '.join(diff) or 'unknown'})")
    return state


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
