"""One rounding rule for H everywhere: every caller that turns (rule, eta) into local steps agrees
with `sde.rules` (QSR floor((alpha/eta)^2), Local SGD round(beta/eta)).

The learning rates are chosen where floor and round differ ((0.08/0.006)^2 = 177.8,
(0.08/0.0125)^2 = 40.96; (0.05/0.0115)^2 = 18.9), so a caller that rounds to nearest fails here."""
import pytest

from experiments import demo, drift_check, flipped_labels
from experiments.continuation import ContinuationConfig
from experiments.flipped_labels import FlipContinuationConfig
from experiments.schedules import QSR as QSRSchedule
from sde.discrete import local_steps_for_beta, qsr_local_steps
from sde.rules import QSR, LocalSGD


@pytest.mark.parametrize("eta, h_qsr", [(0.006, 177), (0.0125, 40)])
def test_every_caller_uses_the_rules_qsr_floor(eta, h_qsr):
    qsr = QSR(4, 2, alpha=0.08)
    assert qsr.local_steps(eta) == h_qsr
    assert qsr_local_steps(eta, 0.08) == h_qsr
    assert QSRSchedule(1, 0.08).period(eta) == h_qsr                              # the trainer's schedule
    assert ContinuationConfig(rule=qsr, eta=eta, sigma=0.1, rounds=1).local_steps == h_qsr
    assert FlipContinuationConfig(qsr, eta, 0.1, rounds=1).local_steps == h_qsr
    assert drift_check.default_configs(eta, steps=4000, checkpoints=2)[2].local_steps == h_qsr
    assert flipped_labels.flip_configs(eta, 0.1, seeds=1, checkpoints=2)["qsr"].local_steps == h_qsr
    assert demo.continuation_config(qsr, eta, demo.CifarSettings(qsr_alpha=0.08)).local_steps == h_qsr
    assert qsr.at_eta(eta).beta == pytest.approx(eta * h_qsr, rel=1e-15)         # the prediction at the run's H


def test_every_caller_uses_the_rules_local_sgd_rounding():
    eta, beta = 0.0115, 0.05           # beta / eta = 4.35 -> 4 (nearest); 0.3 / 0.1 = 2.9999999999999996 -> 3
    local = LocalSGD(4, 2, beta)
    assert local.local_steps(eta) == local_steps_for_beta(beta, eta) == 4
    assert LocalSGD(4, 2, 0.3).local_steps(0.1) == local_steps_for_beta(0.3, 0.1) == 3
    assert ContinuationConfig(rule=LocalSGD(4, 2, 0.3), eta=0.1, sigma=0.1, rounds=1).local_steps == 3
    assert FlipContinuationConfig(LocalSGD(4, 2, 0.3), 0.1, 0.1, rounds=1).local_steps == 3
    assert flipped_labels.flip_configs(0.1, 0.1, seeds=1, checkpoints=2, beta=0.3)["local"].local_steps == 3
