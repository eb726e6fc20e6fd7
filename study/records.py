"""What a study records, without Ray or MLflow: the keys of a Tune result that are bookkeeping, a
result's epoch, the epoch rows a continued trial restored, a trial's flat config, the epochs a study
still runs, the study's default MLflow store and git revision.

Kept apart from :mod:`study.tracking` (whose callbacks subclass Ray Tune's ``Callback``) so that
the CLI, export and report can use them without importing Ray Tune (1.2 s), and ``otstudy run``
can import Tune while Ray starts.
"""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# keys Ray adds to every result, and otstudy's restored_metrics (see history.read_results); they are
# bookkeeping, not metrics
RAY_KEYS = {"timestamp", "done", "training_iteration", "trial_id", "date", "time_this_iter_s", "time_total_s",
            "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
            "checkpoint_dir_name", "config", "should_checkpoint", "experiment_tag", "restored_metrics"}


# where a study keeps Tune's experiment state, and the files otstudy writes in a trial's directories
EXPERIMENT_DIR = "ray"  # <study>/ray holds Tune's experiment state
CHECKPOINT_FILE = "state.pt"  # in a checkpoint directory: the trial's state
EMBEDDINGS_FILE = "embeddings.npz"  # in the final checkpoint directory: the frozen test features
# in the trial directory: an error a retry would repeat (the loss diverged, the data cannot be read), as
# "ErrorName: message"; a retry raises it again at once instead of training
FINAL_ERROR_FILE = "final_error.txt"

# in a trial directory: the epochs a resume recovered from the trial's last checkpoint (see
# study.repairs.recover_finished_trials); read_results adds them to result.json's
RECOVERED_FILE = "recovered_results.json"
# trial id -> its directory, for trials a killed driver had started after its last snapshot: Tune's
# restored state does not know them, so they never run again (their seeds run under new ids)
ABANDONED_FILE = "abandoned_trials.json"


def epochs_to_run(trials: Sequence[Tuple[Optional[float], float, bool]], expected: int,
                  fixed_epochs: Optional[int]) -> Tuple[List[float], float]:
    """The epochs a study still runs: (each known trial's, the trials not yet proposed's in all).

    ``trials``: (epochs its config plans, or None; epochs it ran; finished) per known trial. A finished
    trial runs no more (a pruned one included); an unfinished one its plan minus what it ran; each of the
    ``expected - len(trials)`` trials the searcher has not proposed yet the spec's ``fixed_epochs``, or
    where epochs are searched the known trials' mean plan. A plan that is None is ``fixed_epochs``, or
    TrialConfig's default. For the time-left estimates of the heartbeat and of ``otstudy status``.
    """
    from trainables.catalog import default as knob_default

    default = fixed_epochs if fixed_epochs is not None else knob_default("epochs")
    plans = [default if plan is None else float(plan) for plan, _, _ in trials]
    left = [0.0 if finished else max(plan - float(ran), 0.0) for plan, (_, ran, finished) in zip(plans, trials)]
    per = default if fixed_epochs is not None or not plans else sum(plans) / len(plans)
    return left, max(int(expected) - len(trials), 0) * per


def git_revision(cwd: Optional[str] = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_fail_fast() -> None:
    """An unreachable tracking server must not stall the driver for minutes of retries (MLflow reads
    these when it makes a request)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


# the driver's thread preparing the MLflow store (importing mlflow, creating or checking a sqlite
# store: seconds), started with Ray by session.start_ray_and_store; the tracker holds its MLflow calls
# until it has finished, so the first trial need not wait for it
STORE_PREP: Optional[threading.Thread] = None


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def flat_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The trial's flat config: a grid ``__case__`` dict merged in, Ray's private keys dropped."""
    out = {k: v for k, v in config.items() if not k.startswith("__")}
    out.update(config.get("__case__") or {})
    return out


