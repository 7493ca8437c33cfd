"""Sharpness of a saved model: top Hessian eigenvalue and Hessian trace of the training loss.

    python -m experiments.probe RUN/final.pt [--samples 256] [--matvecs 20] [--seed 0]

accepts a `final.pt` (averaged parameters with re-estimated BatchNorm statistics) or a full
checkpoint (`checkpoints/last.pt`: the mean of all workers' parameters and buffers) and prints
one JSON object. The loss is the mean cross-entropy over the first `samples` training images
of the run's data set, clean labels, no augmentation, network in eval mode (running BN
statistics: `dynamics.Objective(bn="eval")`). The trainer calls the same functions when it
tracks sharpness, so the numbers agree.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from experiments.config import TrainConfig


def sharpness_data(cfg: TrainConfig, train_set, samples: int | None = None) -> list:
    """The fixed probe data: the first `samples` (default cfg.sharpness_samples) training
    images, clean labels, no augmentation, in chunks of cfg.eval_batch."""
    n = min(samples or cfg.sharpness_samples, len(train_set))
    return [train_set.batch(chunk, augment=False) for chunk in torch.split(torch.arange(n), cfg.eval_batch)]


def measure_sharpness(model: nn.Module, data: list, *, matvecs: int, seed: int) -> dict:
    """{"top_eigenvalue", "hessian_trace", "hessian_trace_stderr"} of the mean cross-entropy
    on `data` at the model's parameters (eval-mode normalization). `matvecs` Hessian-vector
    products are spent on each of the two estimates; random vectors come from `seed`."""
    from dynamics import Objective, hessian_trace, top_eigenpairs
    obj = Objective(model, nn.CrossEntropyLoss(), data, bn="eval")
    eig = top_eigenpairs(obj, k=1, tol=1e-4, max_matvecs=max(matvecs, 3),
                         generator=torch.Generator().manual_seed(seed))
    tr = hessian_trace(obj, num_matvecs=max(matvecs, 4), generator=torch.Generator().manual_seed(seed + 1))
    return {"top_eigenvalue": float(eig.values[0]), "hessian_trace": tr.value,
            "hessian_trace_stderr": tr.stderr}


def load_model(path: str, *, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, TrainConfig]:
    """The network saved in a final.pt or a checkpoint, with the config that trained it."""
    from experiments.checkpoint import FORMAT as CKPT_FORMAT
    from experiments.trainer import FINAL_FORMAT, build_network, dtypes
    from experiments.workers import Workers
    state = torch.load(path, map_location="cpu", weights_only=False)
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt not in (FINAL_FORMAT, CKPT_FORMAT):
        raise ValueError(f"{path} is neither a final.pt ({FINAL_FORMAT}) nor a checkpoint ({CKPT_FORMAT})")
    cfg = TrainConfig.from_dict(state["config"])
    dtype, _ = dtypes(cfg)
    model = build_network(cfg, device, dtype)
    if fmt == FINAL_FORMAT:
        model.load_state_dict(state["state_dict"])
    else:
        w = Workers(model, 1, backend="serial")
        mean = w.mean_state(state["params"].mean(0).to(device, dtype),
                            state["buffers"].to(torch.float64).mean(0).to(device, w.buffers.dtype))
        model.load_state_dict(mean)
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
    parser = argparse.ArgumentParser(prog="python -m experiments.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a final.pt or checkpoints/last.pt")
    parser.add_argument("--samples", type=int, default=None, help="training images (default: the run's sharpness_samples)")
    parser.add_argument("--matvecs", type=int, default=None, help="Hessian-vector products per estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder if it moved since training")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.checkpoint, samples=args.samples, matvecs=args.matvecs, seed=args.seed,
                           data_dir=args.data_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
