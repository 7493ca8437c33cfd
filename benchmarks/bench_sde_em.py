"""Euler-Maruyama core (`sde.simulate.euler_maruyama`, un-projected) against torchsde's
`sdeint(method="euler")` on the same nonlinear diagonal-noise SDE in D = 10:

    dY = (sin(Y) - Y) dt + 0.5 / sqrt(1 + Y^2) dW,   Y(0) = 1,   t in [0, 1], dt = 0.01,

1,000 and 10,000 paths, float64, 1 torch thread, side by side in one process (interleaved
repeats, best of 5). Throughput = paths x steps per second; both include drawing the Brownian
increments. As a correctness check the two terminal means must agree within Monte Carlo error.

    python -m benchmarks.bench_sde_em
"""
from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import torch

from sde.simulate import euler_maruyama

DIM, T1, DT, REPEATS, TARGET = 10, 1.0, 0.01, 5, 1.0
OUT = Path(__file__).resolve().parent / "results" / "bench_sde_em.md"


def drift(t, y):
    return torch.sin(y) - y


def diffusion(t, y):
    return 0.5 * torch.rsqrt(1 + y * y)


def run_toolkit(y0: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return euler_maruyama(drift, diffusion, y0, t1=T1, dt=DT, generator=g, save_every=round(T1 / DT))[-1]


def run_torchsde(y0: torch.Tensor, seed: int) -> torch.Tensor:
    import torchsde

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return drift(t, y)

        def g(self, t, y):
            return diffusion(t, y)

    ts = torch.tensor([0.0, T1], dtype=y0.dtype)
    bm = torchsde.BrownianInterval(t0=0.0, t1=T1, size=y0.shape, dtype=y0.dtype, entropy=seed)
    with torch.no_grad():
        return torchsde.sdeint(SDE(), y0, ts, bm=bm, method="euler", dt=DT)[-1]


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    torch.set_num_threads(1)
    n_steps = round(T1 / DT)
    rows = []
    for n_paths in (1_000, 10_000):
        y0 = torch.ones(n_paths, DIM, dtype=torch.float64)
        run_toolkit(y0, 0), run_torchsde(y0, 0)                      # warm-up
        t_ours, t_peer = [], []
        for r in range(REPEATS):                                     # interleaved repeats
            t, ours = timed(run_toolkit, y0, r + 1)
            t_ours.append(t)
            t, peer = timed(run_torchsde, y0, r + 1)
            t_peer.append(t)
        a, b = min(t_ours), min(t_peer)
        se = math.sqrt(float(ours.var(0).mean() / n_paths + peer.var(0).mean() / n_paths))
        z = float((ours.mean(0) - peer.mean(0)).abs().max()) / se
        rows.append((n_paths, n_paths * n_steps / a, n_paths * n_steps / b, b / a, z))
        print(f"paths={n_paths}: toolkit {a * 1e3:.1f} ms, torchsde {b * 1e3:.1f} ms, speed-up {b / a:.2f}x, "
              f"max |mean difference| = {z:.2f} s.e.", flush=True)

    met = all(r[3] >= TARGET for r in rows)
    lines = [
        "Throughput (paths x steps per second) of the un-projected Euler-Maruyama core "
        "`sde.simulate.euler_maruyama` against `torchsde.sdeint(method=\"euler\")` (torchsde "
        f"{__import__('torchsde').__version__}, its default `BrownianInterval`) on "
        "dY = (sin Y - Y) dt + 0.5 (1 + Y^2)^-1/2 dW, D = 10 diagonal noise, dt = 0.01, t in [0, 1], "
        f"float64, 1 torch thread, best of {REPEATS} interleaved repeats. Both include drawing the "
        "Brownian increments.",
        "",
        "| paths | toolkit (paths x steps / s) | torchsde (paths x steps / s) | ratio toolkit / torchsde | terminal means differ by (max, in s.e.) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n_paths, ours, peer, ratio, z in rows:
        lines.append(f"| {n_paths:,} | {ours:,.0f} | {peer:,.0f} | {ratio:.2f}x | {z:.2f} |")
    lines += [
        "",
        f"Target: ratio >= {TARGET:.0f}x at both sizes. **{'Met' if met else 'Not met'}.** "
        "The mean difference column checks that both solve the same SDE (values below ~3 s.e. expected).",
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `python -m benchmarks.bench_sde_em` "
        "(2 shared CPU cores; absolute rates are indicative only, the ratio is the result).",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
