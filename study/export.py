"""Export a study (finished, running or crashed) to Parquet.

Reads only files: Tune's experiment state (trial statuses, errors) and every
trial directory's ``params.json`` / ``result.json``. Writes

* ``results.parquet``: one row per trial: ``trial_id``, ``trial_dir`` (its
  directory under ``ray/``, see :func:`trial_dirs`), ``status``
  (completed | pruned | failed | running | pending), ``error``, ``n_epochs``,
  the flat config (one column per key, the same names as everywhere),
  the last reported metrics, and medians over epochs of the timings
  (``med_step_time_ms``, ``med_ot_time_ms``, ``med_epoch_time_s``,
  ``med_images_per_s``; the first epoch is left out when there are more, it
  includes warm-up); for an Optuna sampler, ``searcher_state`` and
  ``optuna_trial``: the state and number of the configuration's trial in the
  sampler's Optuna study (and in its Optuna storage, :mod:`study.optuna_store`).
* ``history.parquet``: one row per trial-epoch with every reported metric
  (``restored`` = 1 on a row rebuilt from the checkpoint a trial continued
  from, when a killed driver never stored that epoch's result; see
  :func:`read_results`).

Both are written atomically (temp file + rename), so a reader never sees a
half-written table even while the study runs.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from .history import newest_state_file, outcome, read_results, result_epoch
from .records import ABANDONED_FILE, RAY_KEYS, RECOVERED_FILE, flat_config

TIMINGS = ("step_time_ms", "ot_time_ms", "epoch_time_s", "images_per_s", "data_time_ms")


def latest_state(exp_dir: Path) -> Dict[str, Dict[str, Any]]:
    """trial_id -> {status, num_failures, error_file, logdir, config} from Tune's newest state file
    (the one Tune restores: the greatest name, a session time stamp)."""
    newest = newest_state_file(exp_dir, "experiment_state-*.json")
    if newest is None:
        return {}
    try:
        data = json.loads(newest.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        try:
            state = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            runtime = json.loads(entry[1]) if isinstance(entry[1], str) else entry[1]
        except (json.JSONDecodeError, IndexError, TypeError):
            continue
        out[state["trial_id"]] = {
            "status": state.get("status"), "logdir": state.get("relative_logdir"),
            "config": state.get("config") if isinstance(state.get("config"), dict) else None,
            "num_failures": runtime.get("num_failures", 0), "error_file": runtime.get("error_filename"),
        }
    return out


def _error_line(trial_dir: Path, error_file) -> str:
    for cand in ([trial_dir / error_file] if error_file else []) + [trial_dir / "error.txt"]:
        try:
            text = cand.read_text()
        except OSError:
            continue
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # the exception line, e.g. "trainables.pretrain_probe.TrialDiverged: train_loss became nan ..."
        for ln in reversed(lines):
            if ":" in ln and not ln.startswith("File "):
                return ln[:1000]
        return lines[-1][:1000] if lines else ""
    return ""


def _load_newest(exp_dir: Path, pattern: str):
    """The unpickled contents of Tune's newest state file matching ``pattern``, or None."""
    f = newest_state_file(exp_dir, pattern)
    if f is None:
        return None
    try:
        with open(f, "rb") as fh:
            return pickle.load(fh)  # written by this study's own driver (Ray's searcher checkpoints)
    except Exception:  # a half-written or foreign file: the column is just left empty
        return None


def saved_sampler(exp_dir: Path) -> Tuple[Any, Dict[str, Any], Dict[str, List[str]]]:
    """The sampler's Optuna study as Tune last saved it (None for a grid study, or before the first save),
    the Optuna trial each configuration asked (by its first seed's Tune trial id), and each configuration's
    Tune trials, one per seed (the SeedRepeater's groups, by the same id)."""
    inner = _load_newest(exp_dir, "searcher-state-*.pkl")
    if not isinstance(inner, dict) or "_ot_trials" not in inner:
        return None, {}, {}
    gen = _load_newest(exp_dir, "search_gen_state-*.json") or {}
    repeater = gen.get("name:SeedRepeater", {}) if isinstance(gen, dict) else {}
    groups = {gid: list(g.get("members", [])) for gid, g in repeater.get("_groups", {}).items()}
    return inner.get("_ot_study"), dict(inner["_ot_trials"]), groups


def searcher_states(exp_dir: Path) -> Dict[str, Tuple[str, int]]:
    """Tune trial id -> (the state Optuna recorded for its configuration: COMPLETE, PRUNED, FAIL, RUNNING;
    that Optuna trial's number). Every seed of a configuration maps to its one Optuna trial. Empty for grid
    studies."""
    study, asked, groups = saved_sampler(exp_dir)
    by_group = {}
    for gid, trial in asked.items():
        try:
            frozen = study._storage.get_trial(trial._trial_id)
        except Exception:
            continue
        by_group[gid] = (frozen.state.name, frozen.number)
    out = {tid: by_group[g] for g, members in groups.items() if g in by_group for tid in members}
    for gid, state in by_group.items():
        out.setdefault(gid, state)
    return out


def trial_dirs(exp_dir: Path, state: Dict[str, Dict[str, Any]]) -> Dict[str, Path]:
    """Trial id -> its directory: the one Tune's state names, else ``trial_<id>``.

    A driver killed after it started a trial but before its next state snapshot leaves a directory
    the restored state does not know; Tune then starts the trial afresh in ``trial_<id>_<4 hex>``
    (its directory name existed). That first directory is a superseded attempt: it stays on disk
    and is left out here, so the trial is counted once, with the history of the attempt that ran.
    """
    named = {tid: exp_dir / st["logdir"] for tid, st in state.items() if st.get("logdir")}
    found: Dict[str, List[Path]] = {}
    for p in sorted(exp_dir.glob("trial_*")):
        if not p.is_dir() or p in named.values():
            continue
        tid = p.name[len("trial_"):]
        found.setdefault(recorded_id(tid, state) or tid, []).append(p)
    # a trial the state names no directory for yet: its newest attempt
    newest = {tid: max(ps, key=lambda p: (p / "result.json").stat().st_mtime if (p / "result.json").exists() else 0)
              for tid, ps in found.items() if tid not in named}
    return {**newest, **named}


def recorded_id(tid: str, state: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """The recorded trial a directory ``trial_<tid>`` belongs to: ``tid`` itself, or, for a restart in
    ``trial_<id>_<4 hex>`` (started after the state's last snapshot), ``<id>``; None if neither."""
    if tid in state:
        return tid
    base = tid.rsplit("_", 1)[0]
    return base if base in state else None


def abandoned_trials(exp_dir: Path) -> Dict[str, str]:
    """Trial id -> directory of the trials a resume set aside (``repairs.set_aside_abandoned_trials``)."""
    try:
        data = json.loads((exp_dir / ABANDONED_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def collect(study_dir: Path) -> Tuple[pd.DataFrame, pd.DataFrame]:
    exp_dir = Path(study_dir) / "ray"
    state = latest_state(exp_dir)
    searcher = searcher_states(exp_dir)
    dirs = trial_dirs(exp_dir, state)
    abandoned = abandoned_trials(exp_dir)  # started after a dead driver's last snapshot, run again under new ids
    ids = [t for t in dict.fromkeys(list(state) + sorted(dirs)) if t not in abandoned or t in state]
    results, history = [], []
    for tid in ids:
        st = state.get(tid, {})
        tdir = dirs.get(tid, exp_dir / f"trial_{tid}")
        params = {}
        if (tdir / "params.json").exists():
            try:
                params = json.loads((tdir / "params.json").read_text())
            except json.JSONDecodeError:
                params = {}
        config = flat_config(params or st.get("config") or {})
        rows = read_results(tdir / "result.json")
        # a resumed trial re-reports epochs after its checkpoint: keep the last report of each epoch
        by_epoch: Dict[int, Dict[str, Any]] = {}
        for r in rows:
            by_epoch[result_epoch(r)] = r
        epochs = [by_epoch[e] for e in sorted(by_epoch)]
        for r in epochs:
            history.append({"trial_id": tid, **{k: v for k, v in r.items()
                                                 if k not in RAY_KEYS and _scalar(v)}})
        last = epochs[-1] if epochs else {}
        tune_status = st.get("status") or ("TERMINATED" if last.get("done") else "PENDING")
        status = outcome(tune_status, last, ran=bool(epochs))
        row: Dict[str, Any] = {"trial_id": tid, "trial_dir": tdir.name, "status": status, "tune_status": tune_status,
                               "error": _error_line(tdir, st.get("error_file")) if status == "failed" else "",
                               "num_failures": int(st.get("num_failures", 0) or 0), "n_epochs": len(epochs),
                               "searcher_state": searcher.get(tid, ("", None))[0]}
        if searcher:
            row["optuna_trial"] = searcher.get(tid, ("", None))[1]
        row.update({k: v for k, v in config.items() if _scalar(v)})
        row.update({k: v for k, v in last.items() if k not in RAY_KEYS and _scalar(v) and k not in config})
        timing_rows = epochs[1:] if len(epochs) > 1 else epochs
        for k in TIMINGS:
            vals = [r[k] for r in timing_rows if isinstance(r.get(k), (int, float))]
            row[f"med_{k}"] = float(pd.Series(vals).median()) if vals else float("nan")
        results.append(row)
    return pd.DataFrame(results), pd.DataFrame(history)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def export_is_stale(study_dir: Path) -> bool:
    """Whether results.parquet is missing or older than any file the export reads under ``ray/`` (Tune's state,
    a trial's params, results, recovered rows, the set-aside list): only then does ``otstudy report`` export
    again, so that Parquet files merged or edited by hand are what it reports."""
    study_dir = Path(study_dir)
    res = study_dir / "results.parquet"
    if not res.exists():
        return True
    written = res.stat().st_mtime
    exp = study_dir / "ray"
    names = ("params.json", "result.json", RECOVERED_FILE)
    sources = [*exp.glob("experiment_state-*.json"), *exp.glob("searcher-state-*.pkl"), exp / ABANDONED_FILE,
               *(t / name for t in exp.glob("trial_*") for name in names)]
    return any(f.exists() and f.stat().st_mtime > written for f in sources)


def export_study(study_dir: Path) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Write results.parquet and history.parquet into the study directory; return both frames."""
    study_dir = Path(study_dir)
    if not (study_dir / "spec.yaml").is_file():
        raise ValueError(f"{study_dir} is not an otstudy study directory (no spec.yaml)")
    res, hist = collect(study_dir)
    _atomic_parquet(res, study_dir / "results.parquet")
    _atomic_parquet(hist, study_dir / "history.parquet")
    return res, hist
