"""Many processes: torchrun with gloo reproduces the one-process run; a dead peer fails fast.

(Rank-number averaging across gloo processes and the match with PeriodicModelAverager are in
test_averaging.py.)
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.checkpoint import load_verified
from experiments.distributed import DistContext, init_from_env
from experiments.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
RUN = ["--preset", "cpu-tiny", "--workers", "4", "--local-batch", "8", "--local-steps", "3",
       "--momentum", "0.9", "--aug", "--label-noise", "0.1", "--epochs", "3", "--eval-every", "6",
       "--precision", "fp64", "--backend", "auto", "--no-progress"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def test_two_gloo_processes_give_the_one_process_result(tmp_path):
    # --backend auto: a fixed rule, so 1 process (K_loc = 4) and 2 (K_loc = 2) choose alike
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([PY, "-m", "experiments.train", *RUN, "--out", str(one)], cwd=ROOT, env=_env(),
                   check=True, timeout=300, capture_output=True)
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_port()}", "-m", "experiments.train", *RUN, "--out", str(two)],
                          cwd=ROOT, env=_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    backends = [json.loads((d / "config.json").read_text())["backend"] for d in (one, two)]
    assert backends == ["serial", "serial"]
    a = load_verified(one / "final.pt")["state_dict"]
    b = load_verified(two / "final.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ra, rb = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert len(ra) == len(rb) == 4   # 8 steps per epoch x 3 epochs, every 6 steps
    for x, y in zip(ra, rb):
        for key in ("test_acc", "train_acc"):
            assert x[key] == y[key]
        for key in ("test_loss", "train_loss", "worker_spread"):
            assert abs(x[key] - y[key]) < 1e-9 * max(1.0, abs(x[key]))
    # the second process really trained workers 2 and 3: spread covers all 4 workers
    assert ra[0]["worker_spread"] > 0


def test_a_killed_peer_gives_a_clear_error_within_the_timeout(tmp_path):
    port = _port()
    args = [PY, "-m", "experiments.train", "--preset", "cpu-tiny", "--workers", "2", "--epochs", "100000",
            "--dist-timeout", "20", "--backend", "serial", "--no-progress", "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "config.json").exists():   # rank 0 starts its loop
            assert time.time() < deadline and procs[0].poll() is None, "training never started"
            time.sleep(0.1)
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGKILL)
        start = time.time()
        code = procs[0].wait(timeout=60)       # a hang would raise TimeoutExpired here
        elapsed = time.time() - start
        err = procs[0].stderr.read()
        assert code == 4, err[-2000:]
        assert "a peer process died or did not answer" in err and "rank 0/2" in err
        assert elapsed < 20 + 15
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_context_without_torchrun_is_a_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    t = torch.arange(3.0)
    ctx.all_reduce_sum_(t)       # a no-op in one process
    assert torch.equal(t, torch.arange(3.0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_from_env(device="cpu")


def test_sigint_to_one_rank_stops_every_rank_with_one_resumable_checkpoint(tmp_path):
    # two ranks started by hand (as torchrun would), SIGINT to rank 0 only: both stop at the same
    # agreed step (rank 1 learns of it at the next agreement), rank 0 writes the checkpoint of all
    # 4 workers, and one process resumes it to the end of the uninterrupted one-process run
    port, cut, one = _port(), tmp_path / "cut", tmp_path / "one"
    args = [PY, "-m", "experiments.train", *RUN, "--epochs", "12", "--checkpoint-every", "6", "--out", str(cut)]
    procs = [subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        deadline = time.time() + 120
        while not (cut / "checkpoints" / "last.pt").exists():
            assert time.time() < deadline and procs[0].poll() is None, "no checkpoint was written"
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=60) for p in procs]
        errs = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert codes == [130, 143], errs
    assert all(len(e.strip().splitlines()) == 1 and "resume with --resume" in e for e in errs), errs
    from experiments.checkpoint import load_checkpoint
    state = load_checkpoint(cut)
    assert state["params"].shape[0] == 4 and 0 < state["step"] < 96 and state["world_size"] == 2
    assert not (cut / "final.pt").exists()
    base = [PY, "-m", "experiments.train", *RUN, "--epochs", "12", "--checkpoint-every", "6"]
    for extra in (["--out", str(cut), "--resume", str(cut)], ["--out", str(one)]):
        done = subprocess.run(base + extra, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_verified(one / "final.pt")["state_dict"], load_verified(cut / "final.pt")["state_dict"]
    for k in a:   # fp64; 2 processes sum the averages in another order than 1 (as above)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_ranks_beyond_the_gpus_are_refused_unless_gloo_shares_them(monkeypatch):
    from experiments import distributed as dmod
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dmod.resolve_device("auto", 0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"local rank 1 has no GPU of its own: this node has 1 GPU"):
        dmod.resolve_device("auto", 1)
    assert dmod.resolve_device("cuda", 1, share_gpus=True) == torch.device("cuda", 0)
    assert dmod.process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert dmod.process_group_backend(torch.device("cuda", 0), "gloo") == "gloo"
    assert dmod.process_group_backend(torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="nccl' needs a GPU"):
        dmod.process_group_backend(torch.device("cpu"), "nccl")


def test_every_collective_of_a_run_goes_through_the_group_device(tmp_path, monkeypatch):
    # Two identical ranks simulated in one process: the torch.distributed calls are fakes that
    # check each tensor was handed over by DistContext._on_comm, the one place that moves a
    # tensor to the group's device (the GPU under NCCL, the CPU under gloo).
    import torch.distributed as tdist
    from experiments.config import TrainConfig
    from experiments.trainer import Trainer
    routed, calls = set(), []

    class Recording(DistContext):
        def _on_comm(self, t):
            out = t.clone()
            routed.add(id(out))
            return out

    def check(name, t):
        assert id(t) in routed, f"{name} got a tensor that did not pass through _on_comm"
        calls.append(name)

    def all_reduce(t, op=None):
        check("all_reduce", t)
        t.mul_(2)

    def all_gather(parts, t):
        check("all_gather", t)
        for p in parts:
            p.copy_(t)

    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    monkeypatch.setattr(tdist, "all_gather", all_gather)
    monkeypatch.setattr(tdist, "broadcast", lambda t, src=0: check("broadcast", t))
    monkeypatch.setattr(tdist, "barrier", lambda: calls.append("barrier"))
    cfg = TrainConfig(model="small_cnn", width=4, data="synthetic", synthetic_size=128, test_size=64,
                      workers=4, local_batch=8, local_steps=2, epochs=1, eval_every=2, checkpoint_every=2,
                      bn_batches=2, eval_batch=64, out=str(tmp_path / "run"), backend="serial", progress=False)
    ctx = Recording(rank=0, world_size=2, comm_device=torch.device("cpu"))
    Trainer(cfg, dist=ctx).run()
    assert {"all_reduce", "all_gather", "broadcast"} <= set(calls) and len(calls) > 10
    # and the move itself: a tensor reaches the group's device and the result comes back
    meta = DistContext(rank=0, world_size=2, comm_device=torch.device("meta"))
    assert meta._on_comm(torch.ones(3)).device.type == "meta"
    assert DistContext()._on_comm(t := torch.ones(2)) is t
