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
