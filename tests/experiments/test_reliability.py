"""Trainer reliability (issue 17): no silent overwrite, no silent corruption, graceful stops,
divergence caught inside a round, runs that can be extended."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.checkpoint import (CheckpointFileError, load_checkpoint, load_verified, payload_digest,
                                    save_payload)
from experiments.config import TrainConfig
from experiments.data import balanced_subset
from experiments.divergence import DivergenceError, Interrupted
from experiments.metrics import read_metrics
from experiments.probe import load_model
from experiments.schedules import LRSchedule
from experiments.trainer import RunFolderError, Trainer, auto_backend, train

ROOT = Path(__file__).resolve().parents[2]


def tiny(tmp_path, name="run", **kw):
    base = dict(model="small_cnn", width=4, data="synthetic", synthetic_size=128, test_size=64,
                workers=4, local_batch=8, local_steps=4, lr=0.05, momentum=0.9, epochs=4, bn_batches=2,
                eval_every=8, checkpoint_every=8, eval_batch=64, out=str(tmp_path / name),
                backend="serial", progress=False, norm="none")
    return TrainConfig(**{**base, **kw})


def _flip(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _final(out) -> dict:
    return load_verified(Path(out) / "final.pt")["state_dict"]


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in recs]


# ---------------------------------------------------------------------------- integrity
def test_a_corrupted_checkpoint_is_refused_by_resume_and_probe(tmp_path):
    cfg = tiny(tmp_path, epochs=2)
    train(cfg)
    ckpt, final = tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "run" / "final.pt"
    assert load_checkpoint(ckpt, cfg)["step"] == 8       # intact files pass their check
    for f in (ckpt, final):
        _flip(f)
    with pytest.raises(CheckpointFileError, match=r"last\.pt failed its integrity check"):
        Trainer(cfg.replace(resume=str(ckpt), epochs=3))
    with pytest.raises(CheckpointFileError, match=r"final\.pt failed its integrity check"):
        load_model(str(final))
    with pytest.raises(CheckpointFileError, match=r"last\.pt failed its integrity check"):
        load_model(str(ckpt))
    # a truncated file: one line naming it, not a traceback from the zip reader
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointFileError, match=r"last\.pt cannot be read as a checkpoint"):
        load_checkpoint(ckpt)


def test_the_digest_covers_every_value_and_loading_runs_no_code(tmp_path):
    payload = {"format": "x", "a": torch.arange(6.0).reshape(2, 3), "n": 3, "cfg": {"lr": 0.1, "t": (1, 2)},
               "g": torch.zeros(4, dtype=torch.uint8), "h": torch.ones(2, dtype=torch.bfloat16)}
    d = payload_digest(payload)
    changed = [{**payload, "n": 4}, {**payload, "cfg": {"lr": 0.1000001, "t": (1, 2)}},
               {**payload, "a": payload["a"].reshape(3, 2)}, {**payload, "a": payload["a"].double()},
               {**payload, "h": torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)}]
    assert all(payload_digest(c) != d for c in changed)
    save_payload(tmp_path / "p.pt", payload)
    back = load_verified(tmp_path / "p.pt")
    assert back["sha256"] == d and torch.equal(back["a"], payload["a"])
    # a pickle that would run code when loaded with weights_only=False
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))
    torch.save({"format": "x", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointFileError, match="cannot be read as a checkpoint"):
        load_verified(tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------- run folders
def test_a_run_folder_is_never_overwritten(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, epochs=2)
    train(cfg)
    out = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    import experiments.trainer as trainer_mod

    def no_data(*a, **k):
        raise AssertionError("data were loaded before the folder was checked")
    monkeypatch.setattr(trainer_mod, "load_datasets", no_data)
    with pytest.raises(RunFolderError, match=r"already holds a run \(config\.json, metrics\.jsonl, "
                                             r"final\.pt, checkpoints\); continue it with --resume"):
        Trainer(cfg.replace(lr=0.1))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="is an existing file, not a folder"):
        Trainer(cfg.replace(out=str(tmp_path / "afile")))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    # --overwrite moves the old run aside, byte for byte, and starts afresh
    (out / "checkpoints" / ".last.pt.tmp-abc123").write_bytes(b"partial")   # left by a kill
    t = Trainer(cfg.replace(overwrite=True, lr=0.1))
    moved = t.moved_aside
    assert moved.name.startswith("run.replaced-") and moved.parent == tmp_path
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.is_file()} == before
    assert not out.exists() or not any(out.iterdir())
    t.run()
    assert len(read_metrics(out / "metrics.jsonl")) == 1


def test_leftover_temporary_files_are_removed_at_the_next_start(tmp_path):
    cfg = tiny(tmp_path, epochs=4)
    t = Trainer(cfg)
    t.lr = lambda s: 0.05 if s < 8 else float("nan")     # stop after the first checkpoint
    with pytest.raises(DivergenceError):
        t.run()
    leftovers = [tmp_path / "run" / ".metrics.jsonl.tmp-x1", tmp_path / "run" / "checkpoints" / ".last.pt.tmp-x2"]
    for f in leftovers:
        f.write_bytes(b"half a file")
    Trainer(cfg.replace(resume=str(tmp_path / "run")))
    assert not any(f.exists() for f in leftovers)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------------------- divergence
def test_a_nan_in_the_middle_of_a_round_stops_within_it_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, local_steps=8, epochs=6)        # rounds of 8 steps, checkpoint every 8
    t = Trainer(cfg)
    good = t.lr
    # a NaN rate at step 11 of round 1 (steps 8-15): the update makes every parameter NaN
    t.lr = lambda s: float("nan") if s == 11 else good(s)
    steps = []
    real_step = t.workers.step
    t.workers.step = lambda x, y, lr: (steps.append(lr), real_step(x, y, lr))[1]
    with pytest.raises(DivergenceError, match=r"diverged at step 11 in round 1 \(steps 8-15.*non-finite "
                                              r"parameter norm.*Last good checkpoint: .*checkpoints/last\.pt"):
        t.run()
    assert len(steps) == 12                              # steps 0-11: nothing ran after the NaN
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", cfg)   # SHA-256 checked
    assert state["step"] == 8 and torch.isfinite(state["params"]).all()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1
    assert not (tmp_path / "run" / "final.pt").exists()


def test_a_finite_blow_up_is_divergence(tmp_path):
    # lr 1000 without normalization: the parameters grow by orders of magnitude, still finite
    cfg = tiny(tmp_path, lr=1000.0, momentum=0.0, epochs=2)
    with pytest.raises(DivergenceError, match=r"diverged at step 0 in round 0 .*blew up"):
        train(cfg)
    assert not (tmp_path / "run" / "final.pt").exists()


def test_a_non_finite_evaluation_is_not_a_good_state(tmp_path):
    cfg = tiny(tmp_path, epochs=6)
    t = Trainer(cfg)
    real = t._test_sums
    t._test_sums = lambda m: real(m) * (float("nan") if t.evaluations == 1 else 1.0)
    with pytest.raises(DivergenceError, match=r"evaluation at step 16 .* not finite.*checkpoints/last\.pt"):
        t.run()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 8


# ---------------------------------------------------------------------------- stops and resumes
def test_a_stop_mid_round_resumes_bit_for_bit(tmp_path):
    cfg = tiny(tmp_path, name="cut", local_steps=8, epochs=6, aug=True, label_noise=0.1, lr_schedule="cosine")
    full = train(cfg.replace(out=str(tmp_path / "full")))
    t = Trainer(cfg)
    good = t.lr
    t.lr = lambda s: (t.request_stop(signal.SIGINT) if s == 13 else None, good(s))[1]
    with pytest.raises(Interrupted, match=r"stopped by SIGINT at step 14 of 24; wrote .*resume with") as info:
        t.run()
    assert info.value.exit_code == 130
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt", cfg)
    assert (state["step"], state["round"], state["round_first"]) == (14, 1, 8)   # inside round 1
    train(cfg.replace(resume=str(tmp_path / "cut")))
    a, b = _final(full.out), _final(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_metrics(full.out / "metrics.jsonl")) == _strip(read_metrics(tmp_path / "cut" / "metrics.jsonl"))


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


RUN = ["--preset", "cpu-tiny", "--epochs", "30", "--local-steps", "8", "--checkpoint-every", "8",
       "--eval-every", "16", "--momentum", "0.9", "--aug", "--label-noise", "0.1", "--backend", "serial",
       "--no-progress"]


def test_sigint_writes_a_resumable_checkpoint_equal_to_the_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    py = [sys.executable, "-m", "experiments.train", *RUN]
    ref = subprocess.Popen(py + ["--out", str(full)], cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(py + ["--out", str(cut)], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code, err = proc.wait(timeout=60), proc.stderr.read()
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGINT at step ") and "resume with --resume" in lines[0]
    stopped = load_checkpoint(cut)["step"]
    assert 0 < stopped < 120 and not (cut / "final.pt").exists()
    assert not list(cut.rglob(".*.tmp-*"))
    done = subprocess.run(py + ["--out", str(cut), "--resume", str(cut)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    a, b = _final(full), _final(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_metrics(full / "metrics.jsonl")) == _strip(read_metrics(cut / "metrics.jsonl"))


def test_resume_may_extend_the_run(tmp_path):
    # constant rate: 2 epochs extended to 3 equal an uninterrupted 3-epoch run bit for bit
    short = tiny(tmp_path, name="ext", epochs=2)
    train(short)
    train(short.replace(epochs=3, resume=str(tmp_path / "ext")))
    train(short.replace(epochs=3, out=str(tmp_path / "three")))
    a, b = _final(tmp_path / "ext"), _final(tmp_path / "three")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_metrics(tmp_path / "ext" / "metrics.jsonl")) == _strip(read_metrics(tmp_path / "three" / "metrics.jsonl"))
    # cosine: from the checkpoint's step on, the rate is the schedule of the NEW length
    cos = tiny(tmp_path, name="cos", epochs=2, lr_schedule="cosine", local_steps=2, eval_every=2)
    train(cos)
    train(cos.replace(epochs=4, resume=str(tmp_path / "cos")))
    recs = read_metrics(tmp_path / "cos" / "metrics.jsonl")
    new, old = LRSchedule(peak=0.05, total_steps=16, kind="cosine"), LRSchedule(peak=0.05, total_steps=8, kind="cosine")
    assert [r["step"] for r in recs] == list(range(2, 17, 2))
    assert [r["lr"] for r in recs] == [old(s - 1) if s <= 8 else new(s - 1) for s in range(2, 17, 2)]
    # the same length again has nothing left to do; another change of config is still refused
    with pytest.raises(ValueError, match=r"at step 16, the end of a run of 16 steps.*larger --epochs"):
        Trainer(cos.replace(epochs=4, resume=str(tmp_path / "cos")))
    with pytest.raises(ValueError, match=r"fields that differ: lr"):
        Trainer(cos.replace(epochs=5, lr=0.1, resume=str(tmp_path / "cos")))


# ---------------------------------------------------------------------------- silent acceptances
@pytest.mark.parametrize("changes,message", [
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(lr_schedule="cosine", min_lr=0.5), "min_lr 0.5 is above the peak learning rate 0.05"),
    (dict(resume="x", overwrite=True), "resume and overwrite exclude each other"),
    (dict(blowup_factor=0.5), "blowup_factor must be 0"),
    (dict(data="cifar10", train_size=50_001), "exceeds the 50,000 CIFAR-10 train images"),
])
def test_values_accepted_silently_before_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **changes)


@pytest.mark.parametrize("changes,message", [
    (dict(track_sharpness=(99,)), r"track_sharpness index 99 is never reached: the run makes 2 evaluations"),
    (dict(sync="post-local", switch_epoch=4.0), r"switch_epoch 4.0 is at or after the end of the run"),
    (dict(steps_per_epoch=10), r"without replacement at most 4 steps fit in one epoch of 128 images"),
])
def test_settings_that_would_do_nothing_are_refused_before_any_data(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny(tmp_path, **changes))
    assert not (tmp_path / "run").exists()


def test_a_class_balanced_subset_of_any_size():
    labels = torch.arange(300) % 10
    labels = labels[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    images = torch.arange(300)
    x, y = balanced_subset(images, labels, 103, num_classes=10)
    assert torch.bincount(y, minlength=10).tolist() == [11, 11, 11] + [10] * 7
    assert torch.equal(x, torch.sort(x).values)                       # record order kept
    from experiments.datasets import subset
    for n in (100, 250):                                              # divisible: the old subset
        assert torch.equal(balanced_subset(images, labels, n)[0], subset(images, labels, n, balanced=True)[0])


def test_auto_backend_is_a_fixed_rule_written_to_config_json(tmp_path):
    assert auto_backend(torch.device("cpu"))[0] == "serial"
    assert auto_backend(torch.device("cuda", 0))[0] == "vmap"
    train(tiny(tmp_path, epochs=2, backend="auto"))
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["backend"] == "serial" and conf["backend_rule"].startswith("auto: serial")


def test_numpy_scalars_in_a_config_are_stored_as_plain_numbers(tmp_path):
    import numpy as np
    cfg = tiny(tmp_path, epochs=np.float64(2.0), local_steps=np.int64(4), lr=np.float32(0.05))
    assert type(cfg.epochs) is float and type(cfg.local_steps) is int and type(cfg.lr) is float
    save_payload(tmp_path / "p.pt", {"format": "x", "n": np.int64(3), "v": [np.float64(0.5)]})
    back = load_verified(tmp_path / "p.pt")       # weights_only=True admits it
    assert back["n"] == 3 and type(back["n"]) is int and back["v"] == [0.5]


def test_a_preset_run_shorter_than_its_checkpoint_period_still_checkpoints_at_the_end(tmp_path):
    from experiments.config import preset
    cfg = preset("cpu-tiny", epochs=1, out=str(tmp_path / "run"), progress=False)
    assert cfg.checkpoint_every == 8 and Trainer(cfg).total_steps == 4   # every preset checkpoints
    train(cfg.replace(overwrite=True))
    assert load_checkpoint(tmp_path / "run")["step"] == 4


def test_a_final_file_without_a_digest_loads_tensors_only_with_a_warning(tmp_path):
    # files other tools write in the final.pt format (experiments.sharpness snapshots today)
    from experiments.checkpoint import FINAL_FORMAT, UnverifiedFileWarning
    from experiments.trainer import build_network
    cfg = tiny(tmp_path)
    net = build_network(cfg, torch.device("cpu"), torch.float32)
    torch.save({"format": FINAL_FORMAT, "config": cfg.to_dict(), "state_dict": net.state_dict()}, tmp_path / "s.pt")
    with pytest.warns(UnverifiedFileWarning, match="carries no SHA-256"):
        model, _ = load_model(str(tmp_path / "s.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
    with pytest.raises(CheckpointFileError, match="carries no SHA-256"):   # a checkpoint must have one
        load_verified(tmp_path / "s.pt")


def test_json_lines_are_written_whole_with_kept_lines_verbatim_and_non_finite_as_null(tmp_path, monkeypatch):
    """`atomic_write_json_lines`: a kept line stays byte for byte, a dict becomes one sorted JSON line with NaN and
    inf as null; a write that fails midway leaves the previous file whole and no temporary file behind."""
    from experiments import metrics
    path = tmp_path / "rows.jsonl"
    kept = '{"b": 1, "a": NaN}'
    metrics.atomic_write_json_lines(path, [kept, {"z": float("nan"), "y": [1.5, float("inf")]}])
    assert path.read_text() == kept + "\n" + '{"y": [1.5, null], "z": null}\n'
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(metrics.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        metrics.atomic_write_json_lines(path, [{"a": 2}])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
