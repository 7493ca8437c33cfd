"""Hessian trace at equal matvecs: `dynamics.hessian_trace` against pyhessian's Hutchinson, side by side.

    python -m benchmarks.bench_trace [--images 256] [--budgets 12,48] [--checkpoint PATH]
                                     [--small-checkpoint PATH] [--repeats 10] [--small-images 64]
                                     [--models initialization,trained] [--out FILE]

Cost: about 12 CPU minutes for section 1 at budgets 12,48 (each ResNet-20 matvec over 256
images ~3.3 CPU s) plus ~0.5 CPU min per seed of section 2, plus the training when no
checkpoints are given; on the shared 2 cores the wall time was about twice the CPU time.

One process, 1 torch thread, float32, real CIFAR-10 (the first N training images,
`experiments.data.normalize`d, one batch), cross-entropy, BatchNorm in eval mode for both tools
(pyhessian puts the model in eval mode; `Objective(bn="eval")` sees the same function).

1. ResNet-20 (`build_model("resnet20")`) at (a) its seed-0 initialization, BatchNorm running
   statistics set from the images, and (b) a TRAINED checkpoint (`--checkpoint`, a `final.pt` of
   `python -m experiments.train`; without it one is trained into a temporary folder with
   TRAIN_ARGS below, ~7 min on a shared core). For each budget M: the toolkit's default
   `hessian_trace(obj, num_matvecs=M)` ("krylov": M/2 Lanczos steps deflate, M/2 probes on the
   residual) against pyhessian `hessian(...).trace(maxIter=M_max, tol=-inf)` (tol=-inf: never stop
   early; pyhessian's own stop rule divides by the running mean, so tol=0 stops at once when that
   mean is negative). pyhessian draws its Rademacher probes one after another from the global
   generator, so its first M samples are exactly what `trace(maxIter=M)` returns: one run of
   M_max matvecs serves every budget. Reported: stderr ratio toolkit / pyhessian (target <= 0.5).
2. Are the standard errors honest? The same comparison repeated over `--repeats` seeds on a
   small trained CNN (`small_cnn`, width 8, D = 6,418) where repeats are cheap: the spread
   (sd over seeds) of each estimator against the root-mean-square of its reported stderrs,
   for the toolkit's "krylov" and "hutch++" and pyhessian's Hutchinson.
Writes benchmarks/results/bench_trace.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "bench_trace.md"
THREADS = 1
SEED = 1
TRAIN_ARGS = ("--model resnet20 --norm batch --data cifar10 --train-size 2048 --test-size 1000 "
              "--workers 1 --local-batch 128 --local-steps 1 --lr 0.1 --momentum 0.9 --wd 5e-4 "
              "--epochs 20 --no-aug --bn-batches 16 --eval-every 80 --backend serial --seed 0")
SMALL_TRAIN_ARGS = ("--model small_cnn --width 8 --data cifar10 --train-size 2048 --test-size 1000 "
                    "--workers 1 --local-batch 128 --local-steps 1 --lr 0.1 --momentum 0.9 --wd 5e-4 "
                    "--epochs 30 --no-aug --bn-batches 16 --eval-every 160 --backend serial --seed 0")


def _data_dir() -> str:
    from experiments.data import resolve_cifar10_dir
    return str(resolve_cifar10_dir(search=True).resolve())


def _batch(images: int):
    from experiments.data import load_cifar10, normalize
    x, y = load_cifar10(_data_dir(), "train")
    return [(normalize(x[:images]).clone(), y[:images].clone())]


def _initialized(name: str, batches, **kwargs):
    """Seed-0 model with BatchNorm running statistics from the images, in eval mode."""
    from experiments.models import build_model
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model.eval()


def _trained(path: str, args: str, folder: str):
    """The model of a final.pt, training one first (with `args`) when `path` is empty."""
    from experiments.probe import load_model
    from experiments.train import main as train_main
    if not path:
        out = os.path.join(folder, "run")
        code = train_main(args.split() + ["--data-dir", _data_dir(), "--out", out, "--no-progress"])
        if code:
            raise SystemExit(f"training the checkpoint failed with exit code {code}")
        path = os.path.join(out, "final.pt")
    model, cfg = load_model(path)
    return model.eval(), path, cfg


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _peer_samples(model, batches, matvecs: int, seed: int) -> list[float]:
    from pyhessian import hessian
    torch.manual_seed(seed)  # pyhessian draws its probes from the global generator
    peer = hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    samples = peer.trace(maxIter=matvecs, tol=float("-inf"))
    model.zero_grad(set_to_none=True)
    if len(samples) != matvecs:
        raise RuntimeError(f"pyhessian stopped after {len(samples)} of {matvecs} matvecs")
    return samples


def _mean_se(samples) -> tuple[float, float]:
    s = torch.tensor(samples, dtype=torch.float64)
    return float(s.mean()), float(s.std() / math.sqrt(len(s)))


def compare(model, batches, budgets: list[int]) -> dict:
    """Toolkit at each budget (seed SEED) and one pyhessian run of max(budgets) matvecs."""
    from dynamics import Objective, hessian_trace
    obj = Objective(model, nn.CrossEntropyLoss(), batches, bn="eval")
    rows = []
    for m in budgets:
        ours, wall, cpu = _timed(lambda: hessian_trace(obj, num_matvecs=m,
                                                       generator=torch.Generator().manual_seed(SEED)))
        rows.append(dict(budget=m, ours=ours, ours_wall=wall, ours_cpu=cpu))
    samples, wall_p, cpu_p = _timed(lambda: _peer_samples(model, batches, max(budgets), SEED))
    for row in rows:
        row["peer"], row["peer_se"] = _mean_se(samples[:row["budget"]])
    return dict(dim=obj.dim, rows=rows, peer_wall=wall_p, peer_cpu=cpu_p, peer_matvecs=len(samples),
                loss=float(obj.loss()))


def repeats(model, batches, budgets: list[int], count: int) -> dict:
    """Estimates of every tool at every budget over `count` seeds (seed s for everyone)."""
    from dynamics import Objective, hessian_trace
    obj = Objective(model, nn.CrossEntropyLoss(), batches, bn="eval")
    out = {(tool, m): [] for tool in ("krylov", "hutch++", "pyhessian") for m in budgets}
    started = time.perf_counter()
    for s in range(count):
        for method in ("krylov", "hutch++"):
            for m in budgets:
                r = hessian_trace(obj, num_matvecs=m, method=method, generator=torch.Generator().manual_seed(s))
                out[(method, m)].append((r.value, r.stderr))
        samples = _peer_samples(model, batches, max(budgets), s)
        for m in budgets:
            out[("pyhessian", m)].append(_mean_se(samples[:m]))
    return dict(dim=obj.dim, estimates=out, wall=time.perf_counter() - started, loss=float(obj.loss()))


def _spread_rows(rep: dict, budgets: list[int]) -> list[str]:
    lines = ["| budget | tool | mean estimate | sd over seeds | RMS reported stderr | sd / RMS stderr "
             "| RMS stderr / pyhessian's | sd / pyhessian's sd |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in budgets:
        stats = {}
        for tool in ("krylov", "hutch++", "pyhessian"):
            est = torch.tensor(rep["estimates"][(tool, m)], dtype=torch.float64)
            stats[tool] = (float(est[:, 0].mean()), float(est[:, 0].std()), float(est[:, 1].pow(2).mean().sqrt()))
        for tool, (mean, sd, rms) in stats.items():
            name = {"krylov": "toolkit krylov (default)", "hutch++": "toolkit hutch++",
                    "pyhessian": "pyhessian (Hutchinson)"}[tool]
            lines.append(f"| {m} | {name} | {mean:.2f} | {sd:.2f} | {rms:.2f} | {sd / rms:.2f} | "
                         f"{rms / stats['pyhessian'][2]:.2f} | {sd / stats['pyhessian'][1]:.2f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--budgets", default="12,48", help="comma list of matvec budgets (ResNet-20)")
    parser.add_argument("--checkpoint", default="", help="trained ResNet-20 final.pt (else trained here)")
    parser.add_argument("--small-checkpoint", default="", help="trained small_cnn final.pt (else trained here)")
    parser.add_argument("--small-images", type=int, default=64)
    parser.add_argument("--small-budgets", default="12,48,96")
    parser.add_argument("--repeats", type=int, default=10, help="0: skip section 2")
    parser.add_argument("--models", default="initialization,trained", help="section 1 models, comma list")
    parser.add_argument("--out", default=str(RESULT), help="result file")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if not models or set(models) - {"initialization", "trained"}:
        raise SystemExit(f"--models must list initialization and/or trained, got {args.models!r}")
    torch.set_num_threads(THREADS)
    budgets = [int(b) for b in args.budgets.split(",")]
    small_budgets = [int(b) for b in args.small_budgets.split(",")]
    started = time.perf_counter()
    batches = _batch(args.images)
    small_batches = _batch(args.small_images)
    with tempfile.TemporaryDirectory() as folder:
        results, trained_path, rep = {}, "", None
        if "initialization" in models:
            results["initialization"] = compare(_initialized("resnet20", batches), batches, budgets)
        if "trained" in models:
            trained, trained_path, _ = _trained(args.checkpoint, TRAIN_ARGS, os.path.join(folder, "resnet20"))
            results["trained"] = compare(trained, batches, budgets)
        if args.repeats:
            small, _, _ = _trained(args.small_checkpoint, SMALL_TRAIN_ARGS, os.path.join(folder, "small"))
            rep = repeats(small, small_batches, small_budgets, args.repeats)
    total = time.perf_counter() - started

    ok = lambda c: "met" if c else "NOT met"
    D = next(iter(results.values()))["dim"]
    lines = [
        "# Hessian trace at equal matvecs: toolkit vs pyhessian (ResNet-20, real CIFAR-10)",
        "",
        f"ResNet-20 (D = {D:,}), float32, the first {args.images} real CIFAR-10 training images normalized,",
        f"one batch, cross-entropy, BatchNorm in eval mode for both tools. One process,",
        f"torch.set_num_threads({THREADS}). Matvec = one Hessian-vector product over the {args.images} images.",
        "Toolkit: `dynamics.hessian_trace(obj, num_matvecs=M)`, default method \"krylov\" (M/2 Lanczos",
        "steps deflate the top of the spectrum exactly, M/2 Rademacher probes estimate the residual;",
        "its stderr is the residual samples' sd / sqrt(M/2)). pyhessian 0.1: `hessian(...).trace()`,",
        "Hutchinson with M Rademacher probes, stderr = sample sd / sqrt(M). Both from seed 1.",
        "",
        "- (a) initialization: seed-0 weights, BatchNorm running statistics from the images.",
        f"- (b) trained: `python -m experiments.train {TRAIN_ARGS}` (the images above are among its",
        "  2,048 training images; ~7 min on one shared core); checkpoint "
        f"`{trained_path if args.checkpoint else 'trained in a temporary folder'}`.",
        "",
        "## 1. ResNet-20: stderr at equal matvecs",
        "",
        "| model | loss | matvecs | toolkit estimate | toolkit stderr | deflated part (Lanczos) | pyhessian estimate "
        "| pyhessian stderr | stderr ratio | target <= 0.5 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        for row in res["rows"]:
            ratio = row["ours"].stderr / row["peer_se"]
            lines.append(f"| {name} | {res['loss']:.3f} | {row['budget']} | {row['ours'].value:.2f} | "
                         f"{row['ours'].stderr:.2f} | {row['ours'].exact_part:.2f} (rank {row['ours'].rank}) | "
                         f"{row['peer']:.2f} | {row['peer_se']:.2f} | {ratio:.2f} | {ok(ratio <= 0.5)} |")
    lines += ["", "CPU seconds (wall in brackets): "]
    for name, res in results.items():
        ours = "; ".join(f"M={r['budget']}: {r['ours_cpu']:.0f} ({r['ours_wall']:.0f})" for r in res["rows"])
        lines.append(f"- {name}: toolkit {ours}; pyhessian {res['peer_matvecs']} matvecs "
                     f"{res['peer_cpu']:.0f} ({res['peer_wall']:.0f}).")
    if rep is not None:
        lines += [
            "",
            f"## 2. Are the stderrs honest? {args.repeats} seeds on a small trained CNN",
            "",
            f"`small_cnn` width 8 (D = {rep['dim']:,}), trained with `python -m experiments.train {SMALL_TRAIN_ARGS}`,",
            f"Hessian on the first {args.small_images} training images (loss {rep['loss']:.3f}). Seed s = 0..{args.repeats - 1}",
            "for every tool (pyhessian: torch.manual_seed(s)). An honest stderr has sd over seeds / RMS",
            "reported stderr near 1; with g samples the stderr is itself noisy (g = 6 for krylov at 12",
            f"matvecs), and with {args.repeats} seeds the sd is only known to about +-{100 / math.sqrt(2 * max(args.repeats - 1, 1)):.0f}%.",
            "",
            *_spread_rows(rep, small_budgets),
            "",
            f"Section 2 wall time {rep['wall'] / 60:.1f} min.",
        ]
    lines += [
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `python -m benchmarks.bench_trace --images {args.images} "
        f"--budgets {args.budgets} --models {args.models}{' --checkpoint CKPT' if args.checkpoint else ''}"
        f"{' --small-checkpoint SMALL_CKPT' if args.small_checkpoint else ''} --small-images {args.small_images} "
        f"--small-budgets {args.small_budgets} --repeats {args.repeats}`"
        f"{' (CKPT, SMALL_CKPT: final.pt of the training commands above)' if args.checkpoint or args.small_checkpoint else ''}; "
        f"total wall time {total / 60:.1f} min.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".bench_trace.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
