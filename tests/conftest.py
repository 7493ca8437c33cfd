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
    """Folder holding the real CIFAR-10 (CIFAR10_DIR, else ../shared/data, else ./data)."""
    candidates = [os.environ.get("CIFAR10_DIR"), REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "data"]
    for c in candidates:
        if c and (Path(c) / "cifar-10-binary.tar.gz").exists() or (c and (Path(c) / "cifar-10-batches-bin").is_dir()):
            return Path(c)
    raise FileNotFoundError(
        "the real CIFAR-10 was not found: set CIFAR10_DIR to a folder holding "
        "cifar-10-binary.tar.gz or cifar-10-batches-bin/ (see README.md, 'Data')")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    return cifar10_root()
