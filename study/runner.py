"""Spec -> Ray Tune (OptunaSearch or grid, ASHA, resources) -> MLflow, and resume.

The only module that talks to Ray Tune's API (besides the small adapters in
searcher.py and tracking.py), so Ray's API churn touches one place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import yaml

from search_spaces import grid

from .spec import Spec, parse_spec
from .storage import Remote, StorageError, display, is_remote, join, one_line, remote_of
from .records import default_tracking_uri, flat_config, git_revision, mlflow_fail_fast

EXPERIMENT_DIR = "ray"  # <study>/ray holds Tune's experiment state
CHECKPOINT_FILE = "state.pt"
EMBEDDINGS_FILE = "embeddings.npz"  # in the final checkpoint directory: the frozen test features
DIVERGED_FILE = "diverged.txt"  # in the trial directory: why the loss diverged (retries fail at once)


class ResourceError(ValueError):
    """A trial asks for more than any node of the (local) cluster has; the message is one line."""


class StudyExists(ValueError):
    pass


# --------------------------------------------------------------------------- the trial, inside a Ray worker


def load_checkpoint(path: Path) -> Optional[Dict[str, Any]]:
    """Load a trial checkpoint with ``weights_only=True``; a corrupt or foreign file gives None and a warning."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupted / not a plain state dict
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {msg[:200]})")
        return None


def restore_state(candidates: List[Path]) -> Optional[Dict[str, Any]]:
    """The newest loadable checkpoint of ``candidates`` (newest first), with a warning per bad one.

    A truncated or corrupted last checkpoint falls back to the previous good
    one (Tune keeps two), and to a fresh start when none loads.
    """
    for i, path in enumerate(candidates):
        state = load_checkpoint(path)
        if state is not None:
            if i:
                warnings.warn(f"resuming from the older checkpoint {path} (epoch {state.get('epoch')})")
            return state
    if candidates:
        warnings.warn("no loadable checkpoint: the trial restarts from scratch")
    return None


def fetch_checkpoint_file(fs, ckpt_dir: str, dst: Path) -> bool:
    """Copy one checkpoint's state file (not its embeddings) from the storage to ``dst``; False if
    it cannot be read."""
    try:
        with fs.open_input_stream(f"{ckpt_dir}/{CHECKPOINT_FILE}") as src, open(dst, "wb") as out:
            out.write(src.readall())
        return True
    except OSError:
        return False


class _TrialFiles:
    """The trial directory on the study's storage (a local or shared path, or an object store),
    read and written through the storage's pyarrow filesystem, as Tune does."""

    def __init__(self):
        import pyarrow.fs as pafs
        from ray import tune

        st = tune.get_context().get_storage()
        self.local = isinstance(st.storage_filesystem, pafs.LocalFileSystem)
        self.fs, self.path = st.storage_filesystem, st.trial_fs_path

    def read_text(self, name: str) -> Optional[str]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return f.readall().decode()

    def write_text(self, name: str, text: str) -> None:
        with self.fs.open_output_stream(f"{self.path}/{name}") as f:
            f.write(text.encode())

    def restore(self, ckpt) -> Optional[Dict[str, Any]]:
        """The newest loadable checkpoint, falling back to the older one Tune keeps."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                       and i.base_name.startswith("checkpoint_")), reverse=True)
        latest = ckpt.path.rstrip("/")
        order = [latest] + [d for d in dirs if d.rstrip("/") != latest]
        if self.local:
            return restore_state([p for p in (Path(d) / CHECKPOINT_FILE for d in order) if p.exists()])
        with tempfile.TemporaryDirectory() as tmp:
            local = []
            for i, d in enumerate(order):
                dst = Path(tmp) / f"{i}_{Path(d).name}" / CHECKPOINT_FILE
                dst.parent.mkdir()
                if fetch_checkpoint_file(self.fs, d, dst):
                    local.append(dst)
            return restore_state(local)


class _Reporter:
    """Hands each epoch's result (and checkpoint directory) to Tune from a second thread.

    Tune's function API blocks the reporting thread until the driver has
    processed the result and asks for the next one (its callbacks, MLflow, the
    experiment snapshot): ~50 ms per epoch on this machine
    (benchmarks/platform_overhead). Reporting from here lets the next epoch
    train meanwhile. At most one result waits. The checkpoint files are written
    by the training thread at the epoch boundary, so each checkpoint is exactly
    the state of its epoch.

    A stop from Tune (ASHA pruning, the end of the study) sets the session's
    ``stop_event``; Tune itself would only notice it in the next ``report``,
    at the next epoch boundary. :meth:`poll`, called by the training loop
    before every step, ends the trial there instead. That matters with
    ``reuse_actors``: Tune hands the process to the next trial only if the
    stopped trial's thread ends within ``TUNE_FUNCTION_THREAD_TIMEOUT_S``
    (2 s by default), and otherwise fails the *next* trial with "Trainable
    runner reuse requires reset_config() to be implemented and return True"
    (seen with 1-2 s epochs on a loaded machine).
    """

    def __init__(self, stop_event=None):
        import queue
        import threading

        self._stop_event = stop_event  # Tune's session.stop_event (a threading.Event), None outside Tune
        self._queue: "queue.Queue" = queue.Queue(maxsize=1)
        self._error: Optional[BaseException] = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="otstudy-report", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import shutil

        from ray import tune

        while True:
            item = self._queue.get()
            if item is None:
                return
            metrics, ckpt_dir = item
            try:
                if ckpt_dir is None:
                    tune.report(metrics)
                else:
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
            except SystemExit:  # Tune stopped the trial (pruned) while this result waited
                self._stopped = True
                self._discard_pending()
                return
            except BaseException as exc:  # e.g. the checkpoint could not be persisted
                self._error = exc
                self._discard_pending()
                return
            finally:
                if ckpt_dir is not None:
                    shutil.rmtree(ckpt_dir, ignore_errors=True)

    def _discard_pending(self) -> None:
        """Remove the checkpoint directory of a result still queued when reporting ended (it goes nowhere)."""
        import queue
        import shutil

        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1] is not None:
                shutil.rmtree(item[1], ignore_errors=True)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise SystemExit(0)  # what Tune's own report does in the training thread on a stop

    def poll(self) -> None:
        """Between training steps: raise a reporting error, or SystemExit once Tune asked the trial to stop."""
        self._check()
        if self._stop_event is not None and self._stop_event.is_set():
            raise SystemExit(0)

    def _offer(self, item) -> bool:
        """Queue ``item`` for the reporter thread; False if that thread has ended (stop or error)."""
        import queue

        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def put(self, metrics: Dict[str, Any], ckpt_dir: Optional[str]) -> None:
        if not self._offer((metrics, ckpt_dir)):
            self._check()  # the thread ends early only on a stop or an error: raise it here

    def close(self, check: bool = True) -> None:
        """Wait until every result has been handed to Tune; re-raise a reporting error if ``check``."""
        self._offer(None)
        self._thread.join()
        self._discard_pending()  # a result queued after the thread ended (it stopped or failed meanwhile)
        if check:
            self._check()


CKPT_STAGING = "otstudy-ckpt-"  # <tmp>/otstudy-ckpt-<pid>-*: a checkpoint on its way to Tune
_swept = False  # this process has swept the temp directory once


def sweep_checkpoint_staging(tmp: Optional[str] = None) -> int:
    """Remove staged checkpoint directories left by trial processes that no longer run.

    A trial process killed while a checkpoint waited for Tune (the end of a study, a lost node, kill -9)
    cannot remove it; each trial process does this once, at its first trial. Returns how many it removed.
    """
    global _swept
    if _swept and tmp is None:
        return 0
    _swept = True
    import shutil

    removed = 0
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{CKPT_STAGING}*-*"):
        pid = d.name[len(CKPT_STAGING):].split("-", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive, and not ours to sweep
        return True
    return True


def tune_trainable(config: Dict[str, Any]) -> None:
    """Ray Tune function trainable: adapts Tune's report/checkpoint API to trainables.run.

    The first result carries ``setup_s``: the seconds from the trainable's start to the training's start
    (torch's import in a fresh worker, reading the checkpoint to resume from), which Tune's
    ``time_total_s`` counts as part of the trial.

    A stopped trial ends before its next training step (see :class:`_Reporter`); Tune's wait for that
    before reusing the process for the next trial is raised from 2 s to 600 s here (one step of a large
    model on a CPU can take longer than 2 s), unless ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` is set.
    """
    started = time.perf_counter()
    # read by Tune's reset_config in this process when it reuses it for the next trial
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")
    import logging

    import ray
    import torch
    from ray import tune

    from trainables.pretrain_probe import TrialDiverged, recent_metrics, run

    for name in ("ray.train", "ray.tune"):  # "Checkpoint successfully created" once per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)

    # exactly the CPUs the trial booked (Ray's OMP_NUM_THREADS does not reach a process that imported
    # torch before it was set): 2 one-CPU trials on 2 cores must not oversubscribe them
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    sweep_checkpoint_staging()
    files = _TrialFiles()
    diverged = files.read_text(DIVERGED_FILE)
    if diverged is not None:  # a retry of a diverged trial would diverge again: fail at once, train nothing
        raise TrialDiverged(diverged)
    ckpt = tune.get_checkpoint()
    restore = files.restore(ckpt) if ckpt is not None else None
    # the metrics of the last epochs before the one this trial continues from: a driver killed after
    # Tune persisted a checkpoint but before those epochs' results reached the trial's result.json in
    # storage would leave a gap in the history; read_results fills it from here (a JSON string: one
    # key in every first result, so Tune's progress.csv keeps its columns)
    setup: Dict[str, Any] = {"restored_metrics": json.dumps(recent_metrics(restore or {}))}
    carried: Dict[str, float] = {}
    node_id = ray.get_runtime_context().get_node_id()  # which cluster node ran the trial

    def report(metrics: Dict[str, Any], checkpoint: Optional[Dict[str, Any]] = None) -> None:
        m = {**metrics, "node_id": node_id, **setup}
        setup.clear()
        # keep the pruning signal in every result, also between probe epochs
        if "knn_acc" in m:
            carried["knn_acc"] = m["knn_acc"]
        elif "knn_acc" in carried:
            m["knn_acc"] = carried["knn_acc"]
        if checkpoint is None:
            reporter.put(m, None)
            return
        emb = checkpoint.pop("embeddings", None) if isinstance(checkpoint, dict) else None
        d = tempfile.mkdtemp(prefix=f"{CKPT_STAGING}{os.getpid()}-")  # removed once Tune persisted it
        torch.save(checkpoint, Path(d) / CHECKPOINT_FILE)
        if emb is not None:  # travels with the final checkpoint to the study's storage
            import numpy as np

            np.savez_compressed(Path(d) / EMBEDDINGS_FILE, features=emb["features"].numpy(),
                                labels=emb["labels"].numpy())
        try:
            reporter.put(m, d)
        except BaseException:  # stopped by Tune, or reporting failed: this checkpoint goes nowhere
            import shutil

            shutil.rmtree(d, ignore_errors=True)
            raise

    try:  # Tune's stop signal for this trial (internal API: without it a stop waits for the next report)
        from ray.train._internal.session import get_session

        stop_event = getattr(get_session(), "stop_event", None)
    except ImportError:
        stop_event = None
    reporter = _Reporter(stop_event)
    finished = False
    setup["setup_s"] = time.perf_counter() - started
    try:
        run(flat_config(config), report=report, restore=restore, poll=reporter.poll)
        finished = True
    except TrialDiverged as exc:
        files.write_text(DIVERGED_FILE, str(exc))
        raise
    finally:  # the results before an error are handed to Tune too; an error in flight is not masked
        reporter.close(check=finished)


# --------------------------------------------------------------------------- building the Tuner


def trial_resources(spec: Spec) -> Dict[str, float]:
    # always book CPUs too: {"gpu": 0.5} alone would book 0 CPUs and oversubscribe the node
    return {"cpu": float(spec.resources.get("cpu", 1)), "gpu": float(spec.resources.get("gpu", 0))}


def _trainable(spec: Spec):
    from ray import tune

    return tune.with_resources(tune_trainable, trial_resources(spec))


def check_resources(spec: Spec, *, joined: bool) -> None:
    """Fail (or, on a cluster that may add nodes, warn) when no node can hold one trial.

    Tune would keep such a trial pending for ever, saying only every 60 s that no trial started
    (e.g. ``resources: {gpu: 1}`` copied from a GPU cluster to a laptop). A local cluster started by
    this process never grows: :class:`ResourceError`. A cluster joined with ``--address`` may be
    autoscaling: one warning line, and the trials wait for a node that fits.
    """
    import ray

    need = trial_resources(spec)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(res.get("CPU", 0) >= need["cpu"] and res.get("GPU", 0) >= need["gpu"] for res in nodes):
        return
    most = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    ask = f"{need['cpu']:g} CPU(s)" + (f" and {need['gpu']:g} GPU(s)" if need["gpu"] else "")
    have = f"{most.get('CPU', 0):g} CPU(s) and {most.get('GPU', 0):g} GPU(s)"
    if joined:
        print(f"[otstudy] warning: resources: each trial asks for {ask}, but the largest node of the "
              f"cluster has {have}; the trials wait until a node that fits joins (Ctrl-C stops the study, "
              f"`otstudy resume` continues it)")
        return
    raise ResourceError(f"resources: each trial asks for {ask}, but this machine's Ray has {have}; lower "
                        f"resources in the spec, or run on a cluster that has them (--address)")


def _search(spec: Spec):
    """(param_space, search_alg, num_samples) for the spec's sampler."""
    from ray import tune

    space: Dict[str, Any] = {**spec.fixed, "dataset": spec.dataset}
    if spec.sampler == "grid":
        if len(spec.methods) == 1 or spec.cases_set_method:
            space["method"] = spec.methods[0]
        space["__case__"] = tune.grid_search(grid.points(spec.grid_configs(), spec.seeds))
        return space, None, spec.num_samples

    import optuna

    from search_spaces.spaces import DefineByRun

    from .searcher import PrunedAwareOptunaSearch, SeedRepeater

    sampler = (optuna.samplers.TPESampler(seed=spec.sampler_seed) if spec.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.sampler_seed))
    inner = PrunedAwareOptunaSearch(space=DefineByRun(spec.search, spec.methods), metric=spec.metric,
                                    mode=spec.mode, sampler=sampler)
    return space, SeedRepeater(inner, spec.seeds), spec.num_samples * len(spec.seeds)


def _scheduler(spec: Spec, study_dir: Path):
    from ray.tune.schedulers import FIFOScheduler

    from trainables.catalog import default

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

    from .tracking import MLflowTracker, Progress, RemoteSync

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


# --------------------------------------------------------------------------- Ray


def _prepare_store(uri: str) -> None:
    try:  # importing mlflow and creating/migrating a new sqlite store takes seconds (a copy: 0.03 s)
        from mlflow.tracking import MlflowClient

        from .tracking import seed_sqlite_store

        seed_sqlite_store(uri)

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception:
        pass  # the tracker records and reports tracking failures itself


def _prepare_driver(uri: str) -> None:
    try:  # Ray Tune and the tracker's callbacks (1.2 s of imports) while ray.init waits for its processes
        import importlib

        importlib.import_module("study.tracking")
    except Exception:
        pass  # raised again, with its message, where the driver needs it
    _prepare_store(uri)


def start_ray_and_store(address: Optional[str], tracking_uri: str) -> None:
    """Start (or join) Ray while a thread imports Ray Tune, then prepares the MLflow store.

    Each takes seconds, and ray.init mostly waits for the processes it starts. The study starts
    without waiting for the store: the tracker holds its MLflow calls until the thread has finished
    (``records.STORE_PREP``; it must not race the store's schema migration), while the first trial's
    worker starts. With Ray already running (--address) the thread had finished 2.2 s after ray.init
    returned; a 1-trial study's first line came 0.7 s sooner than when the driver waited for it
    (median of 8 paired runs, sooner in 7; BENCHMARKS.md). With a local Ray starting, the two cores
    were busy either way, and the pairs showed no difference.
    """
    import threading

    from . import records

    t = threading.Thread(target=_prepare_driver, args=(tracking_uri,), daemon=True, name="otstudy-store")
    records.STORE_PREP = t
    t.start()
    init_ray(address)


def init_ray(address: Optional[str] = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # per-epoch checkpoints are the point (resume loses at most one epoch): silence Tune's warning about them
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    mlflow_fail_fast()
    kwargs: Dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                              "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # A local cluster's raylet starts one idle Python worker per CPU when the driver connects; on a
        # small machine they import Ray beside the driver, Tune and the first trial's worker (0.66-1.5
        # CPU-s of a 3.4-7.4 CPU-s start on 2 cores, measured per process in /proc), and a trial's actor
        # does not need them. Without them the first trial's data was loaded sooner in 8 of 11 paired
        # runs (by ~0.5-1.5 s; this machine's noise is larger). The raylet reads these from the
        # environment it inherits; a cluster joined with --address keeps its own settings.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        os.environ.setdefault("PL_DISABLE_FORK", "1")  # what Tune sets in each trial's runtime env
        # Ray 2.60 turns token authentication on for a new local cluster and warns on every start that it
        # did so (a warning about nothing wrong, in every study's output): keep the default, drop the line
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_AUTH_NOTICE)
        inherited = dict(os.environ)  # the raylet ray.init starts, and the workers it starts, inherit it
        with _lean_head():
            ray.init(**kwargs)
        global _RAYLET_ENV
        _RAYLET_ENV = inherited


class _Drop(logging.Filter):
    """Drops a logger's records that start with ``prefix``; any other record of it passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# one instance each: a logger adds a filter it already has once
# Ray's notice that a new local cluster has token authentication on (its default); e.g. that it is off passes
_TOKEN_AUTH_NOTICE = _Drop("Token authentication is enabled for this Ray cluster")
# Tune's advice after Ctrl-C to call Tuner.restore(path, trainable=...): _finish prints `otstudy resume DIR`
_TUNE_RESTORE_ADVICE = _Drop("Experiment has been interrupted")


FULL_HEAD_ENV = "OTSTUDY_RAY_FULL_HEAD"  # =1: a local cluster with Ray's API server and autoscaler monitor
_RAYLET_ENV: Optional[Dict[str, str]] = None  # the environment of the local cluster this process started


def _fit(tuner) -> None:
    logging.getLogger("ray.tune.tune").addFilter(_TUNE_RESTORE_ADVICE)
    with _trial_env_inherited():
        tuner.fit()


@contextlib.contextmanager
def _trial_env_inherited():
    """While Tune runs, start trial processes without a runtime env where the one Tune gives them is
    already their inherited environment.

    Tune creates each trial's actor with ``runtime_env={"env_vars": {...}}`` (``PL_DISABLE_FORK=1`` and
    the driver's values of a few variables). A worker with a runtime env is started through Ray's
    runtime-env agent and ``setup_worker.py`` (a Python process importing Ray, which then execs the
    worker): a trial's actor answered after 0.90 s instead of 0.57 s without one (medians; sooner in 10
    of 10 pairs, ``benchmarks/platform_overhead --part actor``), on the path to each concurrent trial's
    first epoch (with reuse_actors, once per concurrent trial). On a local cluster this
    process started, the workers inherit this process's environment as it was at ``ray.init``
    (``PL_DISABLE_FORK=1`` is set before it), so where every variable of Tune's env has that value
    there, the actor class is registered without it, to the same effect. Otherwise (a variable changed
    since, or a cluster joined with ``--address``, whose workers have other environments) Tune's
    runtime env stays. Tune's private ``_ActorClassCache.get`` is replaced only for the duration of the
    study; where a Ray version lacks it, Tune's behaviour stays.
    """
    env, cache = _RAYLET_ENV, None
    if env is not None:
        try:
            from ray.tune.execution.class_cache import _ActorClassCache as cache
        except ImportError:
            cache = None
    original = getattr(cache, "get", None)
    if not callable(original):
        yield
        return

    def get(self, trainable_cls):
        import ray

        remote_cls = original(self, trainable_cls)
        wanted = getattr(remote_cls, "_default_options", {}).get("runtime_env")
        registered = getattr(self, "_cache", None)
        if (isinstance(wanted, dict) and set(wanted) == {"env_vars"} and isinstance(registered, dict)
                and all(env.get(k) == v for k, v in wanted["env_vars"].items())):
            remote_cls = registered[trainable_cls] = ray.remote(trainable_cls)  # registered once
        return remote_cls

    cache.get = get
    try:
        yield
    finally:
        cache.get = original


@contextlib.contextmanager
def _lean_head():
    """While a local cluster starts, skip two head processes a study on one machine never uses.

    * Ray's API server (``dashboard.py``): it starts even with ``include_dashboard=False`` (then only to
      report usage statistics), and ``ray.init`` waits for it to publish its URL before it starts the
      raylet. It serves the dashboard, job submission and the state API (``ray list ...``).
    * The autoscaler's monitor: a local cluster has nothing to scale. Its one message a study could
      meet, a trial no node can hold, is :func:`check_resources`' error, raised before any trial.

    Both are Python processes importing Ray's modules beside the raylet's agents on a small machine:
    without them ``ray.init`` took 2.51 s instead of 3.46 s (medians; Ray's start 0.86 s shorter in
    10 of 10 paired runs, ``benchmarks/platform_overhead --part head``). Ray's private
    ``Node`` methods are replaced only for the duration of ``ray.init`` in this process; where a Ray
    version lacks them, the full head starts. ``OTSTUDY_RAY_FULL_HEAD=1`` keeps Ray's defaults (e.g.
    to inspect a local study with ``ray list actors``); a cluster joined with ``--address`` is never
    touched.
    """
    saved, Node = {}, None
    if os.environ.get(FULL_HEAD_ENV, "") not in ("1", "true", "yes"):
        try:
            from ray._private.node import Node
        except ImportError:  # a Ray without this private module: its full head
            pass
        saved = {name: getattr(Node, name) for name in ("start_api_server", "start_monitor")
                 if callable(getattr(Node, name, None))}
        for name in saved:
            setattr(Node, name, _skip_head_process)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


def _skip_head_process(self, *args, **kwargs) -> None:
    return None


def shutdown_ray() -> None:
    """``ray.shutdown()``, without its 1 s wait for the autoscaler monitor of a local cluster.

    ``ray.shutdown()`` stops the processes ``ray.init()`` started one after another, giving each 1 s to
    exit after SIGTERM; the autoscaler's monitor never exits in that time (measured: 1.02 s of a
    1.38 s shutdown; the raylet, GCS and the others take 0.02-0.04 s each). It holds nothing of a
    study (a local cluster has nothing to autoscale), so it is killed first (otstudy's own local
    cluster starts without it, see :func:`_lean_head`, unless ``OTSTUDY_RAY_FULL_HEAD=1``). Connected
    to a cluster started elsewhere, this process owns no Ray process and only disconnects.
    """
    import ray

    global _RAYLET_ENV
    _RAYLET_ENV = None
    if not ray.is_initialized():
        return
    try:  # Ray's private node handle; if it moved in another Ray version, the plain shutdown below
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        if node is not None and node.is_head():
            for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
                if info.process.poll() is None:
                    info.process.kill()
                    info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - only an optimisation
        pass
    ray.shutdown()


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


def read_study(study_dir: Path) -> Spec:
    """The spec a study ran with; a clear error if ``study_dir`` is not a study."""
    f = Path(study_dir) / "spec.yaml"
    if not f.is_file():
        raise ValueError(f"{study_dir} is not an otstudy study directory (no spec.yaml)")
    return parse_spec(yaml.safe_load(f.read_text()))


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
            import shutil

            shutil.rmtree(study_dir, ignore_errors=True)
            raise StorageError(f"storage {display(home)}: cannot be written ({one_line(exc)})") from None
    print(f"[otstudy] study {spec.name}: {spec.n_trials()} trials ({spec.n_configs()} configurations x "
          f"{len(spec.seeds)} seeds), sampler={spec.sampler}, in {study_dir}"
          + (f" (trials and checkpoints in {display(home)})" if home else ""))
    start_ray_and_store(address, spec.mlflow_uri or default_tracking_uri(study_dir))
    try:
        check_resources(spec, joined=bool(address))
    except ResourceError:  # no trial could ever start: leave nothing behind
        import shutil

        from . import records

        if records.STORE_PREP is not None:  # it writes the MLflow store into the study directory
            records.STORE_PREP.join(timeout=60)
        shutil.rmtree(study_dir, ignore_errors=True)
        if remote is not None:
            remote.delete_home_files(pushed)
        raise
    _fit(build_tuner(spec, study_dir))
    return _finish(study_dir)


def resume_study(study_dir: Path, *, address: Optional[str] = None, restart_errored: bool = False) -> "StudyEnd":
    """Continue a study after Ctrl-C, a crash or kill -9 of the driver.

    Finished trials are not rerun; unfinished ones continue from their last
    checkpoint; errored ones are resumed from their checkpoint (or restarted
    from scratch with ``restart_errored``).
    """
    from ray import tune

    study_dir = Path(study_dir)
    spec = read_study(study_dir)
    init_ray(address)
    check_resources(spec, joined=bool(address))  # before anything of the study is touched
    exp = study_dir / EXPERIMENT_DIR
    remote = remote_of(study_dir)
    if remote is not None:
        remote.pull_experiment(study_dir)  # the rung replay and the export read the local mirror
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
        _fit(build_tuner(spec, study_dir))
        return _finish(study_dir)
    import pyarrow.fs as pafs

    repair_recorded_checkpoints(study_dir, remote.fs if remote is not None else pafs.LocalFileSystem())
    for repair in (repair_grid_generator if spec.sampler == "grid" else repair_search_generator,
                   recover_finished_trials, set_aside_abandoned_trials):
        try:
            repair(study_dir, remote)
        except Exception as exc:  # a repair must never stop a resume: Tune restores what it can
            print(f"[otstudy] warning: {repair.__name__} failed ({one_line(exc)}); resuming without it")
    tuner = tune.Tuner.restore(exp_path, trainable=_trainable(spec), resume_unfinished=True,
                               resume_errored=not restart_errored, restart_errored=restart_errored)
    # Tune restores the callbacks pickled when the study started, bound to the directory (and MLflow
    # store) of the machine that started it: bind them to this study directory instead
    if getattr(tuner, "_local_tuner", None) is not None:  # (through Ray Client the driver holds no tuner)
        tuner._local_tuner.get_run_config().callbacks = _callbacks(spec, study_dir)
    _fit(tuner)
    return _finish(study_dir)


def set_aside_abandoned_trials(study_dir: Path, remote=None) -> List[str]:
    """Set aside the trials a killed driver had started after its last state snapshot.

    Tune's restored state does not know them, so they are never continued: the search algorithm,
    restored to the same snapshot, hands their configurations out again under new trial ids. Their
    directories (checkpoints, perhaps a few results) are kept, listed in ``abandoned_trials.json``
    for the export to leave out (they would show as extra pending or running trials without a
    result), and their MLflow runs, left RUNNING by the dead driver, are ended as KILLED with the
    tag ``otstudy.abandoned``. A restart of a recorded trial (``trial_<id>_<4 hex>``) is not one of
    them, and neither is any trial of a grid study: Tune's grid generator numbers its trials, so the
    restored generator starts the same trial id again (in ``trial_<id>_<4 hex>``, which the export
    follows). Returns the trial ids set aside.
    """
    from .export import abandoned_trials, latest_state, recorded_id
    from .records import ABANDONED_FILE

    exp = Path(study_dir) / EXPERIMENT_DIR
    state = latest_state(exp)
    spec = read_study(study_dir)
    if not state or spec.sampler == "grid":
        return []
    named = {st["logdir"] for st in state.values() if st.get("logdir")}
    known = abandoned_trials(exp)
    new = {}
    for d in sorted(exp.glob("trial_*")):
        tid = d.name[len("trial_"):]
        # a recorded trial, or a restart attempt of one (trial_<id>_<4 hex>), is not abandoned
        if d.is_dir() and d.name not in named and tid not in known and recorded_id(tid, state) is None:
            new[tid] = d.name
    if not new:
        return []
    listed = exp / ABANDONED_FILE
    listed.write_text(json.dumps({**known, **new}, indent=1))
    if remote is not None:
        remote.put_experiment_file(ABANDONED_FILE, listed)
    try:
        from .tracking import end_abandoned_runs

        end_abandoned_runs(spec.mlflow_uri or default_tracking_uri(study_dir), spec.name, list(new))
    except Exception as exc:  # noqa: BLE001 - the runs only stay RUNNING in MLflow
        print(f"[otstudy] warning: the MLflow runs of abandoned trials were not ended ({one_line(exc)})")
    print(f"[otstudy] {len(new)} trial(s) started after the last snapshot were lost with the driver "
          f"({', '.join(sorted(new))}): their configurations start again under new trial ids; their "
          f"directories are kept and left out of the results")
    return sorted(new)


def repair_recorded_checkpoints(study_dir: Path, fs) -> List[str]:
    """Recreate checkpoints that Tune's last snapshot names but the trial has already deleted.

    With ``num_to_keep`` Tune deletes a trial's oldest checkpoint when a new
    one arrives and uploads the experiment snapshot that stops naming it a
    little later (in the background, for an object store); a driver killed in
    between leaves a snapshot whose trial cannot be restored ("does not exist
    on storage anymore"). The missing directory is recreated from the trial's
    next kept checkpoint (the closest state after it), so the trial resumes
    from there instead of failing. Returns the checkpoint paths recreated.
    """
    import pyarrow.fs as pafs
    from ray.tune.utils.serialization import TuneFunctionDecoder

    decoder = TuneFunctionDecoder(allow_cloudpickle=True)  # Tune's own state, written by this study's driver
    done: List[str] = []
    for f in sorted((Path(study_dir) / EXPERIMENT_DIR).glob("experiment_state-*.json")):
        try:
            entries = json.loads(f.read_text()).get("trial_data", [])
        except (OSError, json.JSONDecodeError):
            continue
        for entry in entries:
            try:
                runtime = decoder.decode(entry[1]) if isinstance(entry[1], str) else entry[1]
                manager = runtime["checkpoint_manager"]
                result = manager.latest_checkpoint_result
                older = [r.checkpoint.path.rstrip("/") for r in manager._checkpoint_results if r is not result]
            except Exception:  # an entry from another Ray version: Tune will say what is wrong
                continue
            for path in older:
                # an older kept checkpoint already deleted: Tune deletes it again when the next one
                # arrives and logs an ERROR with a traceback (harmless: the new one is registered
                # first); an empty directory lets it delete quietly (restores skip it: no state.pt)
                if fs.get_file_info(path).type == pafs.FileType.NotFound:
                    fs.create_dir(path)
            if result is None:
                continue
            path = result.checkpoint.path.rstrip("/")
            if path in done or fs.get_file_info(path).type != pafs.FileType.NotFound:
                continue
            parent, name = path.rsplit("/", 1)
            kept = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
                          if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
            if not kept:
                continue
            source = next((k for k in kept if k.rsplit("/", 1)[1] > name), kept[-1])
            fs.create_dir(path)
            pafs.copy_files(source, path, source_filesystem=fs, destination_filesystem=fs)
            print(f"[otstudy] {parent.rsplit('/', 1)[-1]}: the snapshot names {name}, deleted before the driver "
                  f"stopped; it resumes from a copy of {source.rsplit('/', 1)[-1]}")
            done.append(path)
    return done


def _save_tune_state(path: Path, state: Any, remote) -> None:
    """Replace a pickled Tune state file in the experiment directory (and on the study's storage)."""
    import ray.cloudpickle as cloudpickle

    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        cloudpickle.dump(state, f)
    os.replace(tmp, path)
    if remote is not None:
        remote.put_experiment_file(path.name, path)


def _load_tune_state(study_dir: Path, pattern: str):
    """(the newest pickled Tune state file matching ``pattern`` in the experiment directory, its
    contents), or None when there is none or it is not a state this Ray version reads."""
    import ray.cloudpickle as cloudpickle

    files = sorted((Path(study_dir) / EXPERIMENT_DIR).glob(pattern))
    if not files:
        return None
    try:
        with open(files[-1], "rb") as f:
            return files[-1], cloudpickle.load(f)
    except Exception:  # not a state this Ray version writes: Tune will say what is wrong
        return None


def repair_search_generator(study_dir: Path, remote=None) -> Optional[str]:
    """Put an Optuna study's seed groups back in step with the experiment snapshot's trials (see
    :func:`study.searcher.reconcile_with_snapshot`). Returns what was done, or None."""
    from .export import latest_state
    from .searcher import reconcile_with_snapshot

    trials = latest_state(Path(study_dir) / EXPERIMENT_DIR)
    loaded = _load_tune_state(study_dir, "search_gen_state-*.json")
    if not trials or loaded is None:
        return None
    path, state = loaded
    what = reconcile_with_snapshot(state, {tid: {**t, "config": t["config"] or {}} for tid, t in trials.items()})
    if what is not None:
        _save_tune_state(path, state, remote)
        print(f"[otstudy] {what}")
    return what


def recover_finished_trials(study_dir: Path, remote=None) -> List[str]:
    """Recover the last epochs of trials that finished just before the driver died.

    Tune records a trial as finished in its snapshot as soon as the driver has processed the final
    result, but the trial's ``result.json`` reaches storage later (on an object store, with the next
    upload); a driver killed in between leaves a finished trial whose history stops short of its last
    epochs, the final metrics included, and a resume does not run it again (seen in the object-store
    kill test: the trial was counted as pruned). Its last checkpoint holds the metrics of its last
    epochs (``recent_metrics``): the missing ones are written to ``recovered_results.json`` in the
    trial directory (marked ``restored: 1``), which :func:`study.export.read_results` adds. Returns
    the trial ids recovered.
    """
    import pyarrow.fs as pafs

    from trainables.pretrain_probe import recent_metrics

    from .export import latest_state, read_results
    from .records import RECOVERED_FILE

    exp = Path(study_dir) / EXPERIMENT_DIR
    fs = remote.fs if remote is not None else pafs.LocalFileSystem()
    done = []
    for tid, t in latest_state(exp).items():
        logdir = t["logdir"]
        if t["status"] != "TERMINATED" or not logdir or (exp / logdir / RECOVERED_FILE).exists():
            continue
        rows = read_results(exp / logdir / "result.json")
        if rows and rows[-1].get("final"):
            continue
        last = max((int(r.get("epoch", 0)) for r in rows), default=0)
        where = f"{remote.path}/{EXPERIMENT_DIR}/{logdir}" if remote is not None else str((exp / logdir).resolve())
        ckpts = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
                        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
        if not ckpts:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / CHECKPOINT_FILE
            state = (load_checkpoint(local) if fetch_checkpoint_file(fs, ckpts[0], local) else None) or {}
        missing = [m for m in recent_metrics(state) if isinstance(m, dict) and int(m.get("epoch", 0)) > last]
        if not missing:  # a pruned trial: its last checkpoint is not newer than its history
            continue
        out_file = exp / logdir / RECOVERED_FILE
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text("".join(json.dumps({**m, "epoch": int(m["epoch"]), "trial_id": tid, "restored": 1})
                                    + "\n" for m in missing))
        if remote is not None:
            remote.put_experiment_file(f"{logdir}/{RECOVERED_FILE}", out_file)
        print(f"[otstudy] {logdir}: finished before the driver stopped; epoch(s) "
              f"{', '.join(str(int(m['epoch'])) for m in missing)} recovered from its last checkpoint")
        done.append(tid)
    return done


def repair_grid_generator(study_dir: Path, remote=None) -> Optional[str]:
    """Put the grid's trial generator back at the experiment snapshot's trials.

    Tune saves a study as two files: the experiment state (its trials) and the state of the search
    algorithm (for a grid, Tune's variant generator: which grid points it has handed out). A driver
    killed between writing them, or, on an object store, while uploading them (in no fixed order),
    leaves a generator that is ahead of the trials (a grid point handed out that the experiment never
    recorded: the resumed study would end one trial short, seen in the object-store kill test) or
    behind them (a grid point recorded that it would hand out again, under the same trial id). The
    generator is rebuilt from the grid and moved on by the recorded trials, after checking that it
    hands out the same trial ids in the same order; anything else is left to Tune. Returns a
    one-line description of the repair, or None.
    """
    from ray.tune.search.basic_variant import _TrialIterator

    from .export import latest_state

    trials = [(tid, t["status"]) for tid, t in latest_state(Path(study_dir) / EXPERIMENT_DIR).items()]
    loaded = _load_tune_state(study_dir, "basic-variant-state-*.json")
    if not trials or loaded is None:
        return None
    path, gen = loaded
    try:
        (old,) = gen["_iterators"]
    except Exception:  # not a state this Ray version writes: Tune will say what is wrong
        return None
    trials.sort()  # the snapshot lists them in no fixed order; their ids count up (<prefix>_00000, ...)
    if old.num_points_to_evaluate or old.counter == len(trials):  # one grid: it counts from 0
        return None
    fresh = _TrialIterator(uuid_prefix=old.uuid_prefix, num_samples=old.num_samples,
                           unresolved_spec=old.unresolved_spec, constant_grid_search=old.constant_grid_search,
                           lazy_eval=old.lazy_eval, random_state=old.random_state)

    def count(resolved_vars, spec) -> str:  # the trial id create_trial would give, without a Trial
        fresh.counter += 1
        return fresh.uuid_prefix + "%05d" % (fresh.counter - 1)

    fresh.create_trial = count
    try:
        for tid, _ in trials:
            if next(fresh) != tid:
                return None
    except StopIteration:
        return None
    finally:
        del fresh.create_trial
    ids = {tid for tid, _ in trials}
    unfinished = {tid for tid, status in trials if status not in ("TERMINATED", "ERROR")}
    what = (f"the grid generator had handed out {old.counter} trials, the snapshot records "
            f"{len(trials)}: it goes on from trial {len(trials) + 1}")
    gen.update(_iterators=[fresh], _finished=False, _live_trials=(set(gen["_live_trials"]) & ids) | unfinished)
    _save_tune_state(path, gen, remote)
    print(f"[otstudy] {what}")
    return what


class StudyEnd(NamedTuple):
    """Where a run or resume left the study: its directory, and its trials not finished (not completed, pruned
    or failed) when Tune returned; 0 for a study that is done, more after Ctrl-C (Tune saves the experiment,
    ends its run and returns as if done)."""

    study_dir: Path
    unfinished: int


def _finish(study_dir: Path) -> StudyEnd:
    from .export import export_study

    remote = remote_of(study_dir)
    if remote is not None:
        remote.pull_experiment(study_dir)
    res, _ = export_study(study_dir)
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
    return StudyEnd(study_dir, max(expected - finished, 0))
