"""The eta -> 0 summary of one point's rows: what RESULTS.md section 2 quotes and `summary.json` holds.

For every rule, the ratio measured / predicted d tr H / dt along the predicted path (the path of the rule as run at
eta, fitted over the same checkpoints as the measurement; the rate at zeta where no path was integrated), with
standard error stderr / |predicted|, is extrapolated to eta -> 0 by the accepted fit (`fit_to_zero_eta`): the
weighted line when its chi^2 is acceptable (p >= 0.05), else the weighted degree-2 polynomial (4+ etas), else the
Richardson line through the two smallest eta. Local SGD and QSR are also set against SGD:
`local_over_sgd_eta0` = (measured Local / SGD) / (predicted Local / SGD) = ratio_eta0(rule) / ratio_eta0(SGD), which
is 1 where the theory holds.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import chi2 as chi2_law

from sde.analysis import extrapolate_to_zero

__all__ = ["ZeroEtaFit", "fit_to_zero_eta", "compared_with", "ratio_points", "fit_quotient", "summarize",
           "summary_lines", "write_summary", "ACCEPT_P"]

ACCEPT_P = 0.05      # a weighted line is accepted when P(chi^2 >= its chi^2) >= ACCEPT_P


@dataclass(frozen=True)
class ZeroEtaFit:
    """value +- stderr at eta = 0 by `fit` ("line", "degree 2", "richardson" (two smallest eta) or "single eta"),
    and the p-value of the weighted line's chi^2 (NaN with fewer than 3 etas)."""
    value: float
    stderr: float
    fit: str
    line_p: float


def _richardson(etas: np.ndarray, values: np.ndarray, stderrs: np.ndarray) -> tuple[float, float]:
    """The line through the two smallest eta at 0, its standard error from independent stderrs."""
    (e1, e2), (v1, v2), (s1, s2) = etas[:2], values[:2], stderrs[:2]
    return (e2 * v1 - e1 * v2) / (e2 - e1), math.hypot(e2 * s1, e1 * s2) / (e2 - e1)


def fit_to_zero_eta(etas, values, stderrs, *, accept_p: float = ACCEPT_P) -> ZeroEtaFit:
    """The accepted extrapolation of values (n,) +- stderrs (n,) measured at etas (n,) to eta = 0 (module
    docstring). One eta: that value itself ("single eta"); stderrs must be positive."""
    order = np.argsort(np.asarray(etas, dtype=float))
    etas, values, stderrs = (np.asarray(a, dtype=float)[order] for a in (etas, values, stderrs))
    if len(set(etas.tolist())) != len(etas):
        raise ValueError(f"the etas must be distinct, got {etas.tolist()}")
    if len(etas) == 1:
        return ZeroEtaFit(float(values[0]), float(stderrs[0]), "single eta", math.nan)
    if len(etas) == 2:
        return ZeroEtaFit(*_richardson(etas, values, stderrs), "richardson", math.nan)
    line = extrapolate_to_zero(etas, values, stderrs, degree=1)
    p = float(chi2_law.sf(line.residual_chi2, len(etas) - 2))
    if p >= accept_p:
        return ZeroEtaFit(line.value, line.stderr, "line", p)
    if len(etas) >= 4:
        quadratic = extrapolate_to_zero(etas, values, stderrs, degree=2)
        return ZeroEtaFit(quadratic.value, quadratic.stderr, "degree 2", p)
    return ZeroEtaFit(*_richardson(etas, values, stderrs), "richardson", p)


def _as_dict(row) -> dict:
    return dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row)


def compared_with(row, key: str = "trace") -> float:
    """What a row's measured rate is compared with: the predicted path's fitted slope where one was integrated,
    else the rate at zeta. key: "trace" (d tr H/dt) or "lambda_max"."""
    r = _as_dict(row)
    suffix = "" if key == "trace" else "_lambda_max"
    path = r.get("predicted" + suffix + "_path")
    return r["predicted" + suffix] if path is None or not math.isfinite(path) else path


def ratio_points(rows) -> tuple[list, list, list]:
    """(etas, measured / compared_with, stderr / |compared_with|) of rows (`compare.Row`s or JSON dicts), in order."""
    etas, ratios, errors = [], [], []
    for r in map(_as_dict, rows):
        predicted = compared_with(r)
        etas.append(r["eta"])
        ratios.append(r["measured"] / predicted)
        errors.append(r["stderr"] / abs(predicted))
    return etas, ratios, errors


def fit_quotient(fit: ZeroEtaFit, baseline: ZeroEtaFit) -> tuple[float, float]:
    """fit.value / baseline.value and its standard error (independent runs: relative errors in quadrature),
    e.g. (Local / SGD) measured over predicted at eta -> 0."""
    value = fit.value / baseline.value
    return value, abs(value) * math.hypot(fit.stderr / fit.value, baseline.stderr / baseline.value)


def summarize(rows, *, n: int, image_size: int, dim: int, accept_p: float = ACCEPT_P) -> dict:
    """rows (`compare.Row`s or their JSON dicts) of one point and noise, measured (seeds >= 1) -> the summary:
    {"rules": [{rule, n, image_size, D, noise, workers, etas, ratio_per_eta, ratio_per_eta_se, ratio_eta0,
    ratio_eta0_se, fit, line_p}, ...], "local_over_sgd_eta0": {rule: {value, se}}} (module docstring; the second
    needs exactly one SGD rule, workers = 1). ValueError on rows of several noise models or without runs."""
    rows = [_as_dict(r) for r in rows]
    if not rows or any(r["seeds"] < 1 for r in rows):
        raise ValueError("summarize needs measured rows (seeds >= 1); predictions-only rows have no ratio")
    noises = {r["noise"] for r in rows}
    if len(noises) != 1:
        raise ValueError(f"rows of one point and noise model expected, got noises {sorted(noises)}")
    by_rule: dict[str, list[dict]] = {}
    for r in rows:
        by_rule.setdefault(r["rule"], []).append(r)
    rules, fits = [], {}
    for rule, group in by_rule.items():
        etas, ratios, errors = ratio_points(sorted(group, key=lambda r: r["eta"]))
        fit = fits[rule] = fit_to_zero_eta(etas, ratios, errors, accept_p=accept_p)
        rules.append(dict(rule=rule, n=n, image_size=image_size, D=dim, noise=rows[0]["noise"],
                          workers=group[0].get("workers", 1), etas=etas, ratio_per_eta=ratios,
                          ratio_per_eta_se=errors, ratio_eta0=fit.value, ratio_eta0_se=fit.stderr, fit=fit.fit,
                          line_p=fit.line_p))
    baseline = [r for r in rules if r["workers"] == 1]
    local_over_sgd = {}
    if len(baseline) == 1:
        sgd = baseline[0]
        for r in rules:
            if r["workers"] > 1:
                value, se = fit_quotient(fits[r["rule"]], fits[sgd["rule"]])
                local_over_sgd[r["rule"]] = dict(value=value, se=se, sgd=sgd["rule"])
    return dict(rules=rules, local_over_sgd_eta0=local_over_sgd)


def summary_lines(summary: dict) -> list[str]:
    """The summary as printed by the command lines: one line per rule (at eta -> 0, or at its one eta), one per
    Local / SGD ratio."""
    def where(r: dict) -> str:
        return "at eta -> 0" if len(r["etas"]) > 1 else f"at eta = {r['etas'][0]:.3g} only"
    lines = [f"{r['rule']:46s} measured / predicted {where(r)}: {r['ratio_eta0']:.4f} +- {r['ratio_eta0_se']:.2g} "
             f"({r['fit']})" for r in summary["rules"]]
    return lines + [f"{rule:46s} (Local / SGD) measured / predicted: {r['value']:.4f} +- {r['se']:.2g}"
                    for rule, r in summary["local_over_sgd_eta0"].items()]


def write_summary(path: str | Path, summary: dict, *, provenance: dict | None = None) -> None:
    """summary (and provenance: config, git revision, date) as JSON at path, atomically; NaN as null."""
    from experiments.metrics import atomic_write_bytes, finite_or_none
    record = {**summary, **({"provenance": provenance} if provenance else {})}
    atomic_write_bytes(path, (json.dumps(finite_or_none(record), indent=1, sort_keys=True) + "\n").encode())
