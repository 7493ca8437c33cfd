"""The central comparison at full resolution (issue 13): real CIFAR-10 at 32x32, a smooth CNN of D >= 50,000.

    python -m experiments.comparison.full_resolution --n 2000 --out runs/full_resolution/n2000

The setting: N class-balanced training images at 32x32, the GELU CNN `cnn-wide` (`experiments.models.
build_small_cnn`, hidden 48, 9 outputs: D = 51,033), squared loss with Gaussian label noise on simplex targets
(`noise.simplex_targets`: one-hot targets make the Jacobian rank-deficient above N = 49); or, with --noise flip:P,
cross-entropy with flipped labels on 10 outputs (D = 51,082; N m = 9 N either way). The point: float32 Adam,
float64 CG Gauss-Newton (`build_point(method="cg")`, zeta cached in OUT/zeta.pt), then the one Gram
eigendecomposition at zeta (`reading_mf.with_eigendecomposition`), whose memory is checked before anything starts;
it is kept in OUT/gram_eigen.pt (2.6 GB at N = 2,000, git-ignored), so a resumed study reads it instead of
rebuilding it (~12 min at N = 2,000).
The rules come from the point (`plan`): SGD (batch B), Local SGD with K = 4 and 8 at the beta that puts
2 beta lambda = 1 at the trace-weighted median Hessian eigenvalue (`sde.analysis.spectrum_beta`: both sides of 1
over the spectrum), and QSR (K = 4) whose beta = alpha^2 / eta equals that beta at the middle eta; the etas are
eta_lambda / lambda_max. Every (rule, eta) is measured by `compare` matrix-free; OUT gets plan.json, rows.jsonl
(after every row) and summary.json (`summary.summarize`), each with provenance, written atomically. With
--path-dt each row also gets the predicted path over its window (`path.predicted_path`); --paths-only adds the
paths to the rows already in OUT without new runs (`add_paths`), rewriting rows.jsonl and summary.json.
--resume measures only the (rule, eta) rows OUT lacks (an interrupted study, or one given more --eta-lambda),
keeping its rows verbatim and its plan (beta from the same point, QSR's alpha as planned); the rows it makes are
the ones an uninterrupted study makes (every run's seeds come from --seed alone). Both need OUT/zeta.pt: a point
built again can land elsewhere on Gamma (the float32 fit is not bitwise reproducible across machines), so a
committed study keeps its zeta.pt.
--qsr-alpha gives a new study another study's QSR (e.g. more etas at a point rebuilt elsewhere).
--rules measures only some of the plan's rules ("sgd", "local:K=4", "local:K=8", "qsr:K=4"; `rule_name`), e.g. a
fourth eta for the rule whose finite-eta curvature needs it; the plan keeps every rule, the others wait for a
--resume.
--passes float32 runs the Jacobian passes that dominate the cost in float32 (the point's projection CG, and each
reading's projection CG, flow ranks and Lanczos: `reading_mf.MatrixFreeReader(pass_dtype=)`, 5-8x faster CPU
convolutions); residuals, distances, Gauss-Newton steps, tr H and lambda_max stay float64. A resumed study keeps
the passes it was made with.
--flow-rtol and --first-cg-rtol loosen two of the readings' tolerances (`reading_mf.ReadingTolerances`): the flow
term's truncation (default 1e-10) and the CG tolerance of each projection's first Gauss-Newton step (default the
later steps' 1e-4). At N = 2,000, 1e-2 cuts a projection's CG iterations from 47 to 28 and 1e-6 the flow ranks
from 30 to 17; together a reading takes 0.87x the time and moves by 6e-4 (tr H) and 1e-3 (lambda_max) of a
window's change (BENCHMARKS.md bench_reading_cost_tolerances). --reflected formula reads the reflected term
s(Pi(z - x)) - s(z) by its second-order value at zeta instead of a second projection and sharpness reading
(`reading_mf.FlowCorrection.reflected_terms`; error O(|x|^3) and O(|z - zeta| |x|^2), the flow term's): with the
two above, a reading at N = 2,000 takes 0.48x the time and the window's tr H slope moves by +0.65% at eta
lambda_max 0.1 (a finite-eta error, smaller at smaller eta). --gradients float32 takes the runs' stochastic
gradients in float32 (`ContinuationConfig.gradient_dtype`; the iterates stay float64): 1.65-1.86x faster steps
at N = 2,000 (BENCHMARKS.md bench_run_steps). A resumed study keeps its own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from experiments.cli import ArgumentParser, run_main
from experiments.comparison.compare import MODELS, compare, prepare_out, rows_writer
from experiments.comparison.path import predicted_path
from experiments.comparison.noise import GaussianLabelNoise, LabelNoise, parse_noise, simplex_targets
from experiments.comparison.point import Point, build_point
from experiments.comparison.projection import GramPreconditioner, physical_memory
from experiments.comparison.reading_mf import ReadingTolerances, with_eigendecomposition
from experiments.comparison.summary import summarize, summary_lines, write_summary
from sde.analysis import spectrum_beta
from sde.rules import QSR, SGD, LocalSGD

__all__ = ["plan", "rule_name", "add_paths", "study_point", "main", "MODEL", "CLASSES", "RESULT_DIR", "RESULT_DIRS",
           "result_lines"]

MODEL, CLASSES = "cnn-wide", 10
EIGEN_CACHE = "gram_eigen.pt"    # the point's Gram eigendecomposition, kept in OUT between runs (git-ignored)
# the committed study (plan.json, rows.jsonl, summary.json with provenance) that RESULTS.md 2d quotes
RESULT_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "full_resolution_n500"
RESULT_DIRS = (RESULT_DIR, RESULT_DIR.parent / "full_resolution_n2000")     # every committed study, `make demo`'s


WORKERS, QSR_WORKERS = (4, 8), 4                                # Local SGD's K and QSR's K in a plan


def plan(point: Point, *, eta_lambdas=(0.05, 0.1, 0.2), workers=WORKERS, batch: int = 8, qsr_workers: int = QSR_WORKERS,
         quantile: float = 0.5, alpha: float | None = None) -> dict:
    """The rules and etas for a point with its Gram eigendecomposition attached (module docstring):
    {"rules": [SGD, LocalSGD per K, QSR], "etas": [...], "beta", "alpha", "lambda_max", "trace", "rank"}. Hessian
    eigenvalues = Gram eigenvalues / N (slow time t = eta^2 x steps). alpha: QSR's (default: the one whose
    beta = alpha^2 / eta is Local SGD's at the middle eta; a resumed study keeps its own)."""
    eigen = point.preconditioner
    if not isinstance(eigen, GramPreconditioner):
        raise ValueError("plan needs the point's Gram eigendecomposition: pass with_eigendecomposition(point)")
    n = len(point.targets)
    lam = eigen.values[:eigen.rank] / n
    lambda_max = float(lam[0])
    etas = sorted(float(x) / lambda_max for x in eta_lambdas)
    beta = spectrum_beta(lam, quantile=quantile)
    if alpha is None:
        alpha = (beta * etas[len(etas) // 2]) ** 0.5                 # QSR's beta = alpha^2 / eta = beta at mid eta
    elif not alpha > 0:
        raise ValueError(f"QSR's alpha must be positive, got {alpha}")
    for k in (*workers, qsr_workers):
        if batch % k:
            raise ValueError(f"total batch {batch} is not divisible by K = {k}")
    rules = [SGD(batch), *(LocalSGD(k, batch // k, beta) for k in workers), QSR(qsr_workers, batch // qsr_workers,
                                                                               alpha=alpha)]
    return dict(rules=rules, etas=etas, beta=beta, alpha=alpha, lambda_max=lambda_max,
                trace=float(lam.sum()), rank=int(eigen.rank))


RULE_KINDS = {SGD: "sgd", LocalSGD: "local", QSR: "qsr"}       # --rules' names: the forms `compare.parse_rule` reads
RULE_NAMES = ("sgd", *(f"local:K={k}" for k in WORKERS), f"qsr:K={QSR_WORKERS}")     # the rules of a default plan


def rule_name(rule) -> str:
    """The --rules name of a planned rule: "sgd", or its kind and K ("local:K=8", "qsr:K=4")."""
    kind = RULE_KINDS[type(rule)]
    return kind if kind == "sgd" else f"{kind}:K={rule.workers}"


def add_paths(rows: list[dict], point: Point, rules, *, dt: float | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """rows (JSON dicts of one study, from `rows_writer`) with predicted_path and predicted_lambda_max_path filled:
    one `predicted_path` per rule as run (rule.at_eta(eta)) from zeta over the longest window of its rows, read at
    each row's checkpoints by the measurement's fit (`PredictedPath.fitted_slope`). rules: the study's rules
    (`plan`), matched to the rows by repr; dt the Heun step (None: one step per window). Changes rows in place."""
    by_repr = {repr(r): r for r in rules}
    missing = sorted({row["rule"] for row in rows} - set(by_repr))
    if missing:
        raise ValueError(f"rows of rules the plan does not have: {missing} (another point, --eta-lambda or --batch?)")
    groups: dict = {}
    for row in rows:
        groups.setdefault(by_repr[row["rule"]].at_eta(row["eta"]), []).append(row)
    for run_rule, group in groups.items():
        start, t1 = time.perf_counter(), max(row["times"][-1] for row in group)
        path = predicted_path(point, run_rule, t1=t1, dt=dt or t1)
        for row in group:
            row.update(predicted_path=path.fitted_slope(row["times"]),
                       predicted_lambda_max_path=path.fitted_slope(row["times"], "lambda_max"))
        if progress:
            progress(f"path of {run_rule!r} to t = {t1:.4g}: d tr H/dt {path.trace_rate[0]:.5g} at zeta, "
                     f"{path.trace_rate[-1]:.5g} at the end ({time.perf_counter() - start:.0f} s)")
    return rows


def result_lines(folder: Path = RESULT_DIR) -> list[str]:
    """Where the committed full-resolution result lives (relative to the repository) and its summary, as
    printed by `make demo`; one line saying it is missing if the folder has no summary.json."""
    where = folder.relative_to(RESULT_DIR.parents[2]) if folder.is_relative_to(RESULT_DIR.parents[2]) else folder
    if not (folder / "summary.json").is_file():
        return [f"the full-resolution result is not in {where} (run python -m experiments.comparison.full_resolution)"]
    summary = json.loads((folder / "summary.json").read_text())
    first = summary["rules"][0]
    done = ""
    if (folder / "plan.json").is_file() and (folder / "rows.jsonl").is_file():      # what is measured at each eta
        study = json.loads((folder / "plan.json").read_text())
        rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]
        measured = {eta: sum(any(_is_row_of(row, rule, eta) for row in rows) for rule in study["rules"])
                    for eta in study["etas"]}
        per_eta = [f"{eta * study['lambda_max']:.3g}: {count}" for eta, count in measured.items()]
        done = f" (rules measured of {len(study['rules'])} per eta x lambda_max: {', '.join(per_eta)})"
    return [f"full resolution (RESULTS.md 2d): N = {first['n']} CIFAR-10 images at {first['image_size']}x"
            f"{first['image_size']}, D = {first['D']:,}, {first['noise']}; rows and summary in {where}{done}",
            *summary_lines(summary)]


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.comparison.full_resolution", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--n", type=int, default=2000, help="class-balanced CIFAR-10 training images at 32x32")
    add("--noise", default="gaussian:0.1", help="gaussian:SIGMA (squared loss on simplex targets, 9 outputs) or "
        "flip:P (cross-entropy on 10 outputs, every drawn label flipped with probability P)")
    add("--eta-lambda", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="the etas as eta x lambda_max")
    add("--seeds", type=int, default=3)
    add("--checkpoints", type=int, default=4, help="readings per run after t = 0")
    add("--slow-time", type=float, default=0.05, help="slow time eta^2 x steps of every run")
    add("--passes", choices=["float32"], default=None, help="the dtype of the readings' Jacobian passes (projection "
        "CG, flow ranks, Lanczos; 5-8x faster on CPU); residuals, steps, tr H and lambda_max stay float64 "
        "(default: all float64)")
    add("--flow-rtol", type=float, default=None, help="the readings' flow-term truncation (default 1e-10; 1e-6 "
        "keeps ~17 of 30 ranks at N = 2,000 and moves the term by ~4e-4 of itself, BENCHMARKS.md)")
    add("--first-cg-rtol", type=float, default=None, help="the CG tolerance of each projection's first "
        "Gauss-Newton step (default: the later steps' 1e-4; 1e-2 cuts the projections' CG by 40% at N = 2,000)")
    add("--reflected", choices=["projected", "formula"], default=None, help="how each reading takes s(Pi(z - x)): "
        "by a second projection and reading (default), or by its second-order formula at zeta (one projection "
        "and reading: 0.48x a reading's time with the two above at N = 2,000; reading_mf.ReadingTolerances)")
    add("--gradients", choices=["float32"], default=None, help="the dtype of the runs' stochastic gradients "
        "(iterates, averaging and noise draws stay float64; 1.65-1.86x faster steps; default float64)")
    add("--batch", type=int, default=8, help="total batch B of every rule")
    add("--seed", type=int, default=0)
    add("--fit-patience", type=int, default=None, help="stop the point's Adam once its lowest loss has not halved "
        "in this many steps (point.fit; default: up to 3,000 steps; 200 at N = 2,000 stops it after ~820 steps "
        "instead of 3,000 on a plateau, and the projection takes one more Gauss-Newton step; the point is another "
        "one of Gamma, at N = 2,000 a sharper one whose runs take 2x the steps, RESULTS.md 2d)")
    add("--qsr-alpha", type=float, default=None, help="QSR's alpha for a new study (default: beta = alpha^2 / eta "
        "equals Local SGD's beta at the middle eta), e.g. another study's, to measure its QSR at other etas")
    add("--data-dir", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search)")
    add("--out", required=True)
    add("--memory-gib", type=float, default=None, help="memory for the Gram eigendecomposition at zeta (its matrix, "
        "eigenvectors and Jacobian row blocks; default the machine's RAM): a smaller limit streams the Jacobian "
        "in more row blocks (slower Gram build, lower peak)")
    add("--path-dt", type=float, default=None, help="also fit each row's predicted path (Heun step in slow time; "
        "matrix-free for SGD, Jacobian nodes for rules with a psi term)")
    add("--paths-only", action="store_true", help="add the predicted path to the rows already in --out, no runs "
        "(one path per rule as run; --path-dt, default one Heun step per window); rewrites rows.jsonl and summary.json")
    add("--resume", action="store_true", help="measure only the (rule, eta) rows missing from --out's rows.jsonl "
        "(an interrupted study, or more --eta-lambda); the study's plan (beta, alpha) and rows are kept")
    add("--rules", nargs="+", choices=RULE_NAMES, default=None, help="measure only these of the plan's rules "
        "(default: all); the plan keeps every rule, a later --resume measures the others")
    add("--overwrite", action="store_true", help="move a non-empty --out aside first")
    add("--quiet", action="store_true")
    add("--debug", action="store_true")
    return p


def network_outputs(noise: LabelNoise) -> int:
    """The network's outputs under `noise`: the squared loss fits simplex targets on C - 1 outputs (one-hot ones
    make Jt rank-deficient above N = 49), cross-entropy the C class logits."""
    return CLASSES - 1 if isinstance(noise, GaussianLabelNoise) else CLASSES


# what a resumed study (or one given paths) must share with the rows it already has
STUDY_OPTIONS = ("n", "seed", "batch", "fit_patience")      # and the rows' noise
READING_OPTIONS = tuple(f.name for f in dataclasses.fields(ReadingTolerances))   # flags named as its fields
MEASUREMENT_OPTIONS = ("seeds", "slow_time", "checkpoints", "passes", "gradients") + READING_OPTIONS


def _study_rows(out: Path, noise: LabelNoise, args, keys) -> tuple[list[str], dict]:
    """(the JSON lines of OUT's rows.jsonl, OUT's plan.json) for --resume / --paths-only; ValueError if either is
    missing or the rows were made with another noise or other values of `keys` than these options."""
    rows_path, plan_path = out / "rows.jsonl", out / "plan.json"
    for path in (rows_path, plan_path):
        if not path.is_file():
            raise ValueError(f"--resume and --paths-only work on a study's rows and plan: no {path}")
    lines = [line for line in rows_path.read_text().splitlines() if line.strip()]
    for line in lines:
        row = json.loads(line)
        made = {"noise": row["noise"], **{k: row["config"].get(k) for k in keys}}
        if made != {"noise": str(noise), **{k: getattr(args, k) for k in keys}}:
            raise ValueError(f"the rows in {out} were made with {made}, not these options")
    return lines, json.loads(plan_path.read_text())


def _same_eta(a: float, b: float) -> bool:
    """Whether two etas are one (an eta recomputed from lambda_max may differ in its last bit)."""
    return math.isclose(a, b, rel_tol=1e-12)


def _is_row_of(row: dict, rule: str, eta: float) -> bool:
    """Whether a study's JSON row is the rule (its repr, as plan.json lists it) as run at eta."""
    return row["rule"] == rule and _same_eta(row["eta"], eta)


def _measured(rows: list[dict]) -> Callable[[object, float], bool]:
    """compare's `measured(rule, eta)`: whether `rows` (a study's JSON rows) hold that rule as run at that eta."""
    def measured(rule, eta: float) -> bool:
        return any(_is_row_of(row, repr(rule), eta) for row in rows)
    return measured


def study_point(out: Path, images: Tensor, labels: Tensor, noise: LabelNoise, *, seed: int = 0,
                pass_dtype: torch.dtype | None = None, memory_limit: int | None = None, progress=None,
                fit_patience: int | None = None) -> Point:
    """The study's point on images (N, 3, 32, 32) with integer labels (N,), with its Gram eigendecomposition
    (module docstring), read from out/zeta.pt and out/gram_eigen.pt when they hold this setup's (else built and
    written there); pass_dtype as --passes, fit_patience as --fit-patience."""
    outputs = network_outputs(noise)
    targets = simplex_targets(labels, CLASSES) if outputs < CLASSES else labels
    point = build_point(lambda *, image_size: MODELS[MODEL](image_size=image_size, classes=outputs), images,
                        targets, noise=noise, method="cg", seed=seed,
                        fit_dtype=torch.float32, exact_preconditioner=True, memory_limit=memory_limit,
                        cache=out / "zeta.pt", eigen_cache=out / EIGEN_CACHE, progress=progress,
                        pass_dtype=pass_dtype, fit_patience=fit_patience,
                        generator=torch.Generator().manual_seed(seed))
    return with_eigendecomposition(point)


def _main(argv: list[str] | None) -> int:
    from experiments.data import cifar_subset, resolve_cifar10_dir
    from experiments.metrics import atomic_write_bytes, atomic_write_json_lines, provenance
    args = _parser().parse_args(argv)
    noise = parse_noise(args.noise)
    for name in ("n", "seeds", "checkpoints", "batch", "fit_patience"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    excluded = [flag for flag, given in (("--paths-only", args.paths_only), ("--overwrite", args.overwrite),
                                         ("--qsr-alpha", args.qsr_alpha is not None)) if given]
    if args.resume and excluded:
        raise ValueError(f"--resume continues the study in --out; it excludes {excluded[0]}")
    tolerances = ReadingTolerances(**{name: getattr(args, name) for name in READING_OPTIONS
                                      if getattr(args, name) is not None})       # ValueError naming a bad one, now
    if args.qsr_alpha is not None and not args.qsr_alpha > 0:
        raise ValueError(f"--qsr-alpha must be positive, got {args.qsr_alpha}")
    outputs = network_outputs(noise)
    dim = sum(p.numel() for p in MODELS[MODEL](image_size=32, classes=outputs).parameters())
    memory = physical_memory()
    if args.memory_gib is not None:
        if not 0 < args.memory_gib * 2 ** 30 <= memory:
            raise ValueError(f"--memory-gib must be in (0, {memory / 2 ** 30:.1f}] (this machine's RAM), "
                             f"got {args.memory_gib}")
        memory = int(args.memory_gib * 2 ** 30)
    GramPreconditioner.check_memory(noise.equations(args.n, outputs), noise.equations(1, outputs), dim,
                                    limit=memory)                                 # before any work
    out = Path(args.out)
    say = None if args.quiet else (lambda line: print(line, flush=True))
    record = provenance({k: v for k, v in vars(args).items() if k not in ("debug", "quiet", "overwrite")})
    if args.path_dt is not None and not args.path_dt > 0:
        raise ValueError(f"--path-dt must be positive, got {args.path_dt}")
    lines, saved = [], None
    if args.resume or args.paths_only:
        lines, saved = _study_rows(out, noise, args, STUDY_OPTIONS + (MEASUREMENT_OPTIONS if args.resume else ()))
        if not (out / "zeta.pt").is_file():
            raise ValueError(f"--resume and --paths-only need the point the rows were measured at: no "
                             f"{out / 'zeta.pt'} (a point built again can land elsewhere on Gamma: the float32 fit "
                             "differs across machines)")
    images, labels = cifar_subset(resolve_cifar10_dir(args.data_dir, search=True), args.n, image_size=32)
    if not (args.paths_only or args.resume):
        resumable = out.is_dir() and {p.name for p in out.iterdir()} <= {"zeta.pt", "plan.json", EIGEN_CACHE}  # a point
        moved = None if resumable else prepare_out(out, args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        if moved is not None and say:
            say(f"moved the previous contents of {out} aside to {moved}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    pass_dtype = None if args.passes is None else getattr(torch, args.passes)
    point = study_point(out, images, labels, noise, seed=args.seed, pass_dtype=pass_dtype, memory_limit=memory,
                        progress=say, fit_patience=args.fit_patience)
    chosen = plan(point, eta_lambdas=args.eta_lambda, batch=args.batch,
                  alpha=args.qsr_alpha if saved is None else saved["alpha"])
    if saved is not None and not math.isclose(chosen["beta"], saved["beta"], rel_tol=1e-9):
        raise ValueError(f"this point's beta {chosen['beta']:.10g} is not the study's {saved['beta']:.10g}: "
                         f"{out / 'zeta.pt'} is not the point its rows were measured at")
    rows = [json.loads(line) for line in lines]
    if args.paths_only:
        add_paths(rows, point, chosen["rules"], dt=args.path_dt, progress=say)
        added = {"date": record["written"], "path_dt": args.path_dt, "git_revision": record["git_revision"]}
        atomic_write_json_lines(out / "rows.jsonl", [{**row, "path_added": added} for row in rows])
        return _finish(out, rows, args.n, point.objective.dim, record)
    if saved is None:
        setup = {**{k: v for k, v in chosen.items() if k != "rules"}, "rules": [repr(r) for r in chosen["rules"]],
                 "D": point.objective.dim, "point_seconds": time.perf_counter() - start, "provenance": record}
    else:                              # the study's own plan and provenance stay; the etas are the union
        added = [eta for eta in chosen["etas"]
                 if not any(_same_eta(eta, old) for old in saved["etas"])]
        setup = {**saved, "etas": sorted(saved["etas"] + added),
                 "resumed": [*saved.get("resumed", []), record]}
    atomic_write_bytes(out / "plan.json", (json.dumps(setup, indent=1) + "\n").encode())
    if say:
        say(f"plan: lambda_max = {chosen['lambda_max']:.4g}, tr H = {chosen['trace']:.6g}, beta = {chosen['beta']:.4g}, "
            f"alpha = {chosen['alpha']:.4g}, etas = {', '.join(f'{e:.3g}' for e in chosen['etas'])}")
    measured = _measured(rows)
    done = measured if args.rules is None else (lambda rule, eta: measured(rule, eta) or rule_name(rule) not in
                                                args.rules)                  # left out: as if measured
    if say and (args.resume or args.rules):
        left = sum(not done(r, e) for r in chosen["rules"] for e in chosen["etas"])
        say(f"{'resuming' if args.resume else 'measuring'} {out}: {len(rows)} rows kept, {left} to measure")
    made = compare(None, point=point, noise=noise, rules=chosen["rules"], etas=chosen["etas"], seeds=args.seeds,
                   seed=args.seed, slow_time=args.slow_time, checkpoints=args.checkpoints, method="cg",
                   path_dt=args.path_dt, measured=done, progress=say,
                   pass_dtype=pass_dtype, tolerances=tolerances,
                   gradient_dtype=None if args.gradients is None else getattr(torch, args.gradients),
                   on_row=rows_writer(out / "rows.jsonl", record, previous=lines))
    return _finish(out, rows + made, args.n, point.objective.dim, record)


def _finish(out: Path, rows, n: int, dim: int, record: dict) -> int:
    """summary.json beside the rows, printed."""
    summary = summarize(rows, n=n, image_size=32, dim=dim)
    write_summary(out / "summary.json", summary, provenance=record)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {out / 'rows.jsonl'} and {out / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (`experiments.cli`)."""
    return run_main(lambda: _main(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
