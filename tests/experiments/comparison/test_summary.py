"""experiments.comparison.summary: the accepted eta -> 0 fit and the per-rule summary, on rows whose answer is known
(ratios built from exact lines and parabolas in eta)."""
import math

import numpy as np
import pytest

from experiments.comparison.summary import fit_to_zero_eta, summarize

ETAS = [0.002, 0.004, 0.008]


def test_an_acceptable_line_is_kept_and_its_intercept_is_exact():
    fit = fit_to_zero_eta(ETAS, [1 + 3 * e for e in ETAS], [0.01] * 3)
    assert fit.fit == "line" and fit.value == pytest.approx(1, abs=1e-12) and fit.line_p > 0.99
    # the stderr of a weighted line's intercept: sqrt(sum a_k^2 s_k^2) with r0 = a . values
    design = np.vander(ETAS, 2, increasing=True)
    a = np.linalg.pinv(design)[0]
    assert fit.stderr == pytest.approx(0.01 * float(np.sqrt((a ** 2).sum())), rel=1e-12)


def test_a_rejected_line_falls_back_to_degree_2_or_to_richardson():
    parabola = lambda e: 1 - 5 * e + 4000 * e ** 2                       # noqa: E731
    four = ETAS + [0.016]
    fit = fit_to_zero_eta(four, [parabola(e) for e in four], [1e-4] * 4)
    assert fit.fit == "degree 2" and fit.value == pytest.approx(1, abs=1e-10) and fit.line_p < 0.05
    fit = fit_to_zero_eta(ETAS, [parabola(e) for e in ETAS], [1e-4, 2e-4, 3e-4])
    e1, e2 = ETAS[:2]
    v1, v2 = parabola(e1), parabola(e2)
    assert fit.fit == "richardson" and fit.value == pytest.approx((e2 * v1 - e1 * v2) / (e2 - e1), rel=1e-12)
    assert fit.stderr == pytest.approx(math.hypot(e2 * 1e-4, e1 * 2e-4) / (e2 - e1), rel=1e-12)
    assert fit_to_zero_eta([0.004, 0.002], [1.0, 2.0], [0.1, 0.1]).value == pytest.approx(3.0)   # any order
    with pytest.raises(ValueError, match="distinct"):
        fit_to_zero_eta([0.002, 0.002, 0.004], [1, 1, 1], [0.1] * 3)


def _row(rule, workers, eta, predicted_path, factor, *, stderr=0.5, predicted=None):
    return dict(rule=rule, workers=workers, eta=eta, noise="gaussian:0.1", seeds=3, predicted_path=predicted_path,
                predicted=predicted if predicted is not None else predicted_path, measured=predicted_path * factor,
                stderr=stderr)


def test_summary_rows_ratios_and_local_over_sgd():
    """SGD measured = path x (1 + 2 eta), Local = 0.9 x path x (1 + 2 eta), QSR read against its rate at zeta
    (no path: NaN) = 1.05 x (1 - eta): ratios at eta -> 0 of 1, 0.9 and 1.05, Local / SGD 0.9."""
    rows = []
    for e in ETAS:
        rows += [_row("SGD(batch_size=8)", 1, e, -100.0, 1 + 2 * e),
                 _row("LocalSGD(workers=4, local_batch=2, beta=0.5)", 4, e, -250.0, 0.9 * (1 + 2 * e)),
                 _row("QSR(workers=4, local_batch=2, alpha=0.1)", 4, e, math.nan, 1.0, predicted=-400.0)]
        rows[-1]["measured"] = -400.0 * 1.05 * (1 - e)
    out = summarize(rows, n=2000, image_size=32, dim=51033)
    by = {r["rule"].split("(")[0]: r for r in out["rules"]}
    assert by["SGD"]["ratio_eta0"] == pytest.approx(1, abs=1e-10) and by["SGD"]["fit"] == "line"
    assert by["LocalSGD"]["ratio_eta0"] == pytest.approx(0.9, abs=1e-10)
    assert by["QSR"]["ratio_eta0"] == pytest.approx(1.05, abs=1e-10)
    assert by["SGD"]["ratio_per_eta_se"][0] == pytest.approx(0.5 / 100)
    assert {k: by["SGD"][k] for k in ("n", "image_size", "D", "noise")} == dict(n=2000, image_size=32, D=51033,
                                                                               noise="gaussian:0.1")
    local = out["local_over_sgd_eta0"]["LocalSGD(workers=4, local_batch=2, beta=0.5)"]
    assert local["value"] == pytest.approx(0.9, abs=1e-10)
    expected_se = 0.9 * math.hypot(by["LocalSGD"]["ratio_eta0_se"] / 0.9, by["SGD"]["ratio_eta0_se"])
    assert local["se"] == pytest.approx(expected_se, rel=1e-9)
    with pytest.raises(ValueError, match="measured rows"):
        summarize([dict(rows[0], seeds=0)], n=1, image_size=1, dim=1)
    with pytest.raises(ValueError, match="noise"):
        summarize([rows[0], dict(rows[1], noise="flip:0.1")], n=1, image_size=1, dim=1)
