"""The report's tables: results by configuration, paired verdicts against the baseline, how hard the OT term
pulled, and what each method as run is. Pure pandas on the exported results (one row per trial).

The claim a study makes is a paired comparison (docs/methods.md, "Verdicts"): each configuration against the
baseline at the same seed, which fixes the initialisation, the data order and the augmentations
(tests/test_trainable.py checks that it does), Holm-corrected over the study's configurations.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from trainables.catalog import METHOD_INFO, knob_owners

from .stats import ALPHA, POWER, mean_ci, paired_verdicts

# the three frozen-feature probes every trial reports on the test split, in the order the tables show them
PROBES = {"test_knn_acc": "kNN", "test_knn5_acc": "5-NN", "test_linear_acc": "linear"}
# the validation metric a spec searches on -> its test-split counterpart, the study's primary comparison
PRIMARY = {"knn_acc": "test_knn_acc", "knn5_acc": "test_knn5_acc", "linear_acc": "test_linear_acc"}


def config_cols(knobs: List[str]) -> List[str]:
    """The columns that name a configuration: the swept knobs, and the method."""
    return (["method"] if "method" not in knobs else []) + knobs


def baseline_mask(df: pd.DataFrame) -> pd.Series:
    """The baseline's trials: SimCLR where the study runs it; otherwise the method with its regulariser off,
    which is the same loss (SinSim at beta = 0; IOT-CL under U(a) with lambda_p = 0, SimCLR at tau = eps)."""
    mask = pd.Series(False, index=df.index)
    if "method" not in df.columns:
        return mask
    if (df["method"] == "simclr").any():
        return df["method"] == "simclr"
    if "beta" in df.columns:
        mask |= (df["method"] == "sinsim") & (df["beta"] == 0)
    if "lambda_p" in df.columns:
        relax = df["relaxation"] if "relaxation" in df.columns else pd.Series("Ua", index=df.index)
        mask |= (df["method"] == "iot_cl") & (df["lambda_p"] == 0) & relax.fillna("Ua").eq("Ua")
    return mask


def primary_metric(spec: Dict[str, Any]) -> str:
    """The test-split probe a study's verdict is about: the counterpart of the metric it searched on."""
    metric = str(spec.get("metric", "knn_acc"))
    return PRIMARY.get(metric, metric if metric in PROBES else "test_linear_acc")


def shared_knobs(knobs: List[str]) -> List[str]:
    """The swept knobs that no method owns (batch size, learning rate, ...): a configuration is compared with
    the baseline at the same values of these."""
    owners = knob_owners()
    return [k for k in knobs if k != "method" and k not in owners]


def knn_description(res: pd.DataFrame) -> str:
    """How the kNN probe was run, e.g. "weighted kNN, k = 20": the k the trials used (``knn_k_used``)."""
    ks = sorted({int(k) for k in res.get("knn_k_used", pd.Series(dtype=float)).dropna()})
    return "weighted kNN" + (f", k = {', '.join(map(str, ks))}" if ks else "")


def _pm(values) -> str:
    mu, h, n = mean_ci(list(values))
    if n == 0:
        return ""
    return f"{100 * mu:.2f} ± {100 * h:.2f}" if n > 1 else f"{100 * mu:.2f}"


def summary_table(done: pd.DataFrame, cfg_cols: List[str]) -> pd.DataFrame:
    """One row per configuration: n, each probe's test accuracy and the validation kNN (mean ± 95% CI half-width
    over seeds, in %), and the regulariser's strength at the last epoch (means over seeds): ``reg_loss`` (its
    value, e.g. beta * W), ``reg_share`` (that over the rest of the loss) and ``reg_grad_ratio`` (its gradient's
    norm on the encoder features over the rest's)."""
    rows = []
    for keys, g in done.groupby(cfg_cols, dropna=False, sort=True) if cfg_cols and len(done) else []:
        keys = keys if isinstance(keys, tuple) else (keys,)
        row: Dict[str, Any] = {**dict(zip(cfg_cols, keys)), "n": len(g)}
        for m in list(PROBES) + ["knn_acc"]:
            if m in g.columns:
                row[m] = _pm(g[m])
        if "reg_loss" in g.columns and g["reg_loss"].notna().any():
            main = g["train_loss"] - g["reg_loss"]
            row["reg_loss"] = float(g["reg_loss"].mean())
            row["reg_share"] = float((g["reg_loss"] / main).mean())
            row["reg_grad_ratio"] = float(g["reg_grad_ratio"].mean()) if "reg_grad_ratio" in g.columns else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def cross_dataset_table(done: pd.DataFrame, cfg_cols: List[str], metric: str) -> pd.DataFrame:
    """For a study that spans datasets: a configuration (without its dataset) per row, a dataset per column,
    ``metric`` as mean ± 95% CI half-width over seeds in %; empty for a study on one dataset."""
    if "dataset" not in cfg_cols or metric not in done.columns or done["dataset"].nunique() < 2:
        return pd.DataFrame()
    rows = [c for c in cfg_cols if c != "dataset"]
    cells = {}
    for keys, g in done.groupby(rows + ["dataset"], dropna=False, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        cells.setdefault(keys[:-1], {})[keys[-1]] = _pm(g[metric])
    datasets = sorted(done["dataset"].dropna().unique())
    return pd.DataFrame([{**dict(zip(rows, key)), **{d: cell.get(d, "") for d in datasets}}
                         for key, cell in cells.items()])


def verdict_table(done: pd.DataFrame, cfg_cols: List[str], knobs: List[str]) -> pd.DataFrame:
    """Every non-baseline configuration against the baseline, paired by seed at the same shared knobs, for
    each probe (Holm over the configurations within a probe): one row per configuration with, per probe
    ``<probe>_diff``, ``_diff_lo``, ``_diff_hi`` (percentage points), ``_p``, ``_p_holm``, ``_verdict``,
    ``_mde`` (points), and the number of seed pairs. Empty when the study has no baseline."""
    base = baseline_mask(done)
    if not base.any() or base.all():
        return pd.DataFrame()
    out: Optional[pd.DataFrame] = None
    for metric in PROBES:
        if metric not in done.columns:
            continue
        v = paired_verdicts(done, cfg_cols, metric, base, shared_knobs(knobs))
        for c in ("diff", "diff_lo", "diff_hi", "mde"):
            v[c] = 100 * v[c].astype(float)
        v = v.rename(columns={c: f"{metric}_{c}" for c in ("diff", "diff_lo", "diff_hi", "p", "p_holm",
                                                          "verdict", "mde")})
        out = v if out is None else out.merge(v.drop(columns="pairs"), on=cfg_cols, how="outer")
    return out if out is not None else pd.DataFrame()


def verdict_page_table(verdicts: pd.DataFrame, cfg_cols: List[str], primary: str) -> pd.DataFrame:
    """The verdicts as the page shows them, one row per configuration and probe (the primary probe first):
    the seed pairs, "Δ [95% CI]" in points, Holm's p, the verdict and the smallest detectable difference."""
    if verdicts.empty:
        return verdicts
    rows = []
    probes = [m for m in sorted(PROBES, key=lambda m: m != primary) if f"{m}_diff" in verdicts.columns]
    for _, v in verdicts.iterrows():
        for metric in probes:
            d, lo, hi, ph, mde = (v[f"{metric}_{c}"] for c in ("diff", "diff_lo", "diff_hi", "p_holm", "mde"))
            rows.append({**{c: v[c] for c in cfg_cols},
                         "probe (test)": PROBES[metric] + (" (primary)" if metric == primary else ""),
                         "pairs": v["pairs"],
                         "Δ points [95% CI]": "" if not np.isfinite(d) else
                         (f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else f"{d:+.2f}"),
                         "p (Holm)": f"{ph:.3g}" if np.isfinite(ph) else "",
                         "verdict": v[f"{metric}_verdict"],
                         "detectable (80%)": f"±{mde:.2f}" if np.isfinite(mde) else ""})
    return pd.DataFrame(rows)


def methods_as_run(methods: List[str]) -> List[str]:
    """One line per method of the study: its source and, where otstudy's form differs from a public
    implementation, how (``MethodInfo.note``)."""
    lines = []
    for m in methods:
        info = METHOD_INFO.get(m)
        if info is not None:
            lines.append(f"{m}: {info.paper}" + (f". {info.note}" if info.note else ""))
    return lines


VERDICT_NOTE = (f"Each configuration against the baseline at the same seed (the same initialisation, data order "
                f"and augmentations) and the same shared knobs: the mean paired difference in percentage points "
                f"with its 95% Student-t interval, the paired t-test's p-value Holm-corrected over the study's "
                f"configurations (family-wise error {ALPHA:g}), and the verdict: better or worse where that p is "
                f"below {ALPHA:g}, else no detectable difference. \"detectable\": the smallest true difference "
                f"this design (its seeds and the observed spread of its paired differences) would find with "
                f"{100 * POWER:.0f}% power at Holm's first-step level; a smaller true difference may well exist.")
