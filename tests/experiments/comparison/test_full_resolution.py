"""experiments.comparison.full_resolution: the full-resolution study's command line end to end at a tiny N (20 real
CIFAR-10 images at 32x32, the D = 51,033 CNN), its plan checked against a dense reference at the point it built
(Hessian spectrum from the dense Jacobian), and its memory check before any work."""
import json
import math
import shutil

import pytest
import torch

from dynamics.jacobian import output_jacobian
from experiments.comparison import full_resolution
from experiments.comparison.full_resolution import main
from experiments.comparison.path import predicted_path
from experiments.comparison.point import objective, point_at
from experiments.comparison.noise import GaussianLabelNoise, simplex_targets
from experiments.comparison.compare import MODELS
from experiments.comparison.projection import GramPreconditioner
from experiments.comparison.summary import summary_lines
from experiments.data import cifar_subset
from sde.rules import SGD, LocalSGD


OPTIONS = ["--n", "20", "--seeds", "2", "--checkpoints", "2", "--slow-time", "0.001", "--quiet"]


@pytest.fixture(scope="module")
def tiny_study(cifar10_dir, tmp_path_factory):
    """A finished study at N = 20 (one eta, 4 rules), made once: each test works on its own copy."""
    out = tmp_path_factory.mktemp("study") / "fr"
    assert main(OPTIONS + ["--eta-lambda", "0.2", "--data-dir", str(cifar10_dir), "--out", str(out)]) == 0
    return out


def test_full_resolution_study_plans_from_the_point_and_writes_rows_and_summary(cifar10_dir, tiny_study, tmp_path,
                                                                                capsys):
    out = tmp_path / "fr"
    shutil.copytree(tiny_study, out)
    args = OPTIONS + ["--eta-lambda", "0.2", "--data-dir", str(cifar10_dir), "--out", str(out)]
    plan = json.loads((out / "plan.json").read_text())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    # dense reference at the point it built: Hessian eigenvalues = eig(J J^T) / N on Gamma (squared loss)
    x, y = cifar_subset(cifar10_dir, 20, image_size=32)
    net = MODELS["cnn-wide"](image_size=32, classes=9)
    obj = objective(net, x, simplex_targets(y, 10), GaussianLabelNoise(0.1))
    zeta = torch.load(out / "zeta.pt", weights_only=True)["zeta"]
    jac = output_jacobian(obj, zeta)[1].reshape(-1, obj.dim)
    lam = torch.linalg.eigvalsh(jac @ jac.T).flip(0) / 20
    assert plan["D"] == obj.dim == 51033 and plan["rank"] == 180
    assert plan["lambda_max"] == pytest.approx(float(lam[0]), rel=1e-9)
    assert plan["trace"] == pytest.approx(float(lam.sum()), rel=1e-9)
    assert plan["etas"] == [pytest.approx(0.2 / float(lam[0]), rel=1e-9)]
    star = 1 / (2 * plan["beta"])                  # 2 beta lambda = 1 at the trace-weighted median eigenvalue
    assert float(lam[lam <= star * (1 + 1e-9)].sum() / lam.sum()) >= 0.5 > float(lam[lam < star * (1 - 1e-9)].sum()
                                                                                  / lam.sum())
    assert plan["alpha"] ** 2 / plan["etas"][0] == pytest.approx(plan["beta"], rel=1e-12)   # QSR's beta at mid eta
    assert [r["rule"] for r in rows] == plan["rules"] and [r["workers"] for r in rows] == [1, 4, 8, 4]
    assert all(r["seeds"] == 2 and r["dim"] == 51033 for r in rows)
    for got, row in zip(summary["rules"], rows):
        assert got["ratio_eta0"] == pytest.approx(row["measured"] / row["predicted"], rel=1e-12)
    assert set(summary["local_over_sgd_eta0"]) == set(plan["rules"][1:])
    assert full_resolution.result_lines(out)[1:] == summary_lines(summary)       # what `make demo` prints
    assert "N = 20 CIFAR-10 images at 32x32, D = 51,033" in full_resolution.result_lines(out)[0]
    assert full_resolution.result_lines(out)[0].endswith("(rules measured of 4 per eta x lambda_max: 0.2: 4)")
    assert "is not in" in full_resolution.result_lines(tmp_path / "nothing")[0]
    assert main(args) == 2 and "is not empty" in capsys.readouterr().err     # the results are never overwritten
    # --paths-only: the predicted path of every row, no new runs; SGD's matrix-free, Local SGD's on Jacobian nodes
    assert main(args + ["--paths-only"]) == 0
    assert f"measured / predicted at eta = {plan['etas'][0]:.3g} only" in capsys.readouterr().out     # one eta
    with_paths = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["measured"] for r in with_paths] == [r["measured"] for r in rows]              # nothing re-run
    dense = point_at(obj, GaussianLabelNoise(0.1), zeta)
    for row, rule in zip(with_paths[:2], (SGD(8), LocalSGD(4, 2, plan["beta"]))):
        times = torch.tensor(row["times"], dtype=torch.float64)
        want = predicted_path(dense, rule, t1=float(times[-1]), dt=float(times[-1])).fitted_slope(times)
        assert row["predicted_path"] == pytest.approx(want, rel=1e-8) and row["predicted_path"] != row["predicted"]
    for got, row in zip(summary["rules"], with_paths):
        assert got["ratio_eta0"] == pytest.approx(row["measured"] / row["predicted_path"], rel=1e-12)
    (out / "rows.jsonl").unlink()
    assert main(args + ["--paths-only"]) == 2 and "no " in capsys.readouterr().err


def test_a_study_that_cannot_fit_in_memory_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    """N = 2,000: the Gram eigendecomposition needs 2 (18,000)^2 x 8 B plus Jacobian chunks; with 4 GiB of RAM the
    study stops with that estimate before reading data (the data folder does not exist) or creating --out."""
    need = GramPreconditioner.check_memory(18000, 9, 51033, limit=2 ** 60)
    assert 2 * 18000 ** 2 * 8 < need < 2 * 18000 ** 2 * 8 + 2 ** 30
    monkeypatch.setattr(full_resolution, "physical_memory", lambda: 4 * 2 ** 30)
    code = main(["--n", "2000", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2 and f"needs about {need / 2 ** 30:.1f} GiB" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # cross-entropy: 10 logits, N m = 9 N reduced equations, the same Gram matrix (D = 51,082)
    need = GramPreconditioner.check_memory(18000, 9, 51082, limit=2 ** 60)
    code = main(["--n", "2000", "--noise", "flip:0.1", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and f"N m = 18000 equations, D = 51082 needs about {need / 2 ** 30:.1f} GiB" in \
        capsys.readouterr().err
    # --memory-gib: a limit below the need is refused by the same check; one above the machine's RAM by name
    monkeypatch.setattr(full_resolution, "physical_memory", lambda: 64 * 2 ** 30)
    code = main(["--n", "2000", "--memory-gib", "5", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and "> the memory limit 5.0 GiB" in capsys.readouterr().err
    code = main(["--n", "2000", "--memory-gib", "65", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and "--memory-gib must be in (0, 64.0]" in capsys.readouterr().err
    # reading tolerances outside (0, 1): refused by name, before the data
    for flag, name in (("--flow-rtol", "flow_rtol"), ("--first-cg-rtol", "first_cg_rtol")):
        code = main(["--n", "2000", flag, "1.5", "--data-dir", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "o")])
        assert code == 2 and f"{name} must be in (0, 1), got 1.5" in capsys.readouterr().err
    code = main(["--n", "2000", "--fit-patience", "0", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and "--fit-patience must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_resumed_study_measures_only_the_rows_it_lacks(cifar10_dir, tiny_study, tmp_path, capsys, monkeypatch):
    """--resume after a row was lost: exactly that row is measured again and comes back as it was (every run's
    seeds come from --seed alone), reading the point's Gram eigendecomposition from OUT/gram_eigen.pt (the Gram
    matrix is never formed), the kept rows stay verbatim, a second resume measures nothing, and options that
    change the measurement (or --overwrite / --paths-only beside it) are refused before any work."""
    import experiments.comparison.projection as projection
    out = tmp_path / "fr"
    shutil.copytree(tiny_study, out)
    common = OPTIONS + ["--eta-lambda", "0.2", "--data-dir", str(cifar10_dir), "--out", str(out)]
    study = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text("\n".join(study[1:]) + "\n")               # SGD's row lost
    assert (out / full_resolution.EIGEN_CACHE).is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the Gram matrix was rebuilt")
    monkeypatch.setattr(projection, "gram_matrix", no_build)
    assert main(common + ["--resume"]) == 0
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert lines[:3] == study[1:] and len(lines) == 4
    lost, again = json.loads(study[0]), json.loads(lines[3])
    assert again["rule"] == lost["rule"] and again["eta"] == lost["eta"]
    assert again["per_seed"] == pytest.approx(lost["per_seed"], rel=1e-9)      # the same runs and readings
    assert again["predicted"] == pytest.approx(lost["predicted"], rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert {r["rule"] for r in summary["rules"]} == {json.loads(line)["rule"] for line in study}
    before = (out / "rows.jsonl").read_bytes()
    etas, plan = json.loads((out / "plan.json").read_text())["etas"], full_resolution.plan

    def nudged(*args, **kwargs):               # lambda_max read again may move an eta by its last bit
        chosen = plan(*args, **kwargs)
        return {**chosen, "etas": [math.nextafter(eta, 1.0) for eta in chosen["etas"]]}
    monkeypatch.setattr(full_resolution, "plan", nudged)
    assert main(common + ["--resume"]) == 0                                      # nothing left to measure
    assert (out / "rows.jsonl").read_bytes() == before
    assert json.loads((out / "plan.json").read_text())["etas"] == etas           # and no eta twice in the plan
    capsys.readouterr()
    for other in (["--seeds", "3"], ["--noise", "gaussian:0.2"], ["--noise", "flip:0.1"], ["--passes", "float32"],
                  ["--flow-rtol", "1e-6"], ["--first-cg-rtol", "1e-2"], ["--reflected", "formula"],
                  ["--gradients", "float32"], ["--fit-patience", "50"]):
        assert main(common + ["--resume", *other]) == 2
        assert "were made with" in capsys.readouterr().err and (out / "rows.jsonl").read_bytes() == before
    for other in (["--overwrite"], ["--paths-only"], ["--qsr-alpha", "0.1"]):
        assert main(common + ["--resume", *other]) == 2 and f"excludes {other[0]}" in capsys.readouterr().err
    assert (out / "rows.jsonl").read_bytes() == before and not list(tmp_path.glob("fr.replaced-*"))
    # without the study's zeta a point built again lands elsewhere on Gamma: refused before reading any data
    (out / "zeta.pt").unlink()
    for other in ("--resume", "--paths-only"):
        assert main(common[:-4] + ["--data-dir", str(tmp_path / "nowhere"), "--out", str(out), other]) == 2
        assert f"no {out / 'zeta.pt'}" in capsys.readouterr().err
    assert (out / "rows.jsonl").read_bytes() == before


def test_qsr_alpha_sets_a_new_studys_qsr(cifar10_dir, tiny_study, tmp_path, monkeypatch, capsys):
    """--qsr-alpha: a new study (here at the tiny study's zeta) measures QSR at the alpha given, not the one its
    own plan picks (beta at the middle eta); a non-positive alpha is refused before any work."""
    out = tmp_path / "fr"
    out.mkdir()
    shutil.copy(tiny_study / "zeta.pt", out)
    measured = {}

    def compare(*args, rules, **kwargs):                                 # no runs: the rules planned are the point
        measured["rules"] = rules
        return []
    monkeypatch.setattr(full_resolution, "compare", compare)
    monkeypatch.setattr(full_resolution, "_finish", lambda *a, **kw: 0)
    args = OPTIONS + ["--eta-lambda", "0.2", "--data-dir", str(cifar10_dir), "--out", str(out)]
    assert main(args + ["--qsr-alpha", "0.0123"]) == 0
    assert measured["rules"][-1].alpha == 0.0123 and json.loads((out / "plan.json").read_text())["alpha"] == 0.0123
    own = json.loads((tiny_study / "plan.json").read_text())["alpha"]
    assert abs(own / 0.0123 - 1) > 0.1                                   # what the plan alone would have used
    assert main(args + ["--qsr-alpha", "0"]) == 2 and "--qsr-alpha must be positive" in capsys.readouterr().err


def test_rules_measures_only_the_rules_named(cifar10_dir, tiny_study, tmp_path, monkeypatch, capsys):
    """--rules local:K=8 on a resumed study with one more eta: compare is asked to measure only K = 8 at the new
    eta (every other rule counts as measured), the plan keeps all four rules and both etas (`make demo` counts the
    rows at each); the names are the plan's rules' `rule_name`s, and an unknown name is refused before any work."""
    out = tmp_path / "fr"
    shutil.copytree(tiny_study, out)
    asked = {}

    def compare(*args, rules, etas, measured, **kwargs):                 # no runs: which pairs are left to measure
        asked["left"] = [(full_resolution.rule_name(r), e) for e in etas for r in rules if not measured(r, e)]
        asked["rules"] = rules
        return []
    monkeypatch.setattr(full_resolution, "compare", compare)
    monkeypatch.setattr(full_resolution, "_finish", lambda *a, **kw: 0)
    args = OPTIONS + ["--eta-lambda", "0.2", "0.4", "--resume", "--data-dir", str(cifar10_dir), "--out", str(out)]
    assert main(args + ["--rules", "local:K=8"]) == 0
    new_eta = max(json.loads((out / "plan.json").read_text())["etas"])
    assert asked["left"] == [("local:K=8", new_eta)]
    assert [full_resolution.rule_name(r) for r in asked["rules"]] == list(full_resolution.RULE_NAMES)
    assert full_resolution.result_lines(out)[0].endswith("per eta x lambda_max: 0.2: 4, 0.4: 0)")   # make demo
    assert main(args + ["--rules", "sgd", "qsr:K=4"]) == 0
    assert asked["left"] == [("sgd", new_eta), ("qsr:K=4", new_eta)]
    capsys.readouterr()
    assert main(OPTIONS + ["--rules", "local:K=3", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "invalid choice: 'local:K=3'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_resumed_with_one_more_eta_keeps_its_own_plan(cifar10_dir, tiny_study, tmp_path):
    """--resume with one more eta (4 new rows, ~4 min): the new rows use the study's QSR alpha, not the one a fresh
    plan of these etas picks; plan.json keeps the study's provenance and gains the eta and a `resumed` record."""
    out = tmp_path / "fr"
    shutil.copytree(tiny_study, out)
    study = (out / "rows.jsonl").read_text().splitlines()
    first_plan = json.loads((out / "plan.json").read_text())
    assert main(OPTIONS + ["--eta-lambda", "0.2", "0.4", "--resume", "--data-dir", str(cifar10_dir), "--out",
                           str(out)]) == 0
    lines = (out / "rows.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert lines[:4] == study and len(rows) == 8
    plan = json.loads((out / "plan.json").read_text())
    assert plan["alpha"] == first_plan["alpha"] and plan["provenance"] == first_plan["provenance"]
    assert len(plan["etas"]) == 2 and plan["etas"][0] == first_plan["etas"][0] and len(plan["resumed"]) == 1
    assert [r["eta"] for r in rows[4:]] == [plan["etas"][1]] * 4
    assert [r["rule"] for r in rows[4:]] == first_plan["rules"]                  # QSR with the study's alpha
    fresh_alpha = (first_plan["beta"] * plan["etas"][1]) ** 0.5
    assert abs(fresh_alpha / plan["alpha"] - 1) > 0.3                            # what a fresh plan would have used
    summary = json.loads((out / "summary.json").read_text())
    assert all(len(r["etas"]) == 2 and r["fit"] == "richardson" for r in summary["rules"])
