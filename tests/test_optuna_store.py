"""The study's Optuna storage: a copy of the sampler's Optuna study that Optuna's own tools open."""
import sqlite3
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from study.optuna_store import OptunaStorageError, OptunaStore, url_problem

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTS = {"beta": FloatDistribution(0.0, 2.0), "ot_value": CategoricalDistribution(["entropic", "cost"])}


def _sampler_study(states):
    """An in-memory study like the sampler's: one trial per state, asked and told in order."""
    study = optuna.create_study(direction="maximize")
    for i, state in enumerate(states):
        trial = study.ask(DISTS)
        if state == TrialState.COMPLETE:
            study.tell(trial, 0.5 + i / 100)
        elif state != TrialState.RUNNING:
            study.tell(trial, state=state)
    return study


def _loaded(url, name="s"):
    """The study as a fresh process sees it through optuna.load_study."""
    code = ("import json, optuna; s = optuna.load_study(study_name=%r, storage=%r); print(json.dumps("
            "[[t.number, t.state.name, t.value, t.params, t.user_attrs] for t in s.trials]))" % (name, url))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def _as_rows(study):
    return [[t.number, t.state.name, t.value, t.params] for t in study.trials]


def test_the_storage_holds_the_samplers_trials_and_follows_them_as_they_finish(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    source = _sampler_study([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING])
    store = OptunaStore(url, "s", "max")
    store.open(new=True)
    assert store.publish(source, {3: ["t3"]})
    got = _loaded(url)
    assert [row[:4] for row in got] == _as_rows(source)
    assert got[3][1] == "RUNNING" and got[3][4] == {"tune_trials": ["t3"]}
    assert store.publish(source, {3: ["t3", "t4"]})  # its second seed starts
    assert _loaded(url)[3][4] == {"tune_trials": ["t3", "t4"]}
    # the running trial finishes, a new one is asked: both reach the storage
    source.tell(3, 0.9)
    source.ask(DISTS)
    assert store.publish(source, {3: ["t3", "t4"]})
    got = _loaded(url)
    assert [row[:4] for row in got] == _as_rows(source)
    assert [row[1] for row in got] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "RUNNING"]
    assert got[3][2] == 0.9


def test_a_trial_a_killed_driver_asked_after_the_last_save_is_not_left_running(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    saved = _sampler_study([TrialState.COMPLETE, TrialState.RUNNING])  # what Tune saved of the searcher
    live = OptunaStore(url, "s", "max")
    live.open(new=True)
    # after that save the driver told trial 1 and asked trial 2, then was killed
    later = optuna.create_study(direction="maximize")
    first, second = saved.trials
    later.add_trial(first)
    later.add_trial(optuna.trial.create_trial(params=second.params, distributions=second.distributions, value=0.7))
    later.ask(DISTS)
    assert live.publish(later)
    assert [r[1] for r in _loaded(url)] == ["COMPLETE", "COMPLETE", "RUNNING"]
    resumed = OptunaStore(url, "s", "max")  # a resume starts from what Tune saved
    resumed.open(new=False)
    assert resumed.publish(saved)
    assert [row[:4] for row in _loaded(url)] == _as_rows(saved)  # no orphan RUNNING trial, trial 1 open again


def test_a_new_study_refuses_a_storage_that_holds_another_study_of_its_name(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = OptunaStore(url, "s", "max")
    first.open(new=True)
    first.publish(_sampler_study([TrialState.COMPLETE]))
    with pytest.raises(OptunaStorageError, match=r"already holds a study named s \(1 trials\)"):
        OptunaStore(url, "s", "max").open(new=True)
    OptunaStore(url, "s", "max").open(new=False)  # a resume opens it


def test_a_corrupt_or_locked_sqlite_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "optuna.db"
    bad.write_bytes(b"not a database " * 100)
    with pytest.raises(OptunaStorageError) as err:
        OptunaStore(f"sqlite:///{bad}", "s", "max").open(new=True)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "file is not a database" in msg, msg

    locked = tmp_path / "locked.db"
    OptunaStore(f"sqlite:///{locked}", "s", "max").open(new=True)
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writes (and holds the lock past the wait)
    try:
        store = OptunaStore(f"sqlite:///{locked}", "s", "max", lock_timeout_s=0.2)
        with pytest.raises(OptunaStorageError, match="database is locked") as err:
            store.open(new=False)
        assert "\n" not in str(err.value) and str(locked) in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_write_that_fails_mid_study_warns_once_and_the_next_publish_catches_up(tmp_path, capsys):
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    store = OptunaStore(url, "s", "max", lock_timeout_s=0.2)
    store.open(new=True)
    source = _sampler_study([TrialState.COMPLETE])
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert not store.publish(source) and not store.publish(source)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert capsys.readouterr().out.count("could not be written") == 1
    assert not store.publish(source, live=True)  # the searcher's next tries wait a minute (Tune's loop goes on)
    assert store.publish(source)  # the study's end (or a resume) does not wait
    assert [row[:4] for row in _loaded(url)] == _as_rows(source)


@pytest.mark.parametrize("url,ok", [("sqlite:////tmp/x.db", True), ("postgresql+psycopg2://u@h/db", True),
                                    ("postgresql://u:pw@h/db", False),
                                    ("mysql://h/db", True), ("/tmp/x.db", False), ("redis://h", False), (3, False)])
def test_storage_urls(url, ok):
    assert (url_problem(url) is None) == ok
