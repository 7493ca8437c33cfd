"""The GPU check's measurements (issue 14): trainer throughput, HVP and eigenvalue cost, a short real run.

    python -m benchmarks.gpu_check STAGE --out OUTDIR [--pack data_subset] [--smoke]

STAGE is one of `throughput`, `hessian`, `run`, `compile`, `collect` or `all` (the first three
and `collect`, in this process). Each measuring stage writes OUTDIR/<stage>.json; `collect` merges them with the
pytest summary that benchmarks/gpu_check.sh leaves in OUTDIR/pytest_cuda.log into
OUTDIR/gpu_check.json. Device: the GPU (TF32 off: fp32 is true fp32), or with --smoke the CPU
at a tiny size (the suite runs that path end to end, tests/cuda/test_gpu_check_smoke.py).

- throughput: images/s of one training step, K = 8 workers x B_loc = 128 (ResNet-20 and
  ResNet-56, fp32 and bf16 autocast, channels-last, SGD momentum 0.9): one model at batch
  K B_loc = 1,024 with torch.optim.SGD (the ceiling); the serial workers (the authors' design,
  K models stepped one after another); the stacked workers (vmap, the GPU default). Local
  SGD times include one averaging per H = 8 steps. Each configuration is timed in `rounds`
  interleaved rounds of `steps` steps (device synchronized around each round); the ratios
  are of the medians.
- hessian: ResNet-20 on the first 1,024 packed training images (BN statistics from them, eval
  mode): wall time of one HVP over one gradient on the same data (fast_backward reverse mode and
  forward mode, the cheaper counts), and the time to the top Hessian eigenvalue at tol 1e-3
  (`dynamics.top_eigenpairs`, Lanczos) over PyHessian's power iteration at its tol 1e-3, with
  both values; "pyhessian missing" if it cannot be imported.
- run: ResNet-20, K = 8 Local SGD (H = 4) on the packed subset for a fixed number of epochs
  through `experiments.trainer` (stacked workers): test accuracy, seconds per epoch and the
  tracked sharpness (top eigenvalue, trace) at the first and last evaluations.
- compile: the stacked workers with torch.compile for ResNet-20 fp32 (compile time and
  images/s), kept apart because compiling may take minutes.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

STAGES = ("throughput", "hessian", "run", "compile")
ALL = ("throughput", "hessian", "run")   # `all`; compile only when asked (minutes on a CPU)
KEYS = ("device", "torch", "cuda", "date", "stacked_over_single", "stacked_over_serial",
        "hvp_over_grad", "eig_time_over_pyhessian", "cuda_tests")


def sizes(smoke: bool) -> dict:
    """Every size of the check; --smoke shrinks them to seconds on one CPU thread."""
    if smoke:
        return dict(models=("small_cnn",), model_kwargs={"width": 4}, K=2, B=4, H=2, warmup=1, steps=2,
                    rounds=2, hvp_model="small_cnn", hvp_images=32, hvp_batch=16, hvp_rounds=2,
                    run_model="small_cnn", run_workers=2, run_batch=8, run_epochs=2, run_local_steps=2,
                    sharpness_samples=32, sharpness_matvecs=4)
    return dict(models=("resnet20", "resnet56"), model_kwargs={}, K=8, B=128, H=8, warmup=3, steps=10,
                rounds=3, hvp_model="resnet20", hvp_images=1024, hvp_batch=256, hvp_rounds=5,
                run_model="resnet20", run_workers=8, run_batch=128, run_epochs=30, run_local_steps=4,
                sharpness_samples=1024, sharpness_matvecs=20)


def device_for(smoke: bool) -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    if not smoke:
        raise SystemExit("error: no CUDA device here; the GPU check needs one (use --smoke for the CPU rehearsal)")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ---------------------------------------------------------------------------- throughput
class Single:
    """One model, batch K B_loc, torch.optim.SGD with momentum: the throughput ceiling."""

    def __init__(self, model, precision):
        self.m = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.SGD(self.m.parameters(), lr=0.05, momentum=0.9)
        self.precision = precision

    def step(self, x, y, t):
        x = x.reshape(-1, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad(set_to_none=True)
        with autocast(x.device, self.precision):
            logits = self.m(x)
        F.cross_entropy(logits.float(), y.reshape(-1)).backward()
        self.opt.step()


class Local:
    """Local SGD workers (serial or stacked), one averaging every H steps."""

    def __init__(self, model, K, H, backend, precision, compile=False):
        from experiments.averaging import WorkerAverager
        from experiments.workers import SGDOptions, Workers
        self.w = Workers(model, K, backend=backend, sgd=SGDOptions(momentum=0.9), channels_last=True,
                         autocast_dtype=torch.bfloat16 if precision == "bf16" else None, compile=compile)
        self.avg, self.H = WorkerAverager(), H

    def step(self, x, y, t):
        self.w.step(x, y, 0.05)
        if (t + 1) % self.H == 0:
            self.avg.average_(self.w.params, self.w.buffers, self.w.momentum)


def _time_round(obj, x, y, steps, device) -> float:
    sync(device)
    start = time.perf_counter()
    for t in range(steps):
        obj.step(x, y, t)
    sync(device)
    return time.perf_counter() - start


def _synthetic_batch(s: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed (K, B_loc) batch of random images and labels (timing only; the data do not matter)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["K"], s["B"], 3, 32, 32, generator=g).to(device)
    return x, torch.randint(0, 10, (s["K"], s["B"]), generator=g).to(device)


def _images_per_s(objs: dict, x, y, s: dict, device) -> tuple[dict, dict]:
    """Median images/s of each stepper over `rounds` interleaved rounds (order rotated every round),
    after `warmup` steps each; also the round times."""
    for obj in objs.values():
        _time_round(obj, x, y, s["warmup"], device)
    times = {k: [] for k in objs}
    for r in range(s["rounds"]):
        names = list(objs)
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(_time_round(objs[k], x, y, s["steps"], device))
    ips = {k: s["K"] * s["B"] * s["steps"] / statistics.median(v) for k, v in times.items()}
    return ips, times


def throughput(out: Path, smoke: bool) -> dict:
    from experiments.models import build_model
    s, device = sizes(smoke), device_for(smoke)
    K, B, H = s["K"], s["B"], s["H"]
    x, y = _synthetic_batch(s, device)
    rows = {}
    for name in s["models"]:
        torch.manual_seed(0)
        model = build_model(name, **s["model_kwargs"]).to(device)
        for precision in ("fp32", "bf16"):
            objs = {"single": Single(model, precision), "serial": Local(model, K, H, "serial", precision),
                    "stacked": Local(model, K, H, "vmap", precision)}
            ips, times = _images_per_s(objs, x, y, s, device)
            rows[f"{name}/{precision}"] = {
                "images_per_s": ips, "round_seconds": times,
                "stacked_over_single": ips["stacked"] / ips["single"],
                "stacked_over_serial": ips["stacked"] / ips["serial"]}
            print(f"throughput {name}/{precision}: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in ips.items()),
                  flush=True)
            del objs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"K": K, "B_loc": B, "H": H, "steps_per_round": s["steps"], "rounds": s["rounds"],
              "warmup_steps": s["warmup"], "rows": rows}
    _write(out / "throughput.json", result)
    return result


def compile_stage(out: Path, smoke: bool) -> dict:
    from experiments.models import build_model
    s, device = sizes(smoke), device_for(smoke)
    K, H = s["K"], s["H"]
    x, y = _synthetic_batch(s, device)
    torch.manual_seed(0)
    name = s["models"][0]
    model = build_model(name, **s["model_kwargs"]).to(device)
    objs = {"eager": Local(model, K, H, "vmap", "fp32"), "compiled": Local(model, K, H, "vmap", "fp32", compile=True)}
    first = _time_round(objs["compiled"], x, y, 1, device)           # includes compilation
    ips, _ = _images_per_s(objs, x, y, s, device)
    result = {"model": f"{name}/fp32", "first_step_seconds_with_compilation": first, "images_per_s": ips,
              "compiled_over_eager": ips["compiled"] / ips["eager"]}
    print(f"compile {name}: first step {first:.1f} s, " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in ips.items()),
          flush=True)
    _write(out / "compile.json", result)
    return result


# ---------------------------------------------------------------------------- hessian
def _pack_batches(pack: Path, n: int, batch: int, device):
    from experiments.data import normalize
    from experiments.datasets import read_pack
    (x, y), _ = read_pack(pack)
    if len(x) < n:
        raise SystemExit(f"error: the pack {pack} holds {len(x)} training images, {n} needed")
    x, y = normalize(x[:n]).to(device), y[:n].to(device)
    return list(zip(torch.split(x, batch), torch.split(y, batch)))


def _timed(fn, device):
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def hessian(out: Path, smoke: bool, pack: Path) -> dict:
    from torch import nn

    from dynamics import Objective, top_eigenpairs
    from experiments.models import build_model
    s, device = sizes(smoke), device_for(smoke)
    batches = _pack_batches(pack, s["hvp_images"], s["hvp_batch"], device)
    torch.manual_seed(0)
    model = build_model(s["hvp_model"], **(s["model_kwargs"] if smoke else {})).to(device)
    for m in model.modules():   # BN statistics from these images (cumulative average)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for xb, _ in batches:
            model(xb)
    model.eval()
    loss = nn.CrossEntropyLoss()
    variants = {"reverse, fast_backward": dict(hvp_mode="reverse"), "forward": dict(hvp_mode="forward")}
    objs = {k: Objective(model, loss, batches, **kw) for k, kw in variants.items()}
    grad_obj = Objective(model, loss, batches)
    v = torch.randn(grad_obj.dim, generator=torch.Generator().manual_seed(0)).to(device)
    for obj in objs.values():
        obj.hvp(v)
    grad_obj.grad()
    times = {k: [] for k in ("grad", *objs)}
    for _ in range(s["hvp_rounds"]):
        times["grad"].append(_timed(grad_obj.grad, device)[1])
        for k, obj in objs.items():
            times[k].append(_timed(lambda: obj.hvp(v), device)[1])
    med = {k: statistics.median(t) for k, t in times.items()}
    ratios = {k: med[k] / med["grad"] for k in objs}
    best = min(ratios, key=ratios.get)
    # top eigenvalue at tol 1e-3: Lanczos against PyHessian's power iteration
    obj = Objective(model, loss, batches, **variants[best])
    ours, t_ours = _timed(lambda: top_eigenpairs(obj, 1, tol=1e-3, generator=torch.Generator().manual_seed(0)),
                          device)
    result = {"model": s["hvp_model"], "images": s["hvp_images"], "batch": s["hvp_batch"],
              "hvp_seconds": {k: med[k] for k in objs}, "grad_seconds": med["grad"],
              "hvp_over_grad_by_variant": ratios, "hvp_variant": best, "hvp_over_grad": ratios[best],
              "eigenvalue": float(ours.values[0]), "eig_matvecs": ours.matvecs, "eig_seconds": t_ours,
              "eig_converged": bool(ours.converged)}
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        result["eig_time_over_pyhessian"] = "pyhessian missing"
    else:
        torch.manual_seed(0)   # PyHessian draws its start vector from the global generator
        peer = PyHessian(model, loss, dataloader=batches, cuda=device.type == "cuda")
        matvecs, inner = [0], peer.dataloader_hv_product

        def counted(v):
            matvecs[0] += 1
            return inner(v)
        peer.dataloader_hv_product = counted
        (values, _), t_peer = _timed(lambda: peer.eigenvalues(maxIter=100, tol=1e-3, top_n=1), device)
        model.zero_grad(set_to_none=True)
        peer_value = float(values[0])
        result.update(pyhessian_eigenvalue=peer_value, pyhessian_seconds=t_peer, pyhessian_matvecs=matvecs[0],
                      pyhessian_rel_diff=abs(peer_value - result["eigenvalue"]) / abs(result["eigenvalue"]),
                      eig_time_over_pyhessian=t_ours / t_peer)
    print(f"hessian: HVP/grad {ratios[best]:.2f} ({best}); top eigenvalue {result['eigenvalue']:.5g} in "
          f"{t_ours:.2f} s; vs pyhessian {result['eig_time_over_pyhessian']}", flush=True)
    _write(out / "hessian.json", result)
    return result


# ---------------------------------------------------------------------------- run
def run_stage(out: Path, smoke: bool, pack: Path) -> dict:
    from experiments.config import TrainConfig
    from experiments.datasets import pack_train_size
    from experiments.trainer import train
    s = sizes(smoke)
    n = pack_train_size(pack)
    spe = n // (s["run_workers"] * s["run_batch"])
    total = spe * s["run_epochs"]
    cfg = TrainConfig(
        model=s["run_model"], width=4 if smoke else 0, data="cifar10", data_dir=str(pack),
        workers=s["run_workers"], local_batch=s["run_batch"], local_steps=s["run_local_steps"],
        lr=0.1, lr_scaling="linear", lr_ref_batch=128, warmup_epochs=min(2.0, s["run_epochs"] / 4),
        lr_schedule="cosine", momentum=0.9, nesterov=True, wd=5e-4, aug=True, epochs=s["run_epochs"],
        eval_every=max(1, total // 3), bn_batches=10, eval_batch=500,
        track_sharpness=(0, 2) if not smoke else (0, 1),
        sharpness_samples=s["sharpness_samples"], sharpness_matvecs=s["sharpness_matvecs"],
        device="cuda" if torch.cuda.is_available() else "cpu", out=str(out / "run"), overwrite=True,
        progress=False)
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    recs = result.records
    sharp = [{"epoch": r.epoch, "top_eigenvalue": r.top_eigenvalue, "hessian_trace": r.hessian_trace}
             for r in recs if r.top_eigenvalue is not None]
    summary = {"config": cfg.to_dict(), "backend": result.backend, "steps": recs[-1].step,
               "epochs": s["run_epochs"], "wall_seconds": wall,
               "seconds_per_epoch": recs[-1].wall_time / recs[-1].epoch,
               "test_acc": recs[-1].test_acc, "train_loss": recs[-1].train_loss,
               "evaluations": [{"epoch": r.epoch, "test_acc": r.test_acc, "test_loss": r.test_loss}
                               for r in recs],
               "sharpness": sharp}
    print(f"run: {s['run_model']} K={s['run_workers']} {s['run_epochs']} epochs: test acc "
          f"{summary['test_acc']:.4f}, {summary['seconds_per_epoch']:.2f} s/epoch, sharpness "
          + ", ".join(f"epoch {p['epoch']:.1f}: {p['top_eigenvalue']:.4g}" for p in sharp), flush=True)
    _write(out / "run.json", summary)
    return summary


# ---------------------------------------------------------------------------- collect
def cuda_test_summary(log: Path) -> str:
    """"N passed, M failed" (plus skipped / errors when any) from pytest's last summary line."""
    if not log.is_file():
        return "not run"
    text = log.read_text(errors="replace")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1]
                                                 if text.strip() else "")}
    if not counts:
        return "no pytest summary (see pytest_cuda.log)"
    parts = [f"{counts.get('passed', 0)} passed", f"{counts.get('failed', 0)} failed"]
    parts += [f"{counts[k]} {k}" for k in ("skipped", "error", "errors") if counts.get(k)]
    return ", ".join(parts)


def collect(out: Path, smoke: bool) -> dict:
    parts = {st: json.loads((out / f"{st}.json").read_text()) for st in STAGES if (out / f"{st}.json").is_file()}
    tp, hs = parts.get("throughput", {}).get("rows", {}), parts.get("hessian", {})
    cuda = torch.cuda.is_available()
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke rehearsal)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
        "smoke": smoke,
        "stacked_over_single": {k: r["stacked_over_single"] for k, r in tp.items()},
        "stacked_over_serial": {k: r["stacked_over_serial"] for k, r in tp.items()},
        "hvp_over_grad": hs.get("hvp_over_grad", "not run"),
        "eig_time_over_pyhessian": hs.get("eig_time_over_pyhessian", "not run"),
        "cuda_tests": cuda_test_summary(out / "pytest_cuda.log"),
        "missing_stages": [st for st in ALL if st not in parts],
        **parts,
    }
    _write(out / "gpu_check.json", result)
    return result


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=(*STAGES, "collect", "all"))
    ap.add_argument("--out", required=True, help="output folder (JSON per stage, gpu_check.json)")
    ap.add_argument("--pack", default="data_subset", help="packed CIFAR-10 subset (benchmarks/pack_cifar_subset.py)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed (a rehearsal of the script)")
    args = ap.parse_args(argv)
    out, pack = Path(args.out), Path(args.pack)
    from experiments.datasets import is_pack
    if args.stage in ("hessian", "run", "all") and not is_pack(pack):
        ap.error(f"--pack {pack}: no packed subset there (make one with python -m benchmarks.pack_cifar_subset)")
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    todo = ALL if args.stage == "all" else () if args.stage == "collect" else (args.stage,)
    for st in todo:
        start = time.perf_counter()
        if st == "throughput":
            throughput(out, args.smoke)
        elif st == "hessian":
            hessian(out, args.smoke, pack)
        elif st == "run":
            run_stage(out, args.smoke, pack)
        else:
            compile_stage(out, args.smoke)
        print(f"stage {st}: {time.perf_counter() - start:.1f} s", flush=True)
    if args.stage in ("collect", "all"):
        result = collect(out, args.smoke)
        print(json.dumps({k: result[k] for k in KEYS}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
