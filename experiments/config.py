"""The one frozen configuration of a Local SGD run, its validation and the named presets.

`TrainConfig` is built once at the entry point (`experiments.train`) from a preset plus
command-line overrides and then passed down read-only; nothing else reads the command line.
Every check that can be made without touching data runs in `__post_init__`, so a bad value
fails with a ValueError naming it before any model is built.

Units: `local_steps` (H) counts SGD steps of ONE worker; an epoch is `steps_per_epoch` such
steps (default: training-set size // total batch); `eval_every` and `checkpoint_every` count
steps and take effect at the first round boundary at or after each multiple.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields

MODELS = ("small_cnn", "mlp", "resnet20", "resnet32", "resnet56", "vgg16")
SYNCS = ("constant", "post-local", "qsr", "hierarchical")
LR_SCHEDULES = ("constant", "step", "cosine")
AVERAGE_POLICIES = ("average", "local", "reset")

# Fields that describe where and how a run executes, not what it computes: they may differ
# between a run and its resume (a checkpoint written by the serial backend resumes on vmap).
RUN_ONLY_FIELDS = frozenset({"out", "resume", "backend", "data_dir", "download", "device",
                             "dist_timeout", "progress", "eval_batch", "overwrite", "blowup_factor",
                             "dist_backend", "tf32", "deterministic", "compile"})
CIFAR10_SIZES = {"train": 50_000, "test": 10_000}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run. See the module docstring for units.

    Learning rate: the peak rate is `lr`, times K x B_loc / `lr_ref_batch` when
    `lr_scaling == "linear"` (Goyal et al.; Lin et al. 2020 use 0.1 per 128 samples scaled by
    K). Warm-up rises linearly from the unscaled `lr` (or 0 without scaling) over
    `warmup_epochs`; then "constant", "step" (times `decay_factor` at each fraction of the
    run in `decay_at`) or "cosine" (down to `min_lr`).

    Synchronization (`sync`): "constant" H = local_steps; "post-local" H = 1 before
    `switch_epoch`, local_steps after; "qsr" H_s = max(local_steps, floor((qsr_alpha/eta_s)^2))
    at the start of each round (Gu et al. 2024); "hierarchical" averages the workers of one
    process every local_steps steps and all workers every `global_rounds` such rounds.

    What an averaging does to each state: parameters are always averaged; `average_buffers`
    and `average_momentum` are each "average", "local" (kept per worker) or "reset".
    """
    # model
    model: str = "small_cnn"
    norm: str = "default"          # "default" (the model's) | "batch" | "group" | "none"
    width: int = 0                      # 0: the model's default width
    num_classes: int = 10
    # data
    data: str = "synthetic"             # "cifar10" | "synthetic"
    data_dir: str = ""
    download: bool = False
    train_size: int = 0                 # 0: the whole training set; else a class-balanced subset
    test_size: int = 0                  # 0: the whole test set
    synthetic_size: int = 512           # training images of the synthetic data set
    aug: bool = False
    label_noise: float = 0.0            # probability of flipping each drawn label
    replacement: bool = False
    partition: str = "iid"              # "iid" | "label_sorted"
    # workers and synchronization
    workers: int = 4
    local_batch: int = 32
    total_batch: int = 0                # if set, local_batch = total_batch / workers
    local_steps: int = 1                # H (H1 for hierarchical; H_base for qsr)
    sync: str = "constant"
    switch_epoch: float = 0.0           # post-local
    qsr_alpha: float = 0.0              # qsr
    global_rounds: int = 1              # hierarchical: H2
    average_buffers: str = "average"
    average_momentum: str = "local"
    # optimization
    lr: float = 0.1
    lr_scaling: str = "none"            # "none" | "linear"
    lr_ref_batch: int = 128
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    decay_at: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1
    min_lr: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    wd: float = 0.0
    wd_norm_bias: bool = False          # False: no weight decay on norm layers and biases
    # length, evaluation, checkpoints
    epochs: float = 1.0
    steps_per_epoch: int = 0            # 0: training-set size // total batch
    eval_every: int = 0                 # steps; 0: only at the end
    eval_batch: int = 500
    bn_batches: int = 10                # BN re-estimation batches before each evaluation
    checkpoint_every: int = 0           # steps; 0: only the final state
    track_sharpness: tuple[int, ...] = ()   # evaluation indices (0-based) at which to probe
    sharpness_samples: int = 256
    sharpness_matvecs: int = 20
    # execution
    seed: int = 0
    out: str = "runs/default"
    resume: str = ""
    overwrite: bool = False             # move a run already in `out` aside (never deleted)
    blowup_factor: float = 100.0        # divergence: loss or |theta| over this x round start (0: off)
    backend: str = "auto"               # "serial" | "vmap" | "auto"
    precision: str = "fp32"             # "fp32" | "bf16" (autocast) | "fp64"
    channels_last: bool = False
    compile: bool = False               # torch.compile the stacked (vmap) workers' forward pass
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    dist_backend: str = "auto"          # process group: "auto" (nccl on GPU, gloo on CPU) | "gloo" | "nccl"
    tf32: bool = False                  # GPU: allow TF32 matmuls / convolutions for fp32 (off: true fp32)
    deterministic: bool = False         # torch.use_deterministic_algorithms + no cuDNN benchmarking
    dist_timeout: float = 300.0         # seconds before a collective with a dead peer fails
    progress: bool = True

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid config: {msg}")

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        for f in fields(self):   # numpy scalars (a config computed with numpy) become plain values
            v = getattr(self, f.name)
            if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", None) == 0:
                object.__setattr__(self, f.name, v.item())
            elif isinstance(v, tuple) and any(hasattr(x, "dtype") for x in v):
                object.__setattr__(self, f.name, tuple(x.item() if hasattr(x, "item") else x for x in v))
        choice("model", MODELS)
        choice("norm", ("default", "batch", "group", "none"))
        choice("data", ("cifar10", "synthetic"))
        choice("sync", SYNCS)
        choice("lr_schedule", LR_SCHEDULES)
        choice("lr_scaling", ("none", "linear"))
        choice("average_buffers", AVERAGE_POLICIES)
        choice("average_momentum", AVERAGE_POLICIES)
        choice("partition", ("iid", "label_sorted"))
        choice("backend", ("serial", "vmap", "auto"))
        choice("precision", ("fp32", "bf16", "fp64"))
        choice("device", ("auto", "cpu", "cuda"))
        choice("dist_backend", ("auto", "gloo", "nccl"))
        if self.compile and self.backend == "serial":
            bad("compile applies to the stacked workers: use backend vmap or auto, not serial")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f"{f.name} must be a finite number, got {v}")
            if f.name == "decay_at" and any(not math.isfinite(x) for x in v):
                bad(f"{f.name} must hold finite numbers, got {v}")
        if not self.out:
            bad("out (the run folder) must not be empty")
        if self.resume and self.overwrite:
            bad("resume and overwrite exclude each other: --resume continues the run, "
                "--overwrite moves it aside and starts a new one")
        if self.blowup_factor != 0 and self.blowup_factor <= 1:
            bad(f"blowup_factor must be 0 (off) or > 1, got {self.blowup_factor}")
        if self.workers < 1:
            bad(f"workers (K) must be >= 1, got {self.workers}")
        if self.total_batch:
            if self.total_batch % self.workers:
                bad(f"total_batch {self.total_batch} is not divisible by workers K={self.workers}")
            # the total batch, when given, fixes the local batch
            object.__setattr__(self, "local_batch", self.total_batch // self.workers)
        if self.local_batch < 1:
            bad(f"local_batch must be >= 1, got {self.local_batch}")
        if self.local_steps < 1:
            bad(f"local_steps (H) must be >= 1, got {self.local_steps}")
        if self.global_rounds < 1:
            bad(f"global_rounds (H2) must be >= 1, got {self.global_rounds}")
        if not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr}")
        if self.sync == "qsr" and not self.qsr_alpha > 0:
            bad("sync='qsr' needs qsr_alpha > 0")
        if self.sync == "post-local" and self.switch_epoch < 0:
            bad(f"switch_epoch must be >= 0, got {self.switch_epoch}")
        for name in ("momentum", "label_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.nesterov and self.momentum == 0:
            bad("nesterov needs momentum > 0")
        for name in ("wd", "min_lr", "warmup_epochs"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.decay_factor <= 1:
            bad(f"decay_factor must be in (0, 1], got {self.decay_factor}")
        if any(not 0 < f < 1 for f in self.decay_at) or list(self.decay_at) != sorted(self.decay_at):
            bad(f"decay_at must be increasing fractions in (0, 1), got {self.decay_at}")
        if not self.epochs > 0:
            bad(f"epochs must be > 0, got {self.epochs}")
        if self.lr_schedule == "cosine" and self.min_lr > self.peak_lr:
            bad(f"min_lr {self.min_lr} is above the peak learning rate {self.peak_lr}: the cosine "
                "schedule would raise the rate")
        for name in ("steps_per_epoch", "eval_every", "checkpoint_every", "bn_batches", "width",
                     "train_size", "test_size"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_classes < 2:
            bad(f"num_classes must be >= 2, got {self.num_classes}")
        if self.data == "cifar10":
            if self.num_classes != 10:
                bad(f"CIFAR-10 has 10 classes, got num_classes={self.num_classes}")
            for name, split in (("train_size", "train"), ("test_size", "test")):
                if getattr(self, name) > CIFAR10_SIZES[split]:
                    bad(f"{name} {getattr(self, name)} exceeds the {CIFAR10_SIZES[split]:,} "
                        f"CIFAR-10 {split} images")
            if 0 < self.train_size < self.num_classes:
                bad(f"train_size {self.train_size} is below one image per class ({self.num_classes})")
        if self.synthetic_size < 1 or self.eval_batch < 1 or self.lr_ref_batch < 1:
            bad("synthetic_size, eval_batch and lr_ref_batch must be >= 1")
        if self.sharpness_samples < 1 or self.sharpness_matvecs < 2:
            bad("sharpness_samples must be >= 1 and sharpness_matvecs >= 2")
        if any(i < 0 for i in self.track_sharpness):
            bad(f"track_sharpness holds evaluation indices >= 0, got {self.track_sharpness}")
        if self.dist_timeout <= 0:
            bad(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")

    # -------------------------------------------------------------- derived values
    @property
    def batch(self) -> int:
        """Total batch B = K x B_loc."""
        return self.workers * self.local_batch

    @property
    def peak_lr(self) -> float:
        """`lr` after the scaling rule."""
        scale = self.batch / self.lr_ref_batch if self.lr_scaling == "linear" else 1.0
        return self.lr * scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of every field that changes what is computed (not RUN_ONLY_FIELDS)."""
        kept = {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_FIELDS}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=list).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "decay_at" in d:
            d["decay_at"] = tuple(d["decay_at"])
        if "track_sharpness" in d:
            d["track_sharpness"] = tuple(d["track_sharpness"])
        return cls(**d)


# The papers' settings (THEORY.md, "Facts from the papers' experiments") and CPU-scale variants.
# Every preset checkpoints during the run (the long ones every 20-64 epochs), so a crash loses
# at most that much.
PRESETS: dict[str, dict] = {
    # seconds on one CPU thread: synthetic data, a tiny CNN
    "cpu-tiny": dict(model="small_cnn", width=8, data="synthetic", synthetic_size=256, workers=4,
                     local_batch=16, local_steps=4, lr=0.05, epochs=8, bn_batches=4,
                     eval_every=8, eval_batch=256, checkpoint_every=8, out="runs/cpu-tiny"),
    # a few minutes on CPU: real CIFAR-10, 4096 training images
    "cpu-small": dict(model="small_cnn", data="cifar10", train_size=4096, test_size=2000,
                      workers=4, local_batch=32, local_steps=8, lr=0.05, momentum=0.9,
                      wd=5e-4, epochs=10, aug=True, bn_batches=10, eval_every=64,
                      checkpoint_every=64, out="runs/cpu-small"),
    "cpu-small-qsr": dict(model="small_cnn", data="cifar10", train_size=4096, test_size=2000,
                          workers=4, local_batch=32, local_steps=2, sync="qsr", qsr_alpha=0.2,
                          lr=0.1, lr_schedule="cosine", momentum=0.9, wd=5e-4, epochs=10,
                          aug=True, eval_every=64, checkpoint_every=64,
                          out="runs/cpu-small-qsr"),
    # Gu et al. 2023, Fig. 1(a): the Local SGD phase of a post-local run (from an SGD
    # checkpoint at epoch 250 in the paper), ResNet-56 + BN, K = 32, B_loc = 128, H = 600.
    "gu2023-fig1a-resnet56": dict(model="resnet56", norm="batch", data="cifar10", workers=32,
                                  local_batch=128, steps_per_epoch=12, lr=0.32, wd=5e-4,
                                  momentum=0.0, local_steps=600, aug=True, replacement=False,
                                  bn_batches=100, epochs=250, eval_every=120, checkpoint_every=600,
                                  out="runs/gu2023-fig1a"),
    # Gu et al. 2023, Fig. 7: flipped-label noise p = 0.1, sampling with replacement, no aug.
    "gu2023-labelnoise-resnet56-gn": dict(model="resnet56", norm="group", data="cifar10",
                                          workers=32, local_batch=128, lr=0.1, wd=5e-4,
                                          local_steps=384, label_noise=0.1, replacement=True,
                                          aug=False, epochs=1000, bn_batches=0, checkpoint_every=768,
                                          out="runs/gu2023-labelnoise-resnet56"),
    "gu2023-labelnoise-vgg16": dict(model="vgg16", norm="none", data="cifar10", workers=32,
                                    local_batch=128, lr=0.1, wd=0.0, local_steps=384,
                                    label_noise=0.1, replacement=True, aug=False, epochs=1000,
                                    bn_batches=0, checkpoint_every=768, out="runs/gu2023-labelnoise-vgg16"),
    # Lin et al. (ICLR 2020) ResNet-20 recipe with post-local SGD from epoch 150, H = 16.
    "lin2020-resnet20-postlocal": dict(model="resnet20", norm="batch", data="cifar10", workers=16,
                                       local_batch=128, lr=0.2, lr_scaling="linear",
                                       lr_ref_batch=128, warmup_epochs=5, lr_schedule="step",
                                       decay_at=(0.5, 0.75), momentum=0.9, nesterov=True,
                                       wd=1e-4, epochs=300, sync="post-local",
                                       switch_epoch=150, local_steps=16, aug=True,
                                       bn_batches=100, checkpoint_every=480, out="runs/lin2020-resnet20"),
}


def preset(name: str, **overrides) -> TrainConfig:
    """The named preset with `overrides` applied; unknown names raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})
