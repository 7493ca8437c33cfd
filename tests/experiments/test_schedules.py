"""Learning-rate and synchronization schedules against their closed forms."""
import math

import pytest

from experiments.config import TrainConfig
from experiments.schedules import (QSR, ConstantH, Hierarchical, LRSchedule, PostLocal,
                                   build_lr_schedule, build_sync_schedule, plan_rounds)


def test_linear_warmup_then_step_decay_like_lin_et_al():
    cfg = TrainConfig(workers=16, local_batch=128, lr=0.2, lr_scaling="linear", lr_ref_batch=128,
                      warmup_epochs=5, lr_schedule="step", decay_at=(0.5, 0.75), epochs=300)
    s = build_lr_schedule(cfg, steps_per_epoch=10, total_steps=3000)
    assert s.peak == pytest.approx(0.2 * 16)
    assert s(0) == pytest.approx(0.2)                          # warm-up starts at the unscaled rate
    assert s(25) == pytest.approx(0.2 + (3.2 - 0.2) * 25 / 50)  # linear in between
    assert s(50) == pytest.approx(3.2) and s(1499) == pytest.approx(3.2)
    assert s(1500) == pytest.approx(0.32) and s(2249) == pytest.approx(0.32)
    assert s(2250) == pytest.approx(0.032) and s(2999) == pytest.approx(0.032)


def test_cosine_closed_form():
    s = LRSchedule(peak=0.8, total_steps=110, kind="cosine", warmup_steps=10, min_lr=0.01)
    for t in (10, 37, 60, 109, 110):
        expected = 0.01 + 0.79 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
        assert s(t) == pytest.approx(expected, rel=1e-12)
    assert s(5) == pytest.approx(0.4)   # warm-up from 0 without a scaling rule


def test_qsr_periods_on_a_cosine_decay_follow_the_formula():
    H_base, alpha, total = 2, 0.3, 2000
    lr = LRSchedule(peak=0.5, total_steps=total, kind="cosine")
    rounds = list(plan_rounds(QSR(H_base, alpha), lr, total))
    step = 0
    for r, first, rnd in rounds:
        assert first == step
        eta = 0.5 * 0.5 * (1 + math.cos(math.pi * first / total))   # the cosine, written out
        want = max(H_base, math.floor((alpha / eta) ** 2)) if eta > 0 else total
        assert rnd.steps == min(want, total - first), (r, first, eta)
        step += rnd.steps
    assert step == total
    periods = [rnd.steps for _, _, rnd in rounds[:-1]]
    assert periods[0] == H_base and max(periods) > 10 * H_base      # H grows as eta decays
    assert periods == sorted(periods)


def test_post_local_switches_at_the_epoch_and_never_straddles_it():
    sync = build_sync_schedule(TrainConfig(sync="post-local", switch_epoch=3, local_steps=5), steps_per_epoch=7)
    assert sync == PostLocal(5, 21)
    rounds = list(plan_rounds(sync, LRSchedule(peak=0.1, total_steps=60), 60))
    firsts = {first: rnd.steps for _, first, rnd in rounds}
    assert all(firsts[t] == 1 for t in range(21))
    assert [firsts[t] for t in (21, 26, 31)] == [5, 5, 5]
    assert sum(rnd.steps for _, _, rnd in rounds) == 60


def test_constant_and_hierarchical():
    lr = LRSchedule(peak=0.1, total_steps=23)
    rounds = list(plan_rounds(ConstantH(4), lr, 23))
    assert [r.steps for _, _, r in rounds] == [4, 4, 4, 4, 4, 3]
    hier = list(plan_rounds(Hierarchical(2, 3), lr, 23))
    assert [r.is_global for _, _, r in hier] == [False, False, True] * 3 + [False, False, True]
    # the clipped last round (1 step) still ends with a global averaging
    assert hier[-1][2].steps == 1 and hier[-1][2].is_global


def test_resuming_the_plan_mid_run_gives_the_same_rounds():
    lr = LRSchedule(peak=0.5, total_steps=500, kind="cosine")
    full = list(plan_rounds(QSR(1, 0.2), lr, 500))
    r, first, _ = full[7]
    assert list(plan_rounds(QSR(1, 0.2), lr, 500, start_round=r, start_step=first)) == full[7:]
