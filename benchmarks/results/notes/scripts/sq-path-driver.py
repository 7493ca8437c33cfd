"""sq-path driver: predicted label-noise paths at the notebook-04 MLP point and the CNN point.

usage: python driver.py {mlp|cnn} DT  -> /tmp/sqpath/paths_{point}_{DT}.json
"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from experiments.drift_check import PointSetup, prepare_point
from experiments.drift_path import label_noise_drift_path
from experiments.manifold import GramPreconditioner
from sde.rules import SGD, LocalSGD, QSR

point, dt = sys.argv[1], float(sys.argv[2])
root = os.environ.get("CIFAR10_DIR", "/work/shared/data")
only = sys.argv[3:] or None
if point == "mlp":
    setup, cache = PointSetup(n=100, image_size=8, model="mlp"), "/tmp/sqpath/zeta100.pt"
    # (name, rule, sigma, t1): QSR at the beta = eta H actually run (H = 400 at 0.004, 100 at 0.008)
    jobs = [("sgd_s0.1", SGD(8), 0.1, 0.128), ("local_s0.1", LocalSGD(4, 2, 0.4), 0.1, 0.128),
            ("qsr_b1.6_s0.1", LocalSGD(4, 2, 1.6), 0.1, 0.0256), ("qsr_b0.8_s0.1", LocalSGD(4, 2, 0.8), 0.1, 0.128),
            ("sgd_s0.3", SGD(8), 0.3, 0.032), ("local_s0.3", LocalSGD(4, 2, 0.4), 0.3, 0.032)]
else:
    setup, cache = PointSetup(), "/tmp/cnn/zeta_cnn.pt"
    jobs = [("sgd", SGD(8), 0.1, 0.064), ("local", LocalSGD(4, 2, 0.4), 0.1, 0.064),
            ("qsr_limit", QSR(4, 2, alpha=0.08), 0.1, 0.064)]
    for eta, H in ((0.002, 1600), (0.003, 711), (0.004, 400), (0.008, 100)):
        jobs.append((f"qsr_H{H}", LocalSGD(4, 2, eta * H), 0.1, 0.064))
if only:
    jobs = [j for j in jobs if j[0] in only]
t0 = time.perf_counter()
obj, zeta, _ = prepare_point(root, setup, cache=cache)
pre = GramPreconditioner.at(obj, zeta)
print(f"point {point}: D={obj.dim}, L={obj.loss(zeta).item():.2e} ({time.perf_counter() - t0:.0f} s)", flush=True)
out_path = f"/tmp/sqpath/paths_{point}_{dt}.json"
out = json.load(open(out_path)) if os.path.exists(out_path) else {}
for name, rule, sigma, t1 in jobs:
    start = time.perf_counter()
    p = label_noise_drift_path(obj, zeta, rule, sigma=sigma, t1=t1, dt=dt, preconditioner=pre)
    out[name] = dict(rule=repr(rule), sigma=sigma, t1=t1, dt=dt, times=p.times.tolist(), trace=p.trace.tolist(),
                     lambda_max=p.lambda_max.tolist(), trace_rate=p.trace_rate.tolist(),
                     lambda_max_rate=p.lambda_max_rate.tolist(), max_residual=p.max_residual,
                     seconds=time.perf_counter() - start)
    with open(out_path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(out_path + ".tmp", out_path)
    print(f"{name}: {len(p.times)} nodes, trH {p.trace[0]:.4f} -> {p.trace[-1]:.4f}, rate {p.trace_rate[0]:.4f} -> "
          f"{p.trace_rate[-1]:.4f}, lmax rate {p.lambda_max_rate[0]:.4f} -> {p.lambda_max_rate[-1]:.4f}, "
          f"resid {p.max_residual:.1e} ({out[name]['seconds']:.0f} s)", flush=True)
