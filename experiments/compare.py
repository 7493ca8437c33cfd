"""Bring your own model: predicted vs measured sharpness drift on the manifold of minimizers.

`compare(model, images, labels, noise=..., rules=..., etas=...)` takes a network (an `nn.Module` or
a function returning one) and data, builds a point zeta on the manifold Gamma of minimizers of the
noise model's loss (full-batch Adam, then Gauss-Newton to residual <= 1e-10, float64), predicts the
drift of tr H there for every rule (slow SDEs: Li, Wang & Arora 2022; Gu et al. 2023, 2024) and
measures it with noisy continuation runs from zeta, read at Phi to second order. It returns one
`Row` per (rule, eta). Slow time t = eta^2 x steps per worker; rates are d tr H / dt.

The noise model (`experiments.noise_models`: `GaussianLabelNoise`, `FlippedLabels`) owns the loss,
Gamma and the engines; each rule (`sde.rules`) owns its H at eta and its finite-eta form; this module
only schedules the runs: every rule runs about `slow_time` of slow time (steps = slow_time / eta^2 per
worker) with `checkpoints` readings. The point's geometry, Phi correction and preconditioner are
built once and shared by every rule, eta and seed.

Command line (writes OUT/rows.jsonl, one JSON object per (rule, eta), with provenance):

    python -m experiments.compare --model cnn --noise gaussian:0.1 --rules sgd local:K=4,beta=0.4 \
        qsr:K=4,alpha=0.08 --eta 0.004 --seeds 4 --n 200 --image-size 16 --out runs/compare

`--model` is a registered name (`cnn`, `mlp`: `experiments.manifold`'s small smooth networks) or
`module:function` importable from the current directory (called with `image_size=` when it takes
it). `--checkpoint`: a plain state_dict for that network, or, without `--model`, a final.pt /
checkpoint written by `experiments.train`. Every bad input is one error line and an exit code
(`experiments.cli`) before any long work.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from experiments.cli import ArgumentParser, run_main
from experiments.continuation import run_schedule
from experiments.noise_models import LabelNoise, parse_noise
from sde.rules import QSR, SGD, LocalSGD

__all__ = ["Point", "Row", "build_point", "compare", "parse_rule", "run_schedule", "check_model",
           "MODELS", "main"]

Progress = Callable[[str], None] | None


# ---------------------------------------------------------------------- rules from strings
def _rule_kwargs(text: str, allowed: dict[str, type]) -> dict:
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


def _local_batch(kw: dict, workers: int, batch: int, local_batch: int | None) -> int:
    if "b" in kw:
        return kw["b"]
    if local_batch is not None:
        return local_batch
    if batch % workers:
        raise ValueError(f"total batch {batch} is not divisible by K = {workers}: give the local batch (b=)")
    return batch // workers


def _sgd(text, batch, local_batch):
    return SGD(_rule_kwargs(text, {"B": int}).get("B", batch))


def _local(text, batch, local_batch):
    kw = _rule_kwargs(text, {"K": int, "beta": float, "b": int})
    if "K" not in kw or "beta" not in kw:
        raise ValueError(f"rule {text!r}: Local SGD needs K= and beta= (e.g. local:K=4,beta=0.4)")
    return LocalSGD(kw["K"], _local_batch(kw, kw["K"], batch, local_batch), kw["beta"])


def _qsr(text, batch, local_batch):
    kw = _rule_kwargs(text, {"K": int, "alpha": float, "b": int})
    if "K" not in kw or "alpha" not in kw:
        raise ValueError(f"rule {text!r}: QSR needs K= and alpha= (e.g. qsr:K=4,alpha=0.08)")
    return QSR(kw["K"], _local_batch(kw, kw["K"], batch, local_batch), alpha=kw["alpha"])


RULE_FORMS = {"sgd": _sgd, "local": _local, "qsr": _qsr}


def parse_rule(text: str, *, batch: int = 8, local_batch: int | None = None):
    """"sgd[:B=8]", "local:K=4,beta=0.4[,b=2]" or "qsr:K=4,alpha=0.08[,b=2]" -> `sde.SGD` / `LocalSGD` /
    `QSR`. `batch`: SGD's batch and, divided by K, the local batch of the others unless `local_batch`
    or b= is given. ValueError naming the known forms otherwise."""
    name = str(text).partition(":")[0]
    if name not in RULE_FORMS:
        raise ValueError(f"unknown rule {text!r}: expected sgd, local:K=4,beta=0.4 or qsr:K=4,alpha=0.08")
    return RULE_FORMS[name](str(text), batch, local_batch)


# ---------------------------------------------------------------------- the point
def _small_cnn(*, image_size: int, generator: torch.Generator) -> nn.Module:
    from experiments.manifold import build_small_cnn
    return build_small_cnn(image_size=image_size, generator=generator)


def _small_mlp(*, image_size: int, generator: torch.Generator) -> nn.Module:
    from experiments.manifold import build_small_mlp
    return build_small_mlp(image_size=image_size, generator=generator)


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": _small_cnn, "mlp": _small_mlp}   # --model names


def check_model(model: nn.Module, images: Tensor, labels: Tensor, noise: LabelNoise) -> tuple[int, Tensor]:
    """(C, targets in the noise model's form), or ValueError before any work when the network cannot
    have the Gamma the theory assumes: a BatchNorm layer (outputs depend on the batch, or in eval mode
    on statistics that SGD does not move), Dropout (a random loss), outputs that are not one per class
    of the targets, or more equations on Gamma than parameters."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"the network has BatchNorm ({name or 'the model'}: {type(module).__name__}): with "
                             "batch statistics each output depends on the whole batch, so Gamma is not the set "
                             "of per-sample minimizers the theory assumes; use GroupNorm / LayerNorm or none")
        if isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(f"the network has Dropout ({name}): the loss is random, Gamma is not defined; remove it")
    probe = images[:2]
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # noqa: BLE001 - the user's network on the user's images
        raise ValueError(f"the network fails on images of shape {tuple(probe.shape[1:])}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if out.dim() != 2 or out.shape[0] != len(probe) or out.shape[1] < 2:
        raise ValueError(f"the network gives outputs of shape {tuple(out.shape)} for {len(probe)} images; "
                         f"{noise} needs ({len(probe)}, C), one output per class, C >= 2")
    classes = out.shape[1]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} targets")
    try:
        targets = noise.targets(labels, classes)
    except ValueError as exc:
        raise ValueError(f"the network gives outputs of shape {tuple(out.shape)} for {len(probe)} images; "
                         f"{noise}: {exc}") from None
    dim = sum(p.numel() for p in model.parameters())
    eqs = noise.equations(len(images), classes)
    if eqs > dim:
        raise ValueError(f"{len(images)} images give {eqs} equations on Gamma ({noise}) but the network has "
                         f"D = {dim} parameters: Gamma is a manifold only when equations <= D; "
                         "use fewer images or a larger network")
    return classes, targets


@dataclass(frozen=True)
class Point:
    """A point zeta (D,) on Gamma and what every comparison there reuses (built once by `build_point`)."""
    noise: LabelNoise
    objective: object
    labels: Tensor           # the targets in the noise model's form (`LabelNoise.targets`)
    zeta: Tensor
    residual: float          # the noise model's distance to Gamma at zeta (loss, or ||centred(f - log q)||)
    geometry: object
    gradients: object
    preconditioner: object
    correction: object       # `experiments.phi_reading.PhiCorrection`: readings at Phi to second order
    seconds: float
    classes: int = 10        # C, the network's output count

    @property
    def trace(self) -> float:
        return float(self.geometry.trace)

    @property
    def lambda_max(self) -> float:
        return float(self.geometry.lambda_max)


def _as_model(model, *, image_size: int, seed: int) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        from experiments.probe import build_from_factory
        return build_from_factory(model, image_size=image_size, seed=seed)
    raise ValueError(f"model must be an nn.Module or a function returning one, got {type(model).__name__}")


def build_point(model, images: Tensor, labels: Tensor, *, noise: LabelNoise | str, train_steps: int = 3000,
                lr: float = 3e-3, tol: float = 1e-10, seed: int = 0, progress: Progress = None) -> Point:
    """Train `model` (a module, or a factory called with image_size and torch seeded by `seed`) toward
    Gamma by full-batch Adam, project onto Gamma (residual <= tol), and build the geometry, the Phi
    correction and the preconditioner at zeta. Images (N, 3, s, s) and model are used in float64;
    labels: integer (N,) or float (N, C) targets, C = the network's output count (`experiments.noise_models`).
    ValueError when the network does not fit (`check_model`) or the point is not on Gamma."""
    from experiments.phi_reading import PhiCorrection
    noise = parse_noise(noise) if isinstance(noise, str) else noise
    start = time.perf_counter()
    images = images.to(torch.float64)
    net = _as_model(model, image_size=images.shape[-1], seed=seed).to(torch.float64)
    classes, targets = check_model(net, images, labels, noise)
    obj = noise.objective(net, images, targets, classes)
    say = progress or (lambda line: None)
    say(f"point: Adam on {noise} for up to {train_steps} steps (N = {len(images)}, D = {obj.dim})")
    theta = noise.fit(obj, steps=train_steps, lr=lr)
    zeta, residual = noise.project(obj, theta, tol=tol)
    if not residual <= tol:
        raise ValueError(f"the point is not on Gamma: residual {residual:.3e} > {tol:.0e} after the projection "
                         f"({noise}); train longer (more Adam steps) or use fewer images")
    say(f"point: on Gamma (residual {residual:.2e}); geometry, Phi correction and preconditioner")
    geometry, gradients, pre = noise.point_tools(obj, zeta)
    correction = PhiCorrection.at(obj, geometry, gradients)
    say(f"point: tr H = {float(geometry.trace):.6g}, lambda_max = {float(geometry.lambda_max):.6g} "
        f"({time.perf_counter() - start:.0f} s)")
    return Point(noise=noise, objective=obj, labels=targets, zeta=zeta, residual=residual, geometry=geometry,
                 gradients=gradients, preconditioner=pre, correction=correction,
                 seconds=time.perf_counter() - start, classes=classes)


# ---------------------------------------------------------------------- the comparison
@dataclass(frozen=True)
class Row:
    """One rule at one eta: d tr H / dt (slow time) predicted at zeta and measured over `seeds` runs.

    predicted: for the rule as run at eta (QSR: Local SGD with beta = eta H); predicted_limit: its
    eta -> 0 limit; predicted_path: the predicted path fitted like the measurement (NaN unless
    path_dt); measured: mean slope over seeds, stderr its standard error (std / sqrt(seeds)).
    warnings: RegimeWarnings of the runs. engine: the engine's full row (`DriftComparison` /
    `FlipComparison` as a dict)."""
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
    engine: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def ratio(self) -> float:
        """measured / predicted."""
        return self.measured / self.predicted


def _measured_row(point: Point, rule, eta: float, config, *, seed: int, path_dt, progress) -> Row:
    """The noise model's engine run for one config at the point; its RegimeWarnings go into the row."""
    from experiments.continuation import RegimeWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RegimeWarning)
        engine = point.noise.compare(point.objective, point.labels, point.zeta, config, seed=seed,
                                     geometry=point.geometry, gradients=point.gradients, correction=point.correction,
                                     path_dt=path_dt, preconditioner=point.preconditioner, progress=progress)
    regime = [w for w in caught if issubclass(w.category, RegimeWarning)]
    for w in caught:
        if w not in regime:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    e = dataclasses.asdict(engine)
    root = math.sqrt(e["seeds"])
    return Row(rule=e["rule"], eta=eta, noise=str(point.noise), predicted=e["predicted_trace_rate"],
               measured=e["measured_trace_rate"], stderr=e["measured_trace_rate_std"] / root, seeds=e["seeds"],
               seed=seed, predicted_limit=e["predicted_trace_rate_limit"], predicted_path=e["predicted_trace_rate_path"],
               predicted_lambda_max=e["predicted_lambda_max_rate"], measured_lambda_max=e["measured_lambda_max_rate"],
               lambda_max_stderr=e["measured_lambda_max_rate_std"] / root, local_steps=e["local_steps"],
               slow_time=e["slow_time"], trace=e["trace"], lambda_max=e["lambda_max"], seconds=e["seconds"],
               warnings=tuple(f"{w.category.__name__}: {w.message}" for w in regime), engine=e)


def _predicted_row(point: Point, rule, eta: float, config) -> Row:
    """A row without runs: the rates at zeta of the rule as run at eta (`rule.at_eta`) and of the rule itself."""
    start = time.perf_counter()
    obj, geo, grads = point.objective, point.geometry, point.gradients
    limit = point.noise.predict(obj, geo, grads, rule)
    run_rule = rule.at_eta(eta)
    pred = limit if run_rule == rule else point.noise.predict(obj, geo, grads, run_rule)
    nan = float("nan")
    return Row(rule=repr(rule), eta=eta, noise=str(point.noise), predicted=pred.trace_rate, measured=nan, stderr=nan,
               seeds=0, seed=0, predicted_limit=limit.trace_rate, predicted_path=nan,
               predicted_lambda_max=pred.lambda_max_rate, measured_lambda_max=nan, lambda_max_stderr=nan,
               local_steps=config.local_steps, slow_time=0.0, trace=point.trace, lambda_max=point.lambda_max,
               seconds=time.perf_counter() - start)


def compare(model, images: Tensor | None = None, labels: Tensor | None = None, *, noise: LabelNoise | str,
            rules: Sequence, etas: Sequence[float], seeds: int = 4, seed: int = 0, slow_time: float = 0.1,
            checkpoints: int = 5, batch: int = 8, local_batch: int | None = None, path_dt: float | None = None,
            train_steps: int = 3000, lr: float = 3e-3, point: Point | None = None, max_eta_lambda: float = 0.5,
            max_relative_change: float = 0.2, measure: bool = True, progress: Progress = None,
            on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Predicted vs measured d tr H / dt for every rule at every eta (see the module docstring).

    model: an `nn.Module` or a function returning one (ignored when `point` is given: a `build_point`
    result to reuse). rules: `sde` rules or strings (`parse_rule`, with `batch` / `local_batch`).
    Runs `seeds` seeds stacked, drawn from torch.Generator().manual_seed(seed). Every input is checked
    before the point is built, and every eta against the regime (eta lambda_max <= max_eta_lambda)
    before any run; a run whose tr H moves by more than `max_relative_change` gets a RegimeWarning,
    named in its row. measure=False: predictions only (no runs; measured, stderr NaN, seeds 0).
    `on_row(row)`: called as each row is done (e.g. to write it)."""
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
    schedules = {(r, e): run_schedule(r, e, slow_time=slow_time, checkpoints=checkpoints, seeds=seeds)
                 for e in etas for r in rules}                          # a rule's bad settings: ValueError now
    if point is None:
        if images is None or labels is None:
            raise ValueError("give images and labels, or a prebuilt point")
        point = build_point(model, images, labels, noise=noise, train_steps=train_steps, lr=lr, seed=seed,
                            progress=progress)
    elif str(point.noise) != str(noise):
        raise ValueError(f"the point was built for {point.noise}, not {noise}")
    too_large = [e for e in etas if e * point.lambda_max > max_eta_lambda]
    if too_large:
        raise ValueError(f"eta = {too_large} outside the regime: eta x lambda_max > {max_eta_lambda} "
                         f"(lambda_max = {point.lambda_max:.4g} at this point); the slow SDE assumes small eta")
    configs = {key: noise.config(*key, classes=point.classes, max_eta_lambda=max_eta_lambda,
                                 max_relative_change=max_relative_change, **schedule)
               for key, schedule in schedules.items()}
    say = progress or (lambda line: None)
    rows = []
    for (rule, eta), config in configs.items():
        if measure:
            say(f"{rule!r} at eta = {eta:g}: {config.rounds} rounds of {config.local_steps} steps, {seeds} seeds")
            row = _measured_row(point, rule, eta, config, seed=seed, path_dt=path_dt, progress=progress)
            say(f"{row.rule} eta = {eta:g}: predicted {row.predicted:.4g}, measured {row.measured:.4g} "
                f"+- {row.stderr:.2g} (ratio {row.ratio:.3f}, {row.seconds:.0f} s)"
                + "".join(f"; {w}" for w in row.warnings))
        else:
            row = _predicted_row(point, rule, eta, config)
            say(f"{row.rule} eta = {eta:g}: predicted {row.predicted:.6g} (limit {row.predicted_limit:.6g})")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------------- command line
def _prepare_out(out: Path, overwrite: bool) -> Path | None:
    """Refuse an existing non-empty --out unless `overwrite`, which moves it aside (returns where to)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; pass --overwrite to move it aside to "
                             f"{out.name}.replaced-<time> (nothing is deleted)")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved, n = out.with_name(f"{out.name}.replaced-{stamp}"), 1
        while moved.exists():
            moved, n = out.with_name(f"{out.name}.replaced-{stamp}-{n}"), n + 1
        out.rename(moved)
        return moved
    return None


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="cnn, mlp, or module:function returning an nn.Module "
                   "(default cnn; without it, --checkpoint is a file of experiments.train)")
    p.add_argument("--checkpoint", default=None, help="start from this state_dict (or trainer file, see --model)")
    p.add_argument("--noise", required=True, help="gaussian:SIGMA (squared loss) or flip:P (cross-entropy)")
    p.add_argument("--rules", nargs="+", default=["sgd", "local:K=4,beta=0.4", "qsr:K=4,alpha=0.08"],
                   help="sgd[:B=8], local:K=4,beta=0.4[,b=2], qsr:K=4,alpha=0.08[,b=2]")
    p.add_argument("--batch", type=int, default=8, help="total batch B (SGD's; K x the local batch)")
    p.add_argument("--local-batch", type=int, default=None, help="local batch (default --batch / K)")
    p.add_argument("--eta", type=float, nargs="+", default=[0.004])
    p.add_argument("--seeds", type=int, default=4, help="runs per (rule, eta), stacked")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs' generator and the model's initialization")
    p.add_argument("--n", type=int, default=200, help="class-balanced CIFAR-10 training images")
    p.add_argument("--image-size", type=int, default=16, help="image side (avg-pooled from 32; divides 32)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search)")
    p.add_argument("--slow-time", type=float, default=0.1, help="slow time eta^2 x steps of every run")
    p.add_argument("--checkpoints", type=int, default=5, help="readings per run (after t = 0)")
    p.add_argument("--train-steps", type=int, default=3000, help="full-batch Adam steps toward Gamma")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's step")
    p.add_argument("--path-dt", type=float, default=None, help="also fit the predicted path (Heun step)")
    p.add_argument("--predict-only", action="store_true", help="the predictions at the point, no runs")
    p.add_argument("--out", required=True, help="folder for rows.jsonl")
    p.add_argument("--overwrite", action="store_true", help="move a non-empty --out aside first")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _model_from_args(args):
    """The network (module, or factory) named by --model / --checkpoint, checked before any data is read."""
    from experiments.probe import build_from_factory, import_model_factory, load_model, load_state_dict_file
    if args.model is None and args.checkpoint is not None:
        model, _ = load_model(args.checkpoint)
        return model
    spec = args.model or "cnn"
    registered = MODELS.get(spec)
    if registered is not None:
        factory = lambda *, image_size: registered(image_size=image_size,    # noqa: E731
                                                   generator=torch.Generator().manual_seed(args.seed))
    elif ":" in spec:
        factory = import_model_factory(spec)
    else:
        raise ValueError(f"unknown model {spec!r}: expected one of {sorted(MODELS)} or module:function")
    if args.checkpoint is None:
        return factory
    model = build_from_factory(factory, image_size=args.image_size, seed=args.seed)
    return load_state_dict_file(model, args.checkpoint)


def _main(argv: list[str] | None) -> int:
    from experiments.data import resolve_cifar10_dir
    from experiments.manifold import cifar_subset
    from experiments.metrics import atomic_write_bytes, finite_or_none, provenance
    args = _parser().parse_args(argv)
    noise = parse_noise(args.noise)
    rules = [parse_rule(r, batch=args.batch, local_batch=args.local_batch) for r in args.rules]
    for name in ("seeds", "n", "checkpoints", "train_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if 32 % args.image_size:
        raise ValueError(f"--image-size must divide 32, got {args.image_size}")
    for rule in rules:
        for eta in args.eta:
            rule.local_steps(eta)               # bad eta or rule settings: an error now
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        _prepare_out(out, False)                # the refusal, before the data and the model
    model = _model_from_args(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    x, y = cifar_subset(resolve_cifar10_dir(args.data_dir, search=True), args.n, image_size=args.image_size)
    config = {k: v for k, v in vars(args).items() if k not in ("debug", "quiet", "overwrite")}
    record = provenance(config)
    say = None if args.quiet else (lambda line: print(line, flush=True))
    moved = _prepare_out(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if moved is not None and say:
        say(f"moved the previous contents of {out} aside to {moved}")
    lines: list[str] = []

    def write(row: Row) -> None:
        record_row = {**dataclasses.asdict(row), "config": record["config"], "git_revision": record["git_revision"],
                      "date": record["written"], "torch": record["torch"]}
        lines.append(json.dumps(finite_or_none(record_row), sort_keys=True))
        atomic_write_bytes(out / "rows.jsonl", ("\n".join(lines) + "\n").encode())

    rows = compare(model, x, y, noise=noise, rules=rules, etas=args.eta, seeds=args.seeds, seed=args.seed,
                   slow_time=args.slow_time, checkpoints=args.checkpoints, path_dt=args.path_dt,
                   train_steps=args.train_steps, lr=args.lr, measure=not args.predict_only, progress=say,
                   on_row=write)
    print(f"{'rule':42s} {'eta':>8s} {'predicted':>11s} {'measured':>11s} {'stderr':>9s} {'meas/pred':>9s}")
    for r in rows:
        print(f"{r.rule:42s} {r.eta:8g} {r.predicted:11.4g} {r.measured:11.4g} {r.stderr:9.2g} {r.ratio:9.3f}"
              + (" (RegimeWarning)" if r.warnings else ""))
    print(f"wrote {len(rows)} rows to {out / 'rows.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (`experiments.cli`)."""
    return run_main(lambda: _main(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
