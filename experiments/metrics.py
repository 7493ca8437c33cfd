"""Result files of a run: atomic JSON writes, the metrics.jsonl log and provenance.

Every result carries its provenance (DESIGN.md): the full config, the git revision of the
code (with a "-dirty" suffix when the work tree has changes), the seed, the torch version,
the world size and the time it was written.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
TEMP_MARK = ".tmp-"   # temporary files of atomic writes are named ".NAME.tmp-XXXX"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file in `path`'s folder, then fsync and os.replace it to `path`, so a reader
    (or a crash) never sees a partial file; e.g. write=lambda f: torch.save(obj, f) streams a large object with no
    copy of it in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write_bytes` left in `folder` (the
    ".NAME.tmp-*" files; a process killed between write and rename cannot remove its own).
    Returns the paths removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for f in folder.glob(f".*{TEMP_MARK}*"):
            if f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def finite_or_none(value):
    """`value` with every NaN / inf float replaced by None, recursively through dicts, lists and
    tuples (for strict JSON: `json.dumps(..., allow_nan=False)`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n").encode())


def atomic_write_json_lines(path: str | os.PathLike, records) -> None:
    """Dicts, or lines already JSON-encoded (kept verbatim), as one JSON line each (non-finite -> null), atomically."""
    lines = [r if isinstance(r, str) else json.dumps(finite_or_none(r), sort_keys=True) for r in records]
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())


def git_revision(root: Path = ROOT) -> str:
    """`git rev-parse HEAD` of the code (+ "-dirty" if modified), or "unknown" outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config: dict, *, world_size: int = 1) -> dict:
    """The record written to config.json: config, git revision, seed and environment."""
    return {"config": config, "git_revision": git_revision(), "seed": config.get("seed"),
            "torch": torch.__version__, "python": platform.python_version(),
            "world_size": world_size,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per line, flushed and fsynced per record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, evaluations: int) -> None:
        """Keep only the first `evaluations` records (used on resume, so that records written
        after the checkpoint by the interrupted run are not duplicated)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)[:evaluations]
        atomic_write_bytes(self.path, "".join(lines).encode())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
