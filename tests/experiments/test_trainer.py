"""The training loop: it learns on real CIFAR-10, logs what it says, switches H when told,
re-estimates BatchNorm exactly, and stops cleanly on divergence."""
import torch
from torch import nn

import pytest

from experiments.checkpoint import load_checkpoint, load_verified
from experiments.config import TrainConfig
from experiments.metrics import read_metrics
from experiments.trainer import DivergenceError, Trainer, reestimate_bn, train


def tiny(tmp_path, **kw):
    base = dict(model="small_cnn", width=4, data="synthetic", synthetic_size=128, test_size=64,
                workers=4, local_batch=8, local_steps=2, lr=0.05, epochs=2, bn_batches=2,
                eval_every=4, eval_batch=64, out=str(tmp_path / "run"), backend="serial", progress=False)
    return TrainConfig(**{**base, **kw})


def test_short_real_cifar10_run_lowers_the_training_loss(cifar10_dir, tmp_path):
    cfg = TrainConfig(model="small_cnn", width=8, data="cifar10", data_dir=str(cifar10_dir),
                      train_size=512, test_size=500, workers=4, local_batch=16, local_steps=4,
                      lr=0.05, momentum=0.9, epochs=6, eval_every=8, bn_batches=4,
                      out=str(tmp_path / "cifar"), backend="vmap", progress=False)
    result = train(cfg)
    recs = read_metrics(tmp_path / "cifar" / "metrics.jsonl")
    assert len(recs) == 6 and [r["step"] for r in recs] == [8, 16, 24, 32, 40, 48]
    # running minibatch loss: starts near ln 10 = 2.30, must fall clearly below it
    assert recs[0]["train_loss"] > 2.0
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 0.15
    assert recs[-1]["test_acc"] > 0.15          # above chance (0.10) on held-out images
    assert result.final_path.exists()


def test_metrics_records_and_output_folder(tmp_path):
    cfg = tiny(tmp_path, sync="hierarchical", local_steps=2, global_rounds=2, epochs=4)
    train(cfg)
    out = tmp_path / "run"
    recs = read_metrics(out / "metrics.jsonl")
    # evaluations wait for the global averaging that closes every 2nd round of 2 steps
    assert [r["step"] for r in recs] == [4, 8, 12, 16] and [r["round"] for r in recs] == [1, 3, 5, 7]
    for r in recs:
        assert r["lr"] == 0.05 and r["H"] == 2 and r["epoch"] == r["step"] / 4
        assert r["worker_spread"] > 0 and 0 <= r["test_acc"] <= 1 and r["train_loss"] > 0
    import json
    conf = json.loads((out / "config.json").read_text())
    assert conf["config"]["sync"] == "hierarchical" and conf["seed"] == 0 and conf["git_revision"]
    final = load_verified(out / "final.pt")
    assert final["config"] == cfg.to_dict() and final["step"] == 16


def test_post_local_switch_happens_at_the_epoch(tmp_path):
    seen = []
    cfg = tiny(tmp_path, sync="post-local", switch_epoch=1.5, local_steps=3, epochs=4, eval_every=0)
    Trainer(cfg, on_round=lambda r, step, total, lr, H: seen.append((step - H, H))).run()
    # 4 steps per epoch: H = 1 for steps 0..5, then rounds of 3 from step 6 on
    assert seen == [(t, 1) for t in range(6)] + [(6, 3), (9, 3), (12, 3), (15, 1)]


def test_serial_and_vmap_trainers_agree_in_float64(tmp_path):
    finals = {}
    for backend in ("serial", "vmap"):
        cfg = tiny(tmp_path, backend=backend, precision="fp64", momentum=0.9, aug=True, label_noise=0.2,
                   out=str(tmp_path / backend))
        train(cfg)
        finals[backend] = load_verified(tmp_path / backend / "final.pt")["state_dict"]
    for k, v in finals["serial"].items():
        torch.testing.assert_close(v, finals["vmap"][k], rtol=0, atol=1e-6)


def test_bn_reestimation_is_the_plain_average_of_batch_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).double()
    batches = [torch.randn(5, 3, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    reestimate_bn(bn, batches)
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), atol=1e-12)
    assert torch.allclose(bn.running_var, torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0), atol=1e-12)
    assert not bn.training and bn.momentum == 0.1


def test_divergence_stops_within_the_first_round(tmp_path):
    # without normalization (BatchNorm makes the loss scale-invariant and can absorb huge steps)
    cfg = tiny(tmp_path, lr=1e6, local_steps=3, checkpoint_every=3, norm="none")
    rounds = []
    with pytest.raises(DivergenceError, match=r"diverged at step 0 in round 0 .*no checkpoint had been written"):
        Trainer(cfg, on_round=lambda *a: rounds.append(a)).run()
    assert rounds == [] and not (tmp_path / "run" / "final.pt").exists()


def test_divergence_after_a_checkpoint_keeps_it_loadable(tmp_path):
    cfg = tiny(tmp_path, local_steps=2, checkpoint_every=4, eval_every=4, epochs=4, norm="none")
    trainer = Trainer(cfg)
    good = trainer.lr
    trainer.lr = lambda t: good(t) if t < 6 else 1e30   # the rate explodes at step 6 (round 3)
    with pytest.raises(DivergenceError, match=r"at step 6 in round 3 \(steps 6-7.*checkpoints/last.pt"):
        trainer.run()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", cfg)
    assert state["step"] == 4 and torch.isfinite(state["params"]).all()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


def test_numerics_are_set_explicitly_and_recorded(tmp_path):
    import json
    from experiments.trainer import configure_numerics
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        cfg = tiny(tmp_path)
        assert configure_numerics(cfg, torch.device("cuda", 0))["tf32"] is False
        # "fp32" is true fp32 on a GPU unless TF32 is asked for
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_numerics(cfg.replace(tf32=True, deterministic=True), torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(False)
        train(cfg)
        recorded = json.loads((tmp_path / "run" / "config.json").read_text())["numerics"]
        assert recorded == {"tf32": False, "deterministic": False, "device": "cpu"}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.use_deterministic_algorithms(saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def _tiny_pack(folder):
    from experiments.datasets import synthetic_cifar, write_pack
    images, labels = synthetic_cifar(128 + 64, seed=10_007)   # what tiny()'s synthetic data are
    write_pack(folder, (images[:128], labels[:128]), (images[128:], labels[128:]), source="synthetic test")
    return folder


def test_trainer_reads_a_packed_subset_with_its_checksums(tmp_path, capsys):
    # a pack in --data-dir is read instead of the CIFAR-10 archive: the run sees exactly the
    # packed images (same run as the synthetic data it was packed from), and an altered pack
    # is refused with exit 3 before training
    from experiments import train as train_cli
    pack = _tiny_pack(tmp_path / "pack")
    via_pack = train(tiny(tmp_path, data="cifar10", data_dir=str(pack), out=str(tmp_path / "a"),
                          synthetic_size=128))
    direct = train(tiny(tmp_path, out=str(tmp_path / "b")))
    assert [r.test_loss for r in via_pack.records] == [r.test_loss for r in direct.records]
    raw = bytearray((pack / "test_labels.npy").read_bytes())
    raw[-1] ^= 1
    (pack / "test_labels.npy").write_bytes(bytes(raw))
    code = train_cli.main(["--model", "small_cnn", "--width", "4", "--data", "cifar10", "--data-dir",
                           str(pack), "--workers", "2", "--local-batch", "8", "--no-progress",
                           "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "test_labels.npy: SHA-256 differs from the pack manifest" in err[0]


def test_compile_choices(tmp_path):
    from experiments.trainer import auto_backend
    with pytest.raises(ValueError, match="compile applies to the stacked workers"):
        tiny(tmp_path, compile=True, backend="serial")
    assert auto_backend(torch.device("cpu"), compile=True)[0] == "vmap"
    assert auto_backend(torch.device("cpu"))[0] == "serial"


def test_data_generators_live_on_the_device_and_a_foreign_state_is_refused(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    assert all(g.device == trainer.device for g in trainer.generators)
    state = trainer.checkpoint_state()
    state["generators"] = torch.zeros(4, 16, dtype=torch.uint8)   # a CUDA generator's state size
    with pytest.raises(ValueError, match="resume on the device type that wrote the checkpoint"):
        trainer._restore(state)


def test_no_host_reads_per_step(tmp_path, monkeypatch):
    # the step loop reads nothing back from tensors (.item(), float(), int(), .tolist()): runs
    # with the same rounds, evaluations and checkpoints but 4x the steps (H = 2 over 8 steps,
    # H = 8 over 32) make the same number of such reads. What remains is per round (the
    # divergence verdict at each round end) and per evaluation. (On the CPU the per-step
    # divergence flag is a bool() of a CPU tensor, not counted; on a GPU it is read
    # asynchronously.)
    counts = {"n": 0}
    for name in ("item", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            counts["n"] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    reads = []
    for H, epochs in ((2, 2), (8, 8)):
        counts["n"] = 0
        result = train(tiny(tmp_path, backend="vmap", aug=True, label_noise=0.1, local_steps=H,
                            epochs=epochs, eval_every=0, out=str(tmp_path / f"e{epochs}")))
        assert result.records[-1].step == 4 * epochs
        reads.append(counts["n"])
    assert reads[0] == reads[1] and reads[0] > 0


def test_a_library_run_takes_the_configs_device(tmp_path, monkeypatch):
    # train(cfg) without a DistContext runs on cfg.device (it used to run on the CPU whatever
    # the config said): "cuda" without CUDA is refused before any work, "cpu" is the CPU.
    # A machine without CUDA is simulated, so the test runs the same on a GPU machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' was asked for but CUDA is not available"):
        Trainer(tiny(tmp_path, device="cuda"))
    asked = []
    import experiments.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    assert Trainer(tiny(tmp_path, device="auto")).device == torch.device("cpu") and asked == ["auto"]
