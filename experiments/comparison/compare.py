"""Bring your own model: predicted vs measured sharpness drift on the manifold of minimizers.

`compare(model, images, labels, noise=..., rules=..., etas=...)` takes a network (an `nn.Module` or a
function returning one) and data, builds a point zeta on the manifold Gamma of minimizers of the noise
model's loss (`point.build_point`: full-batch Adam, then Gauss-Newton to residual <= 1e-10, float64),
predicts the drift of tr H there for every rule (`sde.label_noise.predict_rates`, or the matrix-free
`sde.label_noise_mf.predict_rates_matrix_free` with method="cg"; slow SDEs of Li, Wang & Arora 2022 and
Gu et al. 2023, 2024) and measures it with noisy continuation runs from zeta read at Phi
(`continuation.measure`). One `Row` per (rule, eta). Slow time t = eta^2 x steps per worker; rates are
d tr H / dt. Every rule runs about `slow_time` of slow time with `checkpoints` readings; the point, its
geometry, Phi correction and preconditioner are built once and shared by every rule, eta and seed.

Command line (writes OUT/rows.jsonl, one JSON object per (rule, eta), with provenance, and for measured rows
OUT/summary.json, `summary.summarize`: measured / predicted per rule at eta -> 0 by the accepted fit):

    python -m experiments.compare --model cnn --noise gaussian:0.1 --rules sgd local:K=4,beta=0.4 \
        qsr:K=4,alpha=0.08 --eta 0.004 --seeds 4 --n 200 --image-size 16 --out runs/compare

`--model`: a registered name (`MODELS`: cnn, cnn-wide, mlp, mlp-wide, `experiments.models`' small smooth
networks) or `module:function` importable from the current directory (called with `image_size=` when it takes
it). `--targets simplex`: squared-loss targets coded as simplex vertices on 9 outputs (`noise.simplex_targets`;
points of more images than the last hidden width, where one-hot targets make the Jacobian rank-deficient).
`--checkpoint`: a plain state_dict for that network, or, without `--model`, a final.pt / checkpoint of
`experiments.train`. `--matrix-free`: the point by CG projections and the predictions without a dense
Jacobian (points of thousands of images; runs are read at Phi matrix-free, `reading_mf`: RESULTS.md section
2b). Every bad input is one error line and an exit
code (`experiments.cli`) before any long work.
"""
from __future__ import annotations

import dataclasses
import functools
import datetime
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from experiments.cli import ArgumentParser, run_main
from experiments.comparison.continuation import ContinuationConfig, RegimeWarning, measure as measure_rule, run_schedule
from experiments.comparison.noise import LabelNoise, parse_noise, simplex_targets
from experiments.comparison.point import Point, build_point
from experiments.comparison.reading_mf import ReadingTolerances, with_eigendecomposition
from experiments.comparison.summary import summarize, summary_lines, write_summary
from experiments.models import build_small_cnn, build_small_mlp
from sde.rules import QSR, SGD, LocalSGD

__all__ = ["Row", "compare", "parse_rule", "predict_row", "prepare_out", "rows_writer", "MODELS", "main"]

Progress = Callable[[str], None] | None
NAN = float("nan")


# ---------------------------------------------------------------------- rules from strings
def _settings(text: str, allowed: dict[str, type]) -> dict:
    name, _, body = text.partition(":")
    out = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"rule {text!r}: unknown setting {item!r} (a {name} rule takes "
                             f"{', '.join(f'{k}=' for k in allowed)})")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise ValueError(f"rule {text!r}: {key}={value!r} is not a {allowed[key].__name__}") from None
    return out


def _workers_rule(cls, knob: str):
    """The parser of a K-worker rule (LocalSGD: beta=, QSR: alpha=); local batch b=, else batch / K."""
    def parse(text: str, batch: int, local_batch: int | None):
        kw = _settings(text, {"K": int, knob: float, "b": int})
        if "K" not in kw or knob not in kw:
            raise ValueError(f"rule {text!r}: {cls.__name__} needs K= and {knob}= (e.g. {text.partition(':')[0]}:"
                             f"K=4,{knob}={0.4 if knob == 'beta' else 0.08})")
        b = kw.get("b", local_batch)
        if b is None:
            if batch % kw["K"]:
                raise ValueError(f"total batch {batch} is not divisible by K = {kw['K']}: give the local batch (b=)")
            b = batch // kw["K"]
        return cls(kw["K"], b, **{knob: kw[knob]})
    return parse


RULE_FORMS = {"sgd": lambda text, batch, local_batch: SGD(_settings(text, {"B": int}).get("B", batch)),
              "local": _workers_rule(LocalSGD, "beta"), "qsr": _workers_rule(QSR, "alpha")}


def parse_rule(text: str, *, batch: int = 8, local_batch: int | None = None):
    """"sgd[:B=8]", "local:K=4,beta=0.4[,b=2]" or "qsr:K=4,alpha=0.08[,b=2]" -> `sde.SGD` / `LocalSGD` /
    `QSR`. `batch`: SGD's batch and, divided by K, the local batch of the others unless `local_batch` or
    b= is given. ValueError naming the known forms otherwise."""
    name = str(text).partition(":")[0]
    if name not in RULE_FORMS:
        raise ValueError(f"unknown rule {text!r}: expected sgd, local:K=4,beta=0.4 or qsr:K=4,alpha=0.08")
    return RULE_FORMS[name](str(text), batch, local_batch)


MODELS: dict[str, Callable[..., nn.Module]] = {   # --model names
    "cnn": build_small_cnn, "mlp": build_small_mlp,
    "mlp-wide": functools.partial(build_small_mlp, hidden=(192, 64)),   # the big points' MLP (D = 50,058 at 8x8)
    "cnn-wide": functools.partial(build_small_cnn, hidden=48)}  # full resolution: D = 51,033 at 32x32, 9 outputs


# ---------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One rule at one eta: d tr H / dt (slow time) predicted at zeta and measured over `seeds` runs.

    predicted: for the rule as run at eta (`rule.at_eta`: QSR runs as Local SGD with beta = eta H);
    predicted_limit: the rule's eta -> 0 limit; predicted_path: the predicted path fitted like the
    measurement (NaN unless path_dt); measured: mean slope over seeds (readings at Phi), stderr its
    standard error std / sqrt(seeds); raw_measured: the same runs read at the Gauss-Newton projection.
    workers: the rule's K (1 for SGD); dim: the network's D.
    per_seed / lambda_max_per_seed: each seed's slope; times and trace_path: the checkpoint times and the
    mean tr H over seeds there (the trajectory, for plots). warnings: the runs' RegimeWarnings. A
    predictions-only row has seeds = 0 and NaN measurements."""
    rule: str
    eta: float
    noise: str
    predicted: float
    measured: float
    stderr: float
    seeds: int
    seed: int
    predicted_limit: float
    predicted_path: float
    predicted_lambda_max: float
    measured_lambda_max: float
    lambda_max_stderr: float
    local_steps: int
    slow_time: float
    trace: float
    lambda_max: float
    seconds: float
    warnings: tuple = ()
    predicted_lambda_max_path: float = NAN
    raw_measured: float = NAN
    max_projection_residual: float = NAN
    workers: int = 1
    dim: int = 0
    per_seed: tuple = ()
    lambda_max_per_seed: tuple = ()
    times: tuple = ()
    trace_path: tuple = ()

    @property
    def ratio(self) -> float:
        """measured / predicted."""
        return self.measured / self.predicted

    @property
    def ratio_path(self) -> float:
        """measured / the predicted path's fitted slope (NaN without path_dt)."""
        return self.measured / self.predicted_path


def _predictions(point: Point, rules: Sequence, etas: Sequence[float], *, method: str,
                 options: dict) -> dict[float, list[tuple]]:
    """eta -> for each rule, (prediction at eta, eta -> 0 limit) at zeta: the `PredictedRates` of the rule as run and
    of the rule. Matrix-free, every rule at every eta is priced in one call: rules sharing a beta (Local SGD at K = 4
    and K = 8, at every eta) share its psi trace, and all betas (QSR's one per eta) share the probes' DG products,
    the cost that dominates (the same probes, so each eta's rates are those of a call for that eta alone)."""
    needed = list(dict.fromkeys(r for eta in etas for rule in rules for r in (rule.at_eta(eta), rule)))
    scale = point.noise.noise_scale
    if method == "cg":              # the point's preconditioner serves the tangent projections (one projector)
        from sde.label_noise_mf import predict_rates_matrix_free
        options.setdefault("projector", _projector(point))
        options.setdefault("spectrum", point.gram_spectrum)        # exact psi(2 beta G) z where the point holds G's
        rates = predict_rates_matrix_free(point.objective, point.zeta, needed, noise_scale=scale,
                                          metric=point.noise.metric(point.targets),
                                          loss_on_gamma=point.noise.minimum_loss(point.targets), **options)
    else:
        from sde.label_noise import predict_rates
        rates = [predict_rates(point.objective, point.geometry, r, noise_scale=scale, gradients=point.gradients)
                 for r in needed]
    by_rule = dict(zip(needed, rates))
    return {eta: [(by_rule[rule.at_eta(eta)], by_rule[rule]) for rule in rules] for eta in etas}


def _projector(point: Point, *, cg_rtol: float = 1e-10, curvature_floor: float = 0.0):
    """The tangent projector at a matrix-free point: CG on the reduced Gram (rtol cg_rtol) under the point's
    preconditioner, Tikhonov shift N x curvature_floor (Hessian units: flatter normal directions count as
    tangent; needed where J is numerically rank-deficient, RESULTS.md section 2b)."""
    from sde.label_noise_mf import TangentProjector
    return TangentProjector(point.objective, point.zeta, point.preconditioner, metric=point.noise.metric(point.targets),
                            rtol=cg_rtol, shift=len(point.targets) * curvature_floor)


def predict_row(point: Point, rule, eta: float, *, method: str = "dense", **options) -> Row:
    """A row without runs: the rates at zeta of the rule as run at eta and of its eta -> 0 limit."""
    start = time.perf_counter()
    [(pred, limit)] = _predictions(point, [rule], [eta], method=method, options=options)[eta]
    return _predicted_row(point, rule, eta, pred, limit, seconds=time.perf_counter() - start)


def _predicted_row(point: Point, rule, eta: float, pred, limit, *, seconds: float) -> Row:
    return Row(rule=repr(rule), eta=eta, noise=str(point.noise), predicted=pred.trace_rate, measured=NAN, stderr=NAN,
               seeds=0, seed=0, predicted_limit=limit.trace_rate, predicted_path=NAN,
               predicted_lambda_max=pred.lambda_max_rate, measured_lambda_max=NAN, lambda_max_stderr=NAN,
               local_steps=rule.local_steps(eta), slow_time=0.0, trace=float(pred.trace),
               lambda_max=float(pred.lambda_max), seconds=seconds, workers=rule.workers,
               dim=point.objective.dim)


def _measured_row(point: Point, config, pred, limit, *, seed: int, path_dt, progress, seconds: float = 0.0) -> Row:
    """`continuation.measure` for one config (a "cg" point is read matrix-free) beside its predictions (pred,
    limit); its RegimeWarnings go into the row, other warnings pass on. seconds: time already spent on the row."""
    start = time.perf_counter() - seconds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RegimeWarning)
        m = measure_rule(point, config, seed=seed, path_dt=path_dt, progress=progress)
    regime = [w for w in caught if issubclass(w.category, RegimeWarning)]
    for w in caught:
        if w not in regime:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    root = math.sqrt(m.seeds)
    return Row(rule=m.rule, eta=m.eta, noise=str(point.noise), predicted=pred.trace_rate, measured=m.trace_rate,
               stderr=m.trace_rate_std / root, seeds=m.seeds, seed=seed, predicted_limit=limit.trace_rate,
               predicted_path=m.path_trace_rate, predicted_lambda_max=pred.lambda_max_rate,
               measured_lambda_max=m.lambda_max_rate, lambda_max_stderr=m.lambda_max_rate_std / root,
               local_steps=m.local_steps, slow_time=m.slow_time, trace=point.trace, lambda_max=point.lambda_max,
               seconds=time.perf_counter() - start,
               warnings=tuple(f"{w.category.__name__}: {w.message}" for w in regime),
               predicted_lambda_max_path=m.path_lambda_max_rate, raw_measured=m.raw_trace_rate,
               max_projection_residual=m.max_projection_residual, workers=config.rule.workers,
               dim=point.objective.dim, per_seed=m.trace_rate_per_seed,
               lambda_max_per_seed=m.lambda_max_rate_per_seed, times=m.checkpoint_times,
               trace_path=m.trace_mean_per_checkpoint)


# ---------------------------------------------------------------------- the comparison
def compare(model, images: Tensor | None = None, labels: Tensor | None = None, *, noise: LabelNoise | str,
            rules: Sequence, etas: Sequence[float], seeds: int = 4, seed: int = 0, slow_time: float = 0.1,
            checkpoints: int = 5, batch: int = 8, local_batch: int | None = None, path_dt: float | None = None,
            train_steps: int = 3000, lr: float = 3e-3, point: Point | None = None, method: str = "dense",
            max_eta_lambda: float = 0.5, max_relative_change: float = 0.2, measure: bool = True,
            nystrom_rank: int = 200, cg_rtol: float = 1e-10, curvature_floor: float = 0.0, cache=None,
            fit_dtype: torch.dtype | None = None, pass_dtype: torch.dtype | None = None,
            tolerances: ReadingTolerances = ReadingTolerances(), gradient_dtype: torch.dtype | None = None,
            measured: Callable[[object, float], bool] | None = None,
            progress: Progress = None, on_row: Callable[[Row], None] | None = None, **mf_options) -> list[Row]:
    """Predicted vs measured d tr H / dt for every rule at every eta (see the module docstring).

    model: an `nn.Module` or a function returning one (ignored when `point`, a `build_point` result, is
    given). rules: `sde` rules or strings (`parse_rule`, with `batch` / `local_batch`). `seeds` runs stacked,
    drawn from torch.Generator().manual_seed(seed). method="cg": the point by CG projections (Nystrom rank
    `nystrom_rank` on the way to Gamma) and the predictions matrix-free (one `_projector(point, cg_rtol=, curvature_floor=)`;
    `mf_options`, e.g. num_probes, go to `predict_rates_matrix_free`); its runs are read at Phi matrix-free
    (`reading_mf`, on one exact Gram eigendecomposition at zeta built here: it also preconditions the
    predictions' tangent projections). Every input
    is checked before the point is built, every eta against the regime (eta lambda_max <= max_eta_lambda)
    before any run; a run whose tr H moves by more than `max_relative_change` gets a RegimeWarning named in
    its row. measure=False: predictions only. `on_row(row)`: called as each row is done (e.g. to write it).
    measured(rule, eta) -> True for the pairs a resumed study already has: skipped (every run's seeds are drawn
    from `seed` alone, so the rows made are the ones an uninterrupted call makes).
    cache: a file keeping zeta between calls (`build_point`'s, keyed by the setup). fit_dtype: the dtype of the
    Adam stage (`point.fit`; e.g. torch.float32), the projection is float64. pass_dtype: the dtype of the matrix-free
    readings' Jacobian passes (`reading_mf.MatrixFreeReader`; e.g. torch.float32) and of the predictions' psi-trace
    products. A point holding its exact Gram eigendecomposition (`Point.gram_spectrum`) gives the psi traces
    exact psi(2 beta G) z, no Lanczos. tolerances: the matrix-free readings' `reading_mf.ReadingTolerances`.
    gradient_dtype: the dtype of the runs' stochastic gradients (`ContinuationConfig.gradient_dtype`)."""
    noise = parse_noise(noise) if isinstance(noise, str) else noise
    rules = [parse_rule(r, batch=batch, local_batch=local_batch) if isinstance(r, str) else r for r in rules]
    etas = [float(e) for e in etas]
    if not rules or not etas:
        raise ValueError("need at least one rule and one eta")
    if any(not (math.isfinite(e) and e > 0) for e in etas):
        raise ValueError(f"every eta must be positive, got {etas}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if checkpoints < 2:
        raise ValueError(f"checkpoints must be >= 2 (a slope after the t = 0 reading), got {checkpoints}")
    if not slow_time > 0:
        raise ValueError(f"slow_time must be positive, got {slow_time}")
    if method not in ("dense", "cg"):
        raise ValueError(f"method must be 'dense' or 'cg', got {method!r}")
    if method == "dense" and tolerances != ReadingTolerances():
        raise ValueError(f"{tolerances} set matrix-free readings: give them with method='cg'")
    schedules = {(r, e): run_schedule(r, e, slow_time=slow_time, checkpoints=checkpoints, seeds=seeds)
                 for e in etas for r in rules}                          # a rule's bad settings: ValueError now
    if point is None:
        if images is None or labels is None:
            raise ValueError("give images and labels, or a prebuilt point")
        point = build_point(model, images, labels, noise=noise, train_steps=train_steps, lr=lr, seed=seed,
                            method=method, progress=progress, cache=cache, fit_dtype=fit_dtype,
                            **({"preconditioner_rank": nystrom_rank, "exact_preconditioner": measure}
                               if method == "cg" else {}))
    elif str(point.noise) != str(noise):
        raise ValueError(f"the point was built for {point.noise}, not {noise}")
    elif point.geometry is None and method == "dense":
        raise ValueError("the point is matrix-free (built with method='cg'): compare it with method='cg'")
    too_large = [e for e in etas if method == "dense" and e * point.lambda_max > max_eta_lambda]
    if too_large:
        raise ValueError(f"eta = {too_large} outside the regime: eta x lambda_max > {max_eta_lambda} "
                         f"(lambda_max = {point.lambda_max:.4g} at this point); the slow SDE assumes small eta")
    say = progress or (lambda line: None)
    rows = []
    if method == "cg" and measure:
        say("point: the Gram eigendecomposition at zeta, shared by every rule's readings and projections")
        point = with_eigendecomposition(point)
    if method == "cg" and "projector" not in mf_options:             # one projector: its solves are reused
        mf_options["projector"] = _projector(point, cg_rtol=cg_rtol, curvature_floor=curvature_floor)
    if method == "cg" and pass_dtype is not None:      # the psi traces' DG products in the readings' pass dtype
        mf_options.setdefault("passes", point.objective.to(pass_dtype))
    pending = [(rule, eta) for rule, eta in schedules if measured is None or not measured(rule, eta)]
    predicted = {}          # eta -> [(at eta, limit) per rule]: every rule at every pending eta, priced at once
    for rule, eta in pending:
        schedule = schedules[rule, eta]
        start = time.perf_counter()
        if not predicted:
            predicted = _predictions(point, rules, list(dict.fromkeys(e for _, e in pending)), method=method,
                                     options=mf_options)
        pred, limit = predicted[eta][rules.index(rule)]
        seconds = time.perf_counter() - start
        if measure:
            config = ContinuationConfig(rule=rule, eta=eta, max_eta_lambda=max_eta_lambda,
                                        max_relative_change=max_relative_change, pass_dtype=pass_dtype,
                                        tolerances=tolerances, gradient_dtype=gradient_dtype, **schedule)
            say(f"{rule!r} at eta = {eta:g}: {config.rounds} rounds of {config.local_steps} steps, {seeds} seeds")
            row = _measured_row(point, config, pred, limit, seed=seed, path_dt=path_dt, progress=progress,
                                seconds=seconds)
            say(f"{row.rule} eta = {eta:g}: predicted {row.predicted:.4g}, measured {row.measured:.4g} "
                f"+- {row.stderr:.2g} (ratio {row.ratio:.3f}, {row.seconds:.0f} s)"
                + "".join(f"; {w}" for w in row.warnings))
        else:
            row = _predicted_row(point, rule, eta, pred, limit, seconds=seconds)
            say(f"{row.rule} eta = {eta:g}: predicted {row.predicted:.6g} (limit {row.predicted_limit:.6g})")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------------- command line
def prepare_out(out: Path, overwrite: bool) -> Path | None:
    """Refuse an existing non-empty --out unless `overwrite`, which moves it aside (returns where to)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return None
    if not overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to move it aside to "
                         f"{out.name}.replaced-<time> (nothing is deleted)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved, n = out.with_name(f"{out.name}.replaced-{stamp}"), 1
    while moved.exists():
        moved, n = out.with_name(f"{out.name}.replaced-{stamp}-{n}"), n + 1
    out.rename(moved)
    return moved


def rows_writer(path: Path, record: dict, previous: Sequence[str] = ()) -> Callable[[Row], None]:
    """compare's `on_row` for a command line: every row so far, with the run's provenance (`metrics.provenance`
    record), rewritten atomically to `path` as JSON lines after each row; `previous` (JSON lines of a study being
    resumed) are kept first, verbatim."""
    from experiments.metrics import atomic_write_json_lines
    lines: list = list(previous)

    def write(row: Row) -> None:
        lines.append({**dataclasses.asdict(row), "config": record["config"], "git_revision": record["git_revision"],
                      "date": record["written"], "torch": record["torch"]})
        atomic_write_json_lines(path, lines)
    return write


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default=None, help="cnn, mlp, or module:function returning an nn.Module "
        "(default cnn; without it, --checkpoint is a file of experiments.train)")
    add("--checkpoint", default=None, help="start from this state_dict (or trainer file, see --model)")
    add("--noise", required=True, help="gaussian:SIGMA (squared loss) or flip:P (cross-entropy)")
    add("--rules", nargs="+", default=["sgd", "local:K=4,beta=0.4", "qsr:K=4,alpha=0.08"],
        help="sgd[:B=8], local:K=4,beta=0.4[,b=2], qsr:K=4,alpha=0.08[,b=2]")
    add("--batch", type=int, default=8, help="total batch B (SGD's; K x the local batch)")
    add("--local-batch", type=int, default=None, help="local batch (default --batch / K)")
    add("--eta", type=float, nargs="+", default=[0.004])
    add("--seeds", type=int, default=4, help="runs per (rule, eta), stacked")
    add("--seed", type=int, default=0, help="seed of the runs' generator and the model's initialization")
    add("--n", type=int, default=200, help="class-balanced CIFAR-10 training images")
    add("--image-size", type=int, default=16, help="image side (avg-pooled from 32; divides 32)")
    add("--targets", choices=("one-hot", "simplex"), default="one-hot", help="class targets of the squared "
        "loss: one-hot on 10 outputs, or simplex (noise.simplex_targets: 9 outputs, no rank-deficient Jacobian; "
        "for points of more images than the last hidden width)")
    add("--data-dir", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search)")
    add("--slow-time", type=float, default=0.1, help="slow time eta^2 x steps of every run")
    add("--checkpoints", type=int, default=5, help="readings per run (after t = 0)")
    add("--train-steps", type=int, default=3000, help="full-batch Adam steps toward Gamma (0: none)")
    add("--lr", type=float, default=3e-3, help="Adam's step")
    add("--fit-float32", action="store_true", help="the Adam stage in float32 (~3x faster convolutions on CPU; "
        "the projection onto Gamma stays float64)")
    add("--path-dt", type=float, default=None, help="also fit the predicted path (Heun step in slow time)")
    add("--predict-only", action="store_true", help="the predictions at the point, no runs")
    add("--matrix-free", action="store_true", help="point by CG projections, predictions without a dense "
        "Jacobian (sde.label_noise_mf; thousands of images); runs read matrix-free on one Gram "
        "eigendecomposition at zeta (2 (N C)^2 float64 numbers, checked against the machine's memory first)")
    add("--nystrom-rank", type=int, default=200, help="--matrix-free: rank of the Gram preconditioner's deflation")
    add("--cg-rtol", type=float, default=1e-10, help="--matrix-free: CG tolerance of the tangent projections")
    add("--curvature-floor", type=float, default=0.0, help="--matrix-free: normal directions of Hessian "
        "curvature far below this count as tangent (Tikhonov shift N x it; e.g. 1e-9 at 1,000+ images)")
    add("--probes", type=int, default=30, help="--matrix-free: stochastic Lanczos probes (rules with a psi term)")
    add("--cache", default=None, help="file keeping the point zeta between runs (keyed by the setup)")
    add("--out", required=True, help="folder for rows.jsonl")
    add("--overwrite", action="store_true", help="move a non-empty --out aside first")
    add("--quiet", action="store_true", help="no progress lines")
    add("--debug", action="store_true", help="show the traceback of an error")
    return p


def _model_from_args(args):
    """The network (module, or factory) named by --model / --checkpoint, checked before any data is read."""
    from experiments.probe import build_from_factory, import_model_factory, load_model, load_state_dict_file
    if args.model is None and args.checkpoint is not None:
        return load_model(args.checkpoint)[0]
    spec = args.model or "cnn"
    if spec in MODELS:
        classes = 9 if args.targets == "simplex" else 10     # simplex: one output per simplex coordinate
        factory = lambda *, image_size: MODELS[spec](image_size=image_size, classes=classes,    # noqa: E731
                                                     generator=torch.Generator().manual_seed(args.seed))
    elif ":" in spec:
        factory = import_model_factory(spec)
    else:
        raise ValueError(f"unknown model {spec!r}: expected one of {sorted(MODELS)} or module:function")
    if args.checkpoint is None:
        return factory
    return load_state_dict_file(build_from_factory(factory, image_size=args.image_size, seed=args.seed),
                                args.checkpoint)


def _main(argv: list[str] | None) -> int:
    from experiments.data import cifar_subset, resolve_cifar10_dir
    from experiments.metrics import provenance
    args = _parser().parse_args(argv)
    noise = parse_noise(args.noise)
    rules = [parse_rule(r, batch=args.batch, local_batch=args.local_batch) for r in args.rules]
    for name in ("seeds", "n", "checkpoints", "nystrom_rank", "probes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps must be >= 0 (0: project the initialization), got {args.train_steps}")
    if 32 % args.image_size:
        raise ValueError(f"--image-size must divide 32, got {args.image_size}")
    if args.path_dt is not None and not args.path_dt > 0:
        raise ValueError(f"--path-dt must be positive, got {args.path_dt}")
    for rule in rules:
        for eta in args.eta:
            rule.local_steps(eta)               # bad eta or rule settings: an error now
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        prepare_out(out, False)                # the refusal, before the data and the model
    model = _model_from_args(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    x, y = cifar_subset(resolve_cifar10_dir(args.data_dir, search=True), args.n, image_size=args.image_size)
    if args.targets == "simplex":
        y = simplex_targets(y, 10)
    record = provenance({k: v for k, v in vars(args).items() if k not in ("debug", "quiet", "overwrite")})
    say = None if args.quiet else (lambda line: print(line, flush=True))
    moved = prepare_out(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if moved is not None and say:
        say(f"moved the previous contents of {out} aside to {moved}")
    write = rows_writer(out / "rows.jsonl", record)
    rows = compare(model, x, y, noise=noise, rules=rules, etas=args.eta, seeds=args.seeds, seed=args.seed,
                   slow_time=args.slow_time, checkpoints=args.checkpoints, path_dt=args.path_dt,
                   train_steps=args.train_steps, lr=args.lr, method="cg" if args.matrix_free else "dense",
                   measure=not args.predict_only, progress=say, on_row=write, cache=args.cache,
                   fit_dtype=torch.float32 if args.fit_float32 else None,
                   **({"nystrom_rank": args.nystrom_rank, "cg_rtol": args.cg_rtol, "num_probes": args.probes,
                       "curvature_floor": args.curvature_floor} if args.matrix_free else {}))
    print(f"{'rule':42s} {'eta':>8s} {'predicted':>11s} {'measured':>11s} {'stderr':>9s} {'meas/pred':>9s}")
    for r in rows:
        print(f"{r.rule:42s} {r.eta:8g} {r.predicted:11.4g} {r.measured:11.4g} {r.stderr:9.2g} {r.ratio:9.3f}"
              + (" (RegimeWarning)" if r.warnings else ""))
    print(f"wrote {len(rows)} rows to {out / 'rows.jsonl'}")
    if not args.predict_only:
        summary = summarize(rows, n=args.n, image_size=args.image_size, dim=rows[0].dim)
        write_summary(out / "summary.json", summary, provenance=record)
        print("\n".join(summary_lines(summary)))
        print(f"wrote {out / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (`experiments.cli`)."""
    return run_main(lambda: _main(argv), argv)
