"""Checkpoints: a run killed with SIGKILL and resumed ends bit for bit where an uninterrupted
run ends; a checkpoint of another config is refused."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.checkpoint import load_checkpoint, load_verified
from experiments.config import preset
from experiments.metrics import read_metrics
from experiments.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--preset", "cpu-tiny", "--epochs", "12", "--checkpoint-every", "8", "--eval-every", "8",
       "--momentum", "0.9", "--aug", "--label-noise", "0.1", "--lr-schedule", "cosine",
       "--sync", "qsr", "--qsr-alpha", "0.15", "--local-steps", "2", "--backend", "serial", "--no-progress"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "experiments.train", *RUN, "--out", str(full)], cwd=ROOT,
                   env=_env(), check=True, timeout=300, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *RUN, "--out", str(cut)],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "final.pt").exists(), "the run finished before the kill: nothing was tested"
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 48
    subprocess.run([sys.executable, "-m", "experiments.train", *RUN, "--out", str(cut), "--resume", str(ckpt)],
                   cwd=ROOT, env=_env(), check=True, timeout=300, capture_output=True)
    a = load_verified(full / "final.pt")["state_dict"]
    b = load_verified(cut / "final.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(ckpt)
    for key in ("params", "momentum", "buffers", "counters", "generators"):
        assert torch.equal(ca[key], cb[key]), key
    strip = lambda recs: [{k: v for k, v in r.items() if k != "wall_time"} for r in recs]
    assert strip(read_metrics(full / "metrics.jsonl")) == strip(read_metrics(cut / "metrics.jsonl"))


def test_resume_from_a_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = preset("cpu-tiny", epochs=1, out=str(tmp_path / "a"), checkpoint_every=4, progress=False,
                 backend="serial")
    train(cfg)
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    with pytest.raises(ValueError, match=r"different config \(fields that differ: local_steps, lr\)"):
        Trainer(cfg.replace(lr=0.5, local_steps=2, resume=str(ckpt)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(cfg.replace(resume=str(tmp_path / "nowhere")))
    # the same config on another backend and output folder resumes (run-only fields may change,
    # and a longer run extends the finished one)
    t = Trainer(cfg.replace(resume=str(tmp_path / "a"), backend="vmap", out=str(tmp_path / "b"), epochs=2))
    assert t.step == 4 and torch.equal(t.workers.params.detach(), load_checkpoint(ckpt)["params"])
