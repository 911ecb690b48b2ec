"""Intervals over runs: the mean, the standard deviation, a percentile-bootstrap interval of the mean, and the
corrected resampled t interval for cross-validation (Nadeau & Bengio 2003), the one to quote when runs share
training posts. numpy (and scipy for t); no torch.
"""
from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the values resampled with replacement n_boot times."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    means = values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def corrected_t_ci(values, test_train_ratio: float, level: float = 0.95) -> tuple[float | None, float | None]:
    """Corrected resampled t interval of the mean of cross-validation scores (Nadeau & Bengio 2003;
    Bouckaert & Frank 2004 for repeated folds): the runs' training sets overlap, so their scores are
    correlated, and the variance of the mean is (1/n + n_test/n_train) s^2, not s^2/n."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None, None  # no spread to scale
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * math.sqrt(
        (1 / len(values) + test_train_ratio) * values.var(ddof=1))
    return float(values.mean() - half), float(values.mean() + half)


def summarize(values, n_boot: int = 10000, test_train_ratio: float | None = None) -> dict:
    """mean, sample standard deviation and bootstrap 95% interval of the finite values; with
    `test_train_ratio` (cross-validation) also the corrected t interval."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0}
    low, high = bootstrap_ci(v, n_boot=n_boot)
    out = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
           "ci_low": low, "ci_high": high, "n": len(v)}
    if test_train_ratio is not None:
        out["ci_corrected_low"], out["ci_corrected_high"] = corrected_t_ci(v, test_train_ratio)
    return out


def summarize_runs(metrics: list[dict], n_boot: int = 10000, test_train_ratio: float | None = None) -> dict[str, dict]:
    """summarize() of every float metric (in first-seen order) over a list of metric dicts."""
    names = list(dict.fromkeys(k for m in metrics for k, v in m.items() if isinstance(v, float)))
    return {k: summarize([m.get(k) for m in metrics], n_boot, test_train_ratio) for k in names}
