"""The trial inside a Ray worker: Tune's function trainable around trainables.pretrain_probe.run, its reports and
checkpoints on the study's storage (a local or shared path, or an object store), and its restore.

torch, ray.tune and pyarrow are imported in the functions that run in the worker: the driver imports this module
(the Tuner names tune_trainable) and must not import torch (it cost the CLI 1.3-2.8 s per command).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from .history import checkpoint_dirs
from .records import CHECKPOINT_FILE, EMBEDDINGS_FILE, FINAL_ERROR_FILE, flat_config


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
        # a trial that fails before its first report may beat Tune to its directory (Tune's loggers make it
        # in the driver when the trial starts): without it the marker was lost, "Failed to open local file"
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{name}") as f:
            f.write(text.encode())

    def restore(self, ckpt) -> Optional[Dict[str, Any]]:
        """The newest loadable checkpoint, falling back to the older one Tune keeps."""
        dirs = checkpoint_dirs(self.fs, self.path)
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
        self._stop_event = stop_event  # Tune's session.stop_event (a threading.Event), None outside Tune
        self._queue: "queue.Queue" = queue.Queue(maxsize=1)
        self._error: Optional[BaseException] = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="otstudy-report", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
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


def _stage_checkpoint(checkpoint: Dict[str, Any]) -> str:
    """A directory holding the checkpoint's state (and the final one's frozen test features, which travel with
    it to the study's storage) for Tune to persist; removed once Tune has (:func:`sweep_checkpoint_staging`)."""
    import numpy as np
    import torch

    emb = checkpoint.pop("embeddings", None)
    d = tempfile.mkdtemp(prefix=f"{CKPT_STAGING}{os.getpid()}-")
    torch.save(checkpoint, Path(d) / CHECKPOINT_FILE)
    if emb is not None:
        np.savez_compressed(Path(d) / EMBEDDINGS_FILE, features=emb["features"].numpy(), labels=emb["labels"].numpy())
    return d


def tune_trainable(config: Dict[str, Any]) -> None:
    """Ray Tune function trainable: adapts Tune's report/checkpoint API to trainables.run. The first result
    carries ``setup_s``, the seconds from the trainable's start to the training's (torch's import in a fresh
    worker, reading the checkpoint to resume from). A stopped trial ends before its next training step (see
    :class:`_Reporter`); Tune's wait for that before reusing the process is raised from 2 s to 600 s (one step of
    a large model on a CPU can take longer), unless ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` is set."""
    started = time.perf_counter()
    # read by Tune's reset_config in this process when it reuses it for the next trial
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")

    import ray
    import torch
    from ray import tune

    from trainables.datasets import DatasetUnreadable
    from trainables.pretrain_probe import TrialDiverged, recent_metrics, run

    final_errors = {cls.__name__: cls for cls in (TrialDiverged, DatasetUnreadable)}  # a retry would repeat them

    for name in ("ray.train", "ray.tune"):  # "Checkpoint successfully created" once per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)

    # exactly the CPUs the trial booked (Ray's OMP_NUM_THREADS does not reach a process that imported
    # torch before it was set): 2 one-CPU trials on 2 cores must not oversubscribe them
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    sweep_checkpoint_staging()
    files = _TrialFiles()
    final = files.read_text(FINAL_ERROR_FILE)
    if final is not None:  # a retry would fail the same way (diverge, or not read the data): fail at once
        kind, _, message = final.partition(": ")
        raise final_errors.get(kind, RuntimeError)(message)
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
        d = _stage_checkpoint(checkpoint)
        try:
            reporter.put(m, d)
        except BaseException:  # stopped by Tune, or reporting failed: this checkpoint goes nowhere
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
    except tuple(final_errors.values()) as exc:
        files.write_text(FINAL_ERROR_FILE, f"{type(exc).__name__}: {exc}")
        raise
    finally:  # the results before an error are handed to Tune too; an error in flight is not masked
        reporter.close(check=finished)
