"""The one figure style of the toolkit: notebooks and scripts draw with these helpers.

- `apply_style()` sets a small, print-friendly matplotlib style (no global state is touched
  until it is called).
- `band(ax, t, samples)` draws the mean over seeds with a +/- 1 std band: every stochastic
  quantity in a figure is shown with its spread over seeds.
- `save_figure(fig, name, folder)` writes `name.png` and `name.pdf` atomically and refuses a
  figure whose axes lack labels, so every committed figure states what it shows and in which
  units (slow time t = eta^2 x steps per worker: `SLOW_TIME_LABEL`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

SLOW_TIME_LABEL = r"slow time $t = \eta^2 \times$ steps per worker"
FIGURES_DIR = Path(__file__).resolve().parents[1] / "figures"

_STYLE = {
    "figure.figsize": (5.5, 3.6),
    "figure.dpi": 110,
    "savefig.dpi": 160,
    "savefig.bbox": "tight",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "font.size": 10,
    "axes.titlesize": 10,
    "lines.linewidth": 1.6,
}


def apply_style() -> None:
    """Set the toolkit's matplotlib style (rcParams) and the non-interactive-safe defaults."""
    import matplotlib as mpl

    mpl.rcParams.update(_STYLE)


def band(ax, t: Sequence[float], samples, *, label: str | None = None, color=None, alpha: float = 0.25):
    """Plot mean over seeds +/- one standard deviation.

    Args:
        t: (T,) x values.
        samples: (n_seeds, T) array-like (torch or numpy); a single seed draws a line only.
    Returns the Line2D of the mean.
    """
    values = np.asarray(samples.detach().cpu() if hasattr(samples, "detach") else samples, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(t):
        raise ValueError(f"samples must have shape (n_seeds, {len(t)}), got {values.shape}")
    mean = values.mean(axis=0)
    (line,) = ax.plot(t, mean, label=label, color=color)
    if values.shape[0] > 1:
        std = values.std(axis=0, ddof=1)
        ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=alpha, linewidth=0)
    return line


def _check_labels(fig) -> None:
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.has_data():
            continue
        if not ax.get_xlabel() or not ax.get_ylabel():
            raise ValueError(f"axes {i} of the figure has no x or y label: every figure states "
                             "what it shows and its units")


def save_figure(fig, name: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """Write `folder/name.png` and `folder/name.pdf` atomically; return the two paths.

    `folder` defaults to the repository's figures/. A failure while drawing leaves any
    previous version of the files untouched.
    """
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"name must be a bare file stem like 'toy_drift', got {name!r}")
    _check_labels(fig)
    folder = Path(folder) if folder is not None else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        target = folder / f"{name}.{ext}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f".{ext}")
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; figures are for everyone to read
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(target)
    return written
