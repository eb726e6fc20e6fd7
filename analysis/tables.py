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

from trainables.catalog import METHOD_INFO, knob_owners, method_defaults

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
    if "method" not in df.columns:
        return pd.Series(False, index=df.index)
    if (df["method"] == "simclr").any():
        return df["method"] == "simclr"
    return (((df["method"] == "sinsim") & _as_run(df, "beta").eq(0))
            | ((df["method"] == "iot_cl") & _as_run(df, "lambda_p").eq(0) & _as_run(df, "relaxation").eq("Ua")))


def _as_run(df: pd.DataFrame, knob: str) -> pd.Series:
    """``df[knob]`` with the value each trial's method ran where the study left the knob unset (NaN, or no
    column): e.g. IOT-CL's lambda_p is 0 unless a spec sets it."""
    given = df[knob] if knob in df.columns else pd.Series(np.nan, index=df.index, dtype=object)
    default = df["method"].map(lambda m: method_defaults(m).get(knob) if isinstance(m, str) else None)
    return given.astype(object).where(given.notna(), default)


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


def verdict_table(done: pd.DataFrame, cfg_cols: List[str], knobs: List[str],
                  trials: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Every non-baseline configuration against the baseline, paired by seed, for each probe (Holm over the
    configurations within a probe): one row per configuration with, per probe ``<probe>_pairs``, ``_diff``,
    ``_diff_lo``, ``_diff_hi`` (percentage points), ``_p``, ``_p_holm``, ``_verdict`` and ``_mde`` (points).
    Empty when the study has no baseline.

    A configuration meets the baseline at the same seed and the same value of every shared knob (batch size,
    learning rate, ...), of every configuration column a method's baseline trials vary in (SimCLR's tau where a
    study sweeps tau for SimCLR and SinSim alike), and of the method where each method's baseline is itself at
    weight 0 (SinSim against SinSim at beta = 0, IOT-CL against IOT-CL under U(a) with lambda_p = 0).
    ``trials``: every trial of the study, whatever its status; a configuration with a seed that did not complete
    (pruned, failed or still running) gets no verdict, as the seeds that did complete are a selection of them
    ("withheld: ..."), and is left out of Holm's family.
    """
    base = baseline_mask(done)
    if not base.any() or base.all():
        return pd.DataFrame()
    per_method = done[base].groupby("method", dropna=False) if "method" in done.columns else None
    varying = [c for c in cfg_cols if (c == "method" and done.loc[base, c].nunique() > 1)
               or (c != "method" and per_method is not None and (per_method[c].nunique(dropna=False) > 1).any())]
    match = list(dict.fromkeys(shared_knobs(knobs) + varying))
    held = _incomplete(trials, done, cfg_cols)
    if len(held):
        withheld = set(_keys(held, cfg_cols))
        keep = pd.Series([k not in withheld for k in _keys(done, cfg_cols)], index=done.index) | base
        done, base = done[keep], base[keep]
    out: Optional[pd.DataFrame] = None
    for metric in PROBES:
        if metric not in done.columns:
            continue
        v = paired_verdicts(done, cfg_cols, metric, base, match)
        for c in ("diff", "diff_lo", "diff_hi", "mde"):
            v[c] = 100 * v[c].astype(float)
        v = v.rename(columns={c: f"{metric}_{c}" for c in ("pairs", "diff", "diff_lo", "diff_hi", "p", "p_holm",
                                                          "verdict", "mde")})
        if len(held):
            v = pd.concat([v, held[cfg_cols].assign(**{f"{metric}_pairs": 0,
                                                       f"{metric}_verdict": held["withheld"]})], ignore_index=True)
        out = v if out is None else out.merge(v, on=cfg_cols, how="outer")
    return out if out is not None else pd.DataFrame()


def _keys(df: pd.DataFrame, cols: List[str]) -> List[tuple]:
    """Each row's values of ``cols`` as a tuple, NaN as None (NaN != NaN would match no row)."""
    return [tuple(None if pd.isna(v) else v for v in row) for row in df[cols].itertuples(index=False, name=None)]


def _incomplete(trials: Optional[pd.DataFrame], done: pd.DataFrame, cfg_cols: List[str]) -> pd.DataFrame:
    """The non-baseline configurations with a trial that did not complete: their config columns and the
    verdict they get instead ("withheld: 2 of 5 seeds did not complete (pruned 1, failed 1)")."""
    if trials is None or trials.empty or "status" not in trials.columns:
        return pd.DataFrame(columns=cfg_cols + ["withheld"])
    trials = trials[~baseline_mask(trials)]
    rows = []
    for key, g in trials.groupby(cfg_cols, dropna=False, sort=True):
        open_ = g[g["status"] != "completed"]
        if len(open_):
            why = ", ".join(f"{s} {n}" for s, n in sorted(open_["status"].value_counts().items()))
            rows.append({**dict(zip(cfg_cols, key if isinstance(key, tuple) else (key,))),
                         "withheld": f"withheld: {len(open_)} of {len(g)} seeds did not complete ({why})"})
    return pd.DataFrame(rows, columns=cfg_cols + ["withheld"])


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
                         "pairs": v[f"{metric}_pairs"],
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
                f"below {ALPHA:g}, else no detectable difference; a configuration with a seed that did not complete "
                f"is withheld (its completed seeds are a selection). \"detectable\": the smallest true difference "
                f"this design (its seeds and the observed spread of its paired differences) would find with "
                f"{100 * POWER:.0f}% power at Holm's first-step level; a smaller true difference may well exist.")
