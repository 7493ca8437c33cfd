"""Table of all eta/windows: measured vs predicted at zeta vs predicted along the path (same fit)."""
import json, math, numpy as np, torch
from experiments.flipped_labels import FlipPath, flip_configs
P = json.load(open("/tmp/cegap/ode.json"))
paths = {}
for name, nodes in P.items():
    c = lambda k: torch.tensor([n[k] for n in nodes], dtype=torch.float64)
    paths[name] = FlipPath(rule=name, times=c("t"), trace=c("trace"), lambda_max=c("lambda_max"), trace_rate=c("trace_rate"),
                           lambda_max_rate=c("lambda_max_rate"), max_residual=0.0)
def times_for(row):
    name = "sgd" if row["rule"].startswith("SGD") else ("local" if row["rule"].startswith("Local") else "qsr")
    if "checkpoint_times" in row and row["checkpoint_times"]:
        return name, torch.tensor(row["checkpoint_times"], dtype=torch.float64)
    if "times" in row:
        return name, torch.tensor(row["times"], dtype=torch.float64)
    eta, T = row["eta"], row["slow_time"]
    ck = 4
    cfg = flip_configs(eta, 0.1, seeds=2, checkpoints=ck, slow_times={"sgd": T, "local": 0.1, "qsr": 0.06})[name]
    if name == "sgd":
        spr = cfg.steps_per_round_sgd; t = [k * spr * eta ** 2 for k in range(cfg.rounds + 1)]
    else:
        H, every = cfg.local_steps, cfg.checkpoint_every
        t = [0.0] + [r * H * eta ** 2 for r in range(1, cfg.rounds + 1) if r % every == 0]
    assert abs(t[-1] - T) < 1e-9, (row["rule"], eta, t[-1], T)
    return name, torch.tensor(t, dtype=torch.float64)
def main():
    rows = [json.loads(l) for l in open("/work/main/benchmarks/results/ce_flip_rows.jsonl")]
    groups = {}
    for r in rows:
        name, t = times_for(r)
        if name == "qsr":
            continue
        key = (name, r["eta"], round(r["slow_time"], 4))
        g = groups.setdefault(key, {"per_seed": [], "lm": [], "t": t, "sets": []})
        g["per_seed"] += r["trace_per_seed"]; g["lm"] += r["lambda_max_per_seed"]; g["sets"].append(r.get("seed", 0))
        g["pred"] = r["predicted_trace_rate"]; g["pred_lm"] = r["predicted_lambda_max_rate"]
    out = {}
    print("| rule | eta | window | seed sets | seeds | pred at zeta | pred along path | measured +/- s.e. | ratio (zeta) | ratio (path) | lmax ratio (path) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(groups):
        g = groups[key]; name, eta, T = key
        x = np.array(g["per_seed"]); lm = np.array(g["lm"])
        m, se = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
        pp = paths[name].fitted_slope(g["t"]); pl = paths[name].fitted_slope(g["t"], "lambda_max")
        out[key] = dict(m=m, se=se, pp=pp, pred=g["pred"], n=len(x), lm=lm.mean(), lmse=lm.std(ddof=1)/math.sqrt(len(lm)), pl=pl)
        print(f"| {name} | {eta} | {T} | {sorted(set(g['sets']))} | {len(x)} | {g['pred']:.2f} | {pp:.2f} | {m:.2f} +/- {se:.2f} | "
              f"{m/g['pred']:.3f} +/- {se/abs(g['pred']):.3f} | {m/pp:.3f} +/- {se/abs(pp):.3f} | {lm.mean()/pl:.3f} +/- {out[key]['lmse']/abs(pl):.3f} |")
    print()
    for eta in sorted({k[1] for k in out}):
        s = [k for k in out if k[0] == "sgd" and k[1] == eta]; l = [k for k in out if k[0] == "local" and k[1] == eta]
        for ks in s:
            for kl in l:
                a, b = out[kl], out[ks]
                ratio = a["m"] / b["m"]; se = ratio * math.sqrt((a["se"]/a["m"])**2 + (b["se"]/b["m"])**2)
                print(f"eta={eta} Local/SGD (windows {kl[2]}/{ks[2]}): measured {ratio:.3f} +/- {se:.3f}; pred zeta {a['pred']/b['pred']:.3f}; "
                      f"pred path {a['pp']/b['pp']:.3f}; measured/path {ratio/(a['pp']/b['pp']):.3f}")

if __name__ == '__main__':
    main()
