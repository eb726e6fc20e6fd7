"""End to end: `otstudy run --smoke-test`, export, MLflow, report, resume; Ray in a subprocess."""
import json
import math
import os
import signal
import socket
import subprocess
import urllib.request

import pandas as pd
import pytest
from helpers import OTSTUDY, assert_optuna_storage_agrees, mlflow_runs, otstudy, result_lines, wait_for

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    storage = tmp_path_factory.mktemp("studies")
    proc = otstudy("run", "--preset", "sinsim_beta", "--smoke-test", "--storage", str(storage))
    (storage / "run.stderr").write_text(proc.stderr)
    return storage / "sinsim_beta"


def test_a_local_study_prints_no_warnings(smoke_study):
    # the trials' own lines come through Ray's log prefix; nothing else on stderr may be a warning
    # (Ray 2.60 warned on every local start that it had turned token authentication on)
    lines = [ln for ln in (smoke_study.parent / "run.stderr").read_text().splitlines() if "pid=" not in ln]
    assert not [ln for ln in lines if "WARNING" in ln or "Warning" in ln], lines


def test_a_finished_trial_keeps_its_last_checkpoint_only(smoke_study):
    # Tune keeps two checkpoints per trial (a resume's fallback); once a trial has ended, the earlier one goes:
    # the last holds the state and the frozen test features the report reads
    for trial in (smoke_study / "ray").glob("trial_*"):
        ckpts = sorted(trial.glob("checkpoint_*"))
        assert len(ckpts) == 1, ckpts
        assert (ckpts[0] / "state.pt").is_file() and (ckpts[0] / "embeddings.npz").is_file()


def test_smoke_study_exports_one_row_per_trial(smoke_study):
    meta = json.loads((smoke_study / "study.json").read_text())
    res = pd.read_parquet(smoke_study / "results.parquet")
    hist = pd.read_parquet(smoke_study / "history.parquet")
    assert meta["n_trials"] == 4 and len(res) == 4
    assert (res["status"] == "completed").all()
    assert sorted(zip(res["beta"], res["seed"])) == [(0.0, 0), (0.0, 1), (0.4, 0), (0.4, 1)]
    for col in ("linear_acc", "test_linear_acc", "knn_acc"):
        assert res[col].map(math.isfinite).all() and res[col].between(0, 1).all()
    assert len(hist) == 4 * 3 and set(hist.groupby("trial_id")["epoch"].max()) == {3}
    assert (res.loc[res["beta"] > 0, "med_ot_time_ms"] > 0).all()
    assert res["hardware"].nunique() == 1 and res["hardware"].iloc[0].endswith(" threads")  # one machine here
    for trial in (smoke_study / "ray").glob("trial_*"):  # Tune's JSON and CSV logs; no TensorBoard file
        assert (trial / "result.json").is_file() and (trial / "progress.csv").is_file()
        assert not list(trial.glob("events.out.tfevents*"))
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert 0 <= rows[0]["setup_s"] < rows[-1]["time_total_s"]  # the worker's set-up, in the first result
        assert all("setup_s" not in r for r in rows[1:])


def test_mlflow_has_one_parent_and_one_child_run_per_trial(smoke_study):
    client, trials, parents = mlflow_runs(smoke_study)
    assert len(parents) == 1 and len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["otstudy.status"] == "completed"
        assert r.data.params["method"] == "sinsim" and "beta" in r.data.params
        hist = client.get_metric_history(r.info.run_id, "knn_acc")
        assert sorted(m.step for m in hist) == [1, 2, 3]  # per-epoch metrics, epoch as step
        assert "test_linear_acc" in r.data.metrics
        # what the timings were measured on, as a tag (a string is no metric)
        assert r.data.tags["otstudy.hardware"].endswith(" threads") and "hardware" not in r.data.metrics


def test_report_writes_plot_table_and_page(smoke_study):
    otstudy("report", str(smoke_study))
    rep = smoke_study / "report"
    png = rep / "sensitivity_beta.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert (rep / "sensitivity_beta.pdf").stat().st_size > 1000
    over = pd.read_csv(rep / "overhead.csv")
    assert set(over["beta"]) == {0.0, 0.4}
    assert over.loc[over["beta"] == 0.0, "med_step_time_ms_ratio"].iloc[0] == pytest.approx(1.0)
    assert (rep / "embeddings.png").read_bytes()[:8] == PNG_MAGIC  # t-SNE/UMAP of best vs baseline
    page = (rep / "index.html").read_text()
    assert "sensitivity_beta.png" in page and "Overhead" in page and "4 completed" in page


def test_resume_of_a_finished_study_reruns_nothing(smoke_study):
    from pathlib import Path

    before = result_lines(smoke_study)
    states = sorted(p.name for p in (smoke_study / "ray").iterdir())
    sessions = set(Path("/tmp/ray").glob("session_2*"))  # every Ray start makes one
    out = otstudy("resume", str(smoke_study)).stdout
    assert result_lines(smoke_study) == before
    # it says so and stops: no Ray started, no second copy of Tune's state files
    assert "every trial has ended; nothing to resume" in out and "4 completed" in out
    assert set(Path("/tmp/ray").glob("session_2*")) == sessions
    assert sorted(p.name for p in (smoke_study / "ray").iterdir()) == states
    _, trials, parents = mlflow_runs(smoke_study)
    assert len(trials) == 4 and len(parents) == 1


def test_ctrl_c_stops_the_study_and_says_how_to_continue(tmp_path):
    # Tune handles SIGINT itself (it saves the experiment and returns), so the study ended as if done: exit 0,
    # and the last lines were Tune's advice to call Tuner.restore(path, trainable=...), not `otstudy resume`
    import signal
    import subprocess
    import time

    from helpers import OTSTUDY

    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([OTSTUDY, "run", "--preset", "sinsim_eps_tpe", "--storage", str(tmp_path)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while "[otstudy trial]" not in log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # the first trials have started (30 epochs each: none has finished)
    assert proc.wait(timeout=180) == 130  # as for Ctrl-C: `otstudy run ... && otstudy report ...` stops here
    text = log.read_text()
    assert "Tuner.restore" not in text, text[-2000:]
    study = tmp_path / "sinsim_eps_tpe"
    assert f"of 16 trials finished; continue with `otstudy resume {study}`" in text, text[-2000:]  # 8 configs x 2 seeds
    # the Optuna storage holds what Tune saved: the configuration its running seeds belong to, RUNNING
    res, trials = assert_optuna_storage_agrees(study, ["beta", "eps"])
    assert [t[1] for t in trials] == ["RUNNING"] and set(res["status"]) <= {"running", "pending"}


def test_tpe_study_repeats_each_configuration_per_seed(tmp_path):
    otstudy("run", "--preset", "sinsim_eps_tpe", "--smoke-test", "--storage", str(tmp_path))
    res = pd.read_parquet(tmp_path / "sinsim_eps_tpe" / "results.parquet")
    assert len(res) == 4 and (res["status"] == "completed").all()
    groups = res.groupby(["beta", "eps"])["seed"].apply(sorted).tolist()
    assert groups == [[0, 1], [0, 1]]  # 2 sampled configurations, each with both seeds
    # Optuna's own tools open the study: its storage agrees with results.parquet, and optuna-dashboard serves it
    study = tmp_path / "sinsim_eps_tpe"
    _, trials = assert_optuna_storage_agrees(study, ["beta", "eps"])
    assert [t[1] for t in trials] == ["COMPLETE", "COMPLETE"]
    port = _free_port()
    dash = subprocess.Popen([OTSTUDY, "optuna-dashboard", str(study), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def listed():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        studies = wait_for(listed, 60, "optuna-dashboard")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["sinsim_eps_tpe"]
    finally:
        os.killpg(dash.pid, signal.SIGTERM)
        dash.wait(timeout=30)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracker_backfills_what_tune_recorded_but_the_store_missed(tmp_path):
    # a trial that ended under an earlier driver (no callbacks after a resume) and an MLflow store
    # that never saw it: at the end of the study the store holds its run, finished, with every epoch
    import json
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from study.tracking import MLflowTracker

    tdir = tmp_path / "ray" / "trial_t1"
    tdir.mkdir(parents=True)
    rows = [{"epoch": e, "train_loss": 5.0 - e, "knn_acc": 0.5 + 0.1 * e, "timestamp": 1700000000 + e}
            for e in (1, 2, 3)]
    rows[-1]["final"] = 1.0
    (tdir / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial = SimpleNamespace(trial_id="t1", config={"method": "simclr", "seed": 0}, status="TERMINATED",
                            last_result=rows[-1])
    for _ in range(2):  # a second resume adds nothing
        tracker = MLflowTracker(uri, "bf", str(tmp_path), {"name": "bf"})
        tracker.setup()
        tracker.on_experiment_end([trial])
        assert tracker.failures == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("bf").experiment_id],
                              filter_string="tags.`otstudy.role` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["otstudy.status"] == "completed"
    hist = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 4.0), (2, 3.0), (3, 2.0)]
