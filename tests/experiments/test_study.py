"""experiments.study: grids of configs x seeds, reading metrics.jsonl back, mean +/- std tables.

Budget: about 25 s (real trainer runs of a few steps on synthetic data, a 4,000-draw coverage
check and one pool of two spawned processes; the rest is file I/O).
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.config import TrainConfig
from experiments.metrics import MetricsLog, atomic_write_json
from experiments.study import (curves_from_records, grid, is_finished, load_curves, markdown_table,
                               mean_std, paired_difference, run_grid, summarize)

BASE = TrainConfig(model="small_cnn", width=4, data="synthetic", synthetic_size=64, test_size=32,
                   workers=2, local_batch=8, epochs=1, bn_batches=1, progress=False, backend="serial")
METHODS = {"SGD": {}, "post-local": {"sync": "post-local", "local_steps": 4, "switch_epoch": 0.5},
           "QSR": {"sync": "qsr", "local_steps": 2, "qsr_alpha": 0.1, "lr_schedule": "cosine"}}


def fake_records(values, *, sharp_at=(), step0=10):
    """Metrics records with test_acc = values[i] at steps step0 * (i + 1)."""
    recs = []
    for i, v in enumerate(values):
        r = {"step": step0 * (i + 1), "epoch": (i + 1) / 2, "test_acc": v, "train_loss": 1.0 / (i + 1),
             "top_eigenvalue": None, "worker_spread": "nan" if i == 0 else 0.5 * i}
        if i in sharp_at:
            r["top_eigenvalue"] = 10.0 + v
        recs.append(r)
    return recs


def write_run(spec, records, config=None):
    log = MetricsLog(spec.out / "metrics.jsonl")
    for r in records:
        log.append(r)
    atomic_write_json(spec.out / "config.json", {"config": (config or spec.config).to_dict()})
    (spec.out / "final.pt").write_bytes(b"x")


def test_grid_builds_every_method_and_seed_with_its_overrides(tmp_path):
    specs = grid(BASE, METHODS, seeds=(3, 5), root=tmp_path, group="short", epochs=0.5, lr=0.2)
    assert [(s.method, s.seed) for s in specs] == [(m, sd) for m in METHODS for sd in (3, 5)]
    for s in specs:
        assert s.group == "short" and s.config.seed == s.seed
        assert s.out == tmp_path / "short" / s.method / f"seed{s.seed}"
        assert s.config.epochs == 0.5 and s.config.lr == 0.2 and s.config.batch == BASE.batch
        for k, v in METHODS[s.method].items():
            assert getattr(s.config, k) == v
    assert {s.config.sync for s in specs} == {"constant", "post-local", "qsr"}


def test_grid_rejects_bad_input_before_training(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        grid(BASE, METHODS, seeds=(1, 1), root=tmp_path)
    with pytest.raises(ValueError, match="qsr_alpha"):
        grid(BASE, {"QSR": {"sync": "qsr"}}, seeds=(0,), root=tmp_path)
    with pytest.raises(ValueError, match="folder"):
        grid(BASE, {"a/b": {}}, seeds=(0,), root=tmp_path)


def test_run_grid_launches_each_config_once_and_skips_finished_runs(tmp_path):
    specs = grid(BASE, METHODS, seeds=(0, 1), root=tmp_path)
    launched = []

    def fake_train(cfg):
        launched.append(cfg)
        spec = next(s for s in specs if s.config == cfg)
        write_run(spec, fake_records([0.1, 0.2]))

    trained = run_grid(specs, train_fn=fake_train)
    assert launched == [s.config for s in specs] and trained == specs
    assert all(is_finished(s) for s in specs)
    # a second pass repeats nothing; a changed computation (another lr) is not "finished"
    launched.clear()
    assert run_grid(specs, train_fn=fake_train) == [] and launched == []
    changed = grid(BASE, {"SGD": {}}, seeds=(0,), root=tmp_path, lr=0.3)[0]
    assert changed.out == specs[0].out and not is_finished(changed)
    # run-only fields (backend, progress) do not make a run unfinished
    same = grid(BASE.replace(backend="vmap"), {"SGD": {}}, seeds=(0,), root=tmp_path)[0]
    assert is_finished(same)


def test_curves_and_tables_match_numpy_on_fabricated_metrics(tmp_path):
    rng = np.random.default_rng(0)
    acc = {m: rng.uniform(0.2, 0.6, size=(3, 4)) for m in METHODS}
    specs = grid(BASE, METHODS, seeds=(0, 1, 2), root=tmp_path)
    for s in specs:
        write_run(s, fake_records(list(acc[s.method][s.seed]), sharp_at=(0, 2)))
    curves = load_curves(specs)
    c = curves[("main", "QSR")]
    np.testing.assert_array_equal(c["test_acc"], acc["QSR"])
    np.testing.assert_array_equal(c.steps, [10, 20, 30, 40])
    assert c.seeds == (0, 1, 2)
    # None and "nan" become NaN; tracked keeps only evaluations every seed has
    assert np.isnan(c["worker_spread"][:, 0]).all() and np.isnan(c["top_eigenvalue"][:, 1]).all()
    ep, v = c.tracked("top_eigenvalue")
    np.testing.assert_array_equal(ep, [0.5, 1.5])
    np.testing.assert_allclose(v, 10.0 + acc["QSR"][:, [0, 2]])
    np.testing.assert_allclose(c.final("top_eigenvalue"), 10.0 + acc["QSR"][:, 2])

    rows = {r["method"]: r for r in summarize(curves, ["test_acc", "top_eigenvalue"], reference="SGD")}
    final = {m: a[:, -1] for m, a in acc.items()}
    mean, std, n = rows["QSR"]["test_acc"]
    assert n == 3 and mean == pytest.approx(final["QSR"].mean()) and std == pytest.approx(final["QSR"].std(ddof=1))
    d = final["post-local"] - final["SGD"]
    mean, std, n = rows["post-local"]["delta_test_acc"]
    assert (mean, std, n) == (pytest.approx(d.mean()), pytest.approx(d.std(ddof=1)), 3)
    assert "delta_test_acc" not in rows["SGD"]
    np.testing.assert_allclose(paired_difference(curves[("main", "QSR")], curves[("main", "SGD")], "test_acc"),
                               final["QSR"] - final["SGD"])

    table = markdown_table([rows["QSR"]], [("method", "method", "", 1), ("test acc (%)", "test_acc", "{:.1f}", 100)])
    assert table.splitlines()[2] == f"| QSR | {100 * final['QSR'].mean():.1f} ± {100 * final['QSR'].std(ddof=1):.1f} |"


def test_mean_std_ignores_non_finite_and_reports_single_seed():
    assert mean_std([1.0, np.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    m, s, n = mean_std([4.0])
    assert (m, n) == (4.0, 1) and math.isnan(s)
    assert mean_std([])[2] == 0


def test_curves_refuse_seeds_evaluated_at_different_steps():
    with pytest.raises(ValueError, match="different steps"):
        curves_from_records({0: fake_records([0.1, 0.2]), 1: fake_records([0.1, 0.2], step0=7)})


def test_load_curves_names_a_missing_run(tmp_path):
    specs = grid(BASE, {"SGD": {}}, seeds=(0,), root=tmp_path)
    with pytest.raises(FileNotFoundError, match="SGD/seed0"):
        load_curves(specs)


def test_steps_per_epoch_matches_the_sampler_rule():
    from experiments.study import steps_per_epoch
    assert steps_per_epoch(BASE) == (64 // 2) // 8
    assert steps_per_epoch(BASE.replace(data="cifar10", train_size=2000, workers=4, local_batch=32)) == 15
    assert steps_per_epoch(BASE.replace(steps_per_epoch=7)) == 7


def test_track_sharpness_evenly_picks_first_last_and_spread():
    from experiments.study import evaluation_steps, track_sharpness_evenly
    cfg = BASE.replace(synthetic_size=160, epochs=1, eval_every=1)   # 10 steps, 10 evaluations
    assert evaluation_steps(cfg) == list(range(1, 11))
    assert track_sharpness_evenly(cfg, 4).track_sharpness == (0, 3, 6, 9)
    assert track_sharpness_evenly(cfg, 1).track_sharpness == (0, 9)
    assert track_sharpness_evenly(cfg, 50).track_sharpness == tuple(range(10))
    # post-local with H = 4 from step 5: rounds end at 1..5, 9, 10
    post = cfg.replace(sync="post-local", local_steps=4, switch_epoch=0.5)
    assert evaluation_steps(post) == [1, 2, 3, 4, 5, 9, 10]


def test_real_trainer_grid_round_trip(tmp_path):
    """Real 8-step runs on synthetic data: the grid trains them, the curves hold the trainer's
    records, the evaluation steps are the ones `evaluation_steps` predicts (QSR's periods
    growing as the cosine rate decays), and sharpness is tracked at the first and last."""
    from experiments.study import evaluation_steps
    specs = grid(BASE, METHODS, seeds=(0,), root=tmp_path, eval_every=3, epochs=2, lr=0.1,
                 lr_schedule="cosine", sharpness_points=2, sharpness_samples=16, sharpness_matvecs=3)
    run_grid(specs)
    curves = load_curves(specs)
    sgd, post, qsr = (curves[("main", m)] for m in METHODS)
    assert list(sgd["H"][0]) == [1, 1, 1] and list(post["H"][0]) == [4, 2]   # switch at step 2
    assert list(qsr["H"][0]) == [2, 4]   # H = (0.1 / eta)^2 = 4 at step 4, where eta = 0.05
    for s in specs:
        np.testing.assert_array_equal(curves[("main", s.method)].steps, evaluation_steps(s.config))
        v = curves[("main", s.method)]["top_eigenvalue"][0]
        assert np.isfinite(v[[0, -1]]).all() and np.isnan(v[1:-1]).all()
    recs = [json.loads(line) for line in (specs[0].out / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(sgd["test_acc"][0], [r["test_acc"] for r in recs])
    assert all(is_finished(s) for s in specs)


# ---------------------------------------------------------------------------- continuations
def _final_params(path):
    import torch
    from experiments.probe import load_model
    model, _ = load_model(str(path))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_train_from_starts_every_worker_at_the_checkpoint(tmp_path):
    """A real pre-training run, then continuations from its final.pt with another seed (so
    another random initialization): with lr 1e-9 and no weight decay the continuation ends
    within 1e-6 of the checkpoint's parameters (steps move them by ~1e-9 x gradient), while
    the run started from scratch with that seed is far from them."""
    import torch
    from experiments.study import INIT_RECORD, file_sha256, train_from
    pre = grid(BASE, {"SGD": {}}, seeds=(0,), root=tmp_path, group="pretrain", lr=0.1, epochs=2)
    run_grid(pre)
    ckpt = pre[0].out / "final.pt"
    theta0 = _final_params(ckpt)
    cont = grid(BASE, {"SGD": {}, "Local": {"local_steps": 2}}, seeds=(7,), root=tmp_path, group="cont",
                init={7: ckpt}, lr=1e-9, epochs=2)
    trained = run_grid(cont)
    assert trained == cont and all(is_finished(s) for s in cont)
    for s in cont:
        assert torch.allclose(_final_params(s.out / "final.pt"), theta0, atol=1e-6)
        record = json.loads((s.out / INIT_RECORD).read_text())
        assert record["sha256"] == file_sha256(ckpt)
    # the final network's accuracy on the test split is the trainer's last test_acc
    from experiments.study import clean_accuracy
    last = json.loads((cont[1].out / "metrics.jsonl").read_text().splitlines()[-1])
    assert clean_accuracy([cont[1].out / "final.pt"], split="test")[0] == pytest.approx(last["test_acc"], abs=1e-12)
    with pytest.raises(ValueError, match="split"):
        clean_accuracy([ckpt], split="val")
    scratch = BASE.replace(seed=7, lr=1e-9, epochs=2, out=str(tmp_path / "scratch"))
    train_from(scratch)
    assert (_final_params(tmp_path / "scratch" / "final.pt") - theta0).abs().max() > 1e-2
    # another checkpoint at the same path makes the continuations unfinished (SHA-256 differs)
    pre2 = grid(BASE, {"SGD": {}}, seeds=(1,), root=tmp_path, group="pretrain", lr=0.1, epochs=2)
    run_grid(pre2)
    ckpt.write_bytes((pre2[0].out / "final.pt").read_bytes())
    assert not any(is_finished(s) for s in cont)


def test_train_from_refuses_another_network_before_training(tmp_path):
    from experiments.study import train_from
    pre = grid(BASE, {"SGD": {}}, seeds=(0,), root=tmp_path, group="pretrain")
    run_grid(pre)
    wider = BASE.replace(width=8, out=str(tmp_path / "wider"))
    with pytest.raises(ValueError, match="width 4 != 8"):
        train_from(wider, pre[0].out / "final.pt")
    not_final = tmp_path / "x.pt"
    not_final.write_bytes(b"")
    import torch
    torch.save({"format": "something else"}, not_final)
    with pytest.raises(ValueError, match="is not a file of this trainer"):
        train_from(BASE.replace(out=str(tmp_path / "y")), not_final)
    with pytest.raises(FileNotFoundError, match="no pre-trained checkpoint"):
        train_from(BASE.replace(out=str(tmp_path / "z")), tmp_path / "missing.pt")
    assert not (tmp_path / "wider").exists() and not (tmp_path / "y").exists()


def test_load_final_reads_a_verified_final_pt_and_refuses_anything_else(tmp_path):
    """A config computed with numpy (qsr_alpha = lr * np.sqrt(H)) is saved as plain numbers and
    reads back; a flipped byte, a file without a SHA-256 and a file holding another object are
    refused, naming the file."""
    import fractions
    import torch
    from experiments.checkpoint import save_final
    from experiments.study import load_final
    from experiments.trainer import FINAL_FORMAT
    cfg = BASE.replace(sync="qsr", local_steps=2, qsr_alpha=0.1 * np.sqrt(4.0))
    ok = save_final(tmp_path / "ok.pt", {"w": torch.ones(2)}, cfg)
    state = load_final(ok)
    assert state["config"]["qsr_alpha"] == pytest.approx(0.2) and torch.equal(state["state_dict"]["w"], torch.ones(2))
    flipped = tmp_path / "flipped.pt"
    raw = bytearray(ok.read_bytes())
    at = raw.index(torch.ones(2).numpy().tobytes())        # the tensor's bytes: still a loadable file
    raw[at] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="flipped.pt failed its integrity check"):
        load_final(flipped)
    unsigned, bad = tmp_path / "unsigned.pt", tmp_path / "bad.pt"
    torch.save({"format": FINAL_FORMAT, "config": cfg.to_dict(), "state_dict": {"w": torch.ones(2)}}, unsigned)
    with pytest.raises(ValueError, match="unsigned.pt carries no SHA-256"):
        load_final(unsigned)
    torch.save({"format": FINAL_FORMAT, "config": {"x": fractions.Fraction(1, 3)}, "state_dict": {}}, bad)
    with pytest.raises(ValueError, match="bad.pt cannot be read"):
        load_final(bad)


def test_grid_with_init_needs_a_checkpoint_for_every_seed(tmp_path):
    with pytest.raises(ValueError, match=r"seeds \[2\]"):
        grid(BASE, {"SGD": {}}, seeds=(1, 2), root=tmp_path, init={1: "a.pt"})
    specs = grid(BASE, {"SGD": {}}, seeds=(1,), root=tmp_path, init={1: "a.pt"})
    assert specs[0].init == "a.pt"
    # no init record and no checkpoint: never "finished"
    write_run(specs[0], fake_records([0.1]))
    assert not is_finished(specs[0])


# ---------------------------------------------------------------------------- confidence intervals
def test_confidence_interval_is_the_student_t_interval():
    from experiments.study import confidence_interval
    ci = confidence_interval([1.0, 2.0, 3.0, 4.0, np.nan, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)   # t_{4, 0.975} from the t table
    assert (ci.mean, ci.n) == (3.0, 5)
    assert ci.lo == pytest.approx(3.0 - half, rel=1e-12) and ci.hi == pytest.approx(3.0 + half, rel=1e-12)
    assert ci.excludes_zero and not confidence_interval([-1.0, 1.0, 0.5]).excludes_zero
    one = confidence_interval([2.0])
    assert one.n == 1 and math.isnan(one.lo)
    with pytest.raises(ValueError, match="level"):
        confidence_interval([1.0, 2.0], level=1.5)


def test_confidence_interval_covers_the_mean_95_percent_of_the_time():
    """4,000 samples of n = 5 normal draws: coverage 0.95 within 0.011 (3.3 binomial standard
    errors, sqrt(0.95 x 0.05 / 4000) = 0.0034)."""
    from experiments.study import confidence_interval
    rng = np.random.default_rng(1)
    hits = [(lambda ci: ci.lo <= 0.3 <= ci.hi)(confidence_interval(rng.normal(0.3, 2.0, size=5)))
            for _ in range(4000)]
    assert abs(np.mean(hits) - 0.95) < 0.011


def test_summarize_adds_paired_intervals_and_the_table_prints_them(tmp_path):
    from experiments.study import Interval, confidence_interval
    acc = {"SGD": [0.50, 0.40, 0.45], "QSR": [0.52, 0.43, 0.46]}
    specs = grid(BASE, {m: METHODS[m] for m in acc}, seeds=(0, 1, 2), root=tmp_path)
    for s in specs:
        write_run(s, fake_records([acc[s.method][s.seed]]))
    rows = {r["method"]: r for r in summarize(load_curves(specs), ["test_acc"], reference="SGD")}
    ci = rows["QSR"]["ci_test_acc"]
    expected = confidence_interval(np.subtract(acc["QSR"], acc["SGD"]))
    assert isinstance(ci, Interval) and ci == expected and ci.mean == pytest.approx(0.02)
    assert "ci_test_acc" not in rows["SGD"]
    table = markdown_table([rows["QSR"]], [("Δ", "ci_test_acc", "{:+.2f}", 100)])
    assert table.splitlines()[2] == f"| +2.00 [{100 * ci.lo:.2f}, {100 * ci.hi:.2f}] |"


# ---------------------------------------------------------------------------- processes
def _fake_train_in_child(cfg, init=None):
    """Module level so that spawned children can unpickle it."""
    if cfg.lr > 1.0:
        raise RuntimeError(f"refused lr {cfg.lr}")
    spec = grid(cfg, {"SGD": {}}, seeds=(cfg.seed,), root=Path(cfg.out).parents[2])[0]
    write_run(spec, fake_records([cfg.lr]))


def test_run_grid_in_two_processes_trains_everything_once_and_reports_failures(tmp_path):
    specs = grid(BASE, {"SGD": {}}, seeds=(0, 1, 2), root=tmp_path, lr=0.25)
    seen = []
    trained = run_grid(specs, train_fn=_fake_train_in_child, processes=2,
                       on_run=lambda s, skipped, sec: seen.append((s.seed, skipped)))
    assert trained == specs and sorted(seen) == [(0, False), (1, False), (2, False)]
    assert all(is_finished(s) for s in specs)
    np.testing.assert_allclose(load_curves(specs)[("main", "SGD")].final("test_acc"), [0.25] * 3)
    assert run_grid(specs, train_fn=_fake_train_in_child, processes=2) == []
    bad = grid(BASE, {"SGD": {}}, seeds=(0,), root=tmp_path / "bad", lr=2.0)
    with pytest.raises(RuntimeError, match="refused lr 2.0"):
        run_grid(bad, train_fn=_fake_train_in_child, processes=2)
    with pytest.raises(ValueError, match="processes"):
        run_grid(specs, processes=0)
