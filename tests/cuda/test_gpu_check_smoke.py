"""The GPU check script end to end on the CPU (its --smoke rehearsal at tiny sizes): every stage
runs, gpu_check.json holds the keys issue 14 asks for, and its ratios are the ones computed
from the timings the stages measured. Not marked cuda: it runs in the ordinary suite."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import KEYS, cuda_test_summary

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_smoke_run_writes_the_summary_from_its_own_timings(tmp_path):
    from experiments.datasets import synthetic_cifar, write_pack
    x, y = synthetic_cifar(96, seed=1)
    pack = tmp_path / "pack"
    write_pack(pack, (x[:64], y[:64]), (x[64:], y[64:]))
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "PACK": str(pack), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert set(KEYS) <= set(summary) and summary["missing_stages"] == []
    tp = json.loads((out / "throughput.json").read_text())["rows"]
    assert set(summary["stacked_over_single"]) == {"small_cnn/fp32", "small_cnn/bf16"}
    for key, row in tp.items():   # the ratios are those of the measured round times' medians
        med = {k: statistics.median(v) for k, v in row["round_seconds"].items()}
        for other in ("single", "serial"):
            ratio = summary[f"stacked_over_{other}"][key]
            assert math.isfinite(ratio) and ratio > 0
            assert ratio == pytest.approx(med[other] / med["stacked"], rel=1e-12)
    hs = json.loads((out / "hessian.json").read_text())
    assert summary["hvp_over_grad"] == pytest.approx(hs["hvp_seconds"][hs["hvp_variant"]] / hs["grad_seconds"])
    assert math.isfinite(summary["hvp_over_grad"]) and summary["hvp_over_grad"] > 0
    peer = summary["eig_time_over_pyhessian"]
    assert peer == "pyhessian missing" or (math.isfinite(peer) and peer > 0)
    run = json.loads((out / "run.json").read_text())
    assert len(run["sharpness"]) == 2 and all(p["top_eigenvalue"] > 0 for p in run["sharpness"])
    import torch
    cuda = torch.cuda.is_available()
    assert 0 <= run["test_acc"] <= 1 and run["backend"] == ("vmap" if cuda else "serial")   # the auto rule
    if not cuda:   # the cuda tests were collected and skipped, not silently absent
        assert summary["cuda_tests"].startswith("0 passed, 0 failed, ") and "skipped" in summary["cuda_tests"]
    assert "=== collect" in (out / "gpu_check.log").read_text()


def test_cuda_test_summary_reads_pytest_last_line(tmp_path):
    log = tmp_path / "pytest_cuda.log"
    assert cuda_test_summary(log) == "not run"
    log.write_text("F...\nFAILED tests/cuda/x.py::t - AssertionError\n==== 1 failed, 4 passed in 31.2s ====\n")
    assert cuda_test_summary(log) == "4 passed, 1 failed"
