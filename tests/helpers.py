"""Helpers shared by the tests that run the otstudy CLI in a subprocess."""
import subprocess
import sys
from pathlib import Path

OTSTUDY = str(Path(sys.executable).parent / "otstudy")


def otstudy(*args, timeout=600):
    proc = subprocess.run([OTSTUDY, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"otstudy {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def mlflow_runs(study: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("otstudy.role") == "trial"], \
        [r for r in runs if r.data.tags.get("otstudy.role") == "study"]


def result_lines(study: Path):
    return {p.parent.name: len(p.read_text().splitlines()) for p in (study / "ray").glob("trial_*/result.json")}




OUTCOMES = Path(__file__).resolve().parents[1] / ".reliability.json"


def record(fault, test, outcome):
    """Note a fault-injection outcome for docs/reliability.md (python -m tests.reliability_table)."""
    import json

    data = json.loads(OUTCOMES.read_text()) if OUTCOMES.exists() else {}
    data[fault] = {"test": test, "outcome": outcome}
    OUTCOMES.write_text(json.dumps(data, indent=2))


def spec_file(tmp_path, name, **overrides):
    """A small digits study spec written to tmp_path; returns (spec path, study directory)."""
    import yaml

    spec = {"name": name, "method": "sinsim", "dataset": "digits",
            "fixed": {"epochs": 3, "batch_size": 256, "proj_hidden": 64, "proj_dim": 32},
            "search": {"beta": {"grid": [0.0, 0.8]}}, "sampler": "grid", "seeds": [0, 1],
            "metric": "knn_acc", "mode": "max", "resources": {"cpu": 1}, "max_concurrent": 2}
    spec.update(overrides)
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f, tmp_path / "studies" / name


def wait_for(cond, timeout, what):
    """Poll ``cond`` until it returns something truthy (returned) or fail after ``timeout`` seconds."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def optuna_trials(study: Path, url: str = None):
    """The study's Optuna trials as a fresh process sees them through ``optuna.load_study``:
    [number, state, value, params, user_attrs] each."""
    import json

    url = url or f"sqlite:///{study / 'optuna.db'}"
    code = ("import json, optuna; s = optuna.load_study(study_name=%r, storage=%r); print(json.dumps("
            "[[t.number, t.state.name, t.value, t.params, t.user_attrs] for t in s.trials]))" % (study.name, url))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_optuna_storage_agrees(study: Path, searched, metric: str = "knn_acc"):
    """The Optuna storage and results.parquet tell the same story: one Optuna trial per configuration, none
    left RUNNING, its state the one every seed's row records, its value the seeds' mean of ``metric`` (what the
    sampler was told), its params the searched knobs the method reads, its Tune trials the configuration's."""
    import math

    import pandas as pd

    res = pd.read_parquet(study / "results.parquet")
    trials = optuna_trials(study)
    assert [t[0] for t in trials] == list(range(len(trials)))
    assert len(trials) == res["optuna_trial"].nunique() and res["optuna_trial"].notna().all()
    outcome = {"COMPLETE": {"completed"}, "PRUNED": {"completed", "pruned"}, "FAIL": {"completed", "pruned", "failed"},
               "RUNNING": {"completed", "pruned", "failed", "running", "pending"}}
    for number, state, value, params, attrs in trials:
        rows = res[res["optuna_trial"] == number]
        assert set(rows["searcher_state"]) == {state}, (number, state, rows["searcher_state"].tolist())
        assert set(rows["status"]) <= outcome[state]
        assert (state == "COMPLETE") == (set(rows["status"]) == {"completed"} and len(rows) == len(attrs["tune_trials"]))
        assert sorted(attrs["tune_trials"]) == sorted(rows["trial_id"])
        if state == "COMPLETE":
            assert math.isclose(value, rows[metric].mean(), rel_tol=1e-12), (value, rows[metric].tolist())
        else:
            assert value is None
        assert set(params) == {k for k in searched if rows[k].notna().all()}
        for k, v in params.items():
            assert (rows[k] == v).all(), (k, v, rows[k].tolist())
    return res, trials
