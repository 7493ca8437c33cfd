"""probe.py: the sharpness of a saved model agrees with dynamics and with the trainer's tracking."""
import json

import torch
from torch import nn

from dynamics import Objective, top_eigenpairs
from experiments.config import TrainConfig
from experiments.metrics import read_metrics
from experiments.probe import load_model, main, probe
from experiments.trainer import build_network, load_datasets, train


def _run(tmp_path, track=(1,)):
    cfg = TrainConfig(model="small_cnn", width=4, data="synthetic", synthetic_size=128, test_size=64,
                      workers=2, local_batch=16, local_steps=2, lr=0.1, epochs=2, eval_every=4,
                      bn_batches=2, precision="fp64", track_sharpness=track, sharpness_samples=16,
                      sharpness_matvecs=20, checkpoint_every=8, out=str(tmp_path / "run"),
                      backend="vmap", progress=False)
    train(cfg)
    return cfg


def test_probe_matches_dynamics_and_the_tracked_value(tmp_path, capsys):
    cfg = _run(tmp_path)
    final = tmp_path / "run" / "final.pt"
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert recs[0]["top_eigenvalue"] is None and recs[1]["top_eigenvalue"] is not None
    got = probe(str(final), matvecs=20)
    # the trainer tracked the same quantity on the same model and data with the same seed
    assert abs(got["top_eigenvalue"] - recs[1]["top_eigenvalue"]) < 1e-9 * abs(got["top_eigenvalue"])
    assert abs(got["hessian_trace"] - recs[1]["hessian_trace"]) < 1e-9 * abs(got["hessian_trace"])
    # independent reference: the saved state loaded by hand, dynamics run to tight convergence
    model = build_network(cfg, torch.device("cpu"), torch.float64)
    model.load_state_dict(torch.load(final, weights_only=True)["state_dict"])
    train_set, _ = load_datasets(cfg, torch.device("cpu"), torch.float64)
    x, y = train_set.batch(torch.arange(16), augment=False)
    ref = top_eigenpairs(Objective(model.eval(), nn.CrossEntropyLoss(), [(x, y)]), k=1, tol=1e-9,
                         max_matvecs=200)
    assert ref.converged
    # probe spends 20 matvecs at tol 1e-4; the top Ritz value converges fastest, to ~1e-4 relative
    assert abs(got["top_eigenvalue"] - float(ref.values[0])) < 1e-4 * abs(float(ref.values[0]))
    assert got["top_eigenvalue"] > 0 and got["samples"] == 16
    assert main([str(final), "--matvecs", "20"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["top_eigenvalue"] == got["top_eigenvalue"]


def test_probe_reads_full_checkpoints_as_the_worker_average(tmp_path):
    _run(tmp_path, track=())
    m_final, _ = load_model(str(tmp_path / "run" / "final.pt"))
    m_ckpt, _ = load_model(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    for (n, a), (_, b) in zip(m_final.named_parameters(), m_ckpt.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)


def test_probe_rejects_other_files(tmp_path):
    import pytest
    from experiments.checkpoint import CheckpointFileError
    torch.save({"hello": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointFileError, match=r"x\.pt is not a file of this trainer \(format None"):
        load_model(str(tmp_path / "x.pt"))


def test_probe_command_line_gives_one_line_and_an_exit_code(tmp_path, capsys):
    _run(tmp_path, track=())
    run = tmp_path / "run"
    # a run folder is read as its final.pt
    assert main([str(run), "--matvecs", "4", "--samples", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 8
    bad = tmp_path / "flipped.pt"
    data = bytearray((run / "final.pt").read_bytes())
    data[len(data) // 2] ^= 0x01                               # one bit
    bad.write_bytes(bytes(data))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    cases = [([str(bad)], 3, "flipped.pt failed its integrity check"),
             ([str(tmp_path / "empty.pt")], 3, "empty.pt is empty (0 bytes)"),
             ([str(tmp_path / "nothere.pt")], 2, "no such file"),
             ([str(tmp_path / "folder")], 2, "folder is a folder without final.pt"),
             ([str(run), "--matvecs", "1"], 2, "--matvecs must be >= 2")]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def test_a_channels_last_checkpoint_reads_as_the_same_network(tmp_path):
    # channels_last stores convolution weights channels-last in the checkpoint rows
    cfg = TrainConfig(model="small_cnn", width=4, data="synthetic", synthetic_size=128, test_size=64,
                      workers=2, local_batch=16, local_steps=2, lr=0.1, epochs=1, eval_every=4,
                      bn_batches=2, precision="fp64", channels_last=True, checkpoint_every=4,
                      out=str(tmp_path / "run"), backend="serial", progress=False)
    train(cfg)
    m_final, _ = load_model(str(tmp_path / "run" / "final.pt"))
    m_ckpt, _ = load_model(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    for (n, a), (_, b) in zip(m_final.named_parameters(), m_ckpt.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)


def user_net(image_size: int = 8) -> nn.Module:
    """A network the trainer did not build (loaded by `--model tests.experiments.test_probe:user_net`)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def test_probe_reads_a_plain_state_dict_of_a_user_network(tmp_path, capsys, cifar10_dir):
    from experiments.data import load_cifar10, normalize
    net = user_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    file = tmp_path / "weights.pt"
    torch.save(net.state_dict(), file)
    argv = [str(file), "--model", "tests.experiments.test_probe:user_net", "--image-size", "8", "--samples", "32",
            "--matvecs", "20", "--data-dir", str(cifar10_dir)]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["samples"] == 32 and got["model"] == "tests.experiments.test_probe:user_net"
    # independent reference: the SAVED weights (not the factory's) on the first 32 images pooled to 8x8
    images, labels = load_cifar10(cifar10_dir, "train")
    x = torch.nn.functional.avg_pool2d(normalize(images[:32], dtype=torch.float64), 4)
    ref = top_eigenpairs(Objective(net.eval(), nn.CrossEntropyLoss(), [(x, labels[:32])]), k=1, tol=1e-10,
                         max_matvecs=300)
    assert ref.converged
    # probe spends 20 matvecs at tol 1e-4; the top Ritz value converges fastest, to ~1e-4 relative
    assert abs(got["top_eigenvalue"] - float(ref.values[0])) < 1e-4 * abs(float(ref.values[0]))
    # a state_dict of another network: one line naming the mismatch (exit 2); not a state_dict: exit 3
    torch.save(user_net(image_size=4).state_dict(), tmp_path / "small.pt")
    torch.save({k: v for k, v in net.state_dict().items() if k != "3.bias"}, tmp_path / "partial.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = [("small.pt", 2, "1.weight has shape (16, 48) in the file, (16, 192) in the model"),
             ("partial.pt", 2, "missing keys ['3.bias']"),
             ("list.pt", 3, "does not hold a state_dict"),
             ("nothere.pt", 2, "no such file")]
    for name, code, message in cases:
        assert main([str(tmp_path / name), *argv[1:]]) == code, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)
    assert main([str(file), "--model", "tests.experiments.test_probe:missing", "--image-size", "8"]) == 2
    assert "has no function 'missing'" in capsys.readouterr().err
