"""Step time of the comparison's runs at full resolution (issue 13's budget): float64 against float32 gradients.

Run: `python -m benchmarks.bench_run_steps [N]` (default 2,000; 2 torch threads). Writes
benchmarks/results/bench_run_steps.md and .json.

Setting: the full-resolution study's network and data (`experiments.comparison.full_resolution`): N class-balanced
real CIFAR-10 training images at 32x32, the GELU CNN `cnn-wide` (9 outputs, D = 51,033) at its initial parameters
(a step's time does not depend on where it is taken), squared loss with Gaussian label noise 0.1 on simplex targets,
total batch 8, 3 seeds. Per rule shape of the study (SGD: 3 models of batch 8 looped; Local SGD K = 4: 12 models of
batch 2 and K = 8: 24 of batch 1, one vmap each), one round of STEPS steps through `sde.discrete.run_local_sgd` with
the runs' own sampler (`continuation.gradient_sampler`), with gradients in float64 and in float32
(`ContinuationConfig.gradient_dtype`), alternated REPEATS times from the same generator seed: the best ms per step
of each, their ratio, and how far the float32 iterates end from the float64 ones on the same draws, relative to
how far those moved.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_run_steps"
STEPS, REPEATS, SEEDS, ETA = 100, 2, 3, 1e-3
SHAPES = (("sgd", "sgd"), ("local K = 4", "local:K=4,beta=0.6"), ("local K = 8", "local:K=8,beta=0.6"))


def measure(n: int) -> dict:
    """Every rule shape's step time with float64 and float32 gradients at N = n (module docstring)."""
    torch.set_num_threads(2)
    from experiments.comparison.compare import MODELS, parse_rule
    from experiments.comparison.continuation import ContinuationConfig, gradient_sampler
    from experiments.comparison.full_resolution import CLASSES, MODEL, network_outputs
    from experiments.comparison.noise import GaussianLabelNoise, simplex_targets
    from experiments.comparison.point import objective
    from experiments.data import cifar_subset, resolve_cifar10_dir
    from sde.discrete import run_local_sgd

    images, labels = cifar_subset(resolve_cifar10_dir(search=True), n, image_size=32)
    torch.manual_seed(0)
    noise = GaussianLabelNoise(0.1)
    model = MODELS[MODEL](image_size=32, classes=network_outputs(noise)).double()
    targets = simplex_targets(labels, CLASSES).double()
    obj = objective(model, images.double(), targets, noise)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = []
    for name, spec in SHAPES:
        rule = parse_rule(spec, batch=8)
        seconds, ends = {"float64": [], "float32": []}, {}
        for _ in range(REPEATS):
            for dtype_name, dtype in (("float64", None), ("float32", torch.float32)):
                config = ContinuationConfig(rule=rule, eta=ETA, rounds=1, seeds=SEEDS, gradient_dtype=dtype)
                sampler = gradient_sampler(obj, noise, targets, config)
                start = time.perf_counter()
                run = run_local_sgd(sampler, theta0, eta=ETA, workers=rule.workers, local_batch=rule.local_batch,
                                    local_steps=STEPS, n_rounds=1, n_seeds=SEEDS,
                                    generator=torch.Generator().manual_seed(1))
                seconds[dtype_name].append((time.perf_counter() - start) / STEPS)
                ends[dtype_name] = run.values[-1]
        moved = float((ends["float64"] - theta0).norm())
        rows.append(dict(rule=name, models=SEEDS * rule.workers, local_batch=rule.local_batch,
                         ms_float64=1e3 * min(seconds["float64"]), ms_float32=1e3 * min(seconds["float32"]),
                         relative_end_difference=float((ends["float32"] - ends["float64"]).norm()) / moved))
    return dict(n=n, D=obj.dim, steps=STEPS, repeats=REPEATS, rows=rows, date=datetime.date.today().isoformat(),
                load=os.getloadavg()[0])


def table(result: dict) -> str:
    lines = ["What: one step of the full-resolution study's runs (N = {n:,} real CIFAR-10 images at 32x32, `cnn-wide`, "
             "D = {D:,}, Gaussian label noise 0.1, total batch 8, 3 seeds), its stochastic gradients in float64 "
             "and in float32 (`ContinuationConfig.gradient_dtype`; iterates, averaging and noise draws float64), "
             "best of {repeats} alternated rounds of {steps} steps; and how far the float32 iterates end from the "
             "float64 ones on the same draws, relative to how far those moved. 2 torch threads.".format(**result), "",
             "| rule | models x local batch | ms per step float64 | float32 | speed-up | end difference / moved |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['rule']} | {r['models']} x {r['local_batch']} | {r['ms_float64']:.1f} | "
                     f"{r['ms_float32']:.1f} | {r['ms_float64'] / r['ms_float32']:.2f} | "
                     f"{r['relative_end_difference']:.1e} |")
    return "\n".join(lines + ["", f"Date: {result['date']}; load average {result['load']:.1f} on {os.cpu_count()} "
                                  f"shared cores. Command: `python -m benchmarks.bench_run_steps {result['n']}`."])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    result = measure(int(args[0]) if args else 2000)
    write_result(RESULTS, result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
