"""Cost of the matrix-free reading at Phi (issue 13) as the number of images N grows: wall time and peak memory.

Run: `python -m benchmarks.bench_reading_cost [N ...]` (default 100 200; 2 torch threads). Writes
benchmarks/results/bench_reading_cost.md and .json.

Setting: the small GELU CNN at 16x16 (`experiments.models.build_small_cnn`, D = 9,946, float64) on N class-balanced
real CIFAR-10 training images, squared loss with Gaussian label noise sigma = 0.1; the point is reached by dense
Gauss-Newton from the initialization (what the point is does not matter to the cost). Each N runs in its own
process so its peak resident memory is its own. Measured per N: the Gram eigendecomposition at zeta (the one
(N C)^2 object: `projection.GramPreconditioner.at` by Jacobian row blocks), then one SGD measurement (B = 8,
eta lambda_max = 0.2, 2 seeds, 2 checkpoints of 1,000 steps each) through `run_continuation`, whose readings report
their projection CG iterations, flow-term ranks and seconds. Growth exponents: least-squares slopes of log time on
log N. The baseline is the route this replaced (Nystrom-preconditioned CG projections, CG normal part and
Krylov-Lyapunov flow term): 36-39 min a reading at N = 500 on this machine (RESULTS.md 2b, 2026-12-04), too slow
to re-run side by side here.

Known limit, so the default sizes are 100 and 200: dense Gauss-Newton from the initialization stalls at N >= 300 on
the rank-deficient Jacobian of one-hot points (distance 3e-8 after 60 steps at N = 300); CG Gauss-Newton from the
initialization under a truncated pseudo-inverse rebuilt every 3 steps stalled at N = 200; full-batch Adam took over
15 min at N = 500 and its point then failed a CG projection at rtol 1e-6.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_reading_cost"
SIZES = (100, 200)
ETA_LAMBDA, STEPS, SEEDS, BATCH = 0.2, 1000, 2, 8


def one(n: int) -> dict:
    """Build the point at N = n, then time the eigendecomposition and one measurement (this process only)."""
    torch.set_num_threads(2)
    from experiments.comparison.compare import MODELS, parse_rule
    from experiments.comparison.continuation import ContinuationConfig, run_continuation
    from experiments.comparison.noise import parse_noise
    from experiments.comparison.point import check_model, objective, point_at
    from experiments.comparison.projection import GramPreconditioner, project
    from experiments.data import cifar_subset, resolve_cifar10_dir
    from experiments.probe import build_from_factory

    images, labels = cifar_subset(resolve_cifar10_dir(search=True), n, image_size=16)
    images, noise = images.to(torch.float64), parse_noise("gaussian:0.1")
    net = build_from_factory(MODELS["cnn"], image_size=16, seed=0).to(torch.float64)
    obj = objective(net, images, check_model(net, images, labels, noise)[1], noise)
    start = time.perf_counter()
    zeta, report = project(obj, noise, obj.params, tol=1e-10, max_gauss_newton=60)
    projection_seconds = time.perf_counter() - start
    start = time.perf_counter()
    eigen = GramPreconditioner.at(obj, noise, zeta)
    eigen_seconds = time.perf_counter() - start
    point = point_at(obj, noise, zeta, method="cg", preconditioner=eigen)
    eta = ETA_LAMBDA * n / float(eigen.values[0])                   # lambda_max = kappa_1 / N
    config = ContinuationConfig(rule=parse_rule("sgd", batch=BATCH), eta=eta, rounds=2, seeds=SEEDS,
                                steps_per_round_sgd=STEPS)
    start = time.perf_counter()
    result = run_continuation(point, config, generator=torch.Generator().manual_seed(0))
    cost = result.reading_cost
    return dict(n=n, D=obj.dim, eta=eta, rows=n * point.classes, projection_seconds=projection_seconds,
                gauss_newton_steps=report.gauss_newton_steps, eigen_seconds=eigen_seconds,
                reading_seconds=cost["seconds"], projection_cg=cost["projection_cg"], flow_ranks=cost["flow_ranks"],
                eigen_matvecs=cost["eigen_matvecs"], measurement_seconds=time.perf_counter() - start,
                peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                trace_start=float(result.trace[0, 0]), trace_end=[float(t) for t in result.trace[-1]])


def slope(ns, values) -> float:
    """Least-squares slope of log(values) on log(ns)."""
    lx, ly = torch.tensor(ns, dtype=torch.float64).log(), torch.tensor(values, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def table(rows: list[dict]) -> str:
    ns = [r["n"] for r in rows]
    per_reading = [sum(r["reading_seconds"]) / len(r["reading_seconds"]) for r in rows]
    lines = [
        "What: the matrix-free reading at Phi (`experiments.comparison.reading_mf`) on the 16x16 GELU CNN "
        f"(D = {rows[0]['D']:,}) at N real CIFAR-10 images, Gaussian label noise 0.1: the exact Gram "
        "eigendecomposition at zeta (once per point) and one SGD measurement (B = 8, eta lambda_max = 0.2, 2 seeds "
        "x 2 checkpoints of 1,000 steps = 4 readings). Each N in its own process, 2 torch threads.",
        "",
        "| N | N C | eigendecomposition s | s per reading | CG its per projection (2 a reading) | flow ranks | "
        "measurement s (runs + readings) | peak GB |",
        "|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r, sec in zip(rows, per_reading):
        lines.append(f"| {r['n']:,} | {r['rows']:,} | {r['eigen_seconds']:.1f} | {sec:.1f} | "
                     f"{', '.join(map(str, r['projection_cg']))} | {', '.join(map(str, r['flow_ranks']))} | "
                     f"{r['measurement_seconds']:.0f} | {r['peak_gb']:.2f} |")
    if len(rows) >= 2:
        lines += ["", f"Growth exponents (log-log slope over N = {ns[0]}..{ns[-1]}): eigendecomposition "
                      f"{slope(ns, [r['eigen_seconds'] for r in rows]):.2f}, reading "
                      f"{slope(ns, per_reading):.2f}, peak memory {slope(ns, [r['peak_gb'] for r in rows]):.2f}."]
    lines += ["", "Baseline (the route replaced, not re-run here): 36-39 min a reading at N = 500 (RESULTS.md 2b).",
              "", f"Date: {datetime.date.today().isoformat()}; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} shared cores. Command: `python -m benchmarks.bench_reading_cost "
                  f"{' '.join(map(str, ns))}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--one"]:
        print(json.dumps(one(int(args[1]))))
        return
    rows = []
    for n in [int(a) for a in args] or SIZES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_reading_cost", "--one", str(n)],
                             cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    from experiments.metrics import atomic_write_bytes
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS.with_suffix(".json"), (json.dumps(rows, indent=1) + "\n").encode())
    text = table(rows)
    atomic_write_bytes(RESULTS.with_suffix(".md"), (text + "\n").encode())
    print(text)


if __name__ == "__main__":
    main()
