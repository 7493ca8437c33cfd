"""Training side of the toolkit: CIFAR-10 files (`experiments.data`), the device-resident data
set with augmentation and label noise (`experiments.datasets`), per-worker samplers
(`experiments.sampling`), networks (`experiments.models`) and the Local SGD trainer.

Submodules are imported explicitly (``from experiments.data import load_cifar10``); this file
imports nothing heavy.
"""

# The public surface is the submodules themselves (none is imported here, so `import experiments`
# stays cheap; `from experiments import *` imports them all).
__all__ = [
    "averaging", "checkpoint", "cli", "compare", "comparison", "config", "convergence",
    "data", "datasets", "demo", "distributed", "divergence", "metrics", "models", "notebooks",
    "plotstyle", "probe", "sampling", "schedules", "sharpness", "study", "tracking", "train", "trainer",
    "workers",
]
