"""A study's lifecycle: spec -> Ray Tune (OptunaSearch or grid, ASHA, resources) -> MLflow, resume, and its end.

The trial itself runs in study.worker, the Ray session is study.session's, and what a resume repairs first is
study.repairs'. Ray and Tune are imported in the functions that use them: the CLI imports this module for
every command, and ``import ray.tune`` costs 1.4 s (README: a command that needs no Ray pays none).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import yaml

from search_spaces import grid
from search_spaces.spaces import DefineByRun
from trainables.catalog import default

from . import records
from .export import export_study, latest_state, saved_sampler
from .optuna_store import OptunaStorageError, OptunaStore, live, storage_url  # noqa: F401  (the CLI's error)
from .records import EXPERIMENT_DIR, FINAL_ERROR_FILE, default_tracking_uri, git_revision
from .repairs import (recover_finished_trials, repair_grid_generator, repair_recorded_checkpoints,
                      repair_search_generator, set_aside_abandoned_trials)
from .session import ResourceError, _fit, check_resources, init_ray, start_ray_and_store, trial_resources  # noqa: F401
from .spec import Spec, read_study  # noqa: F401  (read_study: the CLI's)
from .storage import Remote, StorageError, display, is_remote, join, one_line, remote_of
from .worker import tune_trainable


class StudyExists(ValueError):
    pass


# --------------------------------------------------------------------------- building the Tuner


def _trainable(spec: Spec):
    from ray import tune

    return tune.with_resources(tune_trainable, trial_resources(spec))


def _search(spec: Spec):
    """(param_space, search_alg, num_samples) for the spec's sampler."""
    from ray import tune

    space: Dict[str, Any] = {**spec.fixed}
    if len(spec.datasets) == 1:  # several: each grid point names its own
        space["dataset"] = spec.dataset
    if spec.sampler == "grid":
        if len(spec.methods) == 1 or spec.cases_set_method:
            space["method"] = spec.methods[0]
        space["__case__"] = tune.grid_search(grid.points(spec.grid_configs(), spec.seeds))
        return space, None, spec.num_samples

    import optuna


    from .searcher import PrunedAwareOptunaSearch, SeedRepeater

    sampler = (optuna.samplers.TPESampler(seed=spec.sampler_seed) if spec.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.sampler_seed))
    inner = PrunedAwareOptunaSearch(space=DefineByRun(spec.search, spec.methods, spec.fixed), metric=spec.metric,
                                    mode=spec.mode, sampler=sampler)
    return space, SeedRepeater(inner, spec.seeds), spec.num_samples * len(spec.seeds)


def _scheduler(spec: Spec, study_dir: Path):
    from ray.tune.schedulers import FIFOScheduler


    from .scheduler import ReplayASHA

    if spec.scheduler.get("type") != "asha":
        return FIFOScheduler()
    epochs = int(spec.fixed.get("epochs", default("epochs")))
    return ReplayASHA(experiment_dir=str((study_dir / EXPERIMENT_DIR).resolve()), time_attr="epoch",
                      max_t=int(spec.scheduler.get("max_epochs", epochs)),
                      grace_period=int(spec.scheduler.get("grace_period", 1)),
                      reduction_factor=float(spec.scheduler.get("reduction_factor", 2)))


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _callbacks(spec: Spec, study_dir: Path) -> list:
    """The driver's callbacks for this study directory (MLflow, progress, copies to an object store), and
    Tune's JSON and CSV loggers (result.json is what export, the tracker's backfill and the ASHA replay read).

    Tune's TensorBoard logger is left out unless ``OTSTUDY_TENSORBOARD=1``: tensorboardX imports torch into
    the driver (1.3-2.8 s per study, and the driver needs no torch otherwise) and writes an event file
    per trial that MLflow already covers.
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .tracking import MLflowTracker, Progress, PruneCheckpoints, RemoteSync

    remote = remote_of(study_dir)
    callbacks = [MLflowTracker(spec.mlflow_uri or default_tracking_uri(study_dir), spec.name, str(study_dir),
                               {**spec.to_dict(), "n_trials": spec.n_trials()}),
                 Progress(spec.n_trials(), spec.metric, spec.mode, spec.to_dict()),
                 JsonLoggerCallback(), CSVLoggerCallback()]
    if os.environ.get("OTSTUDY_TENSORBOARD") == "1":
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    else:  # Tune adds the loggers it does not find among the callbacks unless told not to
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if spec.keep_checkpoints == "last":
        callbacks.append(PruneCheckpoints())
    if remote is not None:
        callbacks.append(RemoteSync(remote, study_dir))
    return callbacks


def build_tuner(spec: Spec, study_dir: Path):
    from ray import tune

    remote = remote_of(study_dir)
    space, search_alg, num_samples = _search(spec)
    tune_config = tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search_alg,
                                  scheduler=_scheduler(spec, study_dir), num_samples=num_samples,
                                  max_concurrent_trials=spec.max_concurrent,
                                  trial_dirname_creator=_trial_dirname,
                                  # a trial process is reused for the next trial: no new Python + torch
                                  # import per trial (measured in benchmarks/platform_overhead)
                                  reuse_actors=True)
    run_config = tune.RunConfig(
        # with an object store, Tune writes <home>/ray there and trials checkpoint to it from any node
        name=EXPERIMENT_DIR, storage_path=remote.home if remote is not None else str(study_dir.resolve()),
        callbacks=_callbacks(spec, study_dir),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures), verbose=0)
    return tune.Tuner(_trainable(spec), param_space=space, tune_config=tune_config, run_config=run_config)


# --------------------------------------------------------------------------- study lifecycle


def study_dir_for(spec: Spec, storage: Optional[str], workdir: str = "studies") -> Path:
    """The study's local directory: ``<storage>/<name>``, or ``<workdir>/<name>`` for an object store."""
    base = storage or spec.storage or workdir
    if is_remote(base):
        base = workdir
    if base.startswith("file://"):
        base = base[len("file://"):]
    return Path(base).expanduser() / spec.name


def home_for(spec: Spec, storage: Optional[str]) -> Optional[str]:
    """The study's home URI when its storage is an object store, else None."""
    base = storage or spec.storage
    return join(base, spec.name) if is_remote(base) else None


def write_study_files(spec: Spec, study_dir: Path, *, smoke: bool, home: Optional[str] = None) -> None:
    study_dir.mkdir(parents=True, exist_ok=False)
    (study_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_revision": git_revision(),
            "smoke_test": smoke, "n_trials": spec.n_trials(),
            "tracking_uri": spec.mlflow_uri or default_tracking_uri(study_dir)}
    if home:
        meta["remote"] = home
    (study_dir / "study.json").write_text(json.dumps(meta, indent=2))


def run_study(spec: Spec, *, storage: Optional[str] = None, address: Optional[str] = None,
              smoke: bool = False, workdir: str = "studies") -> "StudyEnd":
    """Create the study directory, run every trial, export Parquet. Returns the study dir and how many of
    its trials did not finish (:class:`StudyEnd`)."""
    study_dir = study_dir_for(spec, storage, workdir)
    home = home_for(spec, storage)
    if study_dir.exists() and any(study_dir.iterdir()):
        raise StudyExists(f"{study_dir} already exists; resume it with `otstudy resume {study_dir}` "
                          f"or choose another --storage/--name")
    remote = Remote(home) if home is not None else None
    if remote is not None and remote.is_study():
        raise StudyExists(f"{display(home)} already holds a study; resume it with `otstudy resume "
                          f"{display(home)}` or choose another --name")
    if study_dir.exists():
        study_dir.rmdir()
    write_study_files(spec, study_dir, smoke=smoke, home=home)
    pushed: List[str] = []
    if remote is not None:
        try:
            pushed = remote.push_home(study_dir)  # resumable from any machine from now on
        except OSError as exc:  # e.g. no write permission: nothing has run, leave nothing behind

            shutil.rmtree(study_dir, ignore_errors=True)
            raise StorageError(f"storage {display(home)}: cannot be written ({one_line(exc)})") from None
    print(f"[otstudy] study {spec.name}: {spec.n_trials()} trials ({spec.n_configs()} configurations x "
          f"{len(spec.seeds)} seeds), sampler={spec.sampler}, in {study_dir}"
          + (f" (trials and checkpoints in {display(home)})" if home else ""))
    store = optuna_store(spec, study_dir)
    try:
        if store is not None:
            store.open(new=True)
        start_ray_and_store(address, spec.mlflow_uri or default_tracking_uri(study_dir))
        check_resources(spec, joined=bool(address))
    except (ResourceError, OptunaStorageError):  # no trial could ever start: leave nothing behind
        if records.STORE_PREP is not None:  # it writes the MLflow store into the study directory
            records.STORE_PREP.join(timeout=60)
        shutil.rmtree(study_dir, ignore_errors=True)
        if remote is not None:
            remote.delete_home_files(pushed)
        raise
    with live(store):
        _fit(build_tuner(spec, study_dir))
    return _finish(study_dir, store)


def resume_study(study_dir: Path, *, address: Optional[str] = None, restart_errored: bool = False) -> "StudyEnd":
    """Continue a study after Ctrl-C, a crash or kill -9 of the driver.

    Finished trials are not rerun; unfinished ones continue from their last
    checkpoint; errored ones are resumed from their checkpoint (or restarted
    from scratch with ``restart_errored``).
    """
    study_dir = Path(study_dir)
    spec = read_study(study_dir)
    exp = study_dir / EXPERIMENT_DIR
    remote = remote_of(study_dir)
    if remote is not None:
        remote.pull_experiment(study_dir)  # the rung replay and the export read the local mirror
    if not restart_errored and every_trial_ended(study_dir, spec.n_trials()):
        # nothing to run: no Ray (7.5-13 s and ~1 GB to start), and no second copy of Tune's state files
        print(f"[otstudy] {study_dir}: every trial has ended; nothing to resume")
        return _finish(study_dir)
    from ray import tune

    init_ray(address)
    check_resources(spec, joined=bool(address))  # before anything of the study is touched
    store = optuna_store(spec, study_dir)
    if store is not None:
        store.open(new=False)
    if remote is not None:
        restorable = tune.Tuner.can_restore(remote.experiment_uri)
        exp_path = remote.experiment_uri
    else:
        restorable = exp.is_dir() and tune.Tuner.can_restore(str(exp.resolve()))
        exp_path = str(exp.resolve())
    if not restorable:
        # stopped before Tune's first snapshot: no trial had been recorded, so nothing is lost by
        # starting the trials now (any partial trial directories are set aside, not deleted)
        if exp.is_dir():
            exp.rename(study_dir / f"{EXPERIMENT_DIR}.unrecorded-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"[otstudy] {study_dir} stopped before its first snapshot: starting its trials now")
        with live(store):
            _fit(build_tuner(spec, study_dir))
        return _finish(study_dir, store)
    import pyarrow.fs as pafs

    repair_recorded_checkpoints(study_dir, remote.fs if remote is not None else pafs.LocalFileSystem())
    for repair in (repair_grid_generator if spec.sampler == "grid" else repair_search_generator,
                   recover_finished_trials, set_aside_abandoned_trials):
        try:
            repair(study_dir, remote)
        except Exception as exc:  # a repair must never stop a resume: Tune restores what it can
            print(f"[otstudy] warning: {repair.__name__} failed ({one_line(exc)}); resuming without it")
    if store is not None:
        publish_saved(study_dir, store)  # drops a trial a killed driver asked after Tune's last save
    tuner = tune.Tuner.restore(exp_path, trainable=_trainable(spec), resume_unfinished=True,
                               resume_errored=not restart_errored, restart_errored=restart_errored)
    # Tune restores the callbacks pickled when the study started, bound to the directory (and MLflow
    # store) of the machine that started it: bind them to this study directory instead
    if getattr(tuner, "_local_tuner", None) is not None:  # (through Ray Client the driver holds no tuner)
        tuner._local_tuner.get_run_config().callbacks = _callbacks(spec, study_dir)
    with live(store):
        _fit(tuner)
    return _finish(study_dir, store)


def every_trial_ended(study_dir: Path, expected: int) -> bool:
    """Whether Tune's latest snapshot records all ``expected`` trials as ended for good: TERMINATED (completed or
    pruned), or ERROR with an error a retry would repeat (the loss diverged, the data cannot be read). A trial that
    failed otherwise would be retried from its checkpoint by a resume, so the study is not over."""
    state = latest_state(study_dir / EXPERIMENT_DIR)
    if len(state) < expected:
        return False
    for t in state.values():
        final = t.get("logdir") and (study_dir / EXPERIMENT_DIR / t["logdir"] / FINAL_ERROR_FILE).exists()
        if t.get("status") != "TERMINATED" and not (t.get("status") == "ERROR" and final):
            return False
    return True


class StudyEnd(NamedTuple):
    """Where a run or resume left the study: its directory, and its trials not finished (not completed, pruned
    or failed) when Tune returned; 0 for a study that is done, more after Ctrl-C (Tune saves the experiment,
    ends its run and returns as if done)."""

    study_dir: Path
    unfinished: int
    completed: int = 0


def optuna_store(spec: Spec, study_dir: Path) -> Optional[OptunaStore]:
    """The study's Optuna storage (:mod:`study.optuna_store`); None for a grid study (no Optuna sampler)."""
    if spec.sampler == "grid":
        return None
    return OptunaStore(storage_url(study_dir, spec.optuna_storage), spec.name, spec.mode)


def publish_saved(study_dir: Path, store: OptunaStore) -> bool:
    """Bring ``store`` in step with the sampler's study as Tune last saved it (what a resume continues from)."""
    study, asked, groups = saved_sampler(Path(study_dir) / EXPERIMENT_DIR)
    if study is None:
        return False
    return store.publish(study, {t.number: groups.get(gid, [gid]) for gid, t in asked.items()})


def _finish(study_dir: Path, store: Optional[OptunaStore] = None) -> StudyEnd:
    remote = remote_of(study_dir)
    if remote is not None:
        remote.pull_experiment(study_dir)
    res, _ = export_study(study_dir)
    store = store or optuna_store(read_study(study_dir), study_dir)
    if store is not None:
        publish_saved(study_dir, store)
    if remote is not None:
        remote.push_home(study_dir)
    counts = res["status"].value_counts().to_dict() if len(res) else {}
    print(f"[otstudy] {study_dir}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    meta = study_dir / "study.json"
    expected = int(json.loads(meta.read_text()).get("n_trials", len(res)) if meta.is_file() else len(res))
    finished = sum(counts.get(s, 0) for s in ("completed", "pruned", "failed"))
    if finished < expected:  # stopped early (Ctrl-C)
        target = display(remote.home) if remote is not None else study_dir
        print(f"[otstudy] {finished} of {expected} trials finished; continue with `otstudy resume {target}`")
    failed = res[res["status"] == "failed"] if len(res) else res
    if len(failed):
        first = next((e for e in failed["error"] if isinstance(e, str) and e), "")
        what = "no trial completed" if not counts.get("completed") else f"{len(failed)} of {len(res)} trials failed"
        print(f"[otstudy] {what}" + (f"; {len(failed)} failed, the first with: {first}" if first else ""))
    return StudyEnd(study_dir, max(expected - finished, 0), int(counts.get("completed", 0)))
