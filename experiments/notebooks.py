"""Execute the project's notebooks with a real Jupyter kernel (CI's quick mode), and promote figures.

Notebooks read `LOCALSGD_QUICK` in their first (parameters) cell: "1" runs a small version in
minutes (CI), "0" the full version. Both write their figures under the git-ignored runs/
(`figures_dir`: runs/figures-quick or runs/figures), as `make demo` writes runs/demo; nothing
rewrites a tracked file until `make figures` (`promote_figures`) copies them into figures/ with
their provenance (figures/provenance.json: date, git revision, command per source). Notebooks are
committed with outputs stripped; `strip_outputs` does that and `has_outputs` lets a test check it.

    python -m experiments.notebooks [--full] [NOTEBOOK ...]
    python -m experiments.notebooks --promote          # = make figures
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
REPO_DIR = NOTEBOOKS_DIR.parent
RUNS_DIR = REPO_DIR / "runs"
QUICK_ENV = "LOCALSGD_QUICK"
PROVENANCE_NAME = "provenance.json"


def figures_dir(quick: bool) -> Path:
    """Where notebooks write figures: runs/figures (full mode, what `make figures` promotes) or
    runs/figures-quick (quick mode, never promoted). Both git-ignored."""
    return RUNS_DIR / ("figures-quick" if quick else "figures")


def _write_json(payload: dict, path: Path) -> None:
    import json
    from experiments.metrics import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict:
    import json
    return json.loads(path.read_text()) if path.exists() else {}


def record_provenance(folder: Path, source: str, figures: list[str], **extra) -> None:
    """Add (or replace) `source`'s entry in folder/provenance.json: figures, date, git revision, extra."""
    import datetime
    from experiments.metrics import git_revision
    book = _read_json(folder / PROVENANCE_NAME)
    book[source] = {"figures": sorted(figures), "git_revision": git_revision(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
    _write_json(book, folder / PROVENANCE_NAME)


def _machine_paths(obj, where: str = "") -> list[str]:
    """Strings in a JSON object that look like absolute or temporary paths (never promoted)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _machine_paths(v, f"{where}/{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _machine_paths(v, f"{where}[{i}]")]
    if isinstance(obj, str) and (obj.startswith(("/", "~")) or "/tmp/" in obj or "../" in obj):
        return [f"{where} = {obj!r}"]
    return []


def promote_figures(sources: list[Path] | None = None, dest: Path | None = None) -> list[Path]:
    """Copy the figures recorded in each source folder's provenance.json (default runs/figures and
    runs/demo) into `dest` (default figures/), merge their provenance into dest/provenance.json and
    return the copied paths. demo_results.json travels with the demo figures; ValueError (before any
    copy) if it holds a machine path, or if a source has no provenance.json or misses a listed file."""
    from experiments.metrics import atomic_write_bytes
    from experiments.plotstyle import FIGURES_DIR
    sources = sources if sources is not None else [figures_dir(False), RUNS_DIR / "demo"]
    dest = Path(dest) if dest is not None else FIGURES_DIR
    plan, book = [], _read_json(dest / PROVENANCE_NAME)
    for folder in map(Path, sources):
        records = _read_json(folder / PROVENANCE_NAME)
        if not records:
            raise ValueError(f"{folder} has no {PROVENANCE_NAME}: run the notebooks with --full or `make demo` first")
        for source, record in records.items():
            if record.get("quick"):
                raise ValueError(f"{folder}: {source} ran in quick mode; quick results are never promoted")
            for name in record["figures"]:
                path = folder / name
                if not path.is_file():
                    raise ValueError(f"{path} is listed in {folder / PROVENANCE_NAME} but missing")
                if path.suffix == ".json":
                    bad = _machine_paths(_read_json(path))
                    if bad:
                        raise ValueError(f"{path} holds machine paths, not promoted: {bad[:3]}")
                plan.append(path)
            book[source] = record
    dest.mkdir(parents=True, exist_ok=True)
    for path in plan:
        atomic_write_bytes(dest / path.name, path.read_bytes())
    _write_json(book, dest / PROVENANCE_NAME)
    return [dest / p.name for p in plan]


def notebook_paths() -> list[Path]:
    """The project's notebooks, in order (notebooks/NN_name.ipynb)."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def execute_notebook(path: str | os.PathLike, *, quick: bool = True, timeout: int = 900,
                     save_to: str | os.PathLike | None = None):
    """Run every cell of `path` in a fresh kernel (cwd = notebooks/); raise on any cell error.

    Returns the executed notebook node. With `save_to`, the executed notebook (with outputs)
    is written there; the source notebook is never modified.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    previous = os.environ.get(QUICK_ENV)
    os.environ[QUICK_ENV] = "1" if quick else "0"
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        if previous is None:
            os.environ.pop(QUICK_ENV, None)
        else:
            os.environ[QUICK_ENV] = previous
    if save_to is not None:
        nbformat.write(nb, save_to)
    return nb


def has_outputs(path: str | os.PathLike) -> bool:
    """True if any code cell of the notebook carries outputs or an execution count."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return any(c.cell_type == "code" and (c.outputs or c.execution_count) for c in nb.cells)


def strip_outputs(path: str | os.PathLike) -> None:
    """Remove outputs and execution counts in place (what is committed)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="paths (default: every notebook)")
    parser.add_argument("--full", action="store_true", help="full mode (figures to runs/figures, see --promote)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    parser.add_argument("--promote", action="store_true",
                        help="copy runs/figures and runs/demo into figures/ with provenance (make figures)")
    args = parser.parse_args(argv)
    if args.promote:
        copied = promote_figures()
        print(f"promoted {len(copied)} files into figures/ (provenance in figures/{PROVENANCE_NAME})")
        return 0
    for path in [Path(p) for p in args.notebooks] or notebook_paths():
        start = time.time()
        print(f"running {path.name} ({'full' if args.full else 'quick'} mode) ...", flush=True)
        folder = figures_dir(quick=not args.full)
        before = {p.name: p.stat().st_mtime for p in folder.glob("*")} if folder.is_dir() else {}
        execute_notebook(path, quick=not args.full, timeout=args.timeout)
        written = [p.name for p in folder.glob("*") if p.name != PROVENANCE_NAME
                   and before.get(p.name) != p.stat().st_mtime] if folder.is_dir() else []
        if written:
            record_provenance(folder, path.name, written, command=f"python -m experiments.notebooks"
                              f"{' --full' if args.full else ''} notebooks/{path.name}")
        print(f"  done in {time.time() - start:.0f} s ({len(written)} figure files in {folder})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
