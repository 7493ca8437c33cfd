"""Predicted vs measured sharpness drift under label noise on real CIFAR-10 (issue #6).

`prepare_point` builds the setting (real balanced CIFAR-10 subset, small GELU CNN, squared loss)
and a point zeta of Gamma; `compare_rule` predicts d tr H/dt and d lambda_max/dt there
(`sde.label_noise`, exact path) and measures them with continuation runs
(`experiments.continuation`), returning one `DriftComparison` row. Run as

    OMP_NUM_THREADS=1 python -m experiments.drift_check --out results.json

which uses 1 torch thread (set deliberately: the cores are shared) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from dynamics.objective import Objective
from experiments.continuation import ContinuationConfig, fit_slope, run_continuation
from experiments.drift_path import label_noise_drift_path
from experiments.data import resolve_cifar10_dir
from experiments.manifold import (GramPreconditioner, ProjectionReport, build_small_cnn, build_small_mlp, cifar_subset, project_to_manifold,
                                  squared_loss_objective, train_to_interpolation)
from experiments.phi_reading import PhiCorrection
from sde.label_noise import gauss_newton_geometry, predict_label_noise_rates, sharpness_gradients
from sde.rules import QSR, SGD, LocalSGD


@dataclass(frozen=True)
class PointSetup:
    """The setting: n real images (n/10 per class) at image_size, the network ("cnn" or "mlp"), Adam steps."""
    n: int = 200
    image_size: int = 16
    model: str = "cnn"
    model_seed: int = 0
    adam_steps: int = 3000
    adam_lr: float = 3e-3


def prepare_point(root: str | Path, setup: PointSetup = PointSetup(), *,
                  cache: str | Path | None = None) -> tuple[Objective, Tensor, ProjectionReport | None]:
    """(objective, zeta on Gamma with L <= 1e-10, projection report) for `setup`.

    With `cache`, zeta is loaded from / saved to that file (keyed by the setup) and the report is None when loaded.
    """
    x, y = cifar_subset(root, setup.n, image_size=setup.image_size)
    if setup.model not in ("cnn", "mlp"):
        raise ValueError(f"setup.model must be 'cnn' or 'mlp', got {setup.model!r}")
    build = build_small_cnn if setup.model == "cnn" else build_small_mlp
    model = build(image_size=setup.image_size, generator=torch.Generator().manual_seed(setup.model_seed))
    obj = squared_loss_objective(model, x, y)
    if cache is not None and Path(cache).exists():
        saved = torch.load(cache)
        if saved.get("setup") == asdict(setup):
            return obj, saved["zeta"], None
    theta = train_to_interpolation(obj, steps=setup.adam_steps, lr=setup.adam_lr, target_loss=1e-5)
    zeta, report = project_to_manifold(obj, theta, tol=1e-10)
    if cache is not None:
        torch.save({"setup": asdict(setup), "zeta": zeta}, cache)
    return obj, zeta, report


@dataclass(frozen=True)
class DriftComparison:
    """One rule at one (eta, sigma): predicted and measured slopes (slow time) of tr H and lambda_max."""
    rule: str
    eta: float
    sigma: float
    local_steps: int
    seeds: int
    slow_time: float
    trace: float
    lambda_max: float
    predicted_trace_rate: float
    predicted_lambda_max_rate: float
    predicted_trace_rate_limit: float      # eta -> 0 limit (differs from the above only for QSR)
    measured_trace_rate: float
    measured_trace_rate_std: float
    measured_lambda_max_rate: float
    measured_lambda_max_rate_std: float
    max_projection_loss: float
    seconds: float
    phi_corrected: bool = False            # readings at Phi to second order (else at Gauss-Newton)
    raw_trace_rate: float | None = None    # slope read at the Gauss-Newton projection (same runs)
    predicted_trace_rate_path: float = float("nan")       # the fitted slope of the predicted path
    predicted_lambda_max_rate_path: float = float("nan")  # (`label_noise_drift_path`) at the same checkpoints

    @property
    def trace_ratio(self) -> float:
        """measured / predicted d tr H / dt."""
        return self.measured_trace_rate / self.predicted_trace_rate

    @property
    def trace_ratio_path(self) -> float:
        """Measured slope / the same fit of the predicted path (NaN without `path_dt`)."""
        return self.measured_trace_rate / self.predicted_trace_rate_path


def compare_rule(obj: Objective, zeta: Tensor, config: ContinuationConfig, *, seed: int = 0,
                 geometry=None, gradients=None, correction: PhiCorrection | None = None,
                 path_dt: float | None = None, preconditioner: GramPreconditioner | None = None,
                 progress: Callable[[str], None] | None = None) -> DriftComparison:
    """Predict (exact path) and measure (continuation, projected readings) for one config.

    With `correction` (`PhiCorrection.at(obj, geometry, gradients)`) the readings are at Phi to
    second order (`experiments.phi_reading`); raw_trace_rate is then the Gauss-Newton reading's slope.
    The predicted rates are at zeta (t = 0), the measured ones fits over the run, and the rates change
    along the run. With `path_dt` the predicted path (`experiments.drift_path.label_noise_drift_path`,
    Heun step path_dt in slow time; QSR at the beta = eta H run) is read at the same checkpoints and
    fitted in the same way: predicted_*_rate_path is the prediction to compare with the measured slope."""
    start = time.perf_counter()
    geometry = geometry or gauss_newton_geometry(obj, zeta)
    gradients = gradients or sharpness_gradients(obj, geometry)
    rule = config.rule
    run_rule = rule.at_eta(config.eta)        # the rule actually run (QSR: Local SGD with beta = eta H)
    limit = predict_label_noise_rates(obj, geometry, rule, sigma=config.sigma, gradients=gradients)
    pred = limit if run_rule == rule else predict_label_noise_rates(obj, geometry, run_rule, sigma=config.sigma,
                                                                    gradients=gradients)
    result = run_continuation(obj, zeta, config, generator=torch.Generator().manual_seed(seed), correction=correction,
                              preconditioner=preconditioner, progress=progress)
    tr = fit_slope(result.times, result.trace)
    lm = fit_slope(result.times, result.lambda_max)
    path_rates = (float("nan"), float("nan"))
    if path_dt is not None:
        times = result.times
        path = label_noise_drift_path(obj, zeta, run_rule, sigma=config.sigma,
                                      t1=float(times[-1]), dt=path_dt)
        path_rates = (path.fitted_slope(times, "trace"), path.fitted_slope(times, "lambda_max"))
    return DriftComparison(
        rule=repr(rule), eta=config.eta, sigma=config.sigma, local_steps=config.local_steps,
        seeds=config.seeds, slow_time=float(result.times[-1]), trace=geometry.trace,
        lambda_max=geometry.lambda_max, predicted_trace_rate=pred.trace_rate,
        predicted_lambda_max_rate=pred.lambda_max_rate, predicted_trace_rate_limit=limit.trace_rate,
        measured_trace_rate=tr.mean, measured_trace_rate_std=tr.std, measured_lambda_max_rate=lm.mean,
        measured_lambda_max_rate_std=lm.std, max_projection_loss=float(result.projection_loss.max()),
        seconds=time.perf_counter() - start, phi_corrected=correction is not None,
        raw_trace_rate=fit_slope(result.times, result.raw_trace).mean,
        predicted_trace_rate_path=path_rates[0], predicted_lambda_max_rate_path=path_rates[1])


def extrapolate_to_zero_eta(etas, values) -> float:
    """Intercept at eta = 0 of the least-squares line through (eta, value): removes the O(eta)
    corrections (eta lambda / 2 of discrete normal fluctuations, the residuals' sampling noise)
    that the eta -> 0 slow SDE omits. With two points it is Richardson extrapolation."""
    eta = torch.as_tensor(etas, dtype=torch.float64)
    val = torch.as_tensor(values, dtype=torch.float64)
    if eta.numel() < 2 or eta.shape != val.shape:
        raise ValueError("need at least two (eta, value) pairs of equal length")
    ec = eta - eta.mean()
    slope = (ec * (val - val.mean())).sum() / (ec ** 2).sum()
    return float(val.mean() - slope * eta.mean())


def steps_per_eta(etas, steps) -> list[int]:
    """Steps per worker for each eta: `steps` is one count for every eta or one count per eta
    (e.g. a fixed slow time eta^2 x steps at every eta). ValueError on a length mismatch or a count < 1."""
    etas, steps = list(etas), list(steps)
    if len(steps) == 1:
        steps = steps * len(etas)
    if len(steps) != len(etas):
        raise ValueError(f"--steps needs one value or one per eta ({len(etas)}), got {len(steps)}")
    if any(s < 1 for s in steps):
        raise ValueError(f"every step count must be >= 1, got {steps}")
    return steps


def default_configs(eta: float = 0.004, sigma: float = 0.1, steps: int = 5000, seeds: int = 4,
                    checkpoints: int = 5, *, qsr_alpha: float = 0.08) -> list[ContinuationConfig]:
    """SGD (B = 8), Local SGD (K = 4, B_loc = 2, beta = 0.4) and QSR (K = 4, B_loc = 2, alpha = qsr_alpha)."""
    per = steps // checkpoints
    sgd = ContinuationConfig(rule=SGD(8), eta=eta, sigma=sigma, rounds=checkpoints, seeds=seeds,
                             steps_per_round_sgd=per)
    local_rule, qsr_rule = LocalSGD(4, 2, 0.4), QSR(4, 2, alpha=qsr_alpha)
    h_local, h_qsr = local_rule.local_steps(eta), qsr_rule.local_steps(eta)
    local = ContinuationConfig(rule=local_rule, eta=eta, sigma=sigma, rounds=steps // h_local,
                               checkpoint_every=max(1, steps // h_local // checkpoints), seeds=seeds)
    qsr = ContinuationConfig(rule=qsr_rule, eta=eta, sigma=sigma, rounds=max(checkpoints, steps // h_qsr),
                             checkpoint_every=max(1, steps // h_qsr // checkpoints), seeds=seeds)
    return [sgd, local, qsr]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search)")
    parser.add_argument("--cache", default=None, help="file to keep zeta in between runs")
    parser.add_argument("--out", required=True, help="JSON lines file to append the rows to")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.004])
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.1])
    parser.add_argument("--rules", nargs="+", default=["sgd", "local", "qsr"])
    parser.add_argument("--steps", type=int, nargs="+", default=[5000], help="one value, or one per --eta")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--qsr-alpha", type=float, default=0.08)
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--n", type=int, default=100, help="images for --model mlp")
    parser.add_argument("--vectorize", action="store_true", help="vmap all seeds x workers every step")
    parser.add_argument("--path-dt", type=float, default=None,
                        help="also fit the predicted path (`experiments.drift_path`, Heun step in slow time, e.g. 0.016)")
    args = parser.parse_args(argv)
    steps_list = steps_per_eta(args.eta, args.steps)         # checked before the costly setup
    if args.path_dt is not None and not args.path_dt > 0:
        parser.error(f"--path-dt must be positive, got {args.path_dt}")
    torch.set_num_threads(1)
    root = resolve_cifar10_dir(args.data, search=True)
    setup = PointSetup() if args.model == "cnn" else PointSetup(n=args.n, image_size=8, model="mlp")
    obj, zeta, _ = prepare_point(root, setup, cache=args.cache)
    geometry = gauss_newton_geometry(obj, zeta)
    gradients = sharpness_gradients(obj, geometry)
    correction = PhiCorrection.at(obj, geometry, gradients)    # readings at Phi (rows also keep the raw reading)
    pre = GramPreconditioner.at(obj, zeta)                   # once per point, shared by every rule and eta
    say = lambda line: print(line, flush=True)               # noqa: E731
    say(f"point: {args.model}, D={obj.dim}, tr H={geometry.trace:.4f}, lambda_max={geometry.lambda_max:.4f}")
    names = {"sgd": 0, "local": 1, "qsr": 2}
    for eta, steps in zip(args.eta, steps_list):
        for sigma in args.sigma:
            configs = default_configs(eta, sigma, steps, args.seeds, args.checkpoints, qsr_alpha=args.qsr_alpha)
            if args.vectorize:
                configs = [dataclasses.replace(c, vectorize=True) for c in configs]
            for name in args.rules:
                row = compare_rule(obj, zeta, configs[names[name]], geometry=geometry, gradients=gradients,
                                   correction=correction, path_dt=args.path_dt, preconditioner=pre,
                                   progress=say)
                with open(args.out, "a") as f:
                    f.write(json.dumps(asdict(row)) + "\n")
                print(f"{row.rule:45s} eta={eta} sigma={sigma} pred={row.predicted_trace_rate:.4g} "
                      f"meas={row.measured_trace_rate:.4g}+-{row.measured_trace_rate_std:.2g} "
                      f"ratio={row.trace_ratio:.3f}"
                      + (f" path pred={row.predicted_trace_rate_path:.4g} ratio_path={row.trace_ratio_path:.3f}"
                         if args.path_dt is not None else "") + f" ({row.seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
