"""The sharpness a run tracks: top Hessian eigenvalue and Hessian trace of the training loss on
a fixed clean subset. Shared by the trainer (`track_sharpness`) and the probe command line
(`experiments.probe`), so the numbers agree; kept apart from both so neither imports the other
at this level.
"""
from __future__ import annotations

import torch
from torch import nn

from experiments.config import TrainConfig

__all__ = ["sharpness_data", "measure_sharpness"]


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
