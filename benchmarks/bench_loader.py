"""Loader + augmentation cost as a share of one training step (run: python -m benchmarks.bench_loader).

Measured side by side in one process with 1 torch thread, batch 128, interleaved repeats:
- toolkit: `DeviceDataset.batch(indices, augment=True)` (gather, batched crop + flip,
  normalize) on the real CIFAR-10 training set (synthetic data if it is not found);
- peer: the usual per-sample pipeline, a `torch.utils.data.DataLoader` (num_workers=0) over a
  Dataset whose __getitem__ pads, crops, flips and normalizes one image (what torchvision's
  RandomCrop(32, padding=4) + RandomHorizontalFlip + Normalize do, minus PIL);
- one SGD training step (forward, cross-entropy, backward, update) of small_cnn and resnet20.
Target: toolkit loader under 5 % of a training step. Writes benchmarks/results/bench_loader.md.
"""
from __future__ import annotations

import datetime
import statistics
import time
from pathlib import Path

import torch

from experiments.data import load_cifar10, normalize, resolve_cifar10_dir
from experiments.datasets import DeviceDataset, synthetic_cifar
from experiments.models import build_model
from experiments.sampling import WorkerSampler

BATCH, REPEATS, THREADS = 128, 15, 1
RESULT = Path(__file__).resolve().parent / "results" / "bench_loader.md"


class _PerSampleAugmented(torch.utils.data.Dataset):
    """Peer pipeline: one image at a time, as torchvision transforms do."""

    def __init__(self, images, labels, generator):
        self.images, self.labels, self.g = images, labels, generator

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.nn.functional.pad(self.images[i], (4, 4, 4, 4))
        oy, ox = torch.randint(0, 9, (2,), generator=self.g).tolist()
        img = img[:, oy:oy + 32, ox:ox + 32]
        if torch.rand(1, generator=self.g).item() < 0.5:
            img = img.flip(-1)
        return normalize(img), self.labels[i]


def _load():
    try:
        return *load_cifar10(resolve_cifar10_dir(search=True), "train"), "real CIFAR-10 training set (50,000)"
    except (FileNotFoundError, ValueError):
        pass
    return *synthetic_cifar(50_000, seed=0), "synthetic_cifar (50,000; real data not found)"


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(THREADS)
    images, labels, source = _load()
    data = DeviceDataset(images, labels, device="cpu")
    sampler = WorkerSampler(len(labels), workers=1, local_batch=BATCH, replacement=False, generator_seed=0)
    steps = sampler.epoch(0)
    g = torch.Generator().manual_seed(0)
    peer = torch.utils.data.DataLoader(_PerSampleAugmented(images, labels, torch.Generator().manual_seed(0)),
                                       batch_size=BATCH, shuffle=True, num_workers=0,
                                       generator=torch.Generator().manual_seed(0))
    peer_iter = iter(peer)
    models = {name: build_model(name) for name in ("small_cnn", "resnet20")}
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
    x0, y0 = data.batch(steps[0, 0], augment=True, generator=g)

    def train_step(name):
        opts[name].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(models[name](x0), y0).backward()
        opts[name].step()

    times = {"toolkit": [], "peer": [], "small_cnn": [], "resnet20": []}
    for name in models:  # warm-up
        train_step(name)
    for r in range(REPEATS):
        times["toolkit"].append(_timed(lambda: data.batch(steps[r + 1, 0], augment=True, generator=g)))
        times["peer"].append(_timed(lambda: next(peer_iter)))
        for name in models:
            times[name].append(_timed(lambda: train_step(name)))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name in models:
        for loader in ("toolkit", "peer"):
            share = med[loader] / med[name]
            rows.append(f"| {loader} | {name} | {1e3 * med[loader]:.2f} | {1e3 * med[name]:.1f} | "
                        f"{100 * share:.2f} % | {'met' if share < 0.05 else 'not met'} |")
    speedup = med["peer"] / med["toolkit"]
    text = "\n".join([
        "# bench_loader: data loading + augmentation as a share of a training step",
        "",
        "What: time to produce one augmented, normalized batch of 128 (random crop with 4-pixel",
        "zero padding + horizontal flip) versus one SGD step (forward, cross-entropy, backward,",
        "update) at batch 128. Toolkit: `DeviceDataset.batch(..., augment=True)` (batched gather +",
        "crop/flip + normalize). Peer: per-sample pipeline in a `torch.utils.data.DataLoader`",
        "(num_workers=0), the torchvision-style transform done one image at a time.",
        "",
        f"Setting: {source}; CPU, torch {torch.__version__}, {THREADS} torch thread; medians of "
        f"{REPEATS} interleaved repeats (times noisy: 2 shared cores; the ratios are the result).",
        "",
        "| loader | model | loader ms | step ms | loader / step | target < 5 % |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Toolkit loader is {speedup:.1f}x faster than the per-sample peer.",
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `python -m benchmarks.bench_loader`.",
        "",
    ])
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
