"""Benchmark scripts: the toolkit beside its peers, ratios measured in one run (BENCHMARKS.md, `collect`)."""
from __future__ import annotations

import json
from pathlib import Path


def write_result(path: Path, data, text: str) -> None:
    """path.json (data as JSON) and path.md (text), each written atomically, folders made as needed."""
    from experiments.metrics import atomic_write_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(data, indent=1) + "\n").encode())
    atomic_write_bytes(path.with_suffix(".md"), (text + "\n").encode())
