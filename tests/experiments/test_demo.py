"""`python -m experiments.demo --quick` on a tiny real CIFAR-10 subset (10 images at 4x4, GELU MLP).

Budget: about 60 s on one thread (two runs of the quick toy part, one tiny continuation set,
and 100 reverse passes for the per-eigendirection reference).
"""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from experiments import demo
from experiments.comparison.full_resolution import RESULT_DIRS, result_lines

RULES = ("SGD", "Local", "QSR")


def run_demo(args):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = demo.main(args)
    return status, buffer.getvalue()


@pytest.fixture(scope="module")
def with_data(cifar10_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status, printed = run_demo(["--quick", "--data-dir", str(cifar10_dir), "--out", str(out)])
    return status, printed, out, json.loads((out / demo.RESULTS_NAME).read_text())


def test_results_carry_predicted_and_measured_rates_for_every_rule(with_data):
    status, printed, _, res = with_data
    assert status == 0
    assert res["git_revision"] and res["date"] and res["torch_threads"] == 1
    assert res["cifar_settings"]["seeds"] == demo.QUICK_CIFAR.seeds
    runs = res["cifar10"]["runs"]
    assert sorted(r["name"] for r in runs) == sorted(RULES)
    for r in runs:
        # label noise lowers the trace in every rule; prediction and measurement both negative,
        # and within 30% of each other even at this tiny size (the CNN point of RESULTS.md finds 2-20% at eta = 0.004)
        assert r["predicted"] < 0 and r["measured"] < 0
        assert 0.7 < r["measured"] / r["predicted"] < 1.3
        assert len(r["per_seed"]) == demo.QUICK_CIFAR.seeds and r["seeds"] == demo.QUICK_CIFAR.seeds
        assert r["measured"] == pytest.approx(np.mean(r["per_seed"]), rel=1e-12)
        assert r["max_projection_residual"] <= 1e-10 and r["warnings"] == []
    # every row of the printed table is there, and where the committed full-resolution result lives
    for name in RULES:
        assert any(line.startswith(name) for line in printed.splitlines())
    for folder in RESULT_DIRS:
        assert "\n".join(result_lines(folder)) in printed and f"benchmarks/results/{folder.name}" in printed


def test_toy_sgd_rate_extrapolates_to_the_slow_sde(with_data):
    toy = with_data[3]["toy"]["rules"]
    sgd = toy["SGD"]
    # closed form -4 sigma^2 m_1 / B = -4 * 1 * 1 / 8
    assert sgd["predicted"] == pytest.approx(-0.5, rel=1e-12)
    # 64 seeds give a standard error of ~1.3% on the extrapolated value; 6% is > 4 standard
    # errors, while the raw eta = 0.04 rate is ~5-10% off (the O(eta) bias extrapolation removes)
    assert abs(sgd["extrapolated"] / sgd["predicted"] - 1) < 0.06
    assert abs(sgd["extrapolated"] - sgd["predicted"]) < 5 * sgd["extrapolated_stderr"] + 0.01
    for name in RULES:
        assert [row["eta"] for row in toy[name]["rows"]] == list(demo.QUICK_TOY.etas)


def _psi(x):
    return (np.expm1(-x) + x) / x


def test_local_over_sgd_predicted_ratio_is_the_closed_form_weighting(with_data, cifar10_dir):
    res = with_data[3]
    s = demo.QUICK_CIFAR
    point = demo.cifar_point(cifar10_dir, s)                 # deterministic: the same point as the demo
    obj, geometry = point.objective, point.geometry
    assert geometry.trace == pytest.approx(res["cifar10"]["point"]["trace"], rel=1e-9)
    g_trace = point.gradients.trace
    # contribution c_i of each Hessian eigendirection v_i to d trH/dt: g . P d3L[v_i v_i^T]
    contributions = []
    for i in range(len(geometry.eigenvalues)):
        e = torch.zeros_like(geometry.eigenvalues)
        e[i] = 1
        contributions.append(float(g_trace @ geometry.d3_pairing(obj, geometry.pairing(e))))
    c = np.array(contributions)
    lam = geometry.eigenvalues.numpy()
    weights = 1 + (s.workers - 1) * _psi(2 * s.beta * lam)            # THEORY.md, label noise
    closed_form = float((weights * c).sum() / c.sum())
    ratio = next(r for r in res["cifar10"]["ratios"] if r["rule"] == "Local")
    # both are sums of the same float64 terms in different orders: agreement to rounding
    assert ratio["predicted"] == pytest.approx(closed_form, rel=1e-8)
    assert 1 < ratio["predicted"] < s.workers
    qsr = next(r for r in res["cifar10"]["ratios"] if r["rule"] == "QSR")
    assert qsr["predicted_limit"] == pytest.approx(s.workers, rel=1e-10)


def test_figures_are_written(with_data):
    out = with_data[2]
    for stem in ("demo_toy_extrapolation", "demo_cifar_trace", "demo_cifar_rates"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000


def test_without_data_runs_the_toy_and_says_how_to_get_cifar10(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    status, printed = run_demo(["--quick", "--data-dir", str(empty), "--out", str(tmp_path / "out")])
    assert status == 0
    assert "no CIFAR-10 found" in printed and "--download" in printed and "--data-dir" in printed
    res = json.loads((tmp_path / "out" / demo.RESULTS_NAME).read_text())
    assert res["cifar10"] is None
    assert all(math.isfinite(res["toy"]["rules"][n]["extrapolated"]) for n in RULES)
    assert (tmp_path / "out" / "demo_toy_extrapolation.png").exists()
    assert not (tmp_path / "out" / "demo_cifar_trace.png").exists()


def test_results_hold_no_machine_paths_and_the_table_says_what_each_row_is(with_data):
    from experiments.notebooks import _machine_paths
    _, printed, out, res = with_data
    assert _machine_paths(res) == []                         # promotable: no absolute, /tmp or ../ paths
    assert res["figures"] and "/" not in "".join(res["figures"])            # names, not paths
    lines = printed.splitlines()
    assert any(line.startswith("Rule / SGD ratio of d trH/dt") for line in lines)
    assert any(line.startswith("Each row: one rule at one eta") for line in lines)
    assert any(line.startswith("Local/SGD ") for line in lines) and any(line.startswith("QSR/SGD ") for line in lines)
    assert not any("meas/pred" in line for line in lines)
    for r in res["cifar10"]["ratios"]:
        assert r["quantity"] == (f"{r['rule']}/SGD" if r["eta"] else "measured/predicted, eta -> 0")
    book = json.loads((out / "provenance.json").read_text())["experiments.demo"]
    assert book["quick"] is True and demo.RESULTS_NAME in book["figures"] and book["git_revision"]


def test_promotion_copies_recorded_figures_with_provenance_and_refuses_bad_sources(with_data, tmp_path):
    from experiments.notebooks import promote_figures, record_provenance
    out = with_data[2]
    dest = tmp_path / "figures"
    with pytest.raises(ValueError, match="quick mode"):            # a quick demo is never promoted
        promote_figures([out], dest)
    full = tmp_path / "full"
    full.mkdir()
    (full / "demo_toy_extrapolation.png").write_bytes((out / "demo_toy_extrapolation.png").read_bytes())
    (full / "demo_results.json").write_text(json.dumps({"figures": ["demo_toy_extrapolation.png"], "seed": 0}))
    record_provenance(full, "experiments.demo", ["demo_toy_extrapolation.png", "demo_results.json"], command="x")
    copied = promote_figures([full], dest)
    assert sorted(p.name for p in copied) == ["demo_results.json", "demo_toy_extrapolation.png"]
    assert (dest / "demo_toy_extrapolation.png").read_bytes() == (full / "demo_toy_extrapolation.png").read_bytes()
    assert json.loads((dest / "provenance.json").read_text())["experiments.demo"]["command"] == "x"
    (full / "demo_results.json").write_text(json.dumps({"cifar10_root": "/home/me/data"}))
    with pytest.raises(ValueError, match="machine paths"):
        promote_figures([full], tmp_path / "other")
    assert not (tmp_path / "other").exists()                     # refused before any copy
    with pytest.raises(ValueError, match="no provenance.json"):
        promote_figures([tmp_path / "empty"], dest)
