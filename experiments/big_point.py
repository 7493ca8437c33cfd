"""A point of Gamma at 2,000+ real CIFAR-10 images and its label-noise predictions, matrix-free (issue #6).

Setting (loss convention of `experiments.manifold`): n class-balanced real CIFAR-10 images
avg-pooled to 8x8, a float64 GELU MLP 192 -> 192 -> 64 -> 10 (D = 50,058, so the normal space,
of dimension N C = 20,000 at n = 2,000, is a proper subspace), squared loss on one-hot targets.
`prepare_big_point` projects the network onto Gamma with
`experiments.manifold.project_to_manifold_cg` (Gauss-Newton, Gram solves by preconditioned
conjugate gradients, no (N C, D) Jacobian), by default straight from the initialization: the
minimum-norm Gauss-Newton path is the training (points reached by full-batch Adam first, an
option, had Gram matrices too ill-conditioned for CG at n = 2,000; docs/studies/notes/big-point.md). `predict_rates_preconditioned` is the exact
matrix-free prediction of `sde.label_noise_mf.predict_label_noise_rates_cg` (SGD, QSR at
eta -> 0; slow time t = eta^2 x steps per worker) with the tangent projection solved under the
Nystrom-deflated preconditioner `GramPreconditionerMF` instead of block-Jacobi alone: at
n = 2,000 the block-Jacobi-scaled Gram has outliers ~100x its bulk, which block-Jacobi CG
pays for in iterations. At the n >= 1,000 points the Jacobian has numerically deficient rank (935 of
the 10,000 Gram eigenvalues are zero to float64 precision at n = 1,000): the normal space is the
nonzero part, and `--curvature-floor` (a Tikhonov shift of the Gram solves, `gram_solve_cg`) keeps
CG from chasing the null cluster (docs/studies/big_point_findings.md). Run as

    OMP_NUM_THREADS=1 python -m experiments.big_point --n 2000 --rank 1000 --rtol 1e-7 \
        --curvature-floor 1e-9 --log-every 50 --sweep --out big_point.jsonl

(1 torch thread, set deliberately: the cores are shared).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from dynamics.objective import Objective
from experiments.data import resolve_cifar10_dir
from experiments.manifold import (GramPreconditionerMF, GramSolveNotConverged, MatrixFreeProjectionReport, build_small_mlp, cifar_subset,
                                  gram_solve_cg, project_to_manifold_cg, squared_loss_objective,
                                  train_to_interpolation)
from sde.label_noise_mf import (ExactProjectionRates, jacobian_frobenius_pass, jacobian_times,
                                jacobian_transpose_times, predict_label_noise_rates_cg,
                                predict_label_noise_rates_lanczos)
from sde.rules import QSR, SGD, LocalSGD


@dataclass(frozen=True)
class BigPointSetup:
    """n real images (n/10 per class) at image_size, MLP widths `hidden`, Adam steps before the projection
    (0: Gauss-Newton from the initialization), Nystrom rank and inexact-Newton CG tolerance of the projection."""
    n: int = 2000
    image_size: int = 8
    hidden: tuple[int, ...] = (192, 64)
    model_seed: int = 0
    adam_steps: int = 0
    adam_lr: float = 1e-3
    preconditioner_rank: int = 200
    cg_rtol: float = 0.05


def big_point_objective(root: str | Path, setup: BigPointSetup) -> Objective:
    x, y = cifar_subset(root, setup.n, image_size=setup.image_size)
    model = build_small_mlp(image_size=setup.image_size, hidden=tuple(setup.hidden),
                            generator=torch.Generator().manual_seed(setup.model_seed))
    return squared_loss_objective(model, x, y)


def prepare_big_point(root: str | Path, setup: BigPointSetup = BigPointSetup(), *, cache: str | Path | None = None
                      ) -> tuple[Objective, Tensor, MatrixFreeProjectionReport | None, dict]:
    """(objective, zeta on Gamma with L <= 1e-10, projection report, cost) for `setup`, never forming J.

    cost: seconds of training and projection, peak resident memory (GB). With `cache`, zeta is
    loaded from / saved to that file (keyed by the setup; report None and cost {} when loaded).
    """
    obj = big_point_objective(root, setup)
    key = json.loads(json.dumps(asdict(setup)))
    if cache is not None and Path(cache).exists():
        saved = torch.load(cache)
        if saved.get("setup") == key:
            return obj, saved["zeta"], None, saved.get("cost", {})
    t0 = time.time()
    theta = obj.params
    if setup.adam_steps:
        theta = train_to_interpolation(obj, steps=setup.adam_steps, lr=setup.adam_lr, target_loss=1e-5)
    t1 = time.time()
    zeta, report = project_to_manifold_cg(obj, theta, tol=1e-10, cg_rtol=setup.cg_rtol, max_gauss_newton=40,
                                          cg_max_iter=20000, preconditioner_rank=setup.preconditioner_rank)
    cost = {"train_seconds": t1 - t0, "projection_seconds": time.time() - t1, "peak_rss_gb": _peak_rss_gb()}
    if cache is not None:
        tmp = Path(str(cache) + ".tmp")
        torch.save({"setup": key, "zeta": zeta, "cost": cost, "report": asdict(report)}, tmp)
        os.replace(tmp, cache)
    return obj, zeta, report, cost


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # Linux reports kB


class PreconditionedTangentProjector:
    """P v = v - J^T a with (J J^T) a = J v solved by CG under a `GramPreconditionerMF` at zeta.

    The drop-in `projector` of `sde.label_noise_mf.predict_label_noise_rates_cg` / `_lanczos`:
    `.project(v)` returns (P v (D,), CG iterations). Every solved (v, a) is kept: a v equal to a
    solved one (e.g. grad tr H, which the SGD / QSR and the Local SGD paths both project) costs no
    CG, and a v within `warm_start_within` (relative distance) of a solved one starts CG from its
    coefficients (`gram_solve_cg` x0; e.g. grad lambda_max from two Lanczos runs whose top
    eigenvectors agree to their tolerance). `log`: optional callable receiving one dict per
    `log_every` CG iterations {"solve", "iteration", "rel_residual", "sq_norm" = ||v - J^T a||^2}
    (its monotone decrease to ||P v||^2 is the convergence evidence, `gram_solve_cg`).
    shift: `gram_solve_cg`'s Tikhonov shift (Gram units): Hessian directions of curvature << shift / N
    count as tangent (for a Jacobian of numerically deficient rank, as at the n >= 1,000 points)."""

    def __init__(self, obj: Objective, zeta: Tensor, preconditioner: GramPreconditionerMF, *,
                 rtol: float = 1e-10, max_iter: int = 20000, warm_start_within: float = 1e-3,
                 log=None, log_every: int = 50, shift: float = 0.0):
        self.obj, self.zeta, self.preconditioner = obj, zeta.detach(), preconditioner
        self.shift = shift
        self.rtol, self.max_iter = rtol, max_iter
        self.warm_start_within, self.log, self.log_every = warm_start_within, log, log_every
        self.solved: list[tuple[Tensor, Tensor, Tensor]] = []   # (v, a, P v)

    def project(self, v: Tensor) -> tuple[Tensor, int]:
        obj, zeta = self.obj, self.zeta
        x0, best = None, self.warm_start_within
        for v_old, a_old, pv_old in self.solved:
            if torch.equal(v, v_old):
                return pv_old.clone(), 0
            dist = float((v - v_old).norm() / v.norm())
            if dist <= best:
                x0, best = a_old, dist
        solve = len(self.solved)
        callback = None
        if self.log is not None:
            def callback(it: int, rel: float, jta: Tensor) -> None:
                if it % self.log_every == 0:
                    g = v - jta
                    self.log({"solve": solve, "iteration": it, "rel_residual": rel, "sq_norm": float(g @ g)})
        a, iters = gram_solve_cg(obj, zeta, jacobian_times(obj, zeta, v), self.preconditioner,
                                 rtol=self.rtol, max_iter=self.max_iter, x0=x0, callback=callback,
                                 shift=self.shift)
        pv = v - jacobian_transpose_times(obj, zeta, a)
        self.solved.append((v.detach().clone(), a, pv))
        return pv.clone(), iters


def predict_rates_preconditioned(obj: Objective, zeta: Tensor, rules, *, sigma: float,
                                 preconditioner: GramPreconditionerMF, rtol: float = 1e-10, max_iter: int = 20000,
                                 lanczos_tol: float = 1e-10, chunk_size: int = 64,
                                 generator: torch.Generator | None = None,
                                 projector: PreconditionedTangentProjector | None = None) -> ExactProjectionRates:
    """`predict_label_noise_rates_cg` (exact SGD / QSR rates, eta -> 0) with the tangent projection
    preconditioned by `preconditioner`; same quantities and stopping rule, only CG differs.
    `projector`: an existing `PreconditionedTangentProjector` to use (and fill) instead of a new one."""
    if projector is None:
        projector = PreconditionedTangentProjector(obj, zeta, preconditioner, rtol=rtol, max_iter=max_iter)
    return predict_label_noise_rates_cg(obj, zeta, rules, sigma=sigma, rtol=rtol, max_iter=max_iter,
                                        lanczos_tol=lanczos_tol, chunk_size=chunk_size, generator=generator,
                                        projector=projector)


def predict_local_sgd_rates_preconditioned(obj: Objective, zeta: Tensor, rules, *, sigma: float,
                                           preconditioner: GramPreconditionerMF, num_probes: int = 30,
                                           deflate: int = 50, rtol: float = 1e-10, max_iter: int = 20000,
                                           generator: torch.Generator | None = None,
                                           projector: PreconditionedTangentProjector | None = None) -> list[dict]:
    """Local SGD rates at zeta by `sde.label_noise_mf.predict_label_noise_rates_lanczos` with the two
    tangent projections solved under `preconditioner`. One dict per rule (rates, standard errors, costs).
    `projector`: reuse one (e.g. from `predict_rates_preconditioned`): its solved projections are
    reused or warm-start CG (`PreconditionedTangentProjector`)."""
    for rule in rules:
        if rule.drift_coefficients()[2] is None:
            raise ValueError(f"{rule!r}: this function is for Local SGD rules (a psi term in the drift); "
                             "use predict_rates_preconditioned")
    if projector is None:
        projector = PreconditionedTangentProjector(obj, zeta, preconditioner, rtol=rtol, max_iter=max_iter)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    res = predict_label_noise_rates_lanczos(obj, zeta, rules, sigma=sigma, num_probes=num_probes, deflate=deflate,
                                            generator=gen, rtol=rtol, max_iter=max_iter, projector=projector)
    return [{"rule": repr(r.rule), "trace": r.trace, "lambda_max": r.lambda_max,
             "trace_rate": r.trace_rate, "trace_rate_stderr": r.trace_rate_stderr,
             "lambda_max_rate": r.lambda_max_rate, "lambda_max_rate_stderr": r.lambda_max_rate_stderr,
             "cg_iterations": list(res.cg_iterations), "eigen_matvecs": res.eigen_matvecs,
             "lanczos_matvecs": res.lanczos_matvecs, "derivative_matvecs": res.derivative_matvecs,
             "converged": bool(res.converged), "seconds": res.seconds} for r in res.rates]


RULES = (SGD(8), QSR(4, 2, alpha=0.08))   # notebook 04's batches: SGD B = 8; QSR K = 4, B_loc = 2 (eta -> 0)
LOCAL_RULES = (LocalSGD(4, 2, 0.4),)      # notebook 04's Local SGD: K = 4, B_loc = 2, beta = 0.4
SIGMA = 0.1


def _rows(tag: str, n: int, result: ExactProjectionRates, seconds: float, **extra) -> list[dict]:
    return [{"path": tag, "n": n, "rule": repr(r.rule), "trace": r.trace, "lambda_max": r.lambda_max,
             "trace_rate": r.trace_rate, "lambda_max_rate": r.lambda_max_rate,
             "cg_iterations": list(result.cg_iterations), "lanczos_matvecs": result.lanczos_matvecs,
             "seconds": seconds, "peak_rss_gb": _peak_rss_gb(), **extra} for r in result.rates]


def sgd_trace_rate_sweep(obj: Objective, zeta: Tensor, preconditioner: GramPreconditionerMF,
                         rtols: tuple[float, ...], *, batch: int = 8, sigma: float = SIGMA,
                         max_iter: int = 50000, every: int | None = None) -> list[dict]:
    """SGD d tr H/dt = -(sigma^2 / 4B) ||P grad tr H||^2 with P solved at each CG tolerance in `rtols`.

    ONE CG run to min(rtols) (or `max_iter`, then the remaining rtols are reported unreached with
    `"reached": False`): a row for each rtol at the first iteration whose relative residual is below
    it, and, with `every`, a row every `every` iterations ("rtol": None), the rate read from the
    running iterate (`gram_solve_cg` callback). The rate's magnitude decreases monotonically along CG
    (the error of the projection is what CG minimizes), so a later row is always the better one, and
    a run of rows with equal rates is the evidence that it has settled: the residual alone is not
    (it can return to ~1e-4 after reaching 1e-8 when the Gram has isolated tiny eigenvalues)."""
    frob_grad, _, _ = jacobian_frobenius_pass(obj, zeta, 64)
    v = frob_grad / obj.num_samples
    rhs = jacobian_times(obj, zeta, v)
    scale = -(sigma ** 2) / (4 * batch)
    pending, rows, start = sorted(rtols, reverse=True), [], time.time()

    def record(it: int, rel: float, jta: Tensor) -> None:
        hit = pending and rel <= pending[0]
        if hit or (every and it % every == 0):
            g = v - jta
            row = {"rtol": None, "rel_residual": rel, "trace_rate": scale * float(g @ g), "cg_iterations": it,
                   "seconds": time.time() - start, "reached": True}
            while pending and rel <= pending[0]:
                rows.append({**row, "rtol": pending.pop(0)})
            if every and it % every == 0:
                rows.append(row)

    try:
        gram_solve_cg(obj, zeta, rhs, preconditioner, rtol=min(rtols), max_iter=max_iter, callback=record)
    except GramSolveNotConverged:
        rows.extend({"rtol": r, "reached": False, "cg_iterations": max_iter} for r in pending)
    return rows


def run(root: str | Path, ns: list[int], *, out: str | Path, cache_dir: str | Path, exact_max_n: int = 200,
        block_jacobi_max_n: int = 500, sweep: tuple[float, ...] = (1e-3, 1e-5, 1e-7, 1e-10),
        rtol: float = 1e-10, local: bool = True, rank: int = 1000, max_iter: int = 50000,
        log_every: int = 0, curvature_floor: float = 0.0,
        progress: Callable[[str], None] | None = None) -> list[dict]:
    """At every n in `ns`: the point; SGD / QSR rates (preconditioned CG at `rtol`, Nystrom `rank`) and
    Local SGD rates (stochastic trace, `predict_local_sgd_rates_preconditioned`, reusing the SGD
    projections); block-Jacobi `predict_label_noise_rates_cg` for n <= block_jacobi_max_n; the exact
    dense path for n <= exact_max_n; a CG-tolerance sweep of the SGD trace rate at the largest n.
    With `log_every`, rows "cg_trajectory" every log_every CG iterations of each projection
    (solve 0: grad tr H, whose ||P~ v||^2 gives the SGD trace rate). `curvature_floor` (Hessian units):
    the projections' Tikhonov shift is N x curvature_floor (`gram_solve_cg` shift): normal directions
    of curvature far below it count as tangent. Appends one JSON line per row to `out`.
    `progress(line)`: told each stage before it starts and each row as written (quiet when None)."""
    from sde.label_noise import gauss_newton_geometry, predict_label_noise_rates, sharpness_gradients
    rows = []
    say = progress or (lambda line: None)

    def emit(new: list[dict]) -> None:
        rows.extend(new)
        with open(out, "a") as f:
            for row in new:
                f.write(json.dumps(row) + "\n")
                say(str({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}))

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    for n in ns:
        setup = BigPointSetup(n=n)
        say(f"n={n}: the point on Gamma (cached in {cache_dir} after the first time)")
        obj, zeta, report, cost = prepare_big_point(root, setup, cache=Path(cache_dir) / f"big_point_n{n}.pt")
        emit([{"path": "point", "n": n, "D": obj.dim, "loss": obj.loss(zeta).item(),
               "report": asdict(report) if report else None, **cost}])
        say(f"n={n}: Nystrom preconditioner (rank {min(rank, 10 * n - 1)})")
        t = time.time()
        pre = GramPreconditionerMF.at(obj, zeta, rank=min(rank, 10 * n - 1))
        build = time.time() - t
        scale = -(SIGMA ** 2) / (4 * RULES[0].total_batch)
        log = None if not log_every else (lambda row: emit([{"path": "cg_trajectory", "n": n, **row,
                                                             "sgd_trace_rate": scale * row["sq_norm"]}]))
        projector = PreconditionedTangentProjector(obj, zeta, pre, rtol=rtol, max_iter=max_iter, log=log,
                                                   log_every=log_every or 50, shift=n * curvature_floor)
        say(f"n={n}: SGD and QSR rates (preconditioned CG, rtol {rtol:g})")
        t = time.time()
        res = predict_rates_preconditioned(obj, zeta, RULES, sigma=SIGMA, preconditioner=pre, rtol=rtol,
                                           max_iter=max_iter, generator=torch.Generator().manual_seed(0),
                                           projector=projector)
        emit(_rows("cg_nystrom", n, res, time.time() - t, rtol=rtol, rank=len(pre.values),
                   curvature_floor=curvature_floor,
                   preconditioner_seconds=build))
        say(f"n={n}: Local SGD rates (stochastic Lanczos)" if local else f"n={n}: Local SGD skipped")
        t = time.time()
        local_rows = [] if not local else predict_local_sgd_rates_preconditioned(
            obj, zeta, LOCAL_RULES, sigma=SIGMA, preconditioner=pre, rtol=rtol, max_iter=max_iter,
            generator=torch.Generator().manual_seed(0), projector=projector)
        emit([{"path": "local_sgd_nystrom", "n": n, "wall_seconds": time.time() - t, "peak_rss_gb": _peak_rss_gb(), **r}
              for r in local_rows])
        if n == max(ns) and sweep:
            say(f"n={n}: CG tolerance sweep {list(sweep)}")
            emit([{"path": "sweep", "n": n, **r} for r in sgd_trace_rate_sweep(obj, zeta, pre, sweep,
                                                                                max_iter=max_iter)])
        if n <= block_jacobi_max_n:
            say(f"n={n}: block-Jacobi CG cross-check")
            t = time.time()
            res = predict_label_noise_rates_cg(obj, zeta, RULES, sigma=SIGMA, rtol=rtol, max_iter=50000,
                                               generator=torch.Generator().manual_seed(0))
            emit(_rows("cg_block_jacobi", n, res, time.time() - t, rtol=rtol))
        if n <= exact_max_n:
            say(f"n={n}: exact dense cross-check")
            t = time.time()
            geo = gauss_newton_geometry(obj, zeta)
            grads = sharpness_gradients(obj, geo)
            exact = [predict_label_noise_rates(obj, geo, rule, sigma=SIGMA, gradients=grads)
                     for rule in (*RULES, *LOCAL_RULES)]
            emit(_rows("exact_dense", n, ExactProjectionRates(rates=exact, cg_iterations=(0, 0), lanczos_matvecs=0),
                       time.time() - t))
            del geo, grads
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 folder (default: CIFAR10_DIR, else a search)")
    parser.add_argument("--n", type=int, nargs="+", default=[200, 500, 1000, 2000])
    parser.add_argument("--exact-max-n", type=int, default=200, help="dense exact path up to this n (memory N C D)")
    parser.add_argument("--block-jacobi-max-n", type=int, default=500,
                        help="block-Jacobi predict_label_noise_rates_cg up to this n (its CG iterations grow fast)")
    parser.add_argument("--no-local", action="store_true", help="skip the Local SGD (stochastic trace) rates")
    parser.add_argument("--sweep", type=float, nargs="*", default=[1e-3, 1e-5, 1e-7, 1e-10],
                        help="CG tolerances of the SGD trace-rate sweep at the largest n")
    parser.add_argument("--rank", type=int, default=1000, help="Nystrom rank of the rates' preconditioner")
    parser.add_argument("--rtol", type=float, default=1e-10, help="CG tolerance of the tangent projections")
    parser.add_argument("--max-iter", type=int, default=50000, help="CG iteration cap of the tangent projections")
    parser.add_argument("--curvature-floor", type=float, default=0.0,
                        help="Hessian directions of curvature far below this count as tangent (Tikhonov shift N x it)")
    parser.add_argument("--log-every", type=int, default=0, help="log the CG trajectory every k iterations (0: off)")
    parser.add_argument("--cache-dir", default="big_point_cache")
    parser.add_argument("--out", default="big_point.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = resolve_cifar10_dir(args.data, search=True)
    run(root, args.n, out=args.out, cache_dir=args.cache_dir, exact_max_n=args.exact_max_n,
        block_jacobi_max_n=args.block_jacobi_max_n, sweep=tuple(args.sweep), local=not args.no_local,
        rtol=args.rtol, rank=args.rank, max_iter=args.max_iter, log_every=args.log_every,
        curvature_floor=args.curvature_floor, progress=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
