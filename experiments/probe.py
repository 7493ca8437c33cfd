"""Sharpness of a saved model: top Hessian eigenvalue and Hessian trace of the training loss.

    python -m experiments.probe RUN/final.pt [--samples 256] [--matvecs 20] [--seed 0]
    python -m experiments.probe weights.pt --model mymodels:build --image-size 16 [--data-dir D]

accepts a `final.pt` (averaged parameters with re-estimated BatchNorm statistics), a full
checkpoint (`checkpoints/last.pt`: the mean of all workers' parameters and buffers) or a run
folder (its final.pt, else its checkpoint) and prints one JSON object. Files are read with
`experiments.checkpoint.load_verified` (SHA-256 checked, no code executed); a bad path or file
is one error line (exit 2 / 3, `experiments.cli`). The loss is the mean cross-entropy over the first `samples` training images
of the run's data set, clean labels, no augmentation, network in eval mode (running BN
statistics: `dynamics.Objective(bn="eval")`). The trainer calls the same functions when it
tracks sharpness, so the numbers agree.

With `--model module:function` (a function importable from the current directory that returns an
`nn.Module`; called with `image_size=` when it takes that argument) the file is a plain `state_dict`
written by any tool: it is read with `torch.load(weights_only=True)` (no code executed), a mismatch
of keys or shapes is one error line, and the data are the first `samples` (default 256) CIFAR-10
training images at `--image-size`, normalized per channel, clean labels, in the network's dtype.
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

__all__ = ["load_model", "probe", "main", "resolve_model_file", "measure_sharpness", "sharpness_data",
           "import_model_factory", "build_from_factory", "load_state_dict_file", "probe_state_dict"]


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


def import_model_factory(spec: str):
    """The function named by "module:function", imported with the current directory on the path.
    ValueError (one line) when the form is wrong, the module does not import or lacks the function."""
    import importlib
    module_name, sep, func_name = str(spec).partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--model {spec!r}: expected module:function (a function returning an nn.Module)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise ValueError(f"--model {spec!r}: module {module_name!r} does not import "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: module {module_name!r} has no function {func_name!r}")
    return factory


def build_from_factory(factory, *, image_size: int, seed: int = 0) -> nn.Module:
    """factory(image_size=...) when it takes that argument, else factory(), with torch's global
    generator seeded by `seed` for the call and restored after (a reproducible initialization)."""
    import inspect
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_size = "image_size" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(image_size=image_size) if takes_size else factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a plain state_dict file into `model` (weights_only: no code executed), the model moved to
    the file's floating dtype when it has one. ValueError naming
    the missing / unexpected keys or the first shape mismatch; CheckpointFileError for an unreadable file."""
    from experiments.checkpoint import CheckpointFileError
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a file we cannot read is a bad file
        raise CheckpointFileError(f"{file} is not a readable state_dict "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFileError(f"{file} does not hold a state_dict (a dict of tensors)")
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) == 1:
        model.to(floats.pop())            # the weights as saved (a float64 file into a float32 factory stays float64)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{file} does not fit the model: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise ValueError(f"{file} does not fit the model: {key} has shape {tuple(state[key].shape)} "
                             f"in the file, {tuple(value.shape)} in the model")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def probe_state_dict(path: str, model_spec: str, *, image_size: int = 32, samples: int | None = None,
                     matvecs: int | None = None, seed: int = 0, data_dir: str | None = None) -> dict:
    """Sharpness of a plain state_dict loaded into `model_spec`'s network (see the module docstring)."""
    import torch.nn.functional as F
    from experiments.data import load_cifar10, normalize, resolve_cifar10_dir
    if 32 % image_size:
        raise ValueError(f"--image-size must divide 32, got {image_size}")
    model = build_from_factory(import_model_factory(model_spec), image_size=image_size, seed=seed)
    load_state_dict_file(model, path)
    dtype = next(model.parameters()).dtype
    images, labels = load_cifar10(resolve_cifar10_dir(data_dir, search=True), "train")
    n = min(samples or 256, len(labels))
    x = normalize(images[:n], dtype=dtype)
    if image_size != 32:
        x = F.avg_pool2d(x, 32 // image_size)
    data = [(xb, yb) for xb, yb in zip(x.split(256), labels[:n].split(256))]
    result = measure_sharpness(model.eval(), data, matvecs=matvecs or 20, seed=seed)
    return {"path": str(path), "model": model_spec, "samples": n, **result}


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
    parser.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                        help="read CHECKPOINT as a plain state_dict of this function's network")
    parser.add_argument("--image-size", type=int, default=32, help="image side for --model (divides 32)")
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
        if args.model is not None:
            result = probe_state_dict(args.checkpoint, args.model, image_size=args.image_size,
                                      samples=args.samples, matvecs=args.matvecs, seed=args.seed,
                                      data_dir=args.data_dir)
        else:
            result = probe(args.checkpoint, samples=args.samples, matvecs=args.matvecs, seed=args.seed,
                           data_dir=args.data_dir)
    for w in caught:
        if issubclass(w.category, UnverifiedFileWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
