"""Hyperparameter importance with Optuna's PED-ANOVA, from a results table.

Only completed trials count (pruned trials carry a low-fidelity value and
failed ones none). Every trial is one observation; the seed is not a
hyperparameter. The study is rebuilt in memory from the table, so the
importance also works for grid studies that never used Optuna.
"""
from __future__ import annotations

import math
from typing import Dict, List

import pandas as pd

LOG_KNOBS = {"eps", "tau", "lr", "uot_lambda1", "uot_lambda2", "weight_decay"}
UNSET = "unset"  # the value of a knob a trial's case does not set


def _distribution(values: pd.Series, knob: str):
    import optuna

    vals = values.dropna()
    numeric = pd.api.types.is_numeric_dtype(vals) and not pd.api.types.is_bool_dtype(vals)
    if numeric and vals.nunique() > 1:
        lo, hi = float(vals.min()), float(vals.max())
        log = knob in LOG_KNOBS and lo > 0
        return optuna.distributions.FloatDistribution(lo, hi, log=log), float
    choices = tuple(sorted(str(v) for v in vals.unique()))
    return optuna.distributions.CategoricalDistribution(choices), str


def param_importances(results: pd.DataFrame, knobs: List[str], metric: str, mode: str = "max") -> Dict[str, float]:
    """{knob: importance} (sums to 1) over the completed trials; empty if fewer than 4 or no varying knob."""
    import optuna

    done = results[(results["status"] == "completed") & results[metric].notna()].copy()
    knobs = [k for k in knobs if k in done.columns and done[k].nunique(dropna=False) > 1]
    if len(done) < 4 or not knobs:
        return {}
    for k in knobs:  # a knob only some cases set (IOT-CL's K, for U(a,b) only): "unset" is one more category
        if done[k].isna().any():
            done[k] = done[k].map(lambda v: UNSET if pd.isna(v) else str(v))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {k: _distribution(done[k], k) for k in knobs}
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in done.iterrows():
        params = {k: cast(row[k]) for k, (d, cast) in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: d for k, (d, _) in dists.items()},
                                                  value=float(row[metric])))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    imp = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    return {k: (0.0 if math.isnan(v) else float(v)) for k, v in imp.items()}
