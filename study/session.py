"""The Ray session of a study: what a trial books, a local Ray (lean head, inherited environment) or a joined
cluster, Tune's fit with its log filters, and stopping what this process started.

Ray is imported in the functions: ``import ray`` costs 0.6 s, and only run and resume start a session.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import records
from .records import mlflow_fail_fast
from .spec import Spec


GPUS_ENV = "OTSTUDY_RAY_NUM_GPUS"  # the GPUs a local Ray declares, where its detection is not wanted


class ResourceError(ValueError):
    """A trial asks for more than any node of the (local) cluster has; the message is one line."""


def trial_resources(spec: Spec) -> Dict[str, float]:
    # always book CPUs too: {"gpu": 0.5} alone would book 0 CPUs and oversubscribe the node
    return {"cpu": float(spec.resources.get("cpu", 1)), "gpu": float(spec.resources.get("gpu", 0))}


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


def _declared_gpus(value: str) -> int:
    if not value.strip().isdigit():
        raise ResourceError(f"{GPUS_ENV}={value!r}: expected a whole number of GPUs for the local Ray to declare")
    return int(value)


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
        if os.environ.get(GPUS_ENV):  # GPUs the local Ray declares (logical ones on a machine without: tests)
            kwargs["num_gpus"] = _declared_gpus(os.environ[GPUS_ENV])
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
    with _trial_env_inherited(), _lean_experiment_state():
        tuner.fit()


STATE_ENV = "OTSTUDY_TUNE_STATE"  # =ray: Tune's own experiment-state bookkeeping (benchmarks/state_saves compares)
STATE_WRITE_RATE = 100e3  # bytes/s: the most Tune's experiment-state saves write on average, whatever the study's size


@contextlib.contextmanager
def _lean_experiment_state():
    """While Tune runs in this driver, save its experiment state less often and smaller, sized for 1,000+ trials.

    Tune rewrites its whole experiment state (every trial's record) at each save, and saves it whenever a trial
    has checkpointed ``num_to_keep`` (2) times since the last save: with a checkpoint per epoch, every couple of
    epochs of any trial. Each trial's record holds, for each of the ~25 numbers it reports, the last 5 and 10
    values (Tune's "last-n-avg" windows, which otstudy never reads), as indented JSON. Here, in the driver only:

    * no save forced by trial checkpoints; Tune saves on its own clock ("auto": every max(10 s, 19 x the time
      a save takes)), here also at least ``size / STATE_WRITE_RATE`` apart (1,000 trials, ~14 MB: every ~140 s
      instead of 10 s), and when the study stops. After a kill -9 a resume redoes at most a save period's
      work: trials that finished after the last save are recovered from their files, a running one continues
      from its newest checkpoint on disk, wherever the save lags it
      (:func:`study.repairs.repair_recorded_checkpoints`), and one started after it runs again;
    * no last-n windows (Tune's min / max / avg / last per metric stay), compact JSON.

    Bytes written per study and per save, against Tune's own bookkeeping: ``benchmarks/state_saves`` (BENCHMARKS.md).
    ``OTSTUDY_TUNE_STATE=ray`` keeps Tune's; where a Ray version lacks these private names, Tune's stays.
    """
    if os.environ.get(STATE_ENV, "") == "ray":
        yield
        return
    try:
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
        from ray.tune.trainable.metadata import _TrainingRunMetadata
    except ImportError:
        yield
        return
    saved = (_ExperimentCheckpointManager.on_trial_checkpoint, _ExperimentCheckpointManager._update_auto_checkpoint_time,
             _TrainingRunMetadata.__init__.__defaults__, _TrainingRunMetadata.get_json_state)
    tune_period = saved[1]

    def paced(self, time_taken: float) -> None:
        tune_period(self, time_taken)
        if self._auto_checkpoint_enabled:
            states = Path(self._storage.experiment_driver_staging_path).glob("experiment_state-*.json")
            size = max((f.stat().st_size for f in states), default=0)
            self._checkpoint_period = max(self._checkpoint_period, size / STATE_WRITE_RATE)

    def compact_json_state(self) -> str:
        if self._cached_json is None:
            data = self.__dict__
            data.pop("_cached_json", None)
            from ray.tune.utils.serialization import TuneFunctionEncoder

            self._cached_json = json.dumps(data, separators=(",", ":"), cls=TuneFunctionEncoder)
        return self._cached_json

    _ExperimentCheckpointManager.on_trial_checkpoint = lambda self, trial: None
    _ExperimentCheckpointManager._update_auto_checkpoint_time = paced
    _TrainingRunMetadata.__init__.__defaults__ = ((),)
    _TrainingRunMetadata.get_json_state = compact_json_state
    try:
        yield
    finally:
        (_ExperimentCheckpointManager.on_trial_checkpoint, _ExperimentCheckpointManager._update_auto_checkpoint_time,
         _TrainingRunMetadata.__init__.__defaults__, _TrainingRunMetadata.get_json_state) = saved


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


def stop_ray_started_in(temp_dir: str, timeout: float = 15.0) -> int:
    """Stop the Ray processes on this machine whose command line names ``temp_dir`` (a Ray started with
    ``ray start --temp-dir=temp_dir``, and the nodes that joined it here), by process id: SIGTERM, then
    SIGKILL after ``timeout`` seconds. ``ray stop`` would stop every Ray on the machine, also ones this
    process did not start. Returns how many processes were signalled."""
    import signal

    def named() -> List[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    found = named()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in named():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + (timeout if sig == signal.SIGTERM else 5)
        while named() and time.time() < deadline:
            time.sleep(0.2)
        if not named():
            break
    return len(found)
