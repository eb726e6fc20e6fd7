"""Summary statistics over seeds, and overhead ratios. Pure pandas/scipy."""
from __future__ import annotations

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
                   group_cols: Sequence[str] = ("batch_size", "hardware")) -> pd.DataFrame:
    """Median timings per configuration and their ratio to the baseline in the same group (batch size, and
    the hardware the trials ran on where results name it: a cluster's nodes may differ).

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
