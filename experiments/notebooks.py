"""Execute the project's notebooks with a real Jupyter kernel (CI's quick mode, `make figures`).

Notebooks read `LOCALSGD_QUICK` in their first (parameters) cell: "1" runs a small version in
minutes (CI), "0" the full version that writes the committed figures. Notebooks are committed
with outputs stripped; `strip_outputs` does that and `has_outputs` lets a test check it.

    python -m experiments.notebooks [--full] [NOTEBOOK ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
QUICK_ENV = "LOCALSGD_QUICK"


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
    parser.add_argument("--full", action="store_true", help="full mode: regenerate the committed figures")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in [Path(p) for p in args.notebooks] or notebook_paths():
        start = time.time()
        print(f"running {path.name} ({'full' if args.full else 'quick'} mode) ...", flush=True)
        execute_notebook(path, quick=not args.full, timeout=args.timeout)
        print(f"  done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
