"""Files of a Local SGD run that hold tensors: full-state checkpoints and final networks,
written atomically, carrying a SHA-256 of their contents, read without running any code.

A checkpoint holds everything the run needs to continue bit for bit: every worker's
parameters, momentum and buffers (all K workers, gathered from every process, so a run can
resume on another number of processes), the per-worker generator states (augmentation and
label noise, as uint8 tensors), the round and step counters (the learning-rate and
synchronization schedules are pure functions of them, and the sampler of (seed, epoch); a
checkpoint written inside a round also records where that round began), the number of
evaluations written and the running training-loss sums. It also stores the config and its
fingerprint: resuming with a config that computes something else raises ValueError before any
training; only `epochs` may change (a resume may extend a run, see `check_resume_config`).

Integrity: every payload (a dict of tensors and plain Python values) gets a key "sha256", the
SHA-256 of a canonical serialization of everything else in it (`payload_digest`: keys sorted,
each tensor's dtype, shape and raw bytes). Every reader goes through `load_verified`, which
loads with `torch.load(weights_only=True)` (only tensors and plain containers: loading runs no
code) and recomputes the digest, so a truncated, flipped or foreign file fails with one
`CheckpointFileError` naming the file. The files stay ordinary `torch.save` files.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from experiments.config import RUN_ONLY_FIELDS, TrainConfig
from experiments.metrics import atomic_write_bytes

FORMAT = "localsgd-checkpoint-v2"
FINAL_FORMAT = "localsgd-final-v1"
LAST = "last.pt"
DIGEST_KEY = "sha256"
# fields a resume may change although they change what is computed (the schedules are then
# defined for the new length; `check_resume_config`)
EXTENSIBLE_FIELDS = frozenset({"epochs"})


class CheckpointFileError(ValueError):
    """A checkpoint or final.pt that cannot be used: unreadable, truncated, corrupt (its
    SHA-256 does not match), not a file of this toolkit, or of another config."""


class UnverifiedFileWarning(UserWarning):
    """A final.pt-format file without a SHA-256 (written by code that does not add one)."""


# ---------------------------------------------------------------------------- integrity
def _feed(h, value) -> None:
    """Feed a canonical serialization of `value` to the hash `h`."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, bool) or value is None:
        h.update(f"B{value}".encode())
    elif isinstance(value, int):
        h.update(f"I{value}".encode())
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        h.update(b"S" + struct.pack("<q", len(value)) + value.encode())
    else:
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint payload "
                        "(tensors, numbers, strings and dict/list/tuple only)")


def payload_digest(payload: dict) -> str:
    """Hex SHA-256 of everything in `payload` except its DIGEST_KEY."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _plain(value):
    """`value` with numpy scalars turned into Python numbers (so weights_only loading admits it)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:   # numpy scalar
        return value.item()
    return value


def save_payload(path: str | os.PathLike, payload: dict) -> Path:
    """torch.save `payload` (numpy scalars made plain) plus its SHA-256 (under "sha256") to
    `path`, atomically."""
    payload = _plain(payload)
    payload = {**payload, DIGEST_KEY: payload_digest(payload)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_verified(path: str | os.PathLike, *, formats: tuple[str, ...] | None = None,
                  require_digest: bool = True) -> dict:
    """The payload saved at `path` by `save_payload`, after checking it.

    Loads with weights_only=True (no code runs), then checks the format (one of `formats`,
    if given) and recomputes the SHA-256. Raises FileNotFoundError / IsADirectoryError for a
    missing path or a folder and `CheckpointFileError` (naming the file) for anything
    unreadable or failing its check. `require_digest=False` admits a file without any digest
    (with an `UnverifiedFileWarning`); a digest that is present is always checked.
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no such file: {file}")
    if file.is_dir():
        raise IsADirectoryError(f"{file} is a folder, not a checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointFileError(f"{file} is empty (0 bytes): not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError,
            zipfile.BadZipFile, AttributeError, TypeError, UnicodeDecodeError, struct.error) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        if len(first) < 8:
            first = f"{type(exc).__name__} {first}".strip()
        raise CheckpointFileError(f"{file} cannot be read as a checkpoint (truncated, corrupt or "
                                  f"not a torch file; or it holds objects other than tensors): {first}") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if formats is not None and fmt not in formats:
        raise CheckpointFileError(f"{file} is not a file of this trainer (format {fmt!r}; "
                                  f"expected {' or '.join(formats)})")
    stored = state.get(DIGEST_KEY) if isinstance(state, dict) else None
    if stored is None:
        if require_digest:
            raise CheckpointFileError(f"{file} carries no SHA-256 (written by an older version or "
                                      "another program): refusing to trust it")
        warnings.warn(f"{file} carries no SHA-256: loaded without an integrity check",
                      UnverifiedFileWarning, stacklevel=2)
        return state
    try:
        actual = payload_digest(state)
    except TypeError as exc:
        raise CheckpointFileError(f"{file} holds unexpected contents ({exc})") from None
    if actual != stored:
        raise CheckpointFileError(f"{file} failed its integrity check (SHA-256 of the contents "
                                  f"{actual[:12]}..., stored {str(stored)[:12]}...): the file is "
                                  "corrupt; do not use it")
    return state


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, state: dict, cfg: TrainConfig) -> Path:
    """Write `state` plus the config and its fingerprint to `path` atomically, with its SHA-256."""
    return save_payload(path, {"format": FORMAT, "config": cfg.to_dict(),
                               "fingerprint": cfg.fingerprint(), **state})


def save_final(path: str | os.PathLike, state_dict: dict, cfg: TrainConfig, **extra) -> Path:
    """A network in the final.pt format ({"format", "config", "state_dict", **extra}) with its
    SHA-256; `extra` holds plain values such as step and round."""
    return save_payload(path, {"format": FINAL_FORMAT, "config": cfg.to_dict(),
                               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                               **extra})


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder / its checkpoints/ folder holding last.pt."""
    p = Path(path)
    for candidate in (p, p / LAST, p / "checkpoints" / LAST):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {p} (looked for the file, {p / LAST} and "
                            f"{p / 'checkpoints' / LAST})")


def check_resume_config(state: dict, cfg: TrainConfig, file: Path) -> None:
    """Refuse (ValueError) a checkpoint written by a config that computes something else.

    Fields in RUN_ONLY_FIELDS may differ; `epochs` may differ too, as long as the new length is
    past the checkpoint's step (the learning-rate schedule and the QSR periods are then those of
    the new length from the checkpoint's step on)."""
    saved = state["config"]
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in RUN_ONLY_FIELDS and k not in EXTENSIBLE_FIELDS
                  and _norm(saved.get(k, now[k])) != _norm(now[k]))
    if diff:
        raise ValueError(f"cannot resume from {file}: it was written by a different config "
                         f"(fields that differ: {', '.join(diff)})")
    if state.get("fingerprint") == cfg.fingerprint() and saved.get("epochs") == cfg.epochs:
        return
    old = saved.get("epochs")
    if not isinstance(old, (int, float)) or not math.isfinite(old):
        raise ValueError(f"cannot resume from {file}: its config has no valid epochs")


def load_checkpoint(path: str | os.PathLike, cfg: TrainConfig | None = None) -> dict:
    """Read and verify a checkpoint (CPU tensors); with `cfg`, refuse one written by another
    config (`check_resume_config`). Raises FileNotFoundError or `CheckpointFileError`."""
    file = resolve_checkpoint(path)
    state = load_verified(file, formats=(FORMAT,))
    for key in ("config", "params", "step", "round"):
        if key not in state:
            raise CheckpointFileError(f"{file} lacks {key!r}: not a complete checkpoint")
    if cfg is not None:
        check_resume_config(state, cfg, file)
    return state


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
