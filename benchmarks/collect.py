"""Assemble BENCHMARKS.md from the per-benchmark tables in benchmarks/results/."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> what it compares (in the order they appear in BENCHMARKS.md)
BENCHMARKS = {
    "bench_hessian": "HVP cost and top eigenvalue against PyHessian",
    "bench_trace": "Hessian trace stderr at equal matvecs against PyHessian, ResNet-20 at init and trained",
    "bench_noise": "gradient-noise probe: JVP path against per-sample gradients",
    "bench_drift_cost": "one matrix-free slow-SDE drift on ResNet-20, in gradient-equivalents",
    "bench_reading_cost": "the matrix-free reading at Phi (issue 13) as N grows: time, memory, growth exponent",
    "bench_reading_cost_eigen": "the Gram eigendecomposition alone at N = 2,000 under a memory limit "
                                "(`bench_reading_cost --eigen`): time and peak memory",
    "bench_reading_cost_passes": "float32 Jacobian passes in the matrix-free reading against float64, the same "
                                 "runs side by side (`bench_reading_cost --passes`): speed-up and differences",
    "bench_reading_cost_breakdown": "where a reading's seconds go at a study's own point "
                                    "(`bench_reading_cost --breakdown`): projections, tr H, lambda_max, flow term",
    "bench_reading_cost_levers": "what two cheaper settings change at a real checkpoint (`bench_reading_cost "
                                 "--levers`): the flow term's truncation, tr H in float32",
    "bench_reading_cost_tolerances": "the cheaper reading settings end to end, the same runs read twice "
                                     "(`bench_reading_cost --tolerances`): seconds, how far the readings and "
                                     "slopes move",
    "bench_run_steps": "a step of the full-resolution study's runs, float64 against float32 gradients "
                       "(`bench_run_steps`)",
    "bench_sde_em": "Euler-Maruyama core against torchsde",
    "bench_loader": "data loading and augmentation as a share of a training step",
    "bench_trainer": "Local SGD throughput against single-model SGD; serial against vmap workers",
    "gpu_check": "the GPU path on one H200 (benchmarks/gpu_check.sh; pending a session with a device)",
}

HEADER = """# Benchmarks

Each section below is written by one script in `benchmarks/` that runs the toolkit and its
peer side by side in one process, so the numbers are ratios measured under the same load.
These machines have 2 shared cores: absolute times are indicative only. Regenerate everything
with `make bench` (installs the peers: pyhessian, torchsde, hessian-eigenthings) or one section
with `python -m benchmarks.NAME` followed by `python -m benchmarks.collect`.
"""


def collect() -> Path:
    parts = [HEADER]
    for name, what in BENCHMARKS.items():
        path = RESULTS / f"{name}.md"
        body = path.read_text().strip() if path.exists() else f"_Not run yet: `python -m benchmarks.{name}`._"
        parts.append(f"## {name}: {what}\n\n{body}\n")
    target = ROOT / "BENCHMARKS.md"
    fd, tmp = tempfile.mkstemp(dir=ROOT, prefix=".BENCHMARKS.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    print(collect())
