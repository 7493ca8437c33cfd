"""Local SGD over node shards: the simulated rounds against a plain per-node loop, the
threshold crossing, the log-log slope fit, the study grid's checks and resume.

Budget: about 3 s (float64 networks of a few hundred parameters, a handful of rounds).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.convergence import (LocalSGDConfig, StudySpec, crossing_round, eval_rounds,
                                     fit_loglog_slope, run_local_sgd, run_study, study_grid)
from experiments.models import build_model
from experiments.sampling import WorkerSampler, node_shards


def _data(n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 10
    return x, y[torch.randperm(n, generator=g)]


def _reference_local_sgd(model, x, y, shards, cfg, seed, rounds):
    """Local SGD written plainly: a deep copy per node, autograd per node, average by hand."""
    import copy
    sampler = WorkerSampler(x.shape[0], workers=shards.shape[0], local_batch=cfg.local_batch,
                            replacement=False, partition="shards", shards=shards, generator_seed=seed)
    per_epoch = sampler.steps_per_epoch
    center = copy.deepcopy(model)
    losses = []
    for r in range(rounds + 1):
        with torch.no_grad():
            losses.append(F.cross_entropy(center(x), y).item())
        if r == rounds:
            break
        locals_ = [copy.deepcopy(center) for _ in range(shards.shape[0])]
        for k in range(cfg.local_steps):
            t = r * cfg.local_steps + k
            idx = sampler.epoch(t // per_epoch)[t % per_epoch]
            for j, net in enumerate(locals_):
                loss = F.cross_entropy(net(x[idx[j]]), y[idx[j]])
                grads = torch.autograd.grad(loss, list(net.parameters()))
                with torch.no_grad():
                    for p, g in zip(net.parameters(), grads):
                        p.sub_(cfg.lr * g)
        with torch.no_grad():
            for name, p in center.named_parameters():
                p.copy_(torch.stack([dict(n.named_parameters())[name] for n in locals_]).mean(0))
    return np.array(losses)


class _TinyLN(nn.Module):
    """A buffer-free net without forward_stacked: exercises the vmap path."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("which", ["stacked", "vmap"])
@pytest.mark.parametrize("regime,local_steps", [("sorted", 3), ("iid", 1)])
def test_rounds_match_a_plain_per_node_loop(which, regime, local_steps):
    x, y = _data()
    torch.manual_seed(0)
    model = (build_model("res_mlp", width=8, depth=1, image_size=2) if which == "stacked" else _TinyLN()).double()
    shards = node_shards(y, 20, regime, seed=1)          # 20 nodes x 4 samples, batch 2
    cfg = LocalSGDConfig(local_steps=local_steps, max_rounds=5, lr=0.2, local_batch=2, eval_points=50)
    traj = run_local_sgd(model, x, y, shards, cfg, seed=3)
    assert traj.rounds.tolist() == [0, 1, 2, 3, 4, 5]    # the log grid is every round here
    ref = _reference_local_sgd(model, x, y, shards, cfg, seed=3, rounds=5)
    # float64 throughout; only summation order differs
    assert np.allclose(traj.loss, ref, rtol=1e-10, atol=0)
    assert traj.loss[-1] < traj.loss[0]
    assert np.array_equal(traj.steps, traj.rounds * local_steps)


def test_run_stops_at_the_threshold_and_interpolates_the_crossing():
    x, y = _data()
    torch.manual_seed(1)
    model = build_model("res_mlp", width=32, depth=1, image_size=2).double()
    shards = node_shards(y, 20, "iid", seed=0)
    cfg = LocalSGDConfig(local_steps=2, max_rounds=3000, lr=0.5, local_batch=4, threshold=0.05, eval_points=60)
    traj = run_local_sgd(model, x, y, shards, cfg, seed=0)
    assert traj.loss[-1] < 0.05 <= traj.loss[-2]       # stopped at the first reading below
    assert traj.rounds[-2] < traj.reached <= traj.rounds[-1]
    assert traj.rounds[-1] < 3000


def test_crossing_round_is_exact_for_a_power_law():
    rounds = np.array([0, 1, 10, 500, 2000, 8000])
    loss = np.concatenate([[5.0], 1.0 / rounds[1:]])
    assert math.isclose(crossing_round(rounds, loss, 1e-3), 1000.0, rel_tol=1e-12)
    assert math.isnan(crossing_round(rounds, loss, 1e-5))
    assert crossing_round(rounds, loss, 10.0) == 0.0   # already below at the first reading
    grid = eval_rounds(20_000, 150)
    assert grid[0] == 0 and grid[1] == 1 and grid[-1] == 20_000 and np.all(np.diff(grid) > 0)


def test_loglog_slope_recovers_a_power_law_and_uses_only_the_tail():
    rng = np.random.default_rng(0)
    rounds = eval_rounds(10_000, 80)
    loss = 3.0 * np.maximum(rounds, 1) ** -1.3 * np.exp(0.05 * rng.standard_normal(rounds.size))
    loss[:5] = 2.0                                    # a transient above max_loss
    fit = fit_loglog_slope(rounds, loss, max_loss=1e-2)
    assert fit.lo < -1.3 < fit.hi and fit.hi - fit.lo < 0.05   # 0.05 noise over 2.6 decades
    assert fit.first > 5 and fit.last == 10_000
    bumped = loss.copy()
    bumped[-10] = 0.5                                 # a late excursion: the tail starts after it
    assert fit_loglog_slope(rounds, bumped).first == rounds[-9]
    with pytest.raises(ValueError, match="readings with loss"):
        fit_loglog_slope(rounds, loss, max_loss=1e-9)


def test_bad_input_fails_before_training():
    x, y = _data()
    shards = node_shards(y, 20, "iid", seed=0)        # 4 samples per node
    cfg = LocalSGDConfig(local_steps=1, max_rounds=2, local_batch=8)
    with pytest.raises(ValueError, match="fewer than the local batch 8"):
        run_local_sgd(build_model("res_mlp", width=8, depth=1, image_size=2), x, y, shards, cfg)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="buffers"):
        run_local_sgd(bn, x, y, shards, LocalSGDConfig(local_steps=1, max_rounds=2, local_batch=2))
    with pytest.raises(ValueError, match="unknown regime"):
        study_grid(["iid", "pathological"], [1, 2], [0])
    with pytest.raises(ValueError, match="local_steps"):
        LocalSGDConfig(local_steps=0, max_rounds=5)
    built = []

    def make():
        built.append(1)
        return build_model("res_mlp", width=8, depth=1, image_size=2).double()

    unbalanced = y.clone()
    unbalanced[0] = (unbalanced[0] + 1) % 10
    specs = study_grid(["iid", "sorted"], [1], [0])
    with pytest.raises(ValueError, match="every class holding"):
        run_study(x, unbalanced, specs, make_model=make, nodes=20, similarity=0.5,
                  rounds_for=lambda s: 2, lr=0.1, local_batch=2)
    with pytest.raises(ValueError, match="fewer than the local batch"):
        run_study(x, y, specs, make_model=make, nodes=20, similarity=0.5,
                  rounds_for=lambda s: 2, lr=0.1, local_batch=8)
    assert not built                                   # nothing was trained


def test_study_resumes_from_its_file(tmp_path):
    x, y = _data()
    built = []

    def make():
        built.append(1)
        return build_model("res_mlp", width=8, depth=1, image_size=2).double()

    specs = study_grid(["sorted", "mixed"], [1, 2], [0])
    kw = dict(make_model=make, nodes=20, similarity=0.5, rounds_for=lambda s: 4 // s.local_steps,
              lr=0.1, local_batch=2, eval_points=10, out=tmp_path / "rows.json")
    rows = run_study(x, y, specs, **kw)
    assert len(built) == 4 and [r["key"] for r in rows] == [s.key for s in specs]
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert [r["loss"] for r in saved] == [r["loss"] for r in rows]
    assert rows[1]["rounds"][-1] == 2 and rows[1]["config"]["local_steps"] == 2
    again = run_study(x, y, specs + [StudySpec("sorted", 1, 1)], **kw)
    assert len(built) == 5                             # only the new cell was trained
    assert [(r["key"], r["loss"]) for r in again[:4]] == [(r["key"], r["loss"]) for r in rows]
    assert rows[0]["reached"] is None                  # 4 rounds never reach 1e-4
    # same seed, same initialization and data order: a fresh run reproduces a saved row
    fresh = run_study(x, y, specs[:1], **{**kw, "out": None})
    assert fresh[0]["loss"] == rows[0]["loss"]
