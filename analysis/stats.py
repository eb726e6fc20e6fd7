"""Summary statistics over seeds, and overhead ratios. Pure pandas/scipy."""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t confidence interval, n); half-width NaN for n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = float(x.mean())
    if n < 2:
        return m, float("nan"), n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return m, half, n


def summarise(df: pd.DataFrame, by: List[str], metric: str, level: float = 0.95) -> pd.DataFrame:
    """One row per group: ``by`` columns, mean, ci (half-width), lo, hi, n of ``metric``."""
    rows = []
    for key, g in df.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        m, h, n = mean_ci(g[metric].tolist(), level)
        rows.append({**dict(zip(by, key)), "mean": m, "ci": h, "lo": m - h if n > 1 else m,
                     "hi": m + h if n > 1 else m, "n": n})
    return pd.DataFrame(rows)


OVERHEAD_COLS = {
    "med_step_time_ms": "step time (ms)",
    "med_epoch_time_s": "epoch time (s)",
    "ot_share": "OT share of step",
    "med_images_per_s": "images/s",
    "peak_mem_mb": "peak memory (MB)",
}


def overhead_table(df: pd.DataFrame, config_cols: List[str], baseline: Optional[pd.Series] = None,
                   group_cols: Sequence[str] = ("dataset", "batch_size", "hardware")) -> pd.DataFrame:
    """Median timings per configuration and their ratio to the baseline in the same group (dataset, batch size,
    and the hardware the trials ran on where results name it: a cluster's nodes may differ).

    Args:
        df: results rows (one per trial) with med_* timing columns.
        config_cols: columns identifying a configuration (e.g. method, beta).
        baseline: boolean mask of baseline rows (SimCLR, or beta = 0); ratios
            are taken against the baseline's median within the same
            ``group_cols`` (batch size, hardware).
    """
    d = df.copy()
    d["ot_share"] = d["med_ot_time_ms"] / d["med_step_time_ms"]
    # a searched batch size is also a configuration column: its ratios are still against the baseline at it
    group_cols = [c for c in group_cols if c in d.columns]
    keys = list(dict.fromkeys(group_cols + config_cols))
    cols = [c for c in OVERHEAD_COLS if c in d.columns]
    grouped = d.groupby(keys, dropna=False)
    table = grouped[cols].median()
    table["n"] = grouped.size()
    table = table.reset_index()
    if baseline is not None and baseline.any():
        if group_cols:
            base = d[baseline].groupby(group_cols, dropna=False)[cols].median().add_suffix("_base").reset_index()
            table = table.merge(base, on=group_cols, how="left")
        else:
            for c in cols:
                table[f"{c}_base"] = d.loc[baseline, c].median()
        for c in cols:
            if c != "ot_share":
                table[f"{c}_ratio"] = table[c] / table[f"{c}_base"]
        table = table.drop(columns=[f"{c}_base" for c in cols])
    return table


# --------------------------------------------------------------------------- paired verdicts

ALPHA = 0.05  # the study's family-wise error rate: Holm over its configurations
POWER = 0.80  # the power at which the smallest detectable difference is stated
# a verdict, or why there is none: fewer than 2 seed pairs; differences that are all equal (a t-test has no
# spread to go on: with accuracies on a grid of 1/n, two seeds can differ by the same amount)
VERDICTS = ("better", "worse", "no detectable difference", "too few pairs", "no spread in the differences",
            "no baseline at its knobs")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN and is not counted."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_t(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float, int]:
    """(mean, CI lower, CI upper, two-sided p, n) of the one-sample t-test of paired differences against 0;
    NaN interval and p for n < 2, and for differences that are all equal (no spread: no test)."""
    d = np.asarray([v for v in diffs if v is not None and np.isfinite(v)], dtype=float)
    n = len(d)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    mean = float(d.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan"), n
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    if se == 0:
        return mean, float("nan"), float("nan"), float("nan"), n
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return mean, mean - half, mean + half, p, n


def detectable_difference(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test of n pairs at level ``alpha`` detects with
    probability ``power``, for differences of standard deviation ``sd``: the delta with
    P(|T| > t_{1-alpha/2, n-1}) = power, T noncentral t with n - 1 degrees of freedom and noncentrality
    delta sqrt(n) / sd (exact, not the normal approximation). NaN for n < 2; 0 for sd = 0."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    return float(sd * _unit_detectable(int(n), float(alpha), float(power)))


@functools.lru_cache(maxsize=256)
def _unit_detectable(n: int, alpha: float, power: float) -> float:
    """:func:`detectable_difference` for sd = 1 (it scales with sd), solved once per design."""
    from scipy.optimize import brentq

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:
        lower = stats.nct.cdf(-crit, df, nc)  # the wrong-sign tail: ~0 here, NaN in scipy far out in nc
        return stats.nct.sf(crit, df, nc) + (lower if np.isfinite(lower) else 0.0) - power

    hi = crit + 5.0
    while shortfall(hi) < 0:
        hi *= 2
    return brentq(shortfall, 0.0, hi, xtol=1e-10) / math.sqrt(n)


def paired_verdicts(df: pd.DataFrame, config_cols: List[str], metric: str, baseline: pd.Series,
                    match_cols: Sequence[str] = (), *, alpha: float = ALPHA, power: float = POWER,
                    higher_is_better: bool = True) -> pd.DataFrame:
    """Every configuration against the baseline, paired by seed.

    For each configuration (``config_cols``) that is not the baseline, the baseline's trial with the same seed
    (and the same ``match_cols``, e.g. the batch size: SimCLR at the same shared knobs) is its pair; the
    differences ``metric(config) - metric(baseline)`` give the mean difference, its 95% Student-t interval and
    the two-sided p-value of the paired t-test. The p-values are Holm-corrected over the study's
    configurations (family-wise error ``alpha``), and the verdict is ``better`` / ``worse`` where the corrected
    p is below ``alpha``, else ``no detectable difference`` (or, without a test, ``too few pairs`` / ``no
    spread in the differences``; ``no baseline at its knobs`` where no baseline trial matches). Each
    configuration must meet one baseline configuration per seed: a baseline that varies in a column the match
    columns leave out would be averaged over it (:class:`ValueError`). ``mde``: the smallest difference this design
    could detect with probability ``power`` at the Bonferroni level alpha / m (Holm's first step), from the
    observed spread of the differences.

    Args:
        df: one row per completed trial with ``seed``, the config columns, match columns and ``metric``.
        baseline: boolean mask of the baseline's rows (SimCLR, or the method at weight 0).
    Returns:
        one row per configuration: the config columns, ``pairs``, ``diff``, ``diff_lo``, ``diff_hi``, ``p``,
        ``p_holm``, ``verdict``, ``mde``.
    """
    cols = ["pairs", "diff", "diff_lo", "diff_hi", "p", "p_holm", "verdict", "mde"]
    if metric not in df.columns or not baseline.any():
        return pd.DataFrame(columns=list(config_cols) + cols)
    match = [c for c in match_cols if c in df.columns]
    keys = match + ["seed"]
    grouped = df[baseline].groupby(keys, dropna=False)
    loose = [c for c in config_cols if c not in keys and c in df.columns and grouped[c].nunique(dropna=False).max() > 1]
    if loose:
        raise ValueError(f"the baseline varies in {', '.join(loose)} at one seed: match on it (match_cols)")
    base = grouped[metric].mean().reset_index().rename(columns={metric: "_base"})
    pairs = df[~baseline][list(dict.fromkeys(config_cols + keys)) + [metric]].merge(base, on=keys, how="left")
    pairs["_d"] = pairs[metric] - pairs["_base"]
    rows = []
    for key, g in pairs.groupby(config_cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        diffs = g["_d"].to_numpy()
        mean, lo, hi, p, n = paired_t(diffs)
        sd = float(np.std(diffs[np.isfinite(diffs)], ddof=1)) if n > 1 else float("nan")
        rows.append({**dict(zip(config_cols, key)), "pairs": n, "diff": mean, "diff_lo": lo, "diff_hi": hi, "p": p,
                     "_sd": sd, "_met": bool(g["_base"].notna().any())})
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=list(config_cols) + cols)
    out["p_holm"] = holm(out["p"].tolist())
    m = int(np.isfinite(out["p"]).sum()) or 1
    out["mde"] = [detectable_difference(sd, n, alpha / m, power) for sd, n in zip(out["_sd"], out["pairs"])]
    sign = 1.0 if higher_is_better else -1.0
    out["verdict"] = [
        ("better" if sign * d > 0 else "worse") if np.isfinite(ph) and ph < alpha else
        "no detectable difference" if np.isfinite(ph) else "no baseline at its knobs" if not met else
        "too few pairs" if n < 2 else "no spread in the differences"
        for d, ph, n, met in zip(out["diff"], out["p_holm"], out["pairs"], out["_met"])]
    return out[list(config_cols) + cols]
