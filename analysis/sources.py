"""Where a report's tables come from: a study directory's Parquet files, or an MLflow experiment.

Both give the same four things: ``results`` (one row per trial), ``history``
(one row per trial-epoch), the ``spec`` dict and ``meta`` (expected trial
count, git revision).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import pandas as pd
import yaml

Study = Tuple[pd.DataFrame, pd.DataFrame, Dict[str, Any], Dict[str, Any]]


class EmptyStudy(ValueError):
    pass


def from_study_dir(study_dir: Path) -> Study:
    study_dir = Path(study_dir)
    res_p, hist_p = study_dir / "results.parquet", study_dir / "history.parquet"
    if not res_p.exists():
        raise EmptyStudy(f"{study_dir} has no results.parquet; run `otstudy export {study_dir}` first "
                         f"(or the study has not started)")
    res = pd.read_parquet(res_p)
    hist = pd.read_parquet(hist_p) if hist_p.exists() else pd.DataFrame()
    spec = yaml.safe_load((study_dir / "spec.yaml").read_text()) if (study_dir / "spec.yaml").exists() else {}
    meta = json.loads((study_dir / "study.json").read_text()) if (study_dir / "study.json").exists() else {}
    err_log = study_dir / "mlflow_errors.log"
    meta["mlflow_errors"] = len(err_log.read_text().splitlines()) if err_log.exists() else 0
    meta["study_dir"] = str(study_dir)
    return res, hist, spec or {}, meta


def _num(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return {"True": True, "False": False, "None": None}.get(v, v)


STATUS = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "pruned", "RUNNING": "running",
          "SCHEDULED": "pending"}


def from_mlflow(tracking_uri: str, experiment: str) -> Study:
    """Rebuild the tables from an MLflow experiment written by otstudy (parent + child runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise EmptyStudy(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    parent = next((r for r in runs if r.data.tags.get("otstudy.role") == "study"), None)
    spec: Dict[str, Any] = {}
    if parent is not None:
        for k, v in parent.data.params.items():
            try:
                spec[k] = json.loads(v)
            except json.JSONDecodeError:
                spec[k] = _num(v)
    res_rows, hist_rows = [], []
    for r in runs:
        if r.data.tags.get("otstudy.role") != "trial":
            continue
        tid = r.data.tags.get("otstudy.trial_id", r.info.run_id)
        status = r.data.tags.get("otstudy.status") or STATUS.get(r.info.status, r.info.status.lower())
        row = {"trial_id": tid, "status": status, "error": r.data.tags.get("otstudy.error", "")}
        if "otstudy.hardware" in r.data.tags:  # what its timings were measured on
            row["hardware"] = r.data.tags["otstudy.hardware"]
        row.update({k: _num(v) for k, v in r.data.params.items()})
        row.update(r.data.metrics)
        per_epoch: Dict[int, Dict[str, float]] = {}
        for key in r.data.metrics:
            for m in client.get_metric_history(r.info.run_id, key):
                per_epoch.setdefault(m.step, {})[key] = m.value
        for step in sorted(per_epoch):
            hist_rows.append({"trial_id": tid, "epoch": step, **per_epoch[step]})
        row["n_epochs"] = len(per_epoch)
        timed = [per_epoch[s] for s in sorted(per_epoch)][1:] or list(per_epoch.values())
        for k in ("step_time_ms", "ot_time_ms", "epoch_time_s", "images_per_s", "data_time_ms"):
            vals = [e[k] for e in timed if k in e]
            row[f"med_{k}"] = float(pd.Series(vals).median()) if vals else float("nan")
        res_rows.append(row)
    if not res_rows:
        raise EmptyStudy(f"MLflow experiment {experiment!r} has no otstudy trial runs")
    meta = {"n_trials": int(spec.get("n_trials", len(res_rows))) if isinstance(spec.get("n_trials"), int)
            else len(res_rows), "mlflow_errors": 0, "source": f"{tracking_uri} / {experiment}"}
    return pd.DataFrame(res_rows), pd.DataFrame(hist_rows), spec, meta
