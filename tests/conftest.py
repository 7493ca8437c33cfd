"""Shared test set-up: deterministic threads, float64 helpers and the real CIFAR-10 location."""
import os
from pathlib import Path

import pytest
import torch

# Two shared cores: one torch thread per process avoids the 30-60x slow-downs of oversubscribed
# small convolutions (DESIGN.md, environment facts) and makes timings of CPU runs repeatable.
torch.set_num_threads(int(os.environ.get("TOOLKIT_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]


def cifar10_root() -> Path:
    """Folder holding the real CIFAR-10: `experiments.data.resolve_cifar10_dir(search=True)` (its
    docstring has the order), made absolute."""
    from experiments.data import BINARY_DIR, BINARY_TAR, resolve_cifar10_dir
    root = resolve_cifar10_dir(search=True).resolve()
    if (root / BINARY_TAR).exists() or (root / BINARY_DIR).is_dir():
        return root
    raise FileNotFoundError(
        f"the real CIFAR-10 was not found (looked in {root}): set CIFAR10_DIR to a folder holding "
        "cifar-10-binary.tar.gz or cifar-10-batches-bin/ (see README.md, 'Data')")


# Export the folder found, so a bare `pytest` and `make test` see the same data everywhere: notebook
# kernels (tests/notebooks) and subprocesses inherit the environment, not this process's search.
try:
    os.environ.setdefault("CIFAR10_DIR", str(cifar10_root()))
except FileNotFoundError:
    pass        # tests that need the data fail with the message above when they ask for it


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    return cifar10_root()
