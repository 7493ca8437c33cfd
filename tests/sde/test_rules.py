"""Rules: derived batch sizes, immutability and validation messages."""
import dataclasses

import pytest

from sde import QSR, SGD, LocalSGD


def test_total_batch_and_workers():
    assert (SGD(64).total_batch, SGD(64).workers) == (64, 1)
    rule = LocalSGD(workers=8, local_batch=16, beta=0.5)
    assert (rule.total_batch, rule.workers) == (128, 8)
    assert rule.round_duration(eta=0.1) == pytest.approx(0.05)       # H eta^2 = beta eta
    qsr = QSR(workers=4, local_batch=32, alpha=0.2)
    assert (qsr.total_batch, qsr.workers) == (128, 4)
    assert qsr.round_duration() == pytest.approx(0.04)              # alpha^2


def test_rules_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SGD(4).batch_size = 8


@pytest.mark.parametrize("make, message", [
    (lambda: SGD(0), "batch_size"),
    (lambda: SGD(-3), "batch_size"),
    (lambda: SGD(2.5), "batch_size"),
    (lambda: SGD(True), "batch_size"),
    (lambda: LocalSGD(0, 4, 1.0), "workers"),
    (lambda: LocalSGD(2.0, 4, 1.0), "workers"),
    (lambda: LocalSGD(2, 0, 1.0), "local_batch"),
    (lambda: LocalSGD(2, 4, 0.0), "beta"),
    (lambda: LocalSGD(2, 4, -1.0), "beta"),
    (lambda: LocalSGD(2, 4, float("inf")), "beta"),
    (lambda: LocalSGD(2, 4, float("nan")), "beta"),
    (lambda: QSR(0, 4), "workers"),
    (lambda: QSR(2, -4), "local_batch"),
    (lambda: QSR(2, 4, alpha=0.0), "alpha"),
])
def test_bad_rules_raise_value_error_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_qsr_round_duration_needs_alpha():
    with pytest.raises(ValueError, match="alpha"):
        QSR(2, 4).round_duration()
