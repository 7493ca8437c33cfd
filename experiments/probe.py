"""Sharpness of a saved model: top Hessian eigenvalue and Hessian trace of the training loss.

    python -m experiments.probe RUN/final.pt [--samples 256] [--matvecs 20] [--seed 0]

accepts a `final.pt` (averaged parameters with re-estimated BatchNorm statistics), a full
checkpoint (`checkpoints/last.pt`: the mean of all workers' parameters and buffers) or a run
folder (its final.pt, else its checkpoint) and prints one JSON object. Files are read with
`experiments.checkpoint.load_verified` (SHA-256 checked, no code executed); a bad path or file
is one error line (exit 2 / 3, `experiments.cli`). The loss is the mean cross-entropy over the first `samples` training images
of the run's data set, clean labels, no augmentation, network in eval mode (running BN
statistics: `dynamics.Objective(bn="eval")`). The trainer calls the same functions when it
tracks sharpness, so the numbers agree.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from experiments.cli import ArgumentParser, run_main
from experiments.config import TrainConfig
from experiments.tracking import measure_sharpness, sharpness_data

__all__ = ["load_model", "probe", "main", "resolve_model_file", "measure_sharpness", "sharpness_data"]


def resolve_model_file(path: str | os.PathLike) -> Path:
    """`path` itself, or for a run folder its final.pt, else its checkpoints/last.pt."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "final.pt", p / "checkpoints" / "last.pt", p / "last.pt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{p} is a folder without final.pt or checkpoints/last.pt")
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def load_model(path: str, *, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, TrainConfig]:
    """The network saved in a final.pt or a checkpoint (or a run folder's), with the config
    that trained it. The SHA-256 is verified; a final.pt-format file without one (e.g. written
    by other tools) loads tensors-only with an `UnverifiedFileWarning`."""
    from experiments.checkpoint import FINAL_FORMAT, FORMAT as CKPT_FORMAT, CheckpointFileError, load_verified
    from experiments.trainer import build_network, dtypes
    from experiments.workers import Workers
    file = resolve_model_file(path)
    try:
        state = load_verified(file, formats=(FINAL_FORMAT, CKPT_FORMAT), require_digest=True)
    except CheckpointFileError as exc:
        if "carries no SHA-256" not in str(exc):
            raise
        state = load_verified(file, formats=(FINAL_FORMAT,), require_digest=False)
    fmt = state["format"]
    try:
        cfg = TrainConfig.from_dict(state["config"])
        dtype, _ = dtypes(cfg)
        model = build_network(cfg, device, dtype)
        if fmt == FINAL_FORMAT:
            model.load_state_dict(state["state_dict"])
        else:
            w = Workers(model, 1, backend="serial", channels_last=cfg.channels_last)  # its row layout
            mean = w.mean_state(state["params"].mean(0).to(device, dtype),
                                state["buffers"].to(torch.float64).mean(0).to(device, w.buffers.dtype))
            model.load_state_dict(mean)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointFileError(f"{file} does not hold a network of its config "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.eval(), cfg


def probe(path: str, *, samples: int | None = None, matvecs: int | None = None, seed: int = 0,
          data_dir: str | None = None) -> dict:
    """Sharpness of the model saved at `path` (see the module docstring)."""
    from experiments.trainer import dtypes, load_datasets
    model, cfg = load_model(path)
    if data_dir:
        cfg = cfg.replace(data_dir=data_dir)
    train_set, _ = load_datasets(cfg, torch.device("cpu"), dtypes(cfg)[0])
    data = sharpness_data(cfg, train_set, samples)
    result = measure_sharpness(model, data, matvecs=matvecs or cfg.sharpness_matvecs, seed=seed)
    return {"path": str(path), "samples": sum(len(y) for _, y in data), **result}


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (experiments.cli)."""
    return run_main(lambda: _main(argv), argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m experiments.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a final.pt, a checkpoints/last.pt or a run folder")
    parser.add_argument("--samples", type=int, default=None, help="training images (default: the run's sharpness_samples)")
    parser.add_argument("--matvecs", type=int, default=None, help="Hessian-vector products per estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder if it moved since training")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.matvecs is not None and args.matvecs < 2:
        raise ValueError(f"--matvecs must be >= 2, got {args.matvecs}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    import warnings
    from experiments.checkpoint import UnverifiedFileWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedFileWarning)
        result = probe(args.checkpoint, samples=args.samples, matvecs=args.matvecs, seed=args.seed,
                       data_dir=args.data_dir)
    for w in caught:
        if issubclass(w.category, UnverifiedFileWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
