"""Command line of the Local SGD trainer.

    python -m experiments.train --preset cpu-tiny [--key value ...]
    torchrun --nproc_per_node=P -m experiments.train --preset NAME ...   (K / P workers each)

Every field of `experiments.config.TrainConfig` is a flag (underscores become dashes; booleans
take --flag / --no-flag; tuples take comma lists such as --decay-at 0.5,0.75). A preset gives
the starting values, flags override them, and the result is parsed ONCE here into the frozen
config that the trainer receives. Rank 0 alone prints (a progress bar and a fixed-width
metrics table) and writes files.

A folder that already holds a run is refused: continue it with --resume OUT (a larger --epochs
extends it) or start afresh with --overwrite (the old folder is renamed OUT.replaced-<time>).
SIGINT / SIGTERM stop after the current step with a resumable checkpoint (every rank under
torchrun); a second signal stops at once. Every failure is one line "error: ..." (--debug: the
traceback). Exit codes (experiments.cli): 2 bad input, 3 bad file (corrupt or foreign
checkpoint, corrupt data), 4 a peer failed, 5 diverged, 130 / 143 stopped by SIGINT / SIGTERM.
The refused inputs and their messages are listed in docs/bad_inputs.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import typing

from experiments.cli import ArgumentParser, run_main
from experiments.config import PRESETS, TrainConfig, preset

TABLE = [("round", "{:>6d}"), ("epoch", "{:>7.2f}"), ("lr", "{:>8.4f}"), ("H", "{:>5d}"),
         ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.4f}"), ("test_loss", "{:>9.4f}"),
         ("test_acc", "{:>8.4f}"), ("worker_spread", "{:>13.3e}")]


HELP = {
    "workers": "K, total simulated workers (split evenly over torchrun processes)",
    "local_batch": "B_loc, samples per worker per step",
    "total_batch": "B = K x B_loc; when set it fixes --local-batch (must be divisible by K)",
    "local_steps": "H local steps per round (H1 for hierarchical, H_base for qsr)",
    "sync": "constant | post-local | qsr | hierarchical",
    "switch_epoch": "post-local: epoch at which H switches from 1 to --local-steps",
    "qsr_alpha": "qsr: H_s = max(H_base, floor((alpha / lr_s)^2))",
    "global_rounds": "hierarchical: H2, rounds between averagings across processes",
    "average_buffers": "BN buffers at an averaging: average | local | reset",
    "average_momentum": "momentum at an averaging: local | average | reset",
    "steps_per_epoch": "0: training-set size // total batch",
    "eval_every": "evaluate at the first round end at or after every multiple of this many steps (0: at the end)",
    "checkpoint_every": "checkpoint likewise, in steps (0: only at the end)",
    "track_sharpness": "evaluation indices (0-based) at which to measure lambda_max and tr Hessian",
    "bn_batches": "training batches for re-estimating BN statistics before every evaluation",
    "resume": "a checkpoint file or a run folder holding checkpoints/last.pt (its SHA-256 is checked)",
    "overwrite": "the --out folder holds a run: move it aside to OUT.replaced-<time> and start afresh",
    "dist_backend": "torchrun process group: auto (nccl on GPU, gloo on CPU) | gloo (also lets ranks share a GPU) | nccl",
    "tf32": "on a GPU, allow TF32 for fp32 matmuls and convolutions (off: fp32 is true fp32)",
    "deterministic": "deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN autotuning)",
    "blowup_factor": "divergence when a step's loss or the parameter norm exceeds this x its round-start value (0: only non-finite values)",
    "epochs": "length of the run; with --resume a larger value extends the run: from the checkpoint's step on, the learning-rate schedule (cosine, step milestones) and the QSR periods are those of the new length",
    "backend": "serial | vmap | auto (fixed rule: serial on CPU, vmap on GPU or with --compile; the same in every rank; written to config.json)",
    "precision": "fp32 | bf16 (autocast of the forward pass, on a GPU or the CPU) | fp64",
    "compile": "torch.compile the stacked workers' forward pass (backend vmap; auto then picks vmap)",
    "channels_last": "channels-last layout for convolution inputs and weights",
    "label_noise": "probability of flipping each drawn label",
    "data_dir": "the CIFAR-10 folder (default: CIFAR10_DIR or a search), or a packed subset made by benchmarks/pack_cifar_subset.py (its SHA-256 manifest is checked)",
    "train_size": "0: the whole training set; else a class-balanced subset (first n // 10 of each class in record order, one more for the first n %% 10 classes)",
}


def _tuple_of(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.train",
                            description="Local SGD / post-local SGD / QSR on CIFAR-10 with K simulated workers.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default=None, help=f"starting values, one of {sorted(PRESETS)}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{HELP.get(f.name, '')} (default {f.default})")
        elif typing.get_origin(hint) is tuple:
            kind = typing.get_args(hint)[0]
            parser.add_argument(flag, type=_tuple_of(kind), default=None, metavar="A,B,...",
                                help=f"{HELP.get(f.name, 'comma list')} (default {','.join(map(str, f.default)) or 'empty'})")
        else:
            parser.add_argument(flag, type=hint, default=None, help=f"{HELP.get(f.name, '')} (default {f.default!r})")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The frozen config from a preset and command-line overrides (ValueError if invalid)."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop("preset")
    args.pop("debug")
    overrides = {k: v for k, v in args.items() if v is not None}
    return preset(name, **overrides) if name else TrainConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see `experiments.cli`)."""
    return run_main(lambda: _main(argv), argv)


class _SignalStop:
    """SIGINT / SIGTERM handler: before training, stop at once; during training, ask the
    trainer to stop after its current step with a checkpoint; a second signal stops at once."""

    def __init__(self):
        self.trainer = None
        self.saved = {}

    def __call__(self, signum, frame):
        from experiments.divergence import Interrupted
        name = signal.Signals(signum).name
        if self.trainer is None:
            raise Interrupted(f"stopped by {name} before training started; nothing was written",
                              signum=signum)
        if self.trainer.stop_signal is not None:
            raise Interrupted(f"stopped by a second {name} without a checkpoint; last checkpoint: "
                              f"{self.trainer.last_checkpoint or 'none'}", signum=signum)
        self.trainer.request_stop(signum)

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self)

    def restore(self):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    cfg = parse_config(argv)
    stopper = _SignalStop()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        stopper.install()
    bar = None
    try:
        from experiments.distributed import init_from_env
        from experiments.trainer import Trainer
        dist = init_from_env(device=cfg.device, timeout=cfg.dist_timeout, backend=cfg.dist_backend)
        try:
            show = dist.is_main and cfg.progress

            def on_round(r, step, total, lr, H):
                nonlocal bar
                if not show:
                    return
                if bar is None:
                    from tqdm import tqdm
                    bar = tqdm(total=total, initial=step - H, unit="step", leave=False, file=sys.stderr)
                bar.update(H)

            def on_eval(rec):
                line = "  ".join(fmt.format(getattr(rec, n)) for n, fmt in TABLE)
                if rec.top_eigenvalue is not None:
                    line += f"  lambda_max {rec.top_eigenvalue:.4g}  tr {rec.hessian_trace:.4g}"
                if show:
                    (bar.write if bar is not None else print)(line)

            trainer = Trainer(cfg, dist=dist, on_round=on_round, on_eval=on_eval)
            if show and trainer.moved_aside is not None:
                print(f"moved the previous run in {cfg.out} aside to {trainer.moved_aside}", flush=True)
            if show:
                print("  ".join(f"{n:>{len(fmt.format(0) if 'd' in fmt else fmt.format(0.0))}}"
                                for n, fmt in TABLE), flush=True)
            stopper.trainer = trainer
            result = trainer.run()
        finally:
            if bar is not None:
                bar.close()
            dist.close()
        if dist.is_main and cfg.progress:
            print(f"wrote {result.out} (backend {result.backend})", flush=True)
        return 0
    finally:
        if in_main_thread:
            stopper.restore()


if __name__ == "__main__":
    sys.exit(main())
