"""The training loop: it learns on real CIFAR-10, logs what it says, switches H when told,
re-estimates BatchNorm exactly, and stops cleanly on divergence."""
import torch
from torch import nn

import pytest

from experiments.checkpoint import load_checkpoint, load_verified
from experiments.config import TrainConfig, preset
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
