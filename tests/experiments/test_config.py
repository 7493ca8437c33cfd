"""The frozen config, its validation, presets and the command line that builds it."""
import dataclasses

import pytest

from experiments.config import PRESETS, TrainConfig, preset
from experiments.train import build_parser, main, parse_config


@pytest.mark.parametrize("changes,message", [
    (dict(workers=3, local_batch=32, total_batch=100), "not divisible by workers"),
    (dict(local_steps=0), "local_steps"),
    (dict(lr=-0.1), "lr must be > 0"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(workers=0), "workers"),
    (dict(sync="qsr"), "qsr_alpha"),
    (dict(model="resnet18"), "model must be one of"),
    (dict(momentum=1.5), "momentum"),
    (dict(nesterov=True), "nesterov needs momentum"),
    (dict(decay_at=(0.75, 0.5)), "decay_at"),
])
def test_bad_values_are_rejected_with_the_field_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_config_is_frozen_and_total_batch_consistent():
    cfg = TrainConfig(workers=4, total_batch=128)
    assert cfg.batch == 128 and cfg.local_batch == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


def test_unknown_preset_and_all_presets_valid():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    for name in PRESETS:
        assert isinstance(preset(name), TrainConfig)
    fig1a = preset("gu2023-fig1a-resnet56")   # THEORY.md facts
    assert (fig1a.workers, fig1a.local_batch, fig1a.local_steps, fig1a.lr, fig1a.bn_batches) == (32, 128, 600, 0.32, 100)
    lin = preset("lin2020-resnet20-postlocal")
    assert lin.peak_lr == pytest.approx(0.2 * 16) and lin.switch_epoch == 150 and lin.nesterov


def test_cli_overrides_a_preset_once():
    cfg = parse_config(["--preset", "cpu-tiny", "--workers", "2", "--local-steps", "3", "--lr", "0.2",
                        "--nesterov", "--momentum", "0.9", "--no-aug", "--decay-at", "0.3,0.6",
                        "--sync", "post-local", "--switch-epoch", "1.5", "--track-sharpness", "0,2"])
    assert (cfg.workers, cfg.local_steps, cfg.lr, cfg.nesterov, cfg.aug) == (2, 3, 0.2, True, False)
    assert cfg.decay_at == (0.3, 0.6) and cfg.track_sharpness == (0, 2) and cfg.switch_epoch == 1.5
    assert cfg.synthetic_size == PRESETS["cpu-tiny"]["synthetic_size"]   # untouched preset values stay
    flags = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags


def test_cli_reports_bad_configs_before_training(capsys, tmp_path):
    assert main(["--workers", "3", "--total-batch", "100", "--out", str(tmp_path / "a")]) == 2
    assert "not divisible by workers" in capsys.readouterr().err
    assert main(["--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["--data", "cifar10", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and "missing" in err
    assert not (tmp_path / "b").exists()          # nothing was written: rejected before training


def test_fingerprint_ignores_where_a_run_executes_but_not_what_it_computes():
    a = TrainConfig()
    assert a.fingerprint() == a.replace(out="elsewhere", backend="vmap", resume="x").fingerprint()
    assert a.fingerprint() != a.replace(lr=0.2).fingerprint()
    assert TrainConfig.from_dict(a.to_dict()) == a
