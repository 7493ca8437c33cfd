"""Cost of the matrix-free reading at Phi (issue 13) as the number of images N grows: wall time and peak memory.

Run: `python -m benchmarks.bench_reading_cost [N ...]` (default 200 500 1000 2000; 2 torch threads). Writes
benchmarks/results/bench_reading_cost.md and .json after every N (atomically), so a long run keeps what it measured.
`python -m benchmarks.bench_reading_cost --eigen N GIB`: only the Gram build and eigendecomposition at N under a
memory limit of GIB GiB (the study's `--memory-gib`), at the network's initial parameters (the cost and memory do
not depend on where it is built), appended to benchmarks/results/bench_reading_cost_eigen.md and .json.
`python -m benchmarks.bench_reading_cost --passes N`: the same SGD measurement read with float64 and with float32
Jacobian passes side by side (speed-up, CG iterations, how much the readings and slopes differ), appended to
benchmarks/results/bench_reading_cost_passes.md and .json.
`python -m benchmarks.bench_reading_cost --breakdown OUT [ETA_LAMBDA]`: where a reading's seconds go at a study's
own point (OUT of `experiments.comparison.full_resolution`, with its zeta.pt and gram_eigen.pt: neither is built
here): its SGD rule at eta = ETA_LAMBDA / lambda_max (default 0.1) over the study's window and checkpoints, one
seed, read with the study's passes; per reading the seconds in the two projections, the two tr H, the two
lambda_max and the flow term, appended to benchmarks/results/bench_reading_cost_breakdown.md and .json.
`python -m benchmarks.bench_reading_cost --levers OUT`: what two cheaper settings would change there, at a real
checkpoint (one seed of the SGD rule at eta lambda_max 0.1, half the window): the flow term's ranks, seconds and
value at flow_rtol 1e-10 (the default), 1e-8 and 1e-6, and tr H from float32 per-sample Jacobians against float64,
appended to benchmarks/results/bench_reading_cost_levers.md and .json.
`python -m benchmarks.bench_reading_cost --tolerances OUT [SETTING [ETA_LAMBDA]]`: cheaper settings end to end
there: --breakdown's run (at ETA_LAMBDA, default 0.1) read with the default `reading_mf.ReadingTolerances` and
with SETTING on the same draws, "loose" (first CG step 1e-2, flow term 1e-6; the default) or "formula" (those and
the reflected reading by its formula at zeta, one projection a reading): seconds per reading, CG iterations and
flow ranks, how far the readings move against the window's change and the window's slopes, appended to
benchmarks/results/bench_reading_cost_tolerances.md and .json.

Setting: full resolution, the GELU CNN `cnn-wide` (`experiments.models.build_small_cnn`, hidden 48, 9 outputs: D =
51,033) on N class-balanced real CIFAR-10 training images at 32x32, squared loss with Gaussian label noise sigma =
0.1 on simplex-coded targets (`experiments.comparison.noise.simplex_targets`: with one-hot targets Jt is
rank-deficient once N exceeds the last hidden width + 1 and points could not be built above N = 200). The point:
float32 full-batch Adam to L <= 1e-5, then float64 CG Gauss-Newton to L <= 1e-10 (`build_point(method="cg",
fit_dtype=torch.float32)`, zeta cached under runs/bench_points/). Each N runs in its own process so its peak
resident memory is its own. Measured per N: the point, the Gram eigendecomposition at zeta (the one (N m)^2 object:
`projection.GramPreconditioner.at` by Jacobian row blocks), then one SGD measurement (B = 8, eta lambda_max = 0.2,
2 seeds, 2 checkpoints of 1,000 steps each) through `run_continuation`, whose readings report their projection CG
iterations, flow-term ranks and seconds. Growth exponents: least-squares slopes of log time on log N. The
baseline is the route this replaced (Nystrom-preconditioned CG projections, CG normal part and Krylov-Lyapunov
flow term): 36-39 min a reading at a 500-image 16x16 point (D = 9,946; RESULTS.md 2b, 2026-12-04), too slow to
re-run side by side here.
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
from torch import Tensor

from benchmarks import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_reading_cost"
SIZES = (200, 500, 1000, 2000)
ETA_LAMBDA, STEPS, SEEDS, BATCH, SIGMA = 0.2, 1000, 2, 8, 0.1
LOOSE = dict(first_cg_rtol=1e-2, flow_rtol=1e-6)      # --tolerances: the loosened `ReadingTolerances`
SETTINGS = {"default": {}, "loose": LOOSE, "formula": dict(LOOSE, reflected="formula")}   # --tolerances OUT SETTING


def _point(n: int):
    """(the point at N = n with its Gram eigendecomposition, its seconds, the eigendecomposition's, its log)."""
    torch.set_num_threads(2)
    from experiments.comparison.compare import MODELS
    from experiments.comparison.noise import GaussianLabelNoise, simplex_targets
    from experiments.comparison.point import build_point
    from experiments.comparison.reading_mf import with_eigendecomposition
    from experiments.data import cifar_subset, resolve_cifar10_dir

    images, labels = cifar_subset(resolve_cifar10_dir(search=True), n, image_size=32)
    lines = []
    start = time.perf_counter()
    point = build_point(lambda *, image_size: MODELS["cnn-wide"](image_size=image_size, classes=9), images,
                        simplex_targets(labels, 10), noise=GaussianLabelNoise(SIGMA), method="cg", tol=1e-10,
                        fit_dtype=torch.float32, exact_preconditioner=True,
                        cache=ROOT / "runs" / "bench_points" / f"cnn-wide-{n}.pt",
                        progress=lines.append, generator=torch.Generator().manual_seed(0))
    point_seconds = time.perf_counter() - start
    start = time.perf_counter()
    point = with_eigendecomposition(point)
    return point, point_seconds, time.perf_counter() - start, lines


def _measure(point, pass_dtype=None):
    """(one SGD measurement's `ContinuationResult` read with Jacobian passes in pass_dtype, its seconds)."""
    from experiments.comparison.compare import parse_rule
    from experiments.comparison.continuation import ContinuationConfig, run_continuation
    eta = ETA_LAMBDA * len(point.targets) / float(point.preconditioner.values[0])     # lambda_max = kappa_1 / N
    config = ContinuationConfig(rule=parse_rule("sgd", batch=BATCH), eta=eta, rounds=2, seeds=SEEDS,
                                steps_per_round_sgd=STEPS, pass_dtype=pass_dtype)
    start = time.perf_counter()
    result = run_continuation(point, config, generator=torch.Generator().manual_seed(0))
    return result, time.perf_counter() - start


def one(n: int) -> dict:
    """Build the point at N = n, then time the eigendecomposition and one measurement (this process only)."""
    point, point_seconds, eigen_seconds, lines = _point(n)
    eigen = point.preconditioner
    result, seconds = _measure(point)
    cost = result.reading_cost
    return dict(n=n, D=point.objective.dim, eta=result.config.eta, rows=n * point.classes,
                point_seconds=point_seconds, point_log=lines, eigen_seconds=eigen_seconds, kept_rank=eigen.rank,
                condition=float(eigen.values[0] / eigen.values[eigen.rank - 1]),
                reading_seconds=cost["seconds"], projection_cg=cost["projection_cg"], flow_ranks=cost["flow_ranks"],
                eigen_matvecs=cost["eigen_matvecs"], measurement_seconds=seconds,
                peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                trace_start=float(result.trace[0, 0]), trace_end=[float(t) for t in result.trace[-1]])


def _slopes(result) -> Tensor:
    """Per-seed least-squares slopes on slow time of the readings at Phi, t = 0 included (`path.fit_slope`, skip 0):
    tr H then lambda_max, (2, seeds)."""
    from experiments.comparison.path import fit_slope
    return torch.stack([fit_slope(result.times, s, skip=0).per_seed for s in (result.trace, result.lambda_max)])


def passes_one(n: int) -> dict:
    """At N = n: the same SGD runs (same seeds) read with float64 and with float32 Jacobian passes, side by side."""
    point, *_ = _point(n)
    out = dict(n=n, rows=n * point.classes, date=datetime.date.today().isoformat(), load=os.getloadavg()[0])
    results = {}
    for name, dtype in (("float64", None), ("float32", torch.float32)):
        results[name], seconds = _measure(point, dtype)
        cost = results[name].reading_cost
        out[name] = dict(measurement_seconds=seconds, reading_seconds=cost["seconds"],
                         projection_cg=cost["projection_cg"], eigen_matvecs=cost["eigen_matvecs"],
                         flow_ranks=cost["flow_ranks"])
    high, low = results["float64"], results["float32"]
    out["max_relative_difference"] = {
        name: float(((a - b).abs() / b.abs()).max())
        for name, a, b in (("trace", low.trace, high.trace), ("lambda_max", low.lambda_max, high.lambda_max))}
    slopes = _slopes(high), _slopes(low)
    out["slope_relative_difference"] = {name: float(((slopes[1][k] - slopes[0][k]).abs() / slopes[0][k].abs()).max())
                                        for k, name in enumerate(("trace", "lambda_max"))}
    out["slope_float64"] = [float(x) for x in slopes[0][0]]
    return out


def passes_table(rows: list[dict]) -> str:
    lines = ["What: one SGD measurement (as in bench_reading_cost: B = 8, eta lambda_max = 0.2, 2 seeds x 2 "
             "checkpoints of 1,000 steps) on `cnn-wide` at 32x32, the same runs read twice at Phi matrix-free: with "
             "every Jacobian pass in float64, and with `MatrixFreeReader(pass_dtype=torch.float32)` (projection CG "
             "products, flow ranks and Lanczos in float32; residuals, Gauss-Newton steps, tr H and the Rayleigh "
             "quotient of lambda_max in float64). Differences: the largest relative difference of a reading (tr H, "
             "lambda_max at Phi) and of a seed's fitted slope. 2 torch threads, float64 first.", "",
             "| N | N m | s per reading float64 | float32 | speed-up | CG its per projection float64 / float32 | "
             "Lanczos products float64 / float32 | readings differ (tr H, lambda_max) | slopes differ (tr H, "
             "lambda_max) | date, load |", "|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in rows:
        high, low = r["float64"], r["float32"]
        per = [sum(x["reading_seconds"]) / len(x["reading_seconds"]) for x in (high, low)]
        d, sl = r["max_relative_difference"], r["slope_relative_difference"]
        lines.append(f"| {r['n']:,} | {r['rows']:,} | {per[0]:.1f} | {per[1]:.1f} | {per[0] / per[1]:.2f}x | "
                     f"{', '.join(map(str, high['projection_cg']))} / {', '.join(map(str, low['projection_cg']))} | "
                     f"{sum(high['eigen_matvecs'])} / {sum(low['eigen_matvecs'])} | {d['trace']:.1e}, "
                     f"{d['lambda_max']:.1e} | {sl['trace']:.1e}, {sl['lambda_max']:.1e} | {r['date']}, "
                     f"{r['load']:.1f} |")
    return "\n".join(lines + ["", "Command: `python -m benchmarks.bench_reading_cost --passes N`."])


def _study(out: str):
    """(the study's point read from `out`, its config, its pass dtype); refused if the point would be built."""
    from experiments.comparison.full_resolution import EIGEN_CACHE, study_point
    from experiments.comparison.noise import parse_noise
    from experiments.data import cifar_subset, resolve_cifar10_dir
    folder = Path(out)
    missing = [name for name in ("plan.json", "zeta.pt", EIGEN_CACHE) if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"this mode reads a study's point, not builds it: {folder} lacks {', '.join(missing)}")
    config = json.loads((folder / "plan.json").read_text())["provenance"]["config"]
    torch.set_num_threads(2)
    images, labels = cifar_subset(resolve_cifar10_dir(config["data_dir"], search=True), config["n"], image_size=32)
    pass_dtype = None if config.get("passes") is None else getattr(torch, config["passes"])
    point = study_point(folder, images, labels, parse_noise(config["noise"]), seed=config["seed"],
                        pass_dtype=pass_dtype, fit_patience=config.get("fit_patience"))
    return point, config, pass_dtype


def _study_sgd_run(point, config: dict, pass_dtype, eta_lambda: float, slow_time: float, checkpoints: int,
                   tolerances=None):
    """(one seed of the study's SGD rule at eta = eta_lambda / lambda_max over slow_time, read at `checkpoints`
    with `tolerances` (a `ReadingTolerances`; None: the default): its `ContinuationResult`, eta, steps)."""
    from experiments.comparison.compare import parse_rule
    from experiments.comparison.continuation import ContinuationConfig, run_continuation, run_schedule
    from experiments.comparison.reading_mf import ReadingTolerances
    rule = parse_rule("sgd", batch=config["batch"])
    eta = eta_lambda * len(point.targets) / float(point.preconditioner.values[0])     # lambda_max = kappa_1 / N
    schedule = run_schedule(rule, eta, slow_time=slow_time, checkpoints=checkpoints, seeds=1)
    run = ContinuationConfig(rule=rule, eta=eta, pass_dtype=pass_dtype, tolerances=tolerances or ReadingTolerances(),
                             **schedule)
    result = run_continuation(point, run, generator=torch.Generator().manual_seed(config["seed"]))
    return result, eta, schedule["rounds"] * schedule["steps_per_round_sgd"]


def breakdown_one(out: str, eta_lambda: float = 0.1) -> dict:
    """At the study in `out`: one seed of its SGD rule over its window, each reading's seconds by piece."""
    return _breakdown(*_study(out), eta_lambda)


def _breakdown(point, config: dict, pass_dtype, eta_lambda: float, tolerances=None) -> dict:
    """`breakdown_one` at the study's point, read with `tolerances` (None: the default); with its readings at Phi
    (tr H and lambda_max per checkpoint)."""
    start = time.perf_counter()
    result, eta, steps = _study_sgd_run(point, config, pass_dtype, eta_lambda, config["slow_time"],
                                        config["checkpoints"], tolerances)
    seconds = time.perf_counter() - start
    cost = result.reading_cost
    return dict(n=config["n"], rows=len(point.targets) * point.classes, eta_lambda=eta_lambda, eta=eta,
                passes=config.get("passes"), steps=steps,
                measurement_seconds=seconds, reading_seconds=cost["seconds"], pieces=cost["pieces"],
                projection_cg=cost["projection_cg"], eigen_matvecs=cost["eigen_matvecs"],
                flow_ranks=cost["flow_ranks"], peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                trace=result.trace[:, 0].tolist(), lambda_max=result.lambda_max[:, 0].tolist(),
                date=datetime.date.today().isoformat(), load=os.getloadavg()[0])


def tolerances_one(out: str, setting: str = "loose", eta_lambda: str = "0.1") -> dict:
    """At the study in `out`: `breakdown_one`'s run (SGD at eta lambda_max `eta_lambda`, one seed, the study's
    window) read on the same draws with the default `ReadingTolerances` and with SETTINGS[setting], each in its own
    process (a second run in one process ran 1.1-1.7x slower per CG iteration and flow rank than the first)."""
    if setting not in SETTINGS or setting == "default":
        raise ValueError(f"--tolerances OUT SETTING: SETTING is one of {sorted(set(SETTINGS) - {'default'})}, "
                         f"got {setting!r}")
    runs = {name: _child("--tolerances-run", out, name, eta_lambda) for name in ("default", setting)}
    return dict(n=runs["default"]["n"], loose=SETTINGS[setting], default=runs["default"], loosened=runs[setting],
                processes=2, date=datetime.date.today().isoformat(), load=os.getloadavg()[0])


def _tolerances_run(out: str, setting: str, eta_lambda: str) -> dict:
    """One of `tolerances_one`'s runs, read with SETTINGS[setting]."""
    from experiments.comparison.reading_mf import ReadingTolerances
    return _breakdown(*_study(out), float(eta_lambda), ReadingTolerances(**SETTINGS[setting]))


def _child(flag: str, *args: str) -> dict:
    """The row a mode of this script prints (its last line, JSON), run in its own process (its peak memory and
    its seconds its own)."""
    printed = subprocess.run([sys.executable, "-m", "benchmarks.bench_reading_cost", flag, *args], cwd=ROOT,
                             check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(printed.strip().splitlines()[-1])


def tolerances_table(rows: list[dict]) -> str:
    lines = ["What: the readings' cheaper settings (`reading_mf.ReadingTolerances`: the first Gauss-Newton "
             "step's CG tolerance of each projection, default 1e-4 like the later steps, the flow term's "
             "truncation, default 1e-10, and the reflected reading s(Pi(z - x)) by its formula at zeta instead of "
             "a second projection) at a full-resolution study's own point, end to end: one seed of its SGD "
             "rule (B = 8, at an eta lambda_max) over its window (slow time 0.05, 2 checkpoints) read twice on the "
             "same draws, with the defaults and loosened, each in its own process (processes 1: both in one "
             "process, the loosened second, which ran 1.1-1.7x slower per CG iteration and flow rank). Seconds "
             "per reading (and the projections' and flow term's share of them), CG iterations per projection, "
             "flow ranks; how far the "
             "loosened readings at Phi land from the default ones, relative to the window's change of each, and "
             "the ratio of the window's slopes (loosened / default) of tr H and lambda_max. 2 torch threads.", "",
             "| N | eta lambda_max | loosened | processes | s per reading | ratio | projections s "
             "| CG its per projection | flow s "
             "| flow ranks | tr H moved / window change | lambda_max moved / window change | slope ratio tr H, "
             "lambda_max | date, load |",
             "|---:|---:|---|---:|---|---:|---|---|---|---|---:|---:|---|---|"]
    for r in rows:
        a, b = r["default"], r["loosened"]
        per = lambda run, key: sum(p[key] for p in run["pieces"]) / len(run["pieces"])    # noqa: E731
        secs = [sum(run["reading_seconds"]) / len(run["reading_seconds"]) for run in (a, b)]
        moved, slopes = {}, []
        for key in ("trace", "lambda_max"):
            change = abs(a[key][-1] - a[key][0])
            moved[key] = max(abs(x - y) for x, y in zip(a[key], b[key])) / change
            slopes.append(f"{(b[key][-1] - b[key][0]) / (a[key][-1] - a[key][0]):.4f}")
        loose = ", ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {v:g}" for k, v in r["loose"].items())
        lines.append(f"| {r['n']:,} | {a['eta_lambda']:g} | {loose} | {r.get('processes', 1)} | "
                     f"{secs[0]:.0f} -> {secs[1]:.0f} | "
                     f"{secs[1] / secs[0]:.2f} | "
                     f"{per(a, 'projection'):.0f} -> {per(b, 'projection'):.0f} | "
                     f"{', '.join(map(str, a['projection_cg']))} -> {', '.join(map(str, b['projection_cg']))} | "
                     f"{per(a, 'flow'):.0f} -> {per(b, 'flow'):.0f} | "
                     f"{', '.join(map(str, a['flow_ranks']))} -> {', '.join(map(str, b['flow_ranks']))} | "
                     f"{moved['trace']:.1e} | {moved['lambda_max']:.1e} | {', '.join(slopes)} | "
                     f"{r['date']}, {r['load']:.1f} |")
    return "\n".join(lines + ["", "Command: `python -m benchmarks.bench_reading_cost --tolerances OUT [SETTING "
                                   "[ETA_LAMBDA]]` (OUT a study's folder, e.g. runs/full_resolution/n2000; SETTING "
                                   "loose (default) or formula; ETA_LAMBDA default 0.1)."])


def breakdown_table(rows: list[dict]) -> str:
    lines = ["What: where a matrix-free reading's seconds go at a full-resolution study's own point (`cnn-wide` at "
             "32x32, D = 51,033, Gaussian label noise 0.1): one seed of the study's SGD rule (B = 8) over its window "
             "(slow time 0.05, 2 checkpoints), read at Phi with the study's passes. A reading is two projections "
             "(Pi(theta) and Pi(z - x)), tr H and lambda_max at both, and the flow term. Seconds per reading, "
             "summed over its pieces; rest: the measurement's other seconds (the runs, the reader's setup with its "
             "tangent gradients, lambda_max at zeta). 2 torch threads.", "",
             "| N | N m | passes | eta lambda_max, steps | s per reading | projections | tr H | lambda_max | flow | "
             "CG its per projection | Lanczos products per lambda_max | flow ranks | rest s | peak GB | date, load |",
             "|---:|---:|---|---|---:|---|---|---|---|---|---|---|---:|---:|---|"]
    for r in rows:
        count = len(r["reading_seconds"])
        total = sum(r["reading_seconds"]) / count
        piece = {k: sum(p[k] for p in r["pieces"]) / count for k in ("projection", "trace", "lambda_max", "flow")}
        share = {k: f"{v:.1f} ({100 * v / total:.0f}%)" for k, v in piece.items()}
        lines.append(f"| {r['n']:,} | {r['rows']:,} | {r['passes'] or 'float64'} | {r['eta_lambda']:g}, "
                     f"{r['steps']:,} | {total:.1f} | {share['projection']} | {share['trace']} | "
                     f"{share['lambda_max']} | {share['flow']} | {', '.join(map(str, r['projection_cg']))} | "
                     f"{', '.join(map(str, r['eigen_matvecs']))} | {', '.join(map(str, r['flow_ranks']))} | "
                     f"{r['measurement_seconds'] - sum(r['reading_seconds']):.0f} | {r['peak_gb']:.2f} | "
                     f"{r['date']}, {r['load']:.1f} |")
    return "\n".join(lines + ["", "Command: `python -m benchmarks.bench_reading_cost --breakdown OUT [ETA_LAMBDA]` "
                                   "(OUT a study's folder, e.g. runs/full_resolution/n2000)."])


def levers_one(out: str) -> dict:
    """At the study in `out`, at a real checkpoint: the flow term against flow_rtol, tr H in float32 and float64."""
    from experiments.comparison.reading_mf import MatrixFreeReader
    point, config, pass_dtype = _study(out)
    readers, original = [], MatrixFreeReader.reading

    def keep(self, theta, seed=0):
        readers.append((self, theta.clone()))
        return original(self, theta, seed)
    MatrixFreeReader.reading = keep                   # the run's reader and its last theta, kept for the levers
    try:
        result, *_ = _study_sgd_run(point, config, pass_dtype, 0.1, config["slow_time"] / 2, 1)
    finally:
        MatrixFreeReader.reading = original
    reader, theta = readers[-1]
    z, _ = reader.project(theta)
    x, correction = theta - z, reader.correction
    row = dict(n=config["n"], passes=config.get("passes"), offset_norm=float(x.norm()),
               half_window_change=float(result.trace[-1, 0] - result.trace[0, 0]), flow={}, trace={},
               date=datetime.date.today().isoformat(), load=os.getloadavg()[0])
    for rtol in (1e-10, 1e-8, 1e-6):
        correction.flow_rtol, start = rtol, time.perf_counter()
        terms = correction.flow_terms(x)
        row["flow"][f"{rtol:g}"] = dict(terms=terms, ranks=correction.cost["ranks"],
                                        seconds=time.perf_counter() - start)
    for dtype in (torch.float64, torch.float32):
        start = time.perf_counter()
        value = reader.trace(z, passes=point.objective.to(dtype))
        row["trace"][str(dtype).removeprefix("torch.")] = dict(value=value, seconds=time.perf_counter() - start)
    return row


def levers_table(rows: list[dict]) -> str:
    lines = ["What: two settings that would make a reading cheaper, at a full-resolution study's own point and a real "
             "checkpoint (one seed of its SGD rule, B = 8, eta lambda_max = 0.1, after half the window: slow time "
             "0.025). The flow term (tr H part) at flow_rtol 1e-8 and 1e-6 against the default 1e-10: ranks, "
             "seconds, and its change relative to the term and to the reading's change of tr H over the half "
             "window; tr H from float32 per-sample Jacobians against float64. 2 torch threads.", "",
             "| N | passes | offset norm | tr H change over the half window | flow ranks 1e-10 / 1e-8 / 1e-6 | "
             "flow s | flow change 1e-8, 1e-6 (of the term) | (of the tr H change) | tr H float32 - float64 | "
             "(of the tr H change) | tr H s float64 / float32 | date, load |",
             "|---:|---|---:|---:|---|---|---|---|---:|---:|---|---|"]
    for r in rows:
        flow, change = r["flow"], abs(r["half_window_change"])
        ref = flow["1e-10"]["terms"][0]
        delta = [abs(flow[k]["terms"][0] - ref) for k in ("1e-08", "1e-06")]
        diff = r["trace"]["float32"]["value"] - r["trace"]["float64"]["value"]
        seconds = [f"{flow[k]['seconds']:.0f}" for k in ("1e-10", "1e-08", "1e-06")]
        lines.append(f"| {r['n']:,} | {r['passes'] or 'float64'} | {r['offset_norm']:.3f} | "
                     f"{r['half_window_change']:.4f} | "
                     f"{' / '.join(str(flow[k]['ranks']) for k in ('1e-10', '1e-08', '1e-06'))} | "
                     f"{' / '.join(seconds)} | "
                     f"{delta[0] / abs(ref):.1e}, {delta[1] / abs(ref):.1e} | {delta[0] / change:.1e}, "
                     f"{delta[1] / change:.1e} | {diff:.2e} | {abs(diff) / change:.1e} | "
                     f"{r['trace']['float64']['seconds']:.0f} / {r['trace']['float32']['seconds']:.0f} | "
                     f"{r['date']}, {r['load']:.1f} |")
    return "\n".join(lines + ["", "Command: `python -m benchmarks.bench_reading_cost --levers OUT`."])


def eigen_only(n: int, gib: float) -> dict:
    """Time and peak resident memory of `GramPreconditioner.at` at N = n under a limit of `gib` GiB (this process)."""
    torch.set_num_threads(2)
    from experiments.comparison.compare import MODELS
    from experiments.comparison.noise import GaussianLabelNoise, simplex_targets
    from experiments.comparison.point import objective
    from experiments.comparison.projection import GramPreconditioner
    from experiments.data import cifar_subset, resolve_cifar10_dir
    from experiments.probe import build_from_factory

    images, labels = cifar_subset(resolve_cifar10_dir(search=True), n, image_size=32)
    noise = GaussianLabelNoise(SIGMA)
    net = build_from_factory(lambda *, image_size: MODELS["cnn-wide"](image_size=image_size, classes=9),
                             image_size=32, seed=0).to(torch.float64)
    obj = objective(net, images.to(torch.float64), simplex_targets(labels, 10), noise)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    limit = int(gib * 2 ** 30)
    need = GramPreconditioner.check_memory(n * 9, 9, obj.dim, limit=limit)
    start = time.perf_counter()
    eigen = GramPreconditioner.at(obj, noise, obj.params, memory_limit=limit)
    return dict(n=n, rows=n * 9, D=obj.dim, limit_gib=gib, need_gb=need / 1e9, seconds=time.perf_counter() - start,
                rss_before_gb=before, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                top=float(eigen.values[0]), date=datetime.date.today().isoformat(), load=os.getloadavg()[0])


def eigen_table(rows: list[dict]) -> str:
    lines = ["What: `projection.GramPreconditioner.at` alone (Gram matrix Jt Jt^T by Jacobian row blocks, then the "
             "in-place MRRR eigendecomposition) on `cnn-wide` at 32x32 at its initial parameters, N real CIFAR-10 "
             "images, 9 outputs, under the memory limit given (the Jacobian row block takes half of what the Gram "
             "matrix and its eigenvectors leave). Peak: the process's maximum resident set, Python, torch and the "
             "data included. 2 torch threads, each N in its own process.", "",
             "| N | N m | limit GiB | need (Gram + eigenvectors + chunks) GB | seconds | RSS before GB | peak GB | "
             "date, load |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['n']:,} | {r['rows']:,} | {r['limit_gib']:g} | {r['need_gb']:.2f} | {r['seconds']:.0f} | "
              f"{r['rss_before_gb']:.2f} | {r['peak_gb']:.2f} | {r['date']}, {r['load']:.1f} |" for r in rows]
    return "\n".join(lines + ["", "Command: `python -m benchmarks.bench_reading_cost --eigen N GIB`."])


def slope(ns, values) -> float:
    """Least-squares slope of log(values) on log(ns)."""
    lx, ly = torch.tensor(ns, dtype=torch.float64).log(), torch.tensor(values, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def table(rows: list[dict]) -> str:
    ns = [r["n"] for r in rows]
    per_reading = [sum(r["reading_seconds"]) / len(r["reading_seconds"]) for r in rows]
    lines = [
        "What: the matrix-free reading at Phi (`experiments.comparison.reading_mf`) on the GELU CNN `cnn-wide` at "
        f"32x32 (D = {rows[0]['D']:,}) at N real CIFAR-10 images, Gaussian label noise 0.1 on simplex targets: the "
        "point (float32 Adam, float64 CG Gauss-Newton), the exact Gram eigendecomposition at zeta (once per point) "
        "and one SGD measurement (B = 8, eta lambda_max = 0.2, 2 seeds x 2 checkpoints of 1,000 steps = 4 "
        "readings). Each N in its own process, 2 torch threads.",
        "",
        "| N | N m | point s | eigendecomposition s | kept rank, condition | s per reading | CG its per projection "
        "(2 a reading) | flow ranks | measurement s (runs + readings) | peak GB |",
        "|---:|---:|---:|---:|---|---:|---|---|---:|---:|",
    ]
    for r, sec in zip(rows, per_reading):
        lines.append(f"| {r['n']:,} | {r['rows']:,} | {r['point_seconds']:.0f} | {r['eigen_seconds']:.0f} | "
                     f"{r['kept_rank']:,}, {r['condition']:.2g} | {sec:.1f} | "
                     f"{', '.join(map(str, r['projection_cg']))} | {', '.join(map(str, r['flow_ranks']))} | "
                     f"{r['measurement_seconds']:.0f} | {r['peak_gb']:.2f} |")
    if len(rows) >= 2:
        lines += ["", f"Growth exponents (log-log slope over N = {ns[0]}..{ns[-1]}): point "
                      f"{slope(ns, [r['point_seconds'] for r in rows]):.2f}, eigendecomposition "
                      f"{slope(ns, [r['eigen_seconds'] for r in rows]):.2f}, reading "
                      f"{slope(ns, per_reading):.2f}, measurement "
                      f"{slope(ns, [r['measurement_seconds'] for r in rows]):.2f}, peak memory "
                      f"{slope(ns, [r['peak_gb'] for r in rows]):.2f}."]
    lines += ["", "Baseline (the route replaced, not re-run here): 36-39 min a reading at a 500-image 16x16 point "
                  "(RESULTS.md 2b).",
              "", f"Date: {datetime.date.today().isoformat()}; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} shared cores. Command: `python -m benchmarks.bench_reading_cost "
                  f"{' '.join(map(str, ns))}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    children = {"--one": lambda n: one(int(n)), "--eigen-one": lambda n, gib: eigen_only(int(n), float(gib)),
                "--passes-one": lambda n: passes_one(int(n)), "--levers-one": levers_one,
                "--tolerances-run": _tolerances_run, "--tolerances-one": tolerances_one,
                "--breakdown-one": lambda out, *eta: breakdown_one(out, *map(float, eta))}
    if args[:1] and args[0] in children:          # a mode run in its own process: its row as JSON
        print(json.dumps(children[args[0]](*args[1:])))
        return
    appended = {"--eigen": ("_eigen", "--eigen-one", 3, eigen_table, lambda r: (r["n"], r["limit_gib"])),
                "--passes": ("_passes", "--passes-one", 2, passes_table, lambda r: r["n"]),
                "--breakdown": ("_breakdown", "--breakdown-one", 3, breakdown_table,
                                lambda r: (r["n"], r["eta_lambda"], r["date"])),
                "--levers": ("_levers", "--levers-one", 2, levers_table, lambda r: (r["n"], r["date"])),
                "--tolerances": ("_tolerances", "--tolerances-one", 4, tolerances_table,
                                 lambda r: (r["n"], r["date"], r["default"]["eta_lambda"]))}
    if args[:1] and args[0] in appended:           # one process, its row added to the section's table
        suffix, flag, count, render, key = appended[args[0]]
        row = _child(flag, *args[1:count])
        where = RESULTS.with_name(RESULTS.name + suffix)
        rows = json.loads(where.with_suffix(".json").read_text()) if where.with_suffix(".json").exists() else []
        rows = sorted(rows + [row], key=key)
        write_result(where, rows, render(rows))
        print(render(rows))
        return
    rows = []
    for n in [int(a) for a in args] or SIZES:
        rows = sorted(rows + [_child("--one", str(n))], key=lambda r: r["n"])
        print(rows[-1], flush=True)
        write_result(RESULTS, rows, table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
