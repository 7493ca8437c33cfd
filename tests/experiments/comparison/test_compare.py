"""experiments.comparison.compare (and `python -m experiments.compare`): bring your own model.

The pipeline's rows are the engine's own numbers for the same point and seeds (both noise models), the command
line writes them with provenance (in process and as a subprocess, on a network defined in THIS file), bad inputs
are refused before any long work, and the README's example runs as printed. Real CIFAR-10, 10 images at 4x4,
float64. (Migrated from tests/experiments/test_compare.py and the command-line parts of test_drift_check.py.)
"""
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.compare import MODELS, compare, main, parse_rule, predict_row
from experiments.comparison.continuation import ContinuationConfig, measure, run_schedule
from experiments.comparison.noise import FlippedLabels, GaussianLabelNoise, parse_noise
from experiments.comparison.point import build_point, check_model
from experiments.comparison.reading_mf import ReadingTolerances, with_eigendecomposition
from experiments.data import cifar_subset, load_cifar10, normalize
from sde.label_noise import gauss_newton_geometry, predict_rates, sharpness_gradients
from sde.rules import QSR, SGD, LocalSGD

ROOT = Path(__file__).resolve().parents[3]
SPEC = "tests.experiments.comparison.test_compare:tiny_net"


def tiny_net(image_size: int = 4) -> nn.Module:
    """The user's network: 3 x image_size^2 -> 32 (tanh) -> 10, D = 1,898 at 4x4."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, 32), nn.Tanh(), nn.Linear(32, 10))


def wrong_outputs(image_size: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, 7))


def with_batchnorm(image_size: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, 32), nn.BatchNorm1d(32), nn.Linear(32, 10))


def five_classes(image_size: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, 32), nn.Tanh(), nn.Linear(32, 5))


@pytest.fixture(scope="module")
def data(cifar10_dir):
    return cifar_subset(cifar10_dir, 10, image_size=4)


KW = dict(etas=[0.01], seeds=2, slow_time=0.005, checkpoints=3, train_steps=2000, lr=1e-2)


@pytest.mark.parametrize("noise,rule", [("flip:0.1", "qsr:K=2,alpha=0.1"), ("gaussian:0.1", "local:K=2,beta=0.2")])
def test_rows_are_the_engines_numbers_for_the_same_point_and_seeds(data, noise, rule):
    x, y = data
    lines = []
    (row,) = compare(tiny_net, x, y, noise=noise, rules=[rule], progress=lines.append, **KW)
    # the same comparison assembled by hand from the engine (point, prediction, measurement)
    point = build_point(tiny_net, x, y, noise=noise, train_steps=2000, lr=1e-2)
    r = parse_rule(rule)
    scale = point.noise.noise_scale
    limit = predict_rates(point.objective, point.geometry, r, noise_scale=scale, gradients=point.gradients)
    at_eta = predict_rates(point.objective, point.geometry, r.at_eta(0.01), noise_scale=scale,
                           gradients=point.gradients)
    config = ContinuationConfig(rule=r, eta=0.01, **run_schedule(r, 0.01, slow_time=0.005, checkpoints=3, seeds=2))
    m = measure(point, config, seed=0)
    # same point, same rule at the same eta: the prediction is the same float64 computation
    assert row.predicted == pytest.approx(at_eta.trace_rate, rel=1e-10, abs=0)
    assert row.predicted_limit == pytest.approx(limit.trace_rate, rel=1e-10, abs=0)
    assert (row.predicted != row.predicted_limit) == ("qsr" in rule)    # QSR runs at eta with beta = eta H
    # same seeds: the runs draw the same batches and noise, so the measured slopes are the same
    assert row.measured == pytest.approx(m.trace_rate, rel=1e-9, abs=0)
    assert row.stderr == pytest.approx(m.trace_rate_std / 2 ** 0.5, rel=1e-9)
    assert row.measured == pytest.approx(sum(row.per_seed) / 2, rel=1e-12) and len(row.lambda_max_per_seed) == 2
    assert len(row.times) == len(row.trace_path) == 4 and row.times[0] == 0.0
    assert row.trace_path[0] == pytest.approx(row.trace, rel=1e-6)          # the readings start at zeta
    assert row.rule == repr(r) and row.seeds == 2 and row.noise == noise
    assert row.local_steps == config.local_steps and row.warnings == ()
    assert row.predicted < 0 and row.measured < 0     # both: tr H decreases under label noise
    assert any(line.startswith("point: on Gamma") for line in lines) and "ratio" in lines[-1]


def test_parsers_and_schedule():
    assert parse_rule("sgd") == SGD(8) and parse_rule("sgd:B=16") == SGD(16)
    assert parse_rule("local:K=4,beta=0.4") == LocalSGD(4, 2, 0.4)
    assert parse_rule("local:K=4,beta=0.4", batch=32) == LocalSGD(4, 8, 0.4)
    assert parse_rule("qsr:K=4,alpha=0.08,b=3") == QSR(4, 3, alpha=0.08)
    assert parse_rule("qsr:K=2,alpha=0.08", local_batch=5) == QSR(2, 5, alpha=0.08)
    for bad, match in [("adam", "unknown rule 'adam'"), ("local:K=4", "needs K= and beta="),
                       ("qsr:K=4,gamma=1", "unknown setting 'gamma=1'"), ("local:K=x,beta=0.4", "K='x' is not a int"),
                       ("local:K=3,beta=0.4", "not divisible by K = 3"), ("qsr:alpha=0.1", "needs K= and alpha=")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            parse_rule(bad)
    assert parse_noise("gaussian:0.1") == GaussianLabelNoise(0.1) and parse_noise("flip:0.2") == FlippedLabels(0.2)
    for bad in ("uniform:0.1", "flip", "flip:x", "flip:1.5", "gaussian:-1"):
        with pytest.raises(ValueError):
            parse_noise(bad)
    # QSR at eta = 0.01, alpha = 0.1: H = floor(100) = 100; 0.1 / 1e-4 = 1000 steps -> 10 rounds (>= 5)
    assert run_schedule(QSR(2, 4, alpha=0.1), 0.01, slow_time=0.1, checkpoints=5, seeds=3) == \
        {"rounds": 10, "checkpoint_every": 2, "seeds": 3}
    assert run_schedule(SGD(8), 0.01, slow_time=0.1, checkpoints=5, seeds=3) == \
        {"rounds": 5, "steps_per_round_sgd": 200, "seeds": 3}
    # (test_flipped_labels' flip_configs): at eta = 0.02 SGD runs its slow time exactly, Local SGD (H = 20) and
    # QSR (H = floor(16)) in whole rounds
    sgd = run_schedule(SGD(8), 0.02, slow_time=0.2, checkpoints=4, seeds=2)
    assert sgd["rounds"] * sgd["steps_per_round_sgd"] * 0.02 ** 2 == pytest.approx(0.2)
    local, qsr = parse_rule("local:K=4,beta=0.4"), parse_rule("qsr:K=4,alpha=0.08")
    assert local.local_steps(0.02) == 20 and qsr.local_steps(0.02) == 16
    rounds = run_schedule(local, 0.02, slow_time=0.1, checkpoints=4, seeds=2)["rounds"]
    assert rounds * 20 * 0.02 ** 2 == pytest.approx(0.1, rel=0.05)


def test_registered_models_and_the_balanced_real_subset(cifar10_dir):
    cnn = MODELS["cnn"](image_size=16, generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in cnn.parameters()) == 9946
    assert sum(p.numel() for p in MODELS["mlp"](image_size=8).parameters()) == 7562
    assert sum(p.numel() for p in MODELS["mlp-wide"](image_size=8).parameters()) == 50058   # RESULTS 2b's MLP
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.ReLU)) for m in cnn.modules())
    with pytest.raises(ValueError, match="activation"):
        MODELS["cnn"](activation="relu")
    x, y = cifar_subset(cifar10_dir, 20, image_size=8)
    assert x.shape == (20, 3, 8, 8) and x.dtype == torch.float64
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10
    images, labels = load_cifar10(cifar10_dir, "train")
    first_frog = torch.nonzero(labels == 6).flatten()[0]
    expected = torch.nn.functional.avg_pool2d(normalize(images[first_frog:first_frog + 1], dtype=torch.float64), 4)
    where = torch.nonzero(y == 6).flatten()[0]
    torch.testing.assert_close(x[where:where + 1], expected)
    with pytest.raises(ValueError, match="multiple of 10"):
        cifar_subset(cifar10_dir, 15)


def test_bad_networks_and_points_are_refused_before_training(data):
    x, y = data
    noise = GaussianLabelNoise(0.1)
    with pytest.raises(ValueError, match="BatchNorm.*Gamma is not the set of per-sample minimizers"):
        check_model(with_batchnorm().double(), x, y, noise)
    with pytest.raises(ValueError, match=r"outputs of shape \(2, 7\) .* labels lie in \[0, 9\] but the network has 7"):
        check_model(wrong_outputs().double(), x, y, noise)
    with pytest.raises(ValueError, match=r"float targets of shape \(10, 3\) do not fit the network's 10 outputs"):
        check_model(tiny_net().double(), x, torch.zeros(10, 3, dtype=torch.float64), noise)
    with pytest.raises(ValueError, match="float targets must be one-hot rows"):
        check_model(tiny_net().double(), x, torch.full((10, 10), 0.1, dtype=torch.float64), FlippedLabels(0.1))
    with pytest.raises(ValueError, match=r"0 < p < \(C-1\)/C = 0.5 for the network's C = 2 outputs"):
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).double(), x, y % 2, FlippedLabels(0.6))
    with pytest.raises(ValueError, match="Dropout"):
        check_model(nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(48, 10)).double(), x, y, noise)
    with pytest.raises(ValueError, match="100 equations on Gamma .* D = 69 parameters"):
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 1), nn.Linear(1, 10)).double(), x, y, noise)
    with pytest.raises(ValueError, match="the point is not on Gamma"):
        build_point(tiny_net, x, y, noise=noise, train_steps=1, tol=1e-300)
    point = build_point(tiny_net, x, y, noise=noise, train_steps=2000, lr=1e-2)
    with pytest.raises(ValueError, match="outside the regime: eta x lambda_max > 0.5"):
        compare(None, noise=noise, rules=["sgd"], etas=[0.6 / point.lambda_max], point=point)
    with pytest.raises(ValueError, match="built for gaussian:0.1, not flip:0.1"):
        compare(None, noise="flip:0.1", rules=["sgd"], etas=[0.01], point=point)
    with pytest.raises(ValueError, match="set matrix-free readings: give them with method='cg'"):
        compare(None, noise=noise, rules=["sgd"], etas=[0.01], point=point,
                tolerances=ReadingTolerances(reflected="formula"))
    # predictions alone (no runs) are the measured rows' predictions; a run leaving the linear regime
    # (here: any change of tr H beyond 1e-9 relative) keeps its row and names the RegimeWarning in it
    kw = dict(noise=noise, rules=["sgd", "qsr:K=2,alpha=0.1"], etas=[0.01], seeds=2, slow_time=0.005, checkpoints=3)
    only = compare(None, point=point, measure=False, **kw)
    with _no_warning():
        full = compare(None, point=point, max_relative_change=1e-9, **kw)
    for a, b in zip(only, full):
        assert (a.rule, a.predicted, a.predicted_limit) == (b.rule, b.predicted, b.predicted_limit)
        assert math.isnan(a.measured) and a.seeds == 0 and not math.isnan(b.measured)
        assert len(b.warnings) == 1 and b.warnings[0].startswith("RegimeWarning: tr H changed by")
    assert only[1].predicted != only[1].predicted_limit     # QSR at eta: Local SGD with beta = eta H
    # gradient_dtype reaches the runs: the same draws, each gradient rounded to float32, measure nearly the same
    low = compare(None, point=point, max_relative_change=1.0, gradient_dtype=torch.float32, **kw)
    for a, b in zip(low, full):
        assert a.measured != b.measured and a.measured == pytest.approx(b.measured, rel=1e-4)    # measured 1e-6


@contextlib.contextmanager
def _no_warning():
    """Fails on any warning that escapes (compare records RegimeWarnings in the row instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _cli(out, *extra):
    return ["--model", SPEC, "--noise", "gaussian:0.1", "--rules", "sgd", "qsr:K=2,alpha=0.1", "--batch", "8",
            "--eta", "0.01", "--seeds", "2", "--n", "10", "--image-size", "4", "--slow-time", "0.005",
            "--checkpoints", "3", "--train-steps", "2000", "--lr", "0.01", "--out", str(out), "--quiet", *extra]


def test_command_line_writes_the_library_rows_with_provenance(data, tmp_path, capsys):
    x, y = data
    assert main(_cli(tmp_path / "a")) == 0
    table = capsys.readouterr().out
    assert "meas/pred" in table and "wrote 2 rows" in table
    rows = [json.loads(line) for line in (tmp_path / "a" / "rows.jsonl").read_text().splitlines()]
    lib = compare(tiny_net, x, y, noise="gaussian:0.1", rules=["sgd", "qsr:K=2,alpha=0.1"], etas=[0.01], seeds=2,
                  slow_time=0.005, checkpoints=3, train_steps=2000, lr=1e-2)
    assert len(rows) == 2
    for got, want in zip(rows, lib):
        assert {"rule", "eta", "predicted", "measured", "stderr", "seeds", "config", "git_revision", "date"} <= set(got)
        assert got["rule"] == want.rule and got["eta"] == 0.01 and got["seeds"] == 2
        assert got["predicted"] == want.predicted and got["measured"] == want.measured   # same point, same seeds
        assert got["per_seed"] == list(want.per_seed) and got["times"] == list(want.times)
        assert got["config"]["model"] == SPEC and got["config"]["noise"] == "gaussian:0.1"
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", got["git_revision"])
    # summary.json beside the rows: each rule's ratio (one eta: that eta's, against the path or the rate at zeta)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [r["rule"] for r in summary["rules"]] == [w.rule for w in lib] and summary["provenance"]["config"]["n"] == 10
    for got, want in zip(summary["rules"], lib):
        assert got["ratio_eta0"] == pytest.approx(want.ratio, rel=1e-12) and got["fit"] == "single eta"
        assert got["D"] == want.dim > 0 and got["image_size"] == 4 and got["workers"] == (1 if "SGD" in got["rule"] else 2)
    (only,) = summary["local_over_sgd_eta0"].values()
    assert only["value"] == pytest.approx(lib[1].ratio / lib[0].ratio, rel=1e-12)
    # --cache keeps zeta: a second run loads it and gives the same rows
    cached = [*_cli(tmp_path / "c1", "--rules", "sgd", "--predict-only"), "--cache", str(tmp_path / "zeta.pt")]
    assert main(cached) == 0 and (tmp_path / "zeta.pt").is_file()
    stamp = (tmp_path / "zeta.pt").stat().st_mtime_ns
    cached[cached.index(str(tmp_path / "c1"))] = str(tmp_path / "c2")
    assert main(cached) == 0 and (tmp_path / "zeta.pt").stat().st_mtime_ns == stamp
    first, second = ((tmp_path / d / "rows.jsonl").read_text().splitlines() for d in ("c1", "c2"))
    assert json.loads(first[0])["predicted"] == json.loads(second[0])["predicted"] == rows[0]["predicted"]
    # a non-empty --out is refused (nothing moved); --overwrite moves it aside
    code = main(_cli(tmp_path / "a"))
    assert code == 2 and "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(_cli(tmp_path / "a", "--rules", "sgd", "--overwrite")) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("a.replaced-")]
    assert len(aside) == 1 and len((aside[0] / "rows.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "a" / "rows.jsonl").read_text().splitlines()) == 1
    # the same command in a fresh process (module:function imported from the current directory)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", *_cli(tmp_path / "b")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = [json.loads(line) for line in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()]
    assert [(r["predicted"], r["measured"]) for r in again] == [(r["predicted"], r["measured"]) for r in rows]


@pytest.mark.parametrize("extra,message", [
    (["--rules", "adam"], "unknown rule 'adam'"),
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--model", "no_such_module_here:f"], "module 'no_such_module_here' does not import"),
    (["--model", "tests.experiments.comparison.test_compare:nothing"], "has no function 'nothing'"),
    (["--model", "tests.experiments.comparison.test_compare:with_batchnorm"], "the network has BatchNorm"),
    (["--model", "tests.experiments.comparison.test_compare:wrong_outputs"], "outputs of shape (2, 7)"),
    (["--noise", "flip:2"], "flipped labels need 0 < p < (C-1)/C"),
    (["--noise", "flip:0.95"], "0 < p < (C-1)/C = 0.9 for the network's C = 10 outputs"),
    (["--eta", "0"], "eta must be positive"),
    (["--eta", "5"], "outside the regime"),
    (["--path-dt", "-1"], "--path-dt must be positive"),
    (["--image-size", "5"], "--image-size must divide 32"),
])
def test_command_line_refuses_bad_input_in_one_line(tmp_path, capsys, extra, message):
    assert main(_cli(tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out" / "rows.jsonl").exists()


def test_settings_are_checked_before_the_data_is_read(tmp_path, capsys):
    # (test_drift_check's "checks before setup"): no data folder is needed to refuse a bad rule or eta
    for extra, message in ((["--rules", "qsr:K=2"], "needs K= and alpha="), (["--seeds", "0"], "--seeds must be >= 1"),
                           (["--path-dt", "0"], "--path-dt must be positive")):
        assert main(_cli(tmp_path / "out", "--data-dir", str(tmp_path / "missing"), *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_readme_example_runs_as_printed(cifar10_dir):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Bring your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    rows = scope["rows"]
    assert len(rows) == 2 and all(r.predicted < 0 for r in rows)


def test_checkpoints_plain_state_dict_and_trainer_file(data, tmp_path, capsys):
    from experiments.config import TrainConfig
    from experiments.trainer import train
    x, y = data
    # a plain state_dict of the test's network: the point starts from THOSE weights
    start = tiny_net().double()
    with torch.no_grad():
        for p in start.parameters():
            p.mul_(1.5)
    torch.save(start.state_dict(), tmp_path / "w.pt")
    assert main(_cli(tmp_path / "a", "--checkpoint", str(tmp_path / "w.pt"), "--predict-only")) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "rows.jsonl").read_text().splitlines()]
    want = compare(start, x, y, noise="gaussian:0.1", rules=["sgd", "qsr:K=2,alpha=0.1"], etas=[0.01],
                   train_steps=2000, lr=1e-2, measure=False)
    default = compare(tiny_net, x, y, noise="gaussian:0.1", rules=["sgd"], etas=[0.01], train_steps=2000, lr=1e-2,
                      measure=False)
    assert [r["predicted"] for r in rows] == [r.predicted for r in want]
    assert rows[0]["predicted"] != default[0].predicted        # another start, another point of Gamma
    assert rows[0]["measured"] is None and rows[0]["seeds"] == 0
    # files of experiments.train (no --model): a BatchNorm network is refused, a normalization-free one used
    for name, model, norm in (("bn", "small_cnn", "default"), ("plain", "mlp", "none")):
        cfg = TrainConfig(model=model, width=4 if model == "small_cnn" else 16, norm=norm, data="synthetic",
                          synthetic_size=64, test_size=32, workers=2, local_batch=8, local_steps=2, lr=0.05, epochs=1,
                          eval_every=4, bn_batches=2, precision="fp64", checkpoint_every=4, out=str(tmp_path / name),
                          backend="serial", progress=False)
        train(cfg)
    argv = [a for a in _cli(tmp_path / "b", "--image-size", "32", "--predict-only", "--eta", "0.001") if a != SPEC]
    argv.remove("--model")
    assert main([*argv, "--checkpoint", str(tmp_path / "bn" / "final.pt")]) == 2
    assert "the network has BatchNorm" in capsys.readouterr().err
    assert main([*argv, "--checkpoint", str(tmp_path / "plain" / "final.pt")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["predicted"] < 0 and rows[0]["config"]["checkpoint"].endswith("final.pt")


def test_any_number_of_classes_and_float_targets(data):
    x, y = data
    kw = dict(rules=["sgd", "local:K=2,beta=0.2"], **KW)
    # one-hot float targets are the integer labels: the same point, the same rows, bit for bit
    hot = torch.nn.functional.one_hot(y, 10).to(torch.float64)
    a = compare(tiny_net, x, y, noise="gaussian:0.1", **kw)
    b = compare(tiny_net, x, hot, noise="gaussian:0.1", **kw)
    assert [(r.predicted, r.measured) for r in a] == [(r.predicted, r.measured) for r in b]
    # C = 5 classes (labels y mod 5), flipped labels at p = 0.3 < 4/5: the prediction is the closed form
    # (metric-weighted geometry, noise scale 1) at the same point assembled by hand, and the runs (5-class
    # flips) read tr H falling
    labels = y % 5
    rows = compare(five_classes, x, labels, noise="flip:0.3", **kw)
    point = build_point(five_classes, x, labels, noise="flip:0.3", train_steps=2000, lr=1e-2)
    noise = FlippedLabels(0.3)
    geo = gauss_newton_geometry(point.objective, point.zeta, metric=noise.metric(noise.targets(labels, 5)))
    assert geo.eigenvalues.numel() <= 10 * 4                     # m = C - 1 = 4 equations per image
    for row, rule in zip(rows, (SGD(8), LocalSGD(2, 4, 0.2))):
        ref = predict_rates(point.objective, geo, rule, noise_scale=1.0,
                            gradients=sharpness_gradients(point.objective, geo)).trace_rate
        assert row.predicted == pytest.approx(ref, rel=1e-10, abs=0)
        assert row.predicted < 0 and row.measured < 0
        assert row.trace == pytest.approx(geo.trace, rel=1e-12)


def test_matrix_free_predictions_equal_the_exact_ones(cifar10_dir, tmp_path, monkeypatch):
    """(experiments.big_point's command line, now --matrix-free): the point by CG projections, the rates by
    sde.label_noise_mf (exact CG terms for SGD and the QSR limit; stochastic Lanczos for the psi rules) equal the
    dense route's at the dense point to the CG projection's accuracy (seen 4e-9) and the Lanczos error (seen 6e-4)."""
    x, y = cifar_subset(cifar10_dir, 30, image_size=4)            # N C = 300 equations, D = 1,898
    kw = dict(noise="gaussian:0.1", rules=["sgd", "local:K=2,beta=0.2", "qsr:K=2,alpha=0.1"], etas=[0.01],
              train_steps=2000, lr=1e-2, measure=False)
    dense = compare(tiny_net, x, y, **kw)
    lines = []
    free = compare(tiny_net, x, y, method="cg", progress=lines.append, **kw)
    assert any("predicted" in line for line in lines) and len(free) == 3
    for d, f in zip(dense, free):
        assert f.trace == pytest.approx(d.trace, rel=1e-7)
        assert f.predicted_limit == pytest.approx(d.predicted_limit, rel=1e-6 if f.rule.startswith(("SGD", "QSR"))
                                                  else 1e-2)
        assert f.predicted == pytest.approx(d.predicted, rel=1e-6 if f.rule.startswith("SGD") else 1e-2)
        assert math.isnan(f.measured) and f.seeds == 0
    # the command line: --matrix-free --predict-only gives the same numbers
    argv = _cli(tmp_path / "mf", "--n", "30", "--matrix-free", "--predict-only", "--rules", "sgd", "--nystrom-rank",
                "100", "--cg-rtol", "1e-12")
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "mf" / "rows.jsonl").read_text().splitlines()]
    assert row["predicted"] == pytest.approx(dense[0].predicted, rel=1e-6) and row["measured"] is None
    assert row["config"]["matrix_free"] is True
    point = build_point(tiny_net, x, y, noise="gaussian:0.1", train_steps=2000, lr=1e-2, method="cg")
    with pytest.raises(ValueError, match="the point is matrix-free"):
        compare(None, point=point, noise="gaussian:0.1", rules=["sgd"], etas=[0.01])
    # runs from a matrix-free point are read at Phi matrix-free (reading_mf) and measure what the dense point's
    # runs measure: same draws, zeta equal to the CG projection's accuracy, readings equal to ~1e-6 (test_reading_mf)
    run = dict(noise="gaussian:0.1", rules=["sgd"], etas=[0.01], seeds=2, slow_time=0.005, checkpoints=3)
    dense_point = build_point(tiny_net, x, y, noise="gaussian:0.1", train_steps=2000, lr=1e-2)
    (mf_row,) = compare(None, point=point, method="cg", **run)
    (dense_row,) = compare(None, point=dense_point, **run)
    assert mf_row.seeds == 2 and math.isfinite(mf_row.measured)
    assert mf_row.measured == pytest.approx(dense_row.measured, rel=1e-4)
    assert mf_row.predicted == pytest.approx(dense_row.predicted, rel=1e-6)
    # a point holding its exact Gram eigendecomposition (as compare's measuring points do) gives a psi rule's trace
    # with exact psi(2 beta G) z, no Lanczos: the same prediction within the probes' error (k2 below). compare prices
    # every rule at every eta in one call: Local SGD at K = 2 and K = 4 (same beta, same B) share one psi trace, so
    # their psi parts stand exactly in the ratio (K - 1) = 3 (separate probes would miss it by ~1e-2), and QSR's
    # beta at each eta is priced on the same probes as a call for that eta alone
    exact_point = with_eigendecomposition(point)
    assert point.gram_spectrum is None and exact_point.gram_spectrum.dim == 300
    assert float(exact_point.gram_spectrum.values.sum()) == pytest.approx(exact_point.trace, rel=1e-9)
    import sde.label_noise_mf as mf
    calls, priced = [], mf.predict_rates_matrix_free
    monkeypatch.setattr(mf, "predict_rates_matrix_free", lambda *a, **k: calls.append(a[2]) or priced(*a, **k))
    qsr = QSR(4, 2, alpha=0.03)
    rows = compare(None, point=exact_point, noise="gaussian:0.1", method="cg", measure=False, etas=[0.01, 0.02],
                   rules=[SGD(8), LocalSGD(2, 4, 0.2), LocalSGD(4, 2, 0.2), qsr])
    sgd, k2, k4 = rows[:3]
    assert len(calls) == 1 and len(calls[0]) == 6       # one call: 3 rules, QSR's limit and QSR as run at each eta
    assert (k4.predicted - sgd.predicted) / (k2.predicted - sgd.predicted) == pytest.approx(3.0, rel=1e-10)
    for row in rows[3::4]:
        alone = predict_row(exact_point, qsr, row.eta, method="cg")
        assert row.predicted != row.predicted_limit and row.predicted == pytest.approx(alone.predicted, rel=1e-10)
    assert k2.predicted == pytest.approx(dense[1].predicted, rel=1e-2)
    # predict_row (one rule) prices it on the same probes as compare: the same number (the spectrum is the default)
    assert predict_row(exact_point, LocalSGD(2, 4, 0.2), 0.01, method="cg").predicted == pytest.approx(k2.predicted,
                                                                                                       rel=1e-10)


def test_matrix_free_projector_reuses_solves_and_its_log_is_the_cg_tolerance_sweep(cifar10_dir):
    """(test_big_point's projector and sweep): at a matrix-free point the tangent projector on the point's Nystrom
    preconditioner returns a solved v's projection without CG, warm-starts a nearby v, and its log along the
    projection of grad tr H is big_point's CG-tolerance sweep of the SGD trace rate -(c / 4B) ||v - J^T a||^2:
    non-increasing in magnitude, above the exact rate at a loose tolerance, equal to it (1e-7) at convergence."""
    from dynamics.jacobian import jacobian_pairing_grad, output_jacobian
    from experiments.comparison.compare import _projector
    from sde.label_noise_mf import TangentProjector
    x, y = cifar_subset(cifar10_dir, 30, image_size=4)
    point = build_point(tiny_net, x, y, noise="gaussian:0.1", train_steps=2000, lr=1e-2, method="cg",
                        preconditioner_rank=40)
    obj, zeta = point.objective, point.zeta
    geo = gauss_newton_geometry(obj, zeta)
    projector = _projector(point, cg_rtol=1e-12)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pv, n_cold = projector.project(v)
    torch.testing.assert_close(pv, geo.tangent_project(v), rtol=0, atol=1e-8 * v.norm().item())
    again, n_again = projector.project(v.clone())
    assert n_again == 0 and torch.equal(again, pv)
    w = v + 1e-5 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pw, n_warm = projector.project(w)
    assert 0 < n_warm < n_cold
    torch.testing.assert_close(pw, geo.tangent_project(w), rtol=0, atol=1e-8 * w.norm().item())
    # the sweep: grad tr H = d3L[I] = (2/N) grad <J, J> projected with a log of every CG iteration
    logged = []
    sweep = TangentProjector(obj, zeta, point.preconditioner, rtol=1e-12, log=logged.append, log_every=1)
    grad_trace = 2 / len(x) * jacobian_pairing_grad(obj, zeta, output_jacobian(obj, zeta)[1])
    sweep.project(grad_trace)
    rates = [-0.1 ** 2 / (4 * 4) * row["sq_norm"] for row in logged]
    exact = predict_rates(obj, geo, SGD(4), noise_scale=0.1 ** 2).trace_rate
    assert rates[-1] == pytest.approx(exact, rel=1e-7) and logged[-1]["rel_residual"] <= 1e-12
    assert all(abs(b) <= abs(a) * (1 + 1e-12) for a, b in zip(rates, rates[1:]))
    loose = next(r for r, row in zip(rates, logged) if row["rel_residual"] <= 1e-2)
    assert abs(loose) > abs(exact) * (1 + 1e-9)                   # a loose tolerance overestimates
