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
