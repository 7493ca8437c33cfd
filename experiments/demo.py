"""`make demo`: the slow-SDE label-noise drift checked on a toy and on real CIFAR-10 (issue #6).

    python -m experiments.demo [--data-dir DIR] [--download] [--out DIR] [--quick]

(a) Toy: `sde.toys.DiagonalNet` with label noise. Discrete SGD, Local SGD (H = beta / eta) and
QSR (H = floor((alpha / eta)^2)) at three learning rates (`sde.discrete`); the slope of
log p_1 (p = u v, conserved by gradient flow, so read at the iterate) is extrapolated to
eta -> 0 (`sde.analysis.extrapolate_to_zero`) and compared with the slow-SDE rate
-4 sigma^2 m_1 w(lambda_1) / B (THEORY.md, label-noise closed form).
(b) Real CIFAR-10: `experiments.compare.compare` on a small GELU MLP and a class-balanced subset: a
point zeta of Gamma (`experiments.comparison.point.build_point`), the predicted d tr H/dt and
d lambda_max/dt for SGD, Local SGD and QSR (`sde.label_noise`, exact path), and continuation runs with
Gaussian label noise read at Phi, the gradient-flow projection onto Gamma, to second order
(`experiments.comparison`), mean +/- std over seeds.

Slow time t = eta^2 x steps per worker. One torch thread (set here, deliberately: the machine's
2 cores are shared and small tensor work does not gain from a second thread). Without data the
toy part runs and the instructions to get CIFAR-10 are printed (exit status 0). Results: a JSON
with provenance (date, git revision, settings, seeds) written atomically to --out (default runs/demo,
git-ignored: `make demo` changes no tracked file), and figures demo_*.png/pdf via
`experiments.plotstyle.save_figure`; `make figures` promotes them into figures/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.comparison.compare import compare
from experiments.comparison.continuation import extrapolate_to_zero_eta
from experiments.comparison.noise import GaussianLabelNoise
from experiments.comparison.path import fit_slope
from experiments.comparison.point import Point, build_point
from experiments.data import cifar_subset, download_cifar10, load_cifar10, resolve_cifar10_dir
from experiments.metrics import atomic_write_bytes, finite_or_none, git_revision
from experiments.models import build_small_mlp
from experiments.notebooks import record_provenance
from experiments.plotstyle import SLOW_TIME_LABEL, apply_style, save_figure
from sde.analysis import extrapolate_to_zero
from sde.discrete import run_local_sgd
from sde.rules import QSR, SGD, LocalSGD
from sde.toys import DiagonalNet

TORCH_THREADS = 1
RESULTS_NAME = "demo_results.json"
DEMO_DIR = Path(__file__).resolve().parents[1] / "runs" / "demo"


@dataclass(frozen=True)
class ToySettings:
    """Diagonal net with m = (1, 1/2), w* = (1, 1), p(0) = (p0, p0), label-noise std sigma.

    Rules share total batch B = 8: SGD(8), LocalSGD(K, 2, beta), QSR(K, 2, alpha). Each run lasts
    `slow_time` (a multiple of alpha^2, one QSR round at every eta)."""
    etas: tuple[float, ...] = (0.04, 0.02, 0.01)
    sigma: float = 1.0
    p0: float = 0.1
    workers: int = 4
    beta: float = 0.2
    alpha: float = 0.2
    slow_time: float = 0.4
    seeds: int = 256
    seed: int = 0


@dataclass(frozen=True)
class CifarSettings:
    """The CIFAR-10 point (n class-balanced images at image_size, `experiments.models.build_small_mlp` seeded
    by model_seed, adam_steps of full-batch Adam) and its continuation runs: `steps` steps per worker at every
    eta (slow time steps x eta^2), rules with total batch workers x local_batch."""
    n: int = 100
    image_size: int = 8
    model_seed: int = 0
    adam_steps: int = 3000
    adam_lr: float = 3e-3
    etas: tuple[float, ...] = (0.004, 0.008)
    sigma: float = 0.1
    steps: int = 2000
    checkpoints: int = 4
    seeds: int = 4
    workers: int = 4
    local_batch: int = 2
    beta: float = 0.4
    qsr_alpha: float = 0.08
    seed: int = 0


QUICK_TOY = ToySettings(seeds=64, slow_time=0.1, alpha=0.2 / math.sqrt(2))
QUICK_CIFAR = CifarSettings(n=10, image_size=4, etas=(0.004,), steps=400, checkpoints=2, seeds=2, beta=0.2,
                            qsr_alpha=0.04)


# ----------------------------------------------------------------------------------------- toy
def toy_rules(s: ToySettings) -> dict[str, object]:
    b_loc = 8 // s.workers
    return {"SGD": SGD(8), "Local": LocalSGD(s.workers, b_loc, s.beta), "QSR": QSR(s.workers, b_loc, alpha=s.alpha)}


def run_toy(s: ToySettings, progress=print) -> dict:
    """Measured slopes of log p_1 per rule and eta, their eta -> 0 extrapolation, and the predictions."""
    X = torch.diag(torch.tensor([math.sqrt(2.0), 1.0], dtype=torch.float64))   # m = (1, 1/2)
    net = DiagonalNet(X, torch.ones(2, dtype=torch.float64), s.sigma)
    zeta0 = net.point_on_gamma(torch.full((2,), s.p0, dtype=torch.float64))
    lam1 = float(net.eigenvalues(zeta0)[0])
    gen = torch.Generator().manual_seed(s.seed)
    out = {"lambda_1": lam1, "rules": {}}
    for name, rule in toy_rules(s).items():
        predicted = float(net.log_rate(zeta0, rule)[0])
        rows = []
        for eta in s.etas:
            workers, b_loc, H = rule.workers, rule.local_batch, rule.local_steps(eta)
            rounds = max(2, round(s.slow_time / (H * eta ** 2)))
            start = time.perf_counter()
            run = run_local_sgd(net.sample_gradient, zeta0, eta=eta, workers=workers, local_batch=b_loc,
                                local_steps=H, n_rounds=rounds, n_seeds=s.seeds, generator=gen,
                                observe=lambda th: torch.log(net.products(th)[:, 0]),
                                observe_every=max(1, rounds // 20))
            slope = fit_slope(run.times, run.values, skip=0)
            rows.append({"eta": eta, "local_steps": H, "rounds": rounds, "measured": slope.mean,
                         "stderr": slope.std / math.sqrt(s.seeds), "std": slope.std,
                         "seconds": time.perf_counter() - start})
            progress(f"  toy {name:5s} eta={eta:<6g} H={H:<4d} d log p1/dt = {slope.mean:+.4f} "
                     f"(predicted {predicted:+.4f})")
        ext = extrapolate_to_zero([r["eta"] for r in rows], [r["measured"] for r in rows],
                                  [r["stderr"] for r in rows])
        out["rules"][name] = {"rule": repr(rule), "predicted": predicted, "rows": rows,
                              "extrapolated": ext.value, "extrapolated_stderr": ext.stderr,
                              "ratio": ext.value / predicted}
    return out


def toy_table(toy: dict, etas) -> str:
    head = f"{'rule':6s} {'predicted':>10s}" + "".join(f" {'eta=' + format(e, 'g'):>10s}" for e in etas)
    head += f" {'eta->0':>18s} {'ratio':>7s}"
    lines = [head, "-" * len(head)]
    for name, r in toy["rules"].items():
        line = f"{name:6s} {r['predicted']:10.4f}" + "".join(f" {row['measured']:10.4f}" for row in r["rows"])
        line += f" {r['extrapolated']:10.4f}+-{r['extrapolated_stderr']:6.4f} {r['ratio']:7.4f}"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- CIFAR
def cifar_rules(s: CifarSettings) -> dict[str, object]:
    b = s.workers * s.local_batch
    return {"SGD": SGD(b), "Local": LocalSGD(s.workers, s.local_batch, s.beta),
            "QSR": QSR(s.workers, s.local_batch, alpha=s.qsr_alpha)}


def cifar_point(root: Path, s: CifarSettings) -> Point:
    """The point of Gamma of the settings' MLP on its real subset, squared loss, Gaussian label noise sigma."""
    x, y = cifar_subset(root, s.n, image_size=s.image_size)
    model = build_small_mlp(image_size=s.image_size, generator=torch.Generator().manual_seed(s.model_seed))
    return build_point(model, x, y, noise=GaussianLabelNoise(s.sigma), train_steps=s.adam_steps, lr=s.adam_lr)


def run_cifar(root: Path, s: CifarSettings, progress=print) -> dict:
    """The point, and `compare`'s rows (predicted at eta and eta -> 0, measured at Phi) for every rule and eta."""
    start = time.perf_counter()
    point = cifar_point(root, s)
    geometry = point.geometry
    progress(f"  point: N={s.n} images {s.image_size}x{s.image_size}, D={point.objective.dim}, "
             f"L(zeta)={point.residual:.2e}, tr H={point.trace:.3f}, lambda_max={point.lambda_max:.3f} "
             f"({time.perf_counter() - start:.0f} s)")
    out = {"point": {"n": s.n, "dim": point.objective.dim, "loss": point.residual, "trace": point.trace,
                     "lambda_max": point.lambda_max, "rank": int(geometry.eigenvalues.numel())},
           "eigenvalues": geometry.eigenvalues.tolist(), "runs": []}
    rules = cifar_rules(s)
    for eta in s.etas:                      # the same steps per worker at every eta
        rows = compare(None, point=point, noise=point.noise, rules=list(rules.values()), etas=[eta], seeds=s.seeds,
                       seed=s.seed, slow_time=s.steps * eta ** 2, checkpoints=s.checkpoints)
        for name, row in zip(rules, rows):
            out["runs"].append({"name": name, "sigma": s.sigma, "eta_lambda_max": eta * point.lambda_max,
                                **asdict(row)})
            progress(f"  cifar {name:5s} eta={eta:<6g} H={row.local_steps:<4d} d trH/dt: predicted "
                     f"{row.predicted:+.4g}, measured {row.measured:+.4g} +- {row.stderr:.2g} (s.e.) "
                     f"({row.seconds:.0f} s)")
    out["ratios"] = local_sgd_ratios(out["runs"], s.etas)
    return out


def local_sgd_ratios(runs: list[dict], etas) -> list[dict]:
    """Local/SGD and QSR/SGD ratios of d trH/dt per eta: predicted, and measured mean +/- std over
    seeds (seed s of one rule paired with seed s of SGD; the runs are independent)."""
    rows = []
    for eta in etas:
        by = {r["name"]: r for r in runs if r["eta"] == eta}
        sgd = np.array(by["SGD"]["per_seed"])
        for name in ("Local", "QSR"):
            per_seed = np.array(by[name]["per_seed"]) / sgd
            rows.append({"eta": eta, "rule": name, "quantity": f"{name}/SGD",
                         "predicted": by[name]["predicted"] / by["SGD"]["predicted"],
                         "predicted_limit": by[name]["predicted_limit"] / by["SGD"]["predicted_limit"],
                         "measured": float(per_seed.mean()),
                         "measured_std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")})
    if len(etas) >= 2:
        for name in ("SGD", "Local", "QSR"):
            ratios = [next(r for r in runs if r["name"] == name and r["eta"] == e) for e in etas]
            rows.append({"eta": 0.0, "rule": name, "quantity": "measured/predicted, eta -> 0",
                         "predicted": 1.0, "predicted_limit": 1.0,
                         "measured": extrapolate_to_zero_eta(etas, [r["measured"] / r["predicted"] for r in ratios]),
                         "measured_std": float("nan")})
    return rows


def cifar_table(cifar: dict) -> str:
    head = (f"{'rule':6s} {'eta':>6s} {'H':>4s} {'pred dtrH/dt':>12s} {'measured (s.e.)':>18s} {'ratio':>6s} "
            f"{'pred dlmax/dt':>13s} {'measured (s.e.)':>16s}")
    lines = ["Each row: one rule at one eta, d/dt in slow time predicted at zeta (the rule as run at eta) and "
             "measured at Phi (mean over seeds +- standard error); ratio = measured / predicted", head, "-" * len(head)]
    for r in cifar["runs"]:
        lines.append(f"{r['name']:6s} {r['eta']:6g} {r['local_steps']:4d} {r['predicted']:12.4g} "
                     f"{r['measured']:10.4g}+-{r['stderr']:6.2g} {r['measured'] / r['predicted']:6.3f} "
                     f"{r['predicted_lambda_max']:13.4g} "
                     f"{r['measured_lambda_max']:8.4g}+-{r['lambda_max_stderr']:6.2g}")
    paired = [r for r in cifar["ratios"] if r["eta"]]
    lines += ["", "Rule / SGD ratio of d trH/dt at each eta (seed s of the rule over seed s of SGD; mean +- std)",
              f"{'ratio':10s} {'eta':>6s} {'predicted at eta':>16s} {'eta->0 limit':>12s} {'measured':>16s}"]
    for r in paired:
        lines.append(f"{r['quantity']:10s} {r['eta']:6g} {r['predicted']:16.4f} {r['predicted_limit']:12.4f} "
                     f"{r['measured']:8.4f}+-{r['measured_std']:6.3f}")
    limits = [r for r in cifar["ratios"] if not r["eta"]]
    if limits:                                 # a line through the etas (two points: no spread)
        lines += ["", "Measured / predicted d trH/dt extrapolated to eta -> 0 (1 = the slow SDE holds)",
                  f"{'rule':10s} {'measured/predicted':>18s}"]
        lines += [f"{r['rule']:10s} {r['measured']:18.4f}" for r in limits]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- figures
def toy_figure(toy: dict, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for name, r in toy["rules"].items():
        etas = [row["eta"] for row in r["rows"]]
        ratios = [row["measured"] / r["predicted"] for row in r["rows"]]
        errs = [row["stderr"] / abs(r["predicted"]) for row in r["rows"]]
        line = ax.errorbar(etas, ratios, yerr=errs, marker="o", label=name, capsize=2)
        ax.errorbar([0.0], [r["ratio"]], yerr=[r["extrapolated_stderr"] / abs(r["predicted"])], marker="*",
                    markersize=10, color=line[0].get_color(), capsize=2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(r"learning rate $\eta$")
    ax.set_ylabel(r"measured / predicted $d\log p_1/dt$")
    ax.set_title("diagonal net, label noise: discrete runs vs slow SDE (stars: $\\eta\\to0$)")
    ax.legend()
    paths = save_figure(fig, "demo_toy_extrapolation", folder)
    plt.close(fig)
    return paths


def cifar_figures(cifar: dict, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    etas = sorted({r["eta"] for r in cifar["runs"]})
    fig, axes = plt.subplots(1, len(etas), figsize=(5.5 * len(etas), 3.6), squeeze=False)
    for ax, eta in zip(axes[0], etas):
        for r in (r for r in cifar["runs"] if r["eta"] == eta):
            t, trace = np.array(r["times"]), np.array(r["trace_path"])     # mean over seeds per checkpoint
            (line,) = ax.plot(t, trace - trace[0], marker="o", label=f"{r['name']} measured (mean of seeds)")
            ax.plot(t, r["predicted"] * t, ls="--", color=line.get_color(), label=f"{r['name']} predicted")
        ax.set_xlabel(SLOW_TIME_LABEL)
        ax.set_ylabel(r"tr $H(t)$ - tr $H(0)$ at $\Phi$")
        ax.set_title(f"CIFAR-10 MLP point, $\\eta$ = {eta:g}, $\\sigma$ = {cifar['runs'][0]['sigma']:g}")
        ax.legend(fontsize=7)
    paths += save_figure(fig, "demo_cifar_trace", folder)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    markers = {"SGD": "o", "Local": "s", "QSR": "^"}
    lo = hi = 0.0
    for r in cifar["runs"]:
        p, m, e = r["predicted"], r["measured"], r["stderr"]
        ax.errorbar([p], [m], yerr=[0 if math.isnan(e) else e], marker=markers[r["name"]], capsize=2,
                    ls="none", label=f"{r['name']} $\\eta$={r['eta']:g}")
        lo, hi = min(lo, p, m), max(hi, p, m)
    ax.plot([lo * 1.1, 0], [lo * 1.1, 0], color="k", lw=0.8, ls="--", label="identity")
    ax.set_xlabel(r"predicted $d\,$tr$H/dt$ (per unit slow time)")
    ax.set_ylabel(r"measured $d\,$tr$H/dt$ (mean $\pm$ s.e. over seeds)")
    ax.legend(fontsize=7)
    paths += save_figure(fig, "demo_cifar_rates", folder)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------- entry point
def write_json_atomic(payload: dict, path: Path) -> None:
    """Strict JSON (NaN / inf as null), written atomically (`experiments.metrics.atomic_write_bytes`)."""
    atomic_write_bytes(path, json.dumps(finite_or_none(payload), indent=1, allow_nan=False, default=str).encode())


def _jsonable(settings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def _command(argv: list[str]) -> str:
    """The command line as run, folders given as absolute paths shown as <DIR> (no machine paths in results)."""
    shown = ["<DIR>" if Path(a).is_absolute() else a for a in argv]
    return " ".join(["python -m experiments.demo", *shown])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search: experiments.data.resolve_cifar10_dir)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into the data folder if missing")
    parser.add_argument("--out", default=str(DEMO_DIR), help="folder for demo_*.png/pdf and demo_results.json "
                        "(default runs/demo, git-ignored; `make figures` promotes them into figures/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(TORCH_THREADS)
    import matplotlib
    matplotlib.use("Agg")
    apply_style()
    out = Path(args.out)
    toy_s, cifar_s = (QUICK_TOY, QUICK_CIFAR) if args.quick else (ToySettings(), CifarSettings())
    start = time.perf_counter()
    say = lambda msg: print(msg, flush=True)   # noqa: E731
    say(f"demo ({'quick' if args.quick else 'full'} mode, {TORCH_THREADS} torch thread): output in {out}")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "git_revision": git_revision(), "command": _command(argv if argv is not None else sys.argv[1:]),
               "quick": args.quick, "torch_threads": TORCH_THREADS, "torch_version": torch.__version__,
               "toy_settings": _jsonable(toy_s), "cifar_settings": _jsonable(cifar_s)}

    say("(a) toy: diagonal net with label noise, discrete runs vs slow SDE")
    toy = run_toy(toy_s, say)
    results["toy"] = toy
    figures = toy_figure(toy, out)
    say(toy_table(toy, toy_s.etas))

    root = resolve_cifar10_dir(args.data_dir, search=True)
    try:
        if args.download:
            download_cifar10(root)
        load_cifar10(root, "train")
        have_data = True
    except FileNotFoundError as err:
        have_data = False
        results["cifar10"] = None
        results["cifar10_missing"] = str(err)
        say(f"(b) skipped: no CIFAR-10 found in {root}.\n    To run it: download the binary version "
            "(https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz) into a folder and pass --data-dir "
            "FOLDER (or set CIFAR10_DIR), or rerun with --download to fetch it into that folder.")
    if have_data:
        say(f"(b) CIFAR-10 from {root}: predicted vs measured d trH/dt under label noise")
        cifar = run_cifar(root, cifar_s, say)
        results["cifar10"] = cifar
        figures += cifar_figures(cifar, out)
        say(cifar_table(cifar))
    results["figures"] = [p.name for p in figures]              # names only: no machine paths in results
    results["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(results, out / RESULTS_NAME)
    record_provenance(out, "experiments.demo", [p.name for p in figures] + [RESULTS_NAME],
                      command=results["command"], quick=args.quick)
    say(f"wrote {out / RESULTS_NAME} and {len(figures)} figure files; wall time {results['wall_seconds']:.0f} s")
    from experiments.comparison.full_resolution import RESULT_DIRS, result_lines
    say("\n".join(["the large results (committed, not re-run here):",
                   *(line for folder in RESULT_DIRS for line in result_lines(folder))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
