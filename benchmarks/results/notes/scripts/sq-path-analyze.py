"""sq-path tables: measured slopes vs the rate at zeta and vs the predicted path fitted at the same checkpoints.

usage: python analyze.py {mlp|cnn} DT [DT_CHECK]
"""
import dataclasses, json, math, re, sys
import numpy as np
import torch
from experiments.demo import CifarSettings, continuation_config
from experiments.drift_check import PointSetup, default_configs, extrapolate_to_zero_eta
from experiments.drift_path import PredictedPath
from sde.analysis import extrapolate_to_zero
from sde.rules import SGD, LocalSGD, QSR

point, dt = sys.argv[1], sys.argv[2]
check = sys.argv[3] if len(sys.argv) > 3 else None

def load(dt):
    raw = json.load(open(f"/tmp/sqpath/paths_{point}_{dt}.json"))
    return {k: PredictedPath(rule=v["rule"], times=torch.tensor(v["times"], dtype=torch.float64),
                             trace=torch.tensor(v["trace"], dtype=torch.float64),
                             lambda_max=torch.tensor(v["lambda_max"], dtype=torch.float64),
                             trace_rate=torch.tensor(v["trace_rate"], dtype=torch.float64),
                             lambda_max_rate=torch.tensor(v["lambda_max_rate"], dtype=torch.float64),
                             max_residual=v["max_residual"]) for k, v in raw.items()}, raw
paths, raw = load(dt)
paths_check = load(check)[0] if check else None

def line0(etas, vals, ses):
    etas = np.asarray(etas, float); a = np.linalg.pinv(np.vander(etas, 2, increasing=True))[0]
    return float(a @ np.asarray(vals)), float(np.sqrt(np.sum(a ** 2 * np.asarray(ses) ** 2)))

def rich(etas, v1, s1, v2, s2):
    a = line0(etas[:2], v1[:2], s1[:2]); b = line0(etas[:2], v2[:2], s2[:2])
    out = f"{a[0]:.3f} +/- {a[1]:.3f} / {b[0]:.3f} +/- {b[1]:.3f}"
    if len(etas) >= 4:
        c, d = extrapolate_to_zero(etas, v1, s1, degree=2), extrapolate_to_zero(etas, v2, s2, degree=2)
        out += f" | {c.value:.3f} +/- {c.stderr:.3f} / {d.value:.3f} +/- {d.stderr:.3f}"
    else:
        out += " | -"
    return out

def extrap(etas, vals, ses):
    if len(etas) >= 3:
        ex = extrapolate_to_zero(etas, vals, ses)
        return f"{ex.value:.3f} +/- {ex.stderr:.3f} (chi2 {ex.residual_chi2:.2f})"
    v, s = line0(etas, vals, ses)
    return f"{v:.3f} +/- {s:.3f} (2-point)"

# ---------------------------------------------------------------- runs: (kind, eta, sigma, key, times, meas, std, seeds, lmeas, lstd, pred0 at zeta, lim)
runs = []
if point == "mlp":
    nb = json.load(open("/tmp/phi/nb04_full.ipynb"))
    text = "".join("".join(o.get("text", "")) for o in nb["cells"][10]["outputs"])
    pat = re.compile(r"(\w+)\s+eta=([\d.]+)\s+sigma=([\d.]+)\s+H=(\d+)\s+pred\s+(\S+)\s+measured\s+(\S+) \+-\s+(\S+)\s+ratio ([\d.]+) "
                     r"\(raw GN ([\d.]+)\); d lmax/dt pred\s+(\S+) measured\s+(\S+) \+-\s+(\S+) ratio ([\d.]+)")
    POINT = PointSetup(n=100, image_size=8, model="mlp")
    settings = CifarSettings(point=POINT, sigma=0.1, steps=2000, checkpoints=4, seeds=6, workers=4, local_batch=2,
                             beta=0.4, qsr_alpha=0.08)
    rules = {"SGD": SGD(8), "Local": LocalSGD(4, 2, 0.4), "QSR": QSR(4, 2, alpha=0.08)}
    for m in pat.finditer(text):
        name, eta, sigma, H = m.group(1), float(m.group(2)), float(m.group(3)), int(m.group(4))
        steps = 2000 * round(0.004 / eta) if eta < 0.004 else 2000
        cfg = continuation_config(rules[name], eta, dataclasses.replace(settings, sigma=sigma, steps=steps))
        assert (H == 1 or cfg.local_steps == H), (name, eta, H, cfg.local_steps)
        key = {"SGD": "sgd", "Local": "local"}.get(name) or f"qsr_b{eta * H:g}"
        key = f"{key}_s{sigma:g}"
        p = paths[key]
        pred0, ratio, std = float(p.trace_rate[0]), float(m.group(8)), float(m.group(7))
        lpred0, lratio, lstd = float(p.lambda_max_rate[0]), float(m.group(13)), float(m.group(12))
        assert abs(pred0 / float(m.group(5)) - 1) < 1e-3, (pred0, m.group(5))
        runs.append(dict(kind=name, eta=eta, sigma=sigma, key=key, times=cfg.checkpoint_times, meas=ratio * pred0, std=std,
                         seeds=6, lmeas=lratio * lpred0, lstd=lstd, pred0=pred0, lpred0=lpred0,
                         lim=4 * float(paths[f"sgd_s{sigma:g}"].trace_rate[0]) if name == "QSR" else pred0))
else:
    steps_of = {0.001: 64000, 0.0015: 28444, 0.002: 16000, 0.003: 7111, 0.004: 4000, 0.008: 1000}
    for line in open("/work/main/benchmarks/results/cnn_point_rows.jsonl"):
        r = json.loads(line)
        kind = {"SGD": "SGD", "LocalSGD": "Local", "QSR": "QSR"}[r["rule"].split("(")[0]]
        cfg = default_configs(r["eta"], 0.1, steps_of[r["eta"]], 4, 5)[["SGD", "Local", "QSR"].index(kind)]
        times = cfg.checkpoint_times
        assert abs(float(times[-1]) / r["slow_time"] - 1) < 1e-6 and cfg.local_steps == r["local_steps"] or kind == "SGD"
        key = {"SGD": "sgd", "Local": "local"}.get(kind) or f"qsr_H{cfg.local_steps}"
        assert abs(float(paths[key].trace_rate[0]) / r["predicted_trace_rate"] - 1) < 1e-9
        runs.append(dict(kind=kind, eta=r["eta"], sigma=0.1, key=key, times=times, meas=r["measured_trace_rate"],
                         std=r["measured_trace_rate_std"], seeds=r["seeds"], lmeas=r["measured_lambda_max_rate"],
                         lstd=r["measured_lambda_max_rate_std"], pred0=r["predicted_trace_rate"],
                         lpred0=r["predicted_lambda_max_rate"], lim=r["predicted_trace_rate_limit"]))

for r in runs:
    p = paths[r["key"]]
    r["path"] = p.fitted_slope(r["times"]); r["lpath"] = p.fitted_slope(r["times"], "lambda_max")
    if paths_check:
        r["path_check"] = paths_check[r["key"]].fitted_slope(r["times"])
    if r["kind"] == "QSR":
        lp = paths["qsr_limit"] if "qsr_limit" in paths else None
        r["lim_path"] = lp.fitted_slope(r["times"]) if lp is not None else float("nan")
    se = r["std"] / math.sqrt(r["seeds"]); lse = r["lstd"] / math.sqrt(r["seeds"])
    r.update(z=r["meas"] / r["pred0"], zse=se / abs(r["pred0"]), pth=r["meas"] / r["path"], pse=se / abs(r["path"]),
             lz=r["lmeas"] / r["lpred0"], lzse=lse / abs(r["lpred0"]), lp=r["lmeas"] / r["lpath"], lpse=lse / abs(r["lpath"]))
    tr = p.at(r["times"])
    r["drop"] = float(1 - tr[-1] / tr[0])

print(f"## {point}: paths (dt = {dt})\n")
print("| path | rule | sigma | t1 | tr H: start -> end (rel. change) | d trH/dt: start -> end (rel.) | lambda_max: start -> end | d lmax/dt: start -> end (rel.) | nodes | max L | wall s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for k, p in paths.items():
    v = raw[k]
    print(f"| {k} | {v['rule']} | {v['sigma']} | {v['t1']} | {p.trace[0]:.3f} -> {p.trace[-1]:.3f} ({float(p.trace[-1] / p.trace[0] - 1):+.2%}) | "
          f"{p.trace_rate[0]:.3f} -> {p.trace_rate[-1]:.3f} ({float(p.trace_rate[-1] / p.trace_rate[0] - 1):+.2%}) | "
          f"{p.lambda_max[0]:.4f} -> {p.lambda_max[-1]:.4f} | {p.lambda_max_rate[0]:.4f} -> {p.lambda_max_rate[-1]:.4f} "
          f"({float(p.lambda_max_rate[-1] / p.lambda_max_rate[0] - 1):+.2%}) | {len(p.times)} | {p.max_residual:.1e} | {v['seconds']:.0f} |")

print(f"\n## {point}: per run (d trH/dt slow time; s.e. = std/sqrt(seeds))\n")
hdr = "| rule | eta | sigma | window | pred at zeta | pred path | path/zeta | measured +/- s.e. | ratio (zeta) | ratio (path) | lmax pred zeta | lmax pred path | lmax ratio (zeta) | lmax ratio (path) |"
if paths_check: hdr += f" path (dt {check}) |"
print(hdr); print("|" + "---|" * hdr.count("|")[:-1] if False else "|" + "---|" * (hdr.count("|") - 1))
for r in sorted(runs, key=lambda r: (r["kind"], r["sigma"], r["eta"])):
    line = (f"| {r['kind']} | {r['eta']} | {r['sigma']} | {float(r['times'][-1]):.4f} | {r['pred0']:.3f} | {r['path']:.3f} | {r['path'] / r['pred0']:.4f} | "
            f"{r['meas']:.3f} +/- {r['std'] / math.sqrt(r['seeds']):.3f} | {r['z']:.3f} +/- {r['zse']:.3f} | {r['pth']:.3f} +/- {r['pse']:.3f} | "
            f"{r['lpred0']:.4f} | {r['lpath']:.4f} | {r['lz']:.3f} +/- {r['lzse']:.3f} | {r['lp']:.3f} +/- {r['lpse']:.3f} |")
    if paths_check: line += f" {r['path_check']:.4f} |"
    print(line)
    if r["kind"] == "QSR" and "lim_path" in r and not math.isnan(r["lim_path"]):
        print(f"|   QSR vs eta->0 limit | {r['eta']} | | | {r['lim']:.3f} | {r['lim_path']:.3f} | {r['lim_path'] / r['lim']:.4f} | | "
              f"{r['meas'] / r['lim']:.3f} +/- {r['zse'] * abs(r['pred0'] / r['lim']):.3f} | {r['meas'] / r['lim_path']:.3f} +/- "
              f"{r['std'] / math.sqrt(r['seeds']) / abs(r['lim_path']):.3f} | | | | |" + (" |" if paths_check else ""))

print(f"\n## {point}: eta -> 0 (weighted least squares, `sde.analysis.extrapolate_to_zero`, degree 1, weights 1/s.e.)\n")
cap = 0.0045 if point == "cnn" else 1.0
print(f"(etas <= {cap})\n")
print("| quantity | etas | ratio (zeta) at eta -> 0 | ratio (path) at eta -> 0 | Richardson, two smallest eta (zeta / path) | degree 2 (zeta / path) |")
print("|---|---|---|---|---|---|")
for kind in ("SGD", "Local", "QSR"):
    rs = sorted([r for r in runs if r["kind"] == kind and r["sigma"] == 0.1 and r["eta"] <= cap], key=lambda r: r["eta"])
    if len(rs) < 2: continue
    e = [r["eta"] for r in rs]
    Z, ZS, PT, PS = [r['z'] for r in rs], [r['zse'] for r in rs], [r['pth'] for r in rs], [r['pse'] for r in rs]
    print(f"| {kind} trace | {e} | {extrap(e, Z, ZS)} | {extrap(e, PT, PS)} | {rich(e, Z, ZS, PT, PS)} |")
    if kind == "QSR" and "lim_path" in rs[0] and not math.isnan(rs[0]["lim_path"]):
        sez = [r["std"] / math.sqrt(r["seeds"]) / abs(r["lim"]) for r in rs]
        sep = [r["std"] / math.sqrt(r["seeds"]) / abs(r["lim_path"]) for r in rs]
        Z, PT = [r['meas'] / r['lim'] for r in rs], [r['meas'] / r['lim_path'] for r in rs]
        print(f"| QSR trace vs eta->0 limit | {e} | {extrap(e, Z, sez)} | {extrap(e, PT, sep)} | {rich(e, Z, sez, PT, sep)} |")
    Z, ZS, PT, PS = [r['lz'] for r in rs], [r['lzse'] for r in rs], [r['lp'] for r in rs], [r['lpse'] for r in rs]
    print(f"| {kind} lambda_max | {e} | {extrap(e, Z, ZS)} | {extrap(e, PT, PS)} | {rich(e, Z, ZS, PT, PS)} |")

print(f"\n## {point}: Local/SGD ratio of d trH/dt\n")
print("| eta | measured | pred at zeta | pred path | measured / zeta | measured / path |")
print("|---|---|---|---|---|---|")
mlp_meas = {0.002: (2.9194, 0.0692), 0.004: (3.0481, 0.0351), 0.008: (3.2714, 0.0445)}   # nb04 cell 19: per-seed mean +- std
vals, ses, preds, predz, es = [], [], [], [], []
for eta in sorted({r["eta"] for r in runs}):
    s = next((r for r in runs if r["kind"] == "SGD" and r["eta"] == eta and r["sigma"] == 0.1), None)
    l = next((r for r in runs if r["kind"] == "Local" and r["eta"] == eta and r["sigma"] == 0.1), None)
    if s is None or l is None: continue
    if point == "mlp":
        m, se = mlp_meas[eta][0], mlp_meas[eta][1] / math.sqrt(6)
    else:
        m = l["meas"] / s["meas"]
        se = abs(m) * math.hypot(l["std"] / math.sqrt(l["seeds"]) / l["meas"], s["std"] / math.sqrt(s["seeds"]) / s["meas"])
    pz, pp = l["pred0"] / s["pred0"], l["path"] / s["path"]
    print(f"| {eta} | {m:.3f} +/- {se:.3f} | {pz:.3f} | {pp:.3f} | {m / pz:.3f} | {m / pp:.3f} |")
    if eta <= cap:
        vals.append(m); ses.append(se); es.append(eta); preds.append(pp); predz.append(pz)
ex = extrapolate_to_zero(es, vals, ses) if len(es) >= 3 else None
if ex:
    print(f"\nLocal/SGD at eta -> 0 (weighted, etas {es}): {ex.value:.3f} +/- {ex.stderr:.3f}; / zeta {ex.value / predz[0]:.3f}; "
          f"/ path (mean over etas of the path ratio {np.mean(preds):.3f}) {ex.value / np.mean(preds):.3f}")
    rr = [v / p for v, p in zip(vals, preds)]
    ex2 = extrapolate_to_zero(es, rr, [s / p for s, p in zip(ses, preds)])
    print(f"(measured / path) per eta extrapolated: {ex2.value:.3f} +/- {ex2.stderr:.3f}")
