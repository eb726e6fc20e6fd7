"""A trial's history, read one way everywhere: its results (result.json, with the epochs a continued trial
restored and a resume recovered), its outcome (completed, pruned, failed, running, pending), its checkpoint
directories, and Tune's newest state file. Export, the tracker, the ASHA replay, the resume repairs and the worker
all call these."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from .records import RECOVERED_FILE

OUTCOMES = ("completed", "pruned", "failed", "running", "pending")


def outcome(tune_status: Optional[str], last: Dict[str, Any], ran: bool = True) -> str:
    """What became of a trial: ``failed`` (Tune's ERROR), ``completed`` (its last result is the final epoch's),
    ``pruned`` (Tune stopped it before: TERMINATED without a final result), ``pending`` (not started), else
    ``running`` (RUNNING or PAUSED, or a driver that died mid-trial)."""
    if tune_status == "ERROR":
        return "failed"
    if last.get("final"):
        return "completed"
    if tune_status == "TERMINATED":
        return "pruned"
    if tune_status == "PENDING" and not ran:
        return "pending"
    return "running"


def result_epoch(result: Dict[str, Any]) -> int:
    """The epoch a Tune result belongs to (Tune's iteration count for results without one)."""
    return int(result.get("epoch", result.get("training_iteration", 0)))



def restored_rows(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The epoch rows a continued trial restored, oldest first (see :func:`study.history.read_results`).

    ``restored_metrics`` is a JSON list of the metrics of the checkpoint's last epochs (a JSON object,
    the checkpoint's epoch alone, from studies before that); every row is marked ``restored: 1``.
    """
    raw = result.get("restored_metrics")
    if not raw or not isinstance(raw, str):
        return []
    try:
        got = json.loads(raw)
    except json.JSONDecodeError:
        return []
    rows = []
    for m in got if isinstance(got, list) else [got]:
        if not isinstance(m, dict) or not isinstance(m.get("epoch"), (int, float)):
            continue
        row = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        row["epoch"] = int(row["epoch"])
        for k in ("trial_id", "node_id"):
            if k in result:
                row[k] = result[k]
        row["restored"] = 1
        rows.append(row)
    return sorted(rows, key=lambda r: r["epoch"])


def read_results(path: Path) -> List[Dict[str, Any]]:
    """The results in a trial's ``result.json``, up to a line cut by a crash.

    A trial continued from a checkpoint sends the metrics of that checkpoint's last epochs with its
    first result (``restored_metrics``; the checkpoint keeps the last ``RECENT_EPOCHS`` = 16). Where
    ``result.json`` lacks one of them (the driver was killed after Tune persisted the checkpoint but
    before those epochs' results reached storage: Tune syncs ``result.json`` at least every second
    checkpoint, so the gap is a few epochs), its row is put back here, before the result that
    carried it, marked ``restored: 1``. A trial that had finished when the driver died is not run
    again; the epochs its ``result.json`` lacks are recovered from its last checkpoint at the resume
    (``recovered_results.json`` beside it, rows also marked ``restored: 1``) and added here.
    """
    rows: List[Dict[str, Any]] = []
    seen = set()
    for r in _json_lines(path):
        epoch = result_epoch(r)
        for back in restored_rows(r):
            if back["epoch"] not in seen and back["epoch"] != epoch:
                rows.append(back)
                seen.add(back["epoch"])
        rows.append(r)
        seen.add(epoch)
    for r in _json_lines(path.parent / RECOVERED_FILE):
        if result_epoch(r) not in seen:
            rows.append(r)
            seen.add(result_epoch(r))
    return rows


def _json_lines(path: Path) -> Iterator[Dict[str, Any]]:
    """The JSON objects of a file written one per line, up to a line cut by a crash."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            return  # a line cut by a crash: everything before it is intact
        if not isinstance(r, dict):
            return
        yield r


def trial_result_file(trial, experiment_dir: Optional[str]) -> Optional[Path]:
    """A Tune trial's ``result.json``: in its storage directory, else in the study's local copy of the
    experiment (an object store's mirror), under the directory Tune gave it (``trial_<id>``, or
    ``trial_<id>_<4 hex>`` when that existed at a resume; see :func:`study.export.trial_dirs`)."""
    candidates = []
    try:  # a new trial has no directory yet: Ray raises instead of returning None
        candidates.append(Path(trial.storage.trial_fs_path) / "result.json")
    except (AttributeError, RuntimeError):
        pass
    if experiment_dir:
        name = getattr(trial, "relative_logdir", None) or f"trial_{trial.trial_id}"
        candidates.append(Path(experiment_dir) / name / "result.json")
    for c in candidates:
        if c.exists():
            return c
    return None


def checkpoint_dirs(fs, path: str) -> List[str]:
    """The checkpoint directories (``checkpoint_<n>``) in a trial directory on a pyarrow filesystem, newest first."""
    import pyarrow.fs as pafs  # pyarrow with Ray: only the resume and the worker list checkpoints

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)


def newest_state_file(exp_dir: Path, pattern: str) -> Optional[Path]:
    """Tune's newest state file matching ``pattern`` (``experiment_state-*.json``, ``searcher-state-*.pkl``,
    ``search_gen_state-*.json``): the greatest name, a session time stamp, which is the one Tune restores
    (modification times change when files are copied to or from an object store)."""
    files = sorted(Path(exp_dir).glob(pattern))
    return files[-1] if files else None
