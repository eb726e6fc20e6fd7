"""What a resume repairs before Tune restores a study: a kill at an unlucky moment leaves Tune's trials, its
searcher and each trial's results out of step (they are saved as separate files, and uploaded to an object store
in no fixed order). Each repair returns what it did, as lines the resume prints."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, List, Optional

from .export import abandoned_trials, latest_state, recorded_id
from .history import checkpoint_dirs, newest_state_file, read_results
from .records import ABANDONED_FILE, CHECKPOINT_FILE, EXPERIMENT_DIR, RECOVERED_FILE, default_tracking_uri
from .spec import read_study
from .storage import one_line
from .worker import fetch_checkpoint_file, load_checkpoint


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
    """Make the checkpoint Tune's last snapshot names for each trial hold the trial's newest state on disk.

    The snapshot lags the trials: Tune deletes a trial's oldest checkpoint when a new one arrives, and
    otstudy's driver saves the snapshot on a clock (:func:`study.session._lean_experiment_state`), so a driver
    killed between two saves leaves a snapshot that names a checkpoint already deleted ("does not exist on
    storage anymore") or one older than the trial's newest. Tune would resume the trial from the named one
    and number its next checkpoints after it, below newer stale ones that the pruning of a finished trial and
    every reader of "the newest checkpoint" would then take for its last. So the named directory gets the
    files of the trial's newest kept checkpoint and the kept ones numbered above it are removed: the trial
    continues from its newest state, and its next checkpoint is again its highest. Only the newest snapshot
    is read (the one Tune restores). Returns the checkpoint paths rewritten.
    """
    import pyarrow.fs as pafs
    from ray.tune.utils.serialization import TuneFunctionDecoder

    decoder = TuneFunctionDecoder(allow_cloudpickle=True)  # Tune's own state, written by this study's driver
    done: List[str] = []
    newest = newest_state_file(Path(study_dir) / EXPERIMENT_DIR, "experiment_state-*.json")
    try:
        entries = json.loads(newest.read_text()).get("trial_data", []) if newest is not None else []
    except (OSError, json.JSONDecodeError):
        entries = []
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
        parent, name = path.rsplit("/", 1)
        kept = [k.rstrip("/") for k in checkpoint_dirs(fs, parent)]  # newest first
        newer = [k for k in kept if k.rsplit("/", 1)[1] > name]
        missing = fs.get_file_info(path).type == pafs.FileType.NotFound
        if path in done or not kept or not (newer or missing):
            continue
        source = (newer or kept)[0]
        if not missing:
            fs.delete_dir(path)
        fs.create_dir(path)
        pafs.copy_files(source, path, source_filesystem=fs, destination_filesystem=fs)
        for k in newer:
            fs.delete_dir(k)
        print(f"[otstudy] {parent.rsplit('/', 1)[-1]}: the snapshot names {name}"
              + (", deleted before the driver stopped" if missing else f", older than {source.rsplit('/', 1)[1]}")
              + f"; it resumes from {source.rsplit('/', 1)[1]}'s state, now in {name}")
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

    newest = newest_state_file(Path(study_dir) / EXPERIMENT_DIR, pattern)
    if newest is None:
        return None
    try:
        with open(newest, "rb") as f:
            return newest, cloudpickle.load(f)
    except Exception:  # not a state this Ray version writes: Tune will say what is wrong
        return None


def repair_search_generator(study_dir: Path, remote=None) -> Optional[str]:
    """Put an Optuna study's seed groups back in step with the experiment snapshot's trials (see
    :func:`study.searcher.reconcile_with_snapshot`). Returns what was done, or None."""
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
    trial directory (marked ``restored: 1``), which :func:`study.history.read_results` adds. Returns
    the trial ids recovered.
    """
    import pyarrow.fs as pafs

    from trainables.pretrain_probe import recent_metrics


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
        ckpts = checkpoint_dirs(fs, where)
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
