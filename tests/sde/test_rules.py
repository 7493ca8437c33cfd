"""Rules: derived batch sizes, immutability, validation messages, and what each rule means (sde.rules)."""
import dataclasses
import math

import torch

import pytest

from sde import QSR, SGD, LocalSGD, psi


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


# ------------------------------------------------------------------ what each rule means (theory)
def test_local_steps_closed_forms():
    assert SGD(8).local_steps(0.01) == 1
    local = LocalSGD(4, 2, 0.4)
    assert [local.local_steps(eta) for eta in (0.004, 0.003, 0.1, 0.3, 1.0)] == [100, 133, 4, 1, 1]
    assert LocalSGD(4, 2, 0.3).local_steps(0.1) == 3        # 0.3 / 0.1 = 2.9999999999999996: nearest, not floor
    qsr = QSR(4, 2, alpha=0.08)
    # floor((alpha / eta)^2) (Gu et al. 2024): 177.78 -> 177 and 40.96 -> 40, where round would give 178 and 41
    assert [qsr.local_steps(eta) for eta in (0.004, 0.006, 0.0125, 0.01, 0.003)] == [400, 177, 40, 64, 711]
    assert QSR(1, 1, alpha=0.07).local_steps(0.01) == 49    # (0.07 / 0.01)^2 = 48.99999999999999: slack keeps 49
    assert qsr.local_steps(1.0) == 1 and qsr.local_steps(1.0, h_base=4) == 4
    assert QSR(1, 1, alpha=0.2).local_steps(0.07, h_base=4) == 8      # floor(8.16)
    with pytest.raises(ValueError, match="alpha"):
        QSR(4, 2).local_steps(0.01)
    with pytest.raises(ValueError, match="eta"):
        local.local_steps(0.0)
    assert (SGD(8).averages, local.averages, qsr.averages) == (False, True, True)
    assert (SGD(8).local_batch, local.local_batch) == (8, 2)


def test_drift_coefficients_and_weights_closed_forms():
    s = torch.tensor([0.0, 0.02, 1.0, 30.0], dtype=torch.float64)
    assert SGD(8).drift_coefficients() == (1.0, 0.0, None)
    assert LocalSGD(5, 2, 0.3).drift_coefficients(eta=0.01) == (1.0, 4.0, 0.3)     # eta does not enter
    assert QSR(5, 2).drift_coefficients() == (5.0, 0.0, None)
    assert QSR(5, 2, alpha=0.1).drift_coefficients(0.01) == (1.0, 4.0, pytest.approx(1.0))
    torch.testing.assert_close(SGD(8).drift_weight(s), torch.ones_like(s), rtol=0, atol=0)
    torch.testing.assert_close(QSR(5, 2).drift_weight(s), torch.full_like(s, 5.0), rtol=0, atol=0)
    torch.testing.assert_close(LocalSGD(5, 2, 0.3).drift_weight(s), 1 + 4 * psi(0.3 * s), rtol=0, atol=0)
    # finite-eta QSR: Local SGD at beta = alpha^2 / eta (H not rounded); -> K as beta -> inf
    torch.testing.assert_close(QSR(5, 2, alpha=0.1).drift_weight(s, eta=0.01), 1 + 4 * psi(1.0 * s))
    assert float(QSR(5, 2, alpha=10.0).drift_weight(torch.tensor([30.0], dtype=torch.float64), eta=1e-3)) \
        == pytest.approx(5.0, rel=1e-6)
    assert LocalSGD(3, 1, 0.5).drift_weight(2.0) == pytest.approx(1 + 2 * (math.exp(-1.0) - 1 + 1.0) / 1.0)
    with pytest.raises(ValueError, match="alpha"):
        QSR(5, 2).drift_weight(s, eta=0.01)


def test_rule_at_eta_is_the_rule_actually_run():
    local, sgd = LocalSGD(4, 2, 0.4), SGD(8)
    assert local.at_eta(0.004) is local and sgd.at_eta(0.004) is sgd
    qsr = QSR(4, 2, alpha=0.08)
    run = qsr.at_eta(0.006)                    # H = 177, so beta = eta H = 1.062 (not alpha^2 / eta = 1.0667)
    assert run == LocalSGD(4, 2, 0.006 * 177) and run.local_steps(0.006) == 177
    assert qsr.as_local_sgd(0.006, whole_steps=False).beta == pytest.approx(0.08 ** 2 / 0.006, rel=1e-15)
    assert qsr.at_eta(0.004).beta == pytest.approx(0.4 * 4, rel=1e-15) and qsr.at_eta(0.004).local_steps(0.004) == 400


def test_no_rule_type_ladders_outside_rules():
    """What a rule means lives in sde/rules.py: library code asks the rule, it never tests its type."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    ladder = re.compile(r"isinstance\([^()]*,\s*\(?[^)]*\b(SGD|LocalSGD|QSR)\b")
    found = [f"{path.relative_to(root)}:{i}" for pkg in ("sde", "experiments", "dynamics", "benchmarks")
             for path in (root / pkg).rglob("*.py") if path.name != "rules.py" or path.parent.name != "sde"
             for i, line in enumerate(path.read_text().splitlines(), 1) if ladder.search(line)]
    assert found == []
