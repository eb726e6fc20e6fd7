"""MLflow logging from the Ray driver: one parent run per study, one child run per trial.

Why not Ray's MLflowLoggerCallback: it keeps trial -> run in memory, so every
``Tuner.restore`` creates a second run for each unfinished trial. Here a
trial's run is found by its tag ``otstudy.trial_id`` (a search in the store),
so any number of resumes keeps exactly one child run per trial, and epochs an
earlier driver already logged are not logged twice.

All writes happen in the driver process, in batches (one ``log_batch`` per
result), so concurrent trials never hammer a SQLite store from several
processes. A tracking failure never stops the study: it is counted, written to
``mlflow_errors.log`` in the study directory, and reported by export/report.
While the driver still prepares the MLflow store at the start of a study, the
tracker holds its calls and makes them, in order, once the store is ready.
"""
from __future__ import annotations

import json
import math
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ray.tune import Callback

from trainables.cache import cache_dir, write_atomically

from . import records
from .history import outcome, read_results, restored_rows, result_epoch, trial_result_file
from .records import RAY_KEYS, epochs_to_run, flat_config, git_revision, mlflow_fail_fast

TRIAL_TAG = "otstudy.trial_id"
ROLE_TAG = "otstudy.role"
STORE_WAIT_S = 60.0  # the longest the tracker waits for the driver's thread preparing the store


def seed_sqlite_store(uri: str) -> bool:
    """Create a new SQLite MLflow store as a copy of an empty, migrated one; True if it did.

    A new store runs MLflow's ~50 schema migrations: 1.6 s of CPU per study on this
    machine, while Ray starts on the same cores; opening a copy takes 0.03 s. The
    empty store is made once per MLflow version (by MLflow itself) in :func:`cache_dir`.
    In the copy only the ``Default`` experiment's artifact location is set to what
    MLflow would have given it here (``./mlruns/0``). Does nothing (False) for
    other URIs, an existing store, or on any error: MLflow then creates the store.
    """
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        return False
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
        if not template.exists():
            write_atomically(template, lambda tmp: MlflowClient(tracking_uri=f"sqlite:///{tmp}")
                             .search_experiments(max_results=1))

        def copy(tmp: Path) -> None:
            shutil.copyfile(template, tmp)
            now = int(time.time() * 1000)
            db = sqlite3.connect(tmp)
            with db:
                db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                           "WHERE experiment_id = 0", (str(Path.cwd().resolve() / "mlruns" / "0"), now, now))
            db.close()

        write_atomically(path, copy)
        return True
    except Exception:
        return False


class MLflowTracker(Callback):
    """Tune callback that mirrors trials into MLflow (see module docstring)."""

    def __init__(self, tracking_uri: str, experiment: str, study_dir: str, spec: Dict[str, Any]):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.study_dir = str(study_dir)
        self.spec = spec
        self._reset()

    def _reset(self):
        self._pending: List[Tuple[Any, tuple]] = []  # calls held while the driver prepares the store
        self._client = None
        self._experiment_id = None
        self._parent_id = None
        self._runs: Dict[str, str] = {}
        self._last_step: Dict[str, float] = {}
        self._hardware: Dict[str, str] = {}  # trial id -> the otstudy.hardware tag logged by this driver
        self._unreachable = False
        self.failures = 0

    def __getstate__(self):
        # Tune pickles callbacks with the experiment; the client and caches are rebuilt on restore
        return {k: self.__dict__[k] for k in ("tracking_uri", "experiment", "study_dir", "spec")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ plumbing
    def _guard(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            self.failures += 1
            with open(Path(self.study_dir) / "mlflow_errors.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}\n")
            if self.failures == 1:
                print(f"[otstudy] MLflow logging failed ({what}: {type(exc).__name__}); training continues, "
                      f"see {Path(self.study_dir) / 'mlflow_errors.log'}")
            return None

    def _ensure(self) -> bool:
        if self._client is not None:
            return True
        if self._unreachable:
            return False
        ok = bool(self._guard("connect", self._connect))
        # one failed connection is enough: do not stall every result on a dead server
        self._unreachable = not ok
        return ok

    def _connect(self) -> bool:
        import mlflow
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            art = None
            if self.tracking_uri.startswith("sqlite:"):
                art = (Path(self.study_dir).resolve() / "mlartifacts").as_uri()
            exp_id = client.create_experiment(self.experiment, artifact_location=art)
        else:
            exp_id = exp.experiment_id
        parents = client.search_runs([exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=1)
        if parents:
            parent_id = parents[0].info.run_id
            client.update_run(parent_id, status="RUNNING")
        else:
            parent = client.create_run(exp_id, run_name=self.experiment, tags={
                ROLE_TAG: "study", "otstudy.git_revision": git_revision(),
                "otstudy.study_dir": self.study_dir})
            parent_id = parent.info.run_id
            flat = {k: json.dumps(v) if not isinstance(v, (str, int, float)) else v for k, v in self.spec.items()}
            client.log_batch(parent_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in flat.items()])
            spec_file = Path(self.study_dir) / "spec.yaml"
            if spec_file.exists():
                client.log_artifact(parent_id, str(spec_file))
        self._client, self._experiment_id, self._parent_id = client, exp_id, parent_id
        return True

    def _run_for(self, trial) -> Optional[str]:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        if not self._ensure():
            return None

        def find_or_create():
            from mlflow.entities import Param

            c = self._client
            found = c.search_runs([self._experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{tid}'",
                                  max_results=2)
            if found:
                run_id = found[0].info.run_id
                hist = c.get_metric_history(run_id, "epoch")
                self._last_step[tid] = max((m.step for m in hist), default=-1)
                c.update_run(run_id, status="RUNNING")
            else:
                cfg = flat_config(trial.config)
                name = trial_label(cfg, self.spec)
                run = c.create_run(self._experiment_id, run_name=f"{name} [{tid}]", tags={
                    "mlflow.parentRunId": self._parent_id, TRIAL_TAG: tid, ROLE_TAG: "trial",
                    "otstudy.seed": str(cfg.get("seed"))})
                run_id = run.info.run_id
                c.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(cfg.items())])
                self._last_step[tid] = -1
            self._backfill(run_id, trial)
            return run_id

        run_id = self._guard(f"create run for trial {tid}", find_or_create)
        if run_id:
            self._runs[tid] = run_id
        return run_id

    def _metrics(self, result: Dict[str, Any], step: int, ts: int):
        from mlflow.entities import Metric

        return [Metric(k, float(v), ts, step) for k, v in result.items()
                if k not in RAY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(float(v))]

    def _backfill(self, run_id: str, trial) -> None:
        """Log the epochs Tune recorded but this store has not seen (a driver killed between the two,
        or an MLflow store restored from an older copy), from the trial's ``result.json``."""
        tid = trial.trial_id
        metrics, last = [], self._last_step.get(tid, -1)
        f = trial_result_file(trial, str(Path(self.study_dir) / "ray"))
        for r in read_results(f) if f is not None else []:
            step = result_epoch(r)
            if step > last:
                metrics += self._metrics(r, step, int(1000 * float(r.get("timestamp", time.time()))))
                last = step
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._client.log_batch(run_id, metrics=metrics[i:i + 1000])
        self._last_step[tid] = last

    def _ready(self, wait: bool = False) -> bool:
        """Whether MLflow may be called now: not while the driver's thread still prepares the store
        (``records.STORE_PREP``: importing mlflow, creating a sqlite store, seconds that would delay
        the first trial), unless ``wait``. Once it may, the calls held meanwhile are made, in order."""
        prep = records.STORE_PREP
        if prep is not None and prep.is_alive():
            if not wait:
                return False
            prep.join(timeout=STORE_WAIT_S)
        while self._pending:
            fn, args = self._pending.pop(0)
            fn(*args)
        return True

    def _call(self, fn, *args) -> None:
        if self._ready():
            fn(*args)
        else:
            self._pending.append((fn, args))

    # ------------------------------------------------------------------ Tune hooks
    def setup(self, **info):
        self._call(self._ensure)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._call(self._run_for, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._call(self._log_result, trial, dict(result))

    def _log_result(self, trial, result: Dict[str, Any]) -> None:
        run_id = self._run_for(trial)
        if run_id is None:
            return
        step = result_epoch(result)
        if step <= self._last_step.get(trial.trial_id, -1):
            return  # already logged by an earlier driver before a resume
        ts = int(time.time() * 1000)
        metrics = self._metrics(result, step, ts)
        # the epochs before the checkpoint the trial continued from, where this store lacks them
        done = self._last_step.get(trial.trial_id, -1)
        back = [m for r in restored_rows(result) if done < r["epoch"] < step for m in self._metrics(r, r["epoch"], ts)]
        metrics = back + metrics
        tags = []
        hardware = result.get("hardware")  # a string (GPU, or CPU model and threads): a tag, not a metric
        if isinstance(hardware, str) and self._hardware.get(trial.trial_id) != hardware:  # once per trial
            from mlflow.entities import RunTag

            tags = [RunTag("otstudy.hardware", hardware[:500])]
            self._hardware[trial.trial_id] = hardware
        self._guard(f"log metrics of trial {trial.trial_id}", self._client.log_batch, run_id, metrics=metrics,
                    tags=tags)
        self._last_step[trial.trial_id] = step  # a failed batch is not retried: training goes on

    def _finish(self, trial, status: str, outcome: str, error: str = ""):
        run_id = self._run_for(trial)
        if run_id is None:
            return

        def do():
            self._client.set_tag(run_id, "otstudy.status", outcome)
            if error:
                self._client.set_tag(run_id, "otstudy.error", error[:4000])
            self._client.set_terminated(run_id, status=status)
            return True

        self._guard(f"finish trial {trial.trial_id}", do)

    def on_trial_complete(self, iteration, trials, trial, **info):
        ended = outcome("TERMINATED", trial.last_result or {})
        self._call(self._finish, trial, "FINISHED" if ended == "completed" else "KILLED", ended)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._call(self._finish, trial, "FAILED", "failed", error_summary(trial))

    def on_experiment_end(self, trials, **info):
        self._ready(wait=True)
        # trials that ended under an earlier driver get no callbacks after a resume: make sure the
        # store holds each of them, finished and complete (it may be a copy older than Tune's records)
        for t in trials:
            if t.trial_id in self._runs or t.status not in ("TERMINATED", "ERROR"):
                continue
            ended = outcome(t.status, t.last_result or {})
            if ended == "failed":
                self._finish(t, "FAILED", "failed", error=error_summary(t))
            else:
                self._finish(t, "FINISHED" if ended == "completed" else "KILLED", ended)
        if self._ensure():
            done = all(t.status in ("TERMINATED", "ERROR") for t in trials)
            self._guard("finish study run", self._client.set_terminated, self._parent_id,
                        status="FINISHED" if done else "KILLED")


def end_abandoned_runs(tracking_uri: str, experiment: str, trial_ids) -> int:
    """End the MLflow runs of trials a killed driver had started after its last snapshot (see
    ``repairs.set_aside_abandoned_trials``): KILLED, tagged ``otstudy.abandoned``. Returns how many."""
    mlflow_fail_fast()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    ended = 0
    for tid in trial_ids:
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{tid}'"):
            client.set_tag(run.info.run_id, "otstudy.abandoned",
                           "started after the driver's last snapshot; lost with the driver, run again under a new id")
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
                ended += 1
    return ended


def error_summary(trial) -> str:
    """The last line of a failed trial's error (e.g. 'TrialDiverged: train_loss became nan ...')."""
    msg = getattr(trial, "error_msg", None)
    if not msg:
        path = getattr(trial, "error_file", None)
        try:
            msg = Path(path).read_text() if path else ""
        except OSError:
            msg = ""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def trial_label(config: Dict[str, Any], spec: Dict[str, Any]) -> str:
    """A short human label: the swept knobs and the seed, e.g. 'beta=0.4 seed=1'; a sampled value to 4
    significant digits ('eps=0.07821', not 0.07821210768011508; the run's params keep every digit)."""
    def part(k) -> str:
        v = config[k]
        return f"{k}={v:.4g}" if isinstance(v, float) and len(repr(v)) > 7 else f"{k}={v}"

    keys = list((spec.get("search") or {}).keys())
    parts = []
    for k in keys:
        if k == "cases":
            continue
        if k in config:
            parts.append(part(k))
    for case in (spec.get("search") or {}).get("cases", []):
        parts += [part(k) for k in case if k in config and part(k) not in parts]
    if "method" in config and isinstance(spec.get("method"), list) and f"method={config['method']}" not in parts:
        parts.insert(0, f"method={config['method']}")
    parts.append(f"seed={config.get('seed')}")
    return " ".join(parts)


class Progress(Callback):
    """One line per finished trial and a heartbeat every ``every_s`` seconds (Ray's tables are off), with the
    time the study still needs at the pace of its epochs so far (:meth:`time_left`)."""

    def __init__(self, n_trials: int, metric: str, mode: str, spec: Dict[str, Any], every_s: float = 30.0):
        self.n_trials, self.metric, self.mode, self.spec, self.every_s = n_trials, metric, mode, spec, every_s
        self._t0 = time.time()
        self._last = 0.0
        self._pace_from: Optional[Tuple[float, int]] = None  # (time, epochs done) at the first result seen
        fixed = (spec.get("fixed") or {}).get("epochs")
        self._fixed_epochs = int(fixed) if fixed is not None else None
        self._asha = (spec.get("scheduler") or {}).get("type") == "asha"

    def _epochs(self, trials, current=None, result=None) -> Tuple[int, float]:
        """(epochs run, epochs still to run: :func:`study.records.epochs_to_run`, a trial finished once Tune
        terminated it or it failed). ``current``'s epochs are ``result``'s (Tune calls the callbacks before it
        updates its last result)."""
        known = []
        for t in trials:
            last = result if t is current and result is not None else t.last_result
            known.append((flat_config(t.config).get("epochs"), int((last or {}).get("epoch") or 0),
                          t.status in ("TERMINATED", "ERROR")))
        left, unseen = epochs_to_run(known, self.n_trials, self._fixed_epochs)
        return sum(ran for _, ran, _ in known), sum(left) + unseen

    def time_left(self, trials, now: Optional[float] = None, current=None, result=None) -> Optional[str]:
        """'~N min left' at the pace of the epochs run since the first result this driver saw (so a resumed
        study's earlier epochs do not count as fast ones; concurrent trials count together), or None before
        that pace is known. With ASHA the study stops trials early, so it is an upper bound."""
        now = time.time() if now is None else now
        done, to_run = self._epochs(trials, current, result)
        if self._pace_from is None:
            self._pace_from = (now, done)
            return None
        since, done_then = self._pace_from
        if done <= done_then or now <= since:
            return None
        left = to_run * (now - since) / (done - done_then)
        text = (f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h")
        return f"{'at most ' if self._asha else ''}~{text} left"

    def _finished(self, trials, current=None) -> int:
        # Tune calls the hooks before it updates the current trial's status
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        return done + (current is not None and current.status not in ("TERMINATED", "ERROR"))

    def _line(self, msg: str) -> None:
        print(f"[otstudy {time.time() - self._t0:6.0f}s] {msg}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._pace_from is None:  # the pace is measured from the first result on
            self.time_left(trials, current=trial, result=result)
        if time.time() - self._last < self.every_s:
            return
        self._last = time.time()
        vals = [t.last_result.get(self.metric) for t in trials if t.last_result and self.metric in t.last_result]
        best = f"{(max(vals) if self.mode == 'max' else min(vals)):.4f}" if vals else "-"
        running = sum(t.status == "RUNNING" for t in trials)
        left = self.time_left(trials, current=trial, result=result)
        self._line(f"{running} running, {self._finished(trials)}/{self.n_trials} finished, "
                   f"best {self.metric} so far {best}" + (f", {left}" if left else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        ended = outcome("TERMINATED", r)
        ended = ended if ended == "completed" else f"{ended} at epoch {r.get('epoch')}"
        extra = f", test_linear_acc={r['test_linear_acc']:.4f}" if "test_linear_acc" in r else ""
        self._line(f"{trial_label(flat_config(trial.config), self.spec)}: {ended}, "
                   f"{self.metric}={r.get(self.metric, float('nan')):.4f}{extra} "
                   f"({self._finished(trials, trial)}/{self.n_trials} finished)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"{trial_label(flat_config(trial.config), self.spec)}: FAILED: {error_summary(trial)} "
                   f"({self._finished(trials, trial)}/{self.n_trials} finished)")


class RemoteSync(Callback):
    """Copies the driver's files to the study's object-store home every ``period_s`` seconds
    (``OTSTUDY_SYNC_PERIOD_S``, default 60) and when the experiment ends (see study/storage.py)."""

    def __init__(self, remote, study_dir: Path, period_s: Optional[float] = None):
        import os

        self.remote, self.study_dir = remote, study_dir
        self.period = float(period_s if period_s is not None else os.environ.get("OTSTUDY_SYNC_PERIOD_S", 60))
        self.last = time.monotonic()

    def _push(self) -> None:
        from .storage import display, one_line

        try:
            self.remote.push_home(self.study_dir)
        except Exception as exc:  # a transient store error must not end the study
            print(f"[otstudy] warning: could not copy the study files to {display(self.remote.home)} "
                  f"({one_line(exc)}); retrying later")
        self.last = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.period:
            self._push()

    def on_experiment_end(self, trials, **info):
        self._push()


class PruneCheckpoints(Callback):
    """Keeps only a finished trial's last checkpoint (its state and, for a completed trial, the frozen test
    features the report's embedding picture reads): Tune keeps two per trial for a resume's fallback, which a
    trial that has ended no longer needs (~1.75 MB each with the small CNN, ~45 MB with ResNet-18). A failed
    trial keeps both: a resume continues it from them. A resume recreates the directories Tune's snapshot still
    names as empty ones (repairs.repair_recorded_checkpoints), so its bookkeeping deletes them quietly."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        from .history import checkpoint_dirs
        from .storage import one_line

        try:
            fs, path = trial.storage.storage_filesystem, trial.storage.trial_fs_path
            dirs = [d.rstrip("/") for d in checkpoint_dirs(fs, path)]
            latest = getattr(trial.checkpoint, "path", None)  # Tune's own latest, else the highest name
            keep = latest.rstrip("/") if latest and latest.rstrip("/") in dirs else (dirs[0] if dirs else None)
            for old in dirs:
                if old != keep:
                    fs.delete_dir(old)
        except Exception as exc:  # disk left as Tune left it; the study goes on
            print(f"[otstudy] warning: could not remove trial {trial.trial_id}'s earlier checkpoints "
                  f"({one_line(exc)})")
