"""Gradient-noise probe on ResNet-20 and an MLP: JVP path against per-sample gradients and a naive loop.

    python -m benchmarks.bench_noise [--images 256] [--ks 10 50] [--chunk 32] [--models resnet20 mlp]

Every (model, method, k) runs in a FRESH subprocess with 1 torch thread: it loads the model
(`experiments.models.build_model`: ResNet-20 with BatchNorm running statistics set from the
images, eval mode; and an MLP with many parameters per activation; float32) and the first `--images` real CIFAR-10 training images, builds a random
orthonormal basis (D, k) (the cost does not depend on which basis), records ru_maxrss as the
baseline, warms up on 2 samples, runs the probe once and reports wall time and the ru_maxrss increase (peak memory of
the probe itself). Methods:
- "loop": the peer, what one writes without the toolkit: one torch.autograd.grad per sample,
  accumulating U^T g_i, the mean, sum |g_i|^2 and sum g_i (U^T g_i)^T (memory O(D k));
- "per_sample": noise_probe(method="per_sample") (vmap per-sample gradients, chunk x D block);
- "jvp": noise_probe(method="jvp") (k + 32 forward-mode directions, k reverse passes per chunk),
  all directions in one vmap; "jvp_dc8": the same with direction_chunk=8.
All three compute U^T Sigma U and the mixed block P Sigma U; the table checks they agree.
Writes benchmarks/results/bench_noise.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "bench_noise.md"
METHODS = ("loop", "per_sample", "jvp", "jvp_dc8")
THREADS = 1


def _save_images(images: int, path: str) -> None:
    """The first `images` real CIFAR-10 training images, normalized, saved for the workers (so
    that decoding the whole archive does not raise the workers' memory high-water mark)."""
    from experiments.data import load_cifar10, normalize, resolve_cifar10_dir
    x, y = load_cifar10(resolve_cifar10_dir(search=True), "train")     # the one data-root resolver
    torch.save((normalize(x[:images]).clone(), y[:images].clone()), path)


def _setup(data_path: str, k: int, model_name: str):
    from dynamics.objective import Objective
    from experiments.models import build_model

    x, y = torch.load(data_path)
    images = len(x)
    torch.manual_seed(0)
    model = build_model(model_name)
    for m in model.modules():  # running statistics := the statistics of these images
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, images, 16):  # small batches: keep the baseline's high-water low
            model(x[start:start + 16])
    model.eval()
    data = [(x[s:s + 128], y[s:s + 128]) for s in range(0, images, 128)]
    obj = Objective(model, nn.CrossEntropyLoss(), data)
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(obj.dim, k, generator=gen)).Q
    return obj, U


def _loop(obj, U):
    """The naive peer: autograd.grad per sample; returns (cov (k,k), trace, mixed (D,k))."""
    theta = obj.params.clone().requires_grad_(True)
    n, sum_g, sum_sq, sum_gc, rows = 0, torch.zeros_like(theta), 0.0, 0, []
    for x, y in obj.data:
        for i in range(len(x)):
            (g,) = torch.autograd.grad(obj.batch_loss(theta, x[i:i + 1], y[i:i + 1]), theta)
            c = U.T @ g
            n, sum_g, sum_sq = n + 1, sum_g + g, sum_sq + g.dot(g).item()
            sum_gc = sum_gc + torch.outer(g, c)
            rows.append(c)
    C = torch.stack(rows)
    mean_g, mean_c = sum_g / n, C.mean(0)
    cov = (C - mean_c).T @ (C - mean_c) / n
    sigma_u = sum_gc / n - torch.outer(mean_g, mean_c)
    return cov, sum_sq / n - mean_g.dot(mean_g).item(), sigma_u - U @ (U.T @ sigma_u)


def worker(method: str, data_path: str, k: int, chunk: int, out: str, model_name: str) -> None:
    torch.set_num_threads(THREADS)
    from dynamics.noise import noise_probe
    obj, U = _setup(data_path, k, model_name)

    def probe(o):
        if method == "loop":
            cov, trace, mixed = _loop(o, U)
            return cov, trace, mixed, 0.0
        options = dict(method="jvp", direction_chunk=8) if method == "jvp_dc8" else dict(method=method)
        r = noise_probe(o, U, chunk_size=chunk, **options)
        return r.cov_in_basis, r.trace_sigma, r.mixed, r.trace_stderr

    # warm-up on 2 samples: one-off lazy initialization (vmap / forward-AD set-up, several
    # seconds on first use) is neither timed nor counted in the peak
    x0, y0 = obj.data[0]
    probe(type(obj)(obj.model, obj.loss_fn, [(x0[:2], y0[:2])]))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    cov, trace, mixed, stderr = probe(obj)
    seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # Linux: KiB
    torch.save({"cov": cov, "mixed": mixed}, out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "trace": trace, "stderr": stderr,
                      "dim": obj.dim}))


def _run(method, data_path, k, chunk, tmp, model_name):
    out = os.path.join(tmp, f"{model_name}_{method}_{k}.pt")
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_noise", "--worker", method,
                           "--data", data_path, "--model", model_name, "--k", str(k), "--chunk", str(chunk), "--out", out],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(torch.load(out))
    return res


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _outcome(results: dict) -> str:
    """Target lines, each computed from the measured numbers."""
    lines = []
    for (name, k), res in results.items():
        ps, loop = res["per_sample"], res["loop"]
        lines.append(f"- {name}, k = {k}: per_sample is {loop['seconds'] / ps['seconds']:.1f}x faster than the loop "
                     f"(target > 1: {'met' if ps['seconds'] < loop['seconds'] else 'NOT met'}); "
                     + "; ".join(f"{m} peak {res[m]['peak_mib']:.0f} MiB vs per_sample {ps['peak_mib']:.0f} MiB "
                                 f"(target lower: {'met' if res[m]['peak_mib'] < ps['peak_mib'] else 'NOT met'}), "
                                 f"{res[m]['seconds'] / ps['seconds']:.1f}x the per_sample time"
                                 for m in ("jvp", "jvp_dc8")))
        worst = max(_rel(res[m]["cov"], ps["cov"]) for m in METHODS)
        lines.append(f"- {name}, k = {k}: largest relative difference of U^T Sigma U between methods {worst:.1e} "
                     f"(target < 1e-4 in float32: {'met' if worst < 1e-4 else 'NOT met'})")
    return "\n".join(lines)


def main(images: int, ks: list[int], chunk: int, models: list[str]) -> str:
    rows, results, dims = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "images.pt")
        _save_images(images, data_path)
        for name in models:
            for k in ks:
                res = results[name, k] = {m: _run(m, data_path, k, chunk, tmp, name) for m in METHODS}
                ref = res["per_sample"]
                dims[name] = ref["dim"]
                for m in METHODS:
                    r = res[m]
                    rows.append(
                        f"| {name} | {k} | {m} | {r['seconds']:.1f} | {r['seconds'] / ref['seconds']:.2f} | "
                        f"{r['peak_mib']:.0f} | {_rel(r['cov'], ref['cov']):.1e} | "
                        f"{_rel(r['mixed'], ref['mixed']):.1e} | "
                        f"{r['trace']:.4g} +- {r['stderr']:.2g} |")
                print("\n".join(rows[-len(METHODS):]), flush=True)
    table = "\n".join(rows)
    nets = ", ".join(f"{n} (D = {d:,})" for n, d in dims.items())
    text = f"""Gradient-noise probe `dynamics.noise_probe` on {nets} from `experiments.models.build_model`
(float32; ResNet-20's BatchNorm in eval mode with running statistics set from the data; the MLP,
width 256 x 2 hidden layers, is the regime of many parameters per activation), the first {images}
real CIFAR-10 training images, a random orthonormal basis U of k columns, chunk_size = {chunk}.
Each row is a fresh subprocess with {THREADS} torch thread; time is one call (wall clock) after a
warm-up call on 2 samples; peak memory is the ru_maxrss increase during that call over the
baseline taken after the model, the data, U and the warm-up (the probe's own working memory, to
within allocator reuse; 0 means it fit in memory already touched).
"loop" is the peer (no library offers this probe; pyhessian and hessian-eigenthings have no noise
code): one `torch.autograd.grad` per sample, accumulating the same moments in O(D k) memory with
the textbook uncentered formula. "jvp" uses 32 Hutchinson probes for the tangent trace (the +- is
its standard error) and vmaps all k + 32 directions at once; "jvp_dc8" does 8 directions at a time.
The other rows are exact. "rel. diff" columns: Frobenius distance to the per_sample result, relative.

| model | k | method | time (s) | time / per_sample | peak memory (MiB) | rel. diff U^T Sigma U | rel. diff P Sigma U | tr Sigma |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{table}

Targets: (1) per_sample faster than the naive loop; (2) the jvp path lighter in peak memory than
per_sample (its reason to exist); (3) all methods agree to float32 accuracy (< 1e-4 relative).

{_outcome(results)}

Date: {datetime.date.today().isoformat()}. Command: `python -m benchmarks.bench_noise --images {images} --ks {' '.join(map(str, ks))} --chunk {chunk} --models {' '.join(models)}`
(2 CPU cores shared with other jobs: absolute times are indicative, ratios less noisy).
"""
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--worker", choices=METHODS)
    parser.add_argument("--k", type=int)
    parser.add_argument("--out")
    parser.add_argument("--data")
    parser.add_argument("--models", nargs="+", default=["resnet20", "mlp"])
    parser.add_argument("--model", default="resnet20")
    args, _ = parser.parse_known_args()  # run_all passes its own arguments through sys.argv
    if args.worker:
        worker(args.worker, args.data, args.k, args.chunk, args.out, args.model)
    else:
        print(main(args.images, args.ks, args.chunk, args.models))
