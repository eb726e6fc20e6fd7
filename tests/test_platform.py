"""The study platform under pruning, kill -9 and resume, a remote MLflow server and a 2-node cluster."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from helpers import (OTSTUDY, assert_optuna_storage_agrees, mlflow_runs, otstudy, result_lines, spec_file,
                     wait_for)

pytestmark = pytest.mark.slow


def test_replay_asha_rebuilds_rungs_from_history(tmp_path):
    from study.scheduler import ReplayASHA

    exp = tmp_path / "ray"
    values = {"a": [0.9, 0.95, 0.97], "b": [0.5, 0.6, 0.7]}
    for tid, accs in values.items():
        (exp / f"trial_{tid}").mkdir(parents=True)
        (exp / f"trial_{tid}" / "result.json").write_text(
            "\n".join(json.dumps({"epoch": e + 1, "knn_acc": a}) for e, a in enumerate(accs)))
    fresh = ReplayASHA(experiment_dir=str(exp), time_attr="epoch", metric="knn_acc", mode="max", max_t=8,
                       grace_period=1, reduction_factor=2)
    for tid in values:
        fresh.on_trial_add(None, SimpleNamespace(trial_id=tid))
    rungs = {milestone: dict(rec) for milestone, rec in fresh._brackets[0]._rungs}
    assert rungs[1] == {"a": 0.9, "b": 0.5} and rungs[2] == {"a": 0.95, "b": 0.6}
    # a new trial below the rebuilt cutoff is pruned at its first rung, as without the resume
    new = SimpleNamespace(trial_id="c")
    fresh.on_trial_add(None, new)
    assert fresh.on_trial_result(None, new, {"epoch": 1, "knn_acc": 0.4}) == "STOP"


def test_asha_records_pruned_trials_as_pruned_everywhere(tmp_path):
    # lr 1e-7 cannot lower the loss: ASHA (train_loss, min) stops those trials at the first rung
    spec, study = spec_file(tmp_path, "asha", method="simclr", search={"lr": {"grid": [1e-2, 1e-7]}},
                             scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                             metric="train_loss", mode="min", max_concurrent=1, seeds=[0, 1])
    spec_dict = yaml.safe_load(spec.read_text())
    spec_dict["fixed"]["epochs"] = 4
    spec.write_text(yaml.safe_dump(spec_dict))
    otstudy("run", str(spec), "--storage", str(tmp_path / "studies"))
    res = pd.read_parquet(study / "results.parquet")
    assert len(res) == 4
    # a grid runs each configuration's seeds side by side: lr 1e-2 seed 0 is first at every rung and
    # goes on; seed 1 meets only seed 0's loss (ASHA may stop it); both lr 1e-7 trials meet worse losses
    first = res[(res["lr"] == 1e-2) & (res["seed"] == 0)]
    assert (first["status"] == "completed").all() and (first["n_epochs"] == 4).all()
    assert (res.loc[res["lr"] == 1e-7, "status"] == "pruned").all()
    pruned = res[res["status"] == "pruned"]
    assert (pruned["n_epochs"] < 4).all()
    _, trials, _ = mlflow_runs(study)
    tags = {r.data.tags["otstudy.trial_id"]: r.data.tags["otstudy.status"] for r in trials}
    assert tags == dict(zip(res["trial_id"], res["status"]))


def test_tpe_with_asha_keeps_optuna_in_step_with_tune(tmp_path):
    spec, study = spec_file(tmp_path, "tpe", method="simclr", sampler="tpe", num_samples=4,
                             search={"lr": {"low": 1e-7, "high": 1e-2, "log": True}}, seeds=[0],
                             scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                             metric="train_loss", mode="min", max_concurrent=1)
    otstudy("run", str(spec), "--storage", str(tmp_path / "studies"))
    res = pd.read_parquet(study / "results.parquet")
    assert len(res) == 4 and set(res["status"]) <= {"completed", "pruned"}
    expected = {"completed": "COMPLETE", "pruned": "PRUNED"}
    assert (res["searcher_state"] == res["status"].map(expected)).all(), res[["status", "searcher_state"]]


def _finished_trials(study: Path):
    done = set()
    for f in (study / "ray").glob("trial_*/result.json"):
        if '"final": 1.0' in f.read_text():
            done.add(f.parent.name)
    return done


def test_kill_9_of_the_driver_then_resume(tmp_path):
    spec, study = spec_file(tmp_path, "killed", fixed={"epochs": 6, "batch_size": 256, "proj_hidden": 64,
                                                            "proj_dim": 32},
                             search={"beta": {"grid": [0.0, 0.4, 0.8]}}, seeds=[0, 1])
    proc = subprocess.Popen([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(_finished_trials(study)) >= 2, 300, "two finished trials")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    finished_before = _finished_trials(study)
    lines_before = {k: v for k, v in result_lines(study).items() if k in finished_before}
    assert len(finished_before) < 6
    otstudy("resume", str(study))
    res = pd.read_parquet(study / "results.parquet")
    assert len(res) == 6 and (res["status"] == "completed").all()
    # none of the finished trials trained again (a trial that finished after Tune's last
    # snapshot re-reports its final metrics from its checkpoint: at most one line, same epoch)
    after = result_lines(study)
    for name, n in lines_before.items():
        assert after[name] - n <= 1, name
    hist = pd.read_parquet(study / "history.parquet")
    assert sorted(hist.groupby("trial_id")["epoch"].apply(sorted).map(tuple).unique()) == [tuple(range(1, 7))]
    _, trials, parents = mlflow_runs(study)
    assert len(trials) == 6 and len(parents) == 1
    assert all(r.info.status == "FINISHED" for r in trials)


def test_tpe_optuna_storage_agrees_with_the_study_after_kill_9_and_resume(tmp_path):
    # two methods: SimCLR reads no beta, so its Optuna trials have no beta param
    spec, study = spec_file(tmp_path, "tpekill", method=["simclr", "sinsim"], sampler="tpe", num_samples=3,
                             search={"beta": {"low": 0.0, "high": 1.0}, "lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                             fixed={"epochs": 6, "batch_size": 256, "proj_hidden": 64, "proj_dim": 32})
    proc = subprocess.Popen([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(_finished_trials(study)) >= 2, 300, "two finished trials")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_finished_trials(study)) < 6
    # a storage that cannot be opened: one line, exit 2, the study unchanged
    db = study / "optuna.db"
    kept = db.read_bytes()
    db.write_bytes(b"not a database " * 100)
    bad = subprocess.run([OTSTUDY, "resume", str(study)], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("otstudy: error:")]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert str(db) in lines[0] and "file is not a database" in lines[0] and "the study is unchanged" in lines[0]
    assert len(_finished_trials(study)) < 6 and not (study / "results.parquet").exists()
    db.write_bytes(kept)
    otstudy("resume", str(study))
    res, trials = assert_optuna_storage_agrees(study, ["method", "beta", "lr"])
    assert len(res) == 6 and (res["status"] == "completed").all() and len(trials) == 3
    assert all(("beta" in params) == (params["method"] == "sinsim") for _, _, _, params, _ in trials)


def test_an_optuna_storage_that_cannot_be_opened_stops_a_run_before_anything_is_made(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database " * 100)
    spec, study = spec_file(tmp_path, "badopt", sampler="random", num_samples=2,
                             search={"beta": {"low": 0.0, "high": 1.0}})
    proc = subprocess.run([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies"),
                           "--optuna-storage", f"sqlite:///{bad}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"otstudy: error: Optuna storage sqlite:///{bad}: cannot be opened "
                                                f"(DatabaseError: file is not a database)"]
    assert not study.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_mlflow_server_receives_the_study(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, 120, "mlflow server")
        uri = f"http://127.0.0.1:{port}"
        spec, study = spec_file(tmp_path, "remote", mlflow_uri=uri,
                                 fixed={"epochs": 2, "batch_size": 256, "proj_hidden": 32, "proj_dim": 16})
        otstudy("run", str(spec), "--storage", str(tmp_path / "studies"))
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("remote")
        runs = client.search_runs([exp.experiment_id])
        trials = [r for r in runs if r.data.tags.get("otstudy.role") == "trial"]
        parents = [r for r in runs if r.data.tags.get("otstudy.role") == "study"]
        assert len(parents) == 1 and len(trials) == 4
        for r in trials:
            assert [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] == [1, 2]
        assert not (study / "mlflow.db").exists()  # everything went to the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path):
    # loopback only; Ray 2.60's token auth would refuse the second `ray start` (RAY_AUTH_MODE=disabled)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    ray_bin = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--include-dashboard=false", "--resources", '{"head_node": 1}',
                        f"--temp-dir={temp}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--resources", '{"worker_node": 1}', "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        spec, study = spec_file(tmp_path, "cluster",
                                 fixed={"epochs": 2, "batch_size": 256, "proj_hidden": 32, "proj_dim": 16})
        proc = subprocess.run([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies"),
                               "--address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = pd.read_parquet(study / "results.parquet")
        assert len(res) == 4 and (res["status"] == "completed").all()
        assert res["node_id"].nunique() == 2  # trials ran on the head and on the second node
        nodes = subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], env=env,
                               capture_output=True, text=True, timeout=60).stdout
        assert "head_node" in nodes and "worker_node" in nodes
    finally:
        from study.session import stop_ray_started_in

        assert stop_ray_started_in(temp) > 0  # this test's two nodes only: `ray stop` would stop every Ray here
        shutil.rmtree(temp, ignore_errors=True)


def test_resume_of_a_study_killed_before_its_first_snapshot(tmp_path):
    spec, study = spec_file(tmp_path, "early", fixed={"epochs": 2, "batch_size": 256, "proj_hidden": 32,
                                                     "proj_dim": 16})
    from study.runner import write_study_files
    from study.spec import load_spec_file

    write_study_files(load_spec_file(spec), study, smoke=False)  # what `run` writes before Ray starts
    otstudy("resume", str(study))
    res = pd.read_parquet(study / "results.parquet")
    assert len(res) == 4 and (res["status"] == "completed").all()


def _s3_lines(fs, root):
    """trial dir name -> lines of its result.json on the object store."""
    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/ray", recursive=True, allow_not_found=True)):
        if info.base_name == "result.json":
            with fs.open_input_stream(info.path) as f:
                out[info.path.split("/")[-2]] = f.readall().decode().splitlines()
    return out


def test_object_store_storage_survives_kill_9_and_resumes_on_another_machine(tmp_path):
    # a real S3 API (moto's server on 127.0.0.1): Tune writes trials and checkpoints to the bucket,
    # the driver is killed, and the study is resumed from its URI alone into a fresh work directory
    import pyarrow.fs as pafs

    port = _free_port()
    # the trials' logs reach the bucket with Tune's experiment saves: every second here (Tune's own setting;
    # otstudy's driver leaves them ~10 s apart), so that a trial is seen midway before it finishes
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "OTSTUDY_SYNC_PERIOD_S": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        def bucket():
            try:
                fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="test",
                                       secret_key="test", region="us-east-1", allow_bucket_creation=True)
                fs.create_dir("otstudy-test")
                return fs
            except OSError:
                return None

        fs = wait_for(bucket, 60, "the S3 server")
        storage = f"s3://otstudy-test/studies?endpoint_override=127.0.0.1:{port}&scheme=http"
        home = f"s3://otstudy-test/studies/objstore?endpoint_override=127.0.0.1:{port}&scheme=http"
        spec, _ = spec_file(tmp_path, "objstore", storage=storage, seeds=[0],
                            fixed={"epochs": 6, "batch_size": 256, "proj_hidden": 32, "proj_dim": 16},
                            search={"beta": {"grid": [0.0, 0.4, 0.8]}})
        machine_a, machine_b = tmp_path / "a", tmp_path / "b"
        proc = subprocess.Popen([OTSTUDY, "run", str(spec), "--workdir", str(machine_a)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        root = "otstudy-test/studies/objstore"

        def progress():
            lines = _s3_lines(fs, root)
            done = [k for k, v in lines.items() if any('"final": 1.0' in ln for ln in v)]
            midway = [k for k, v in lines.items() if k not in done and len(v) >= 3]
            return lines if done and midway else None

        try:
            seen = wait_for(progress, 300, "a finished trial and one midway, on the object store")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert any(i.base_name == "state.pt" for i in fs.get_file_info(
            pafs.FileSelector(f"{root}/ray", recursive=True)))  # checkpoints went to the bucket
        before = _s3_lines(fs, root)
        shutil.rmtree(machine_a)  # another machine: nothing of the first driver's directory is at hand

        proc = subprocess.run([OTSTUDY, "resume", home, "--workdir", str(machine_b)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        study = machine_b / "objstore"
        res = pd.read_parquet(study / "results.parquet")
        assert len(res) == 3 and (res["status"] == "completed").all()
        after = _s3_lines(fs, root)
        continued = 0
        for name, lines in before.items():
            added = len(after[name]) - len(lines)
            if any('"final": 1.0' in ln for ln in lines):
                assert added <= 1, name  # finished trials did not train again
            elif len(lines) >= 3:
                assert added <= 5, name  # continued from a checkpoint in the bucket, not from epoch 1
                continued += 1
        # the trial seen midway was continued, unless it finished before the kill took effect
        midway = [k for k, v in seen.items() if len(v) >= 3 and not any('"final": 1.0' in ln for ln in v)]
        assert continued >= 1 or all(any('"final": 1.0' in ln for ln in before[k]) for k in midway)
        hist = pd.read_parquet(study / "history.parquet")
        assert sorted(hist.groupby("trial_id")["epoch"].apply(sorted).map(tuple).unique()) == [tuple(range(1, 7))]
        _, trials, parents = mlflow_runs(study)
        assert len(trials) == 3 and len(parents) == 1
        # the home holds the driver's files as of the end; another machine sees the finished study
        proc = subprocess.run([OTSTUDY, "status", home, "--workdir", str(tmp_path / "c")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "3 of 3 trials known: 3 completed" in proc.stdout, proc.stdout
        assert (tmp_path / "c" / "objstore" / "mlflow.db").is_file()
        # the same name again is refused, naming the study's home
        proc = subprocess.run([OTSTUDY, "run", str(spec), "--workdir", str(tmp_path / "d")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "s3://otstudy-test/studies/objstore already holds a study" in proc.stderr
        # a bucket that does not exist: one line, exit 2, no local directory left behind
        proc = subprocess.run([OTSTUDY, "run", str(spec), "--workdir", str(tmp_path / "e"), "--storage",
                               storage.replace("otstudy-test", "no-such-bucket")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "storage s3://no-such-bucket/studies/objstore: cannot be" in proc.stderr, \
            proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "e" / "objstore").exists()
        # a trial no node can hold (found once Ray has started): exit 2, nothing left here or in the bucket
        gpu_spec, _ = spec_file(tmp_path, "objgpu", storage=storage, resources={"cpu": 1, "gpu": 1})
        proc = subprocess.run([OTSTUDY, "run", str(gpu_spec), "--workdir", str(tmp_path / "f")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "1 GPU(s), but this machine's Ray has" in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "f" / "objgpu").exists()
        assert not fs.get_file_info(pafs.FileSelector("otstudy-test/studies/objgpu", recursive=True,
                                                      allow_not_found=True))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_snapshot_that_lags_its_trials_resumes_each_from_its_newest_checkpoint(tmp_path):
    # Tune deletes a trial's oldest checkpoint before the snapshot that stops naming it is written, and the
    # driver saves its snapshot on a clock: a driver killed in between leaves a snapshot naming a checkpoint
    # that is gone, or one older than the trial's newest
    import pyarrow.fs as pafs
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig
    from ray.tune.utils.serialization import TuneFunctionEncoder

    from study.repairs import repair_recorded_checkpoints

    trial = tmp_path / "ray" / "trial_x"
    for i, text in ((4, "epoch 4"), (5, "epoch 5")):
        (trial / f"checkpoint_00000{i}").mkdir(parents=True)
        (trial / f"checkpoint_00000{i}" / "state.pt").write_text(text)
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    older, latest = (_TrainingResult(checkpoint=Checkpoint(path=str(trial / f"checkpoint_00000{i}")), metrics={})
                     for i in (2, 3))
    manager._checkpoint_results, manager._latest_checkpoint_result = [older, latest], latest
    runtime = json.dumps({"checkpoint_manager": manager}, cls=TuneFunctionEncoder)
    (tmp_path / "ray" / "experiment_state-1.json").write_text(json.dumps({"trial_data": [["{}", runtime]]}))
    fs = pafs.LocalFileSystem()
    assert repair_recorded_checkpoints(tmp_path, fs) == [str(trial / "checkpoint_000003")]
    assert (trial / "checkpoint_000003" / "state.pt").read_text() == "epoch 5"  # the newest state
    # no stale checkpoint numbered above the one the trial continues from: its next one is its highest again
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    assert repair_recorded_checkpoints(tmp_path, fs) == []  # nothing to do any more
    # the older kept one is there again (empty), so Tune's next registration deletes it without an error
    assert (trial / "checkpoint_000002").is_dir() and not any((trial / "checkpoint_000002").iterdir())
    (trial / "checkpoint_000006").mkdir()
    manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint(path=str(trial / "checkpoint_000006")),
                                                metrics={}))
    assert not (trial / "checkpoint_000002").exists()
    # a snapshot older than a checkpoint that still exists: the named one gets the newest state as well
    (trial / "checkpoint_000007").mkdir()
    (trial / "checkpoint_000007" / "state.pt").write_text("epoch 7")
    assert repair_recorded_checkpoints(tmp_path, fs) == [str(trial / "checkpoint_000003")]
    assert (trial / "checkpoint_000003" / "state.pt").read_text() == "epoch 7"
    assert not (trial / "checkpoint_000007").exists()


def test_a_new_sqlite_store_is_a_copy_of_a_migrated_empty_one(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from study.tracking import seed_sqlite_store

    monkeypatch.setenv("OTSTUDY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    assert seed_sqlite_store(f"sqlite:///{first}") and seed_sqlite_store(f"sqlite:///{second}")
    # one template per MLflow version, and no temporary file left anywhere
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"mlflow-{mlflow.__version__}-empty.db"]
    assert [p.name for p in second.parent.iterdir()] == ["mlflow.db"]
    client = MlflowClient(tracking_uri=f"sqlite:///{second}")  # raises on an out-of-date schema
    made_by_mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'c.db'}").get_experiment("0")
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == made_by_mlflow.artifact_location
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp).info.run_id
    client.log_metric(run, "m", 1.0)
    assert client.get_run(run).data.metrics == {"m": 1.0}
    before = second.read_bytes()
    assert not seed_sqlite_store(f"sqlite:///{second}") and second.read_bytes() == before  # existing: untouched
    assert not seed_sqlite_store("http://127.0.0.1:5000")


def test_the_drivers_experiment_state_is_saved_on_a_clock_paced_by_its_size_and_written_compactly(tmp_path):
    from types import SimpleNamespace

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from study.session import STATE_WRITE_RATE, _lean_experiment_state

    (tmp_path / "experiment_state-x.json").write_bytes(b" " * 3_000_000)  # a study of ~200 trials

    def manager():
        m = _ExperimentCheckpointManager(checkpoint_period="auto", sync_every_n_trial_checkpoints=2,
                                         storage=SimpleNamespace(experiment_driver_staging_path=str(tmp_path)))
        for _ in range(2):
            m.on_trial_checkpoint("trial")
        m._update_auto_checkpoint_time(0.05)
        return m

    def record():
        meta = _TrainingRunMetadata()
        for step, value in enumerate([0.5, 0.6, 0.7], 1):
            meta.update_metric("knn_acc", value, step)
        return meta

    tune_manager, tune_meta = manager(), record()
    assert tune_manager._should_force_sync_up and tune_manager._checkpoint_period == 10.0  # Tune's own
    with _lean_experiment_state():
        lean_manager, lean_meta = manager(), record()
        lean_json = lean_meta.get_json_state()
    assert not lean_manager._should_force_sync_up  # two checkpoints of a trial force no save
    assert lean_manager._checkpoint_period == 3_000_000 / STATE_WRITE_RATE == 30.0
    assert lean_meta.metric_analysis["knn_acc"] == {"max": 0.7, "min": 0.5, "avg": pytest.approx(0.6), "last": 0.7}
    assert "last-5-avg" in tune_meta.metric_analysis["knn_acc"]
    assert "\n" not in lean_json and len(lean_json) < len(tune_meta.get_json_state()) / 2
    assert _TrainingRunMetadata.__init__.__defaults__ == ((5, 10),)  # Tune's own again afterwards
    assert manager()._should_force_sync_up


def test_shutdown_ray_stops_every_process_ray_init_started(tmp_path):
    # shutdown_ray kills the autoscaler monitor first (it ignores SIGTERM for ray.shutdown's whole 1 s
    # wait), then ray.shutdown() stops the rest: nothing ray.init started may survive
    code = """
import json, os, time, ray
from study.session import shutdown_ray
ray.init(include_dashboard=False, logging_level="ERROR")
node = ray._private.worker._global_node
procs = {t: [i.process.pid for i in infos] for t, infos in node.all_processes.items()}
shutdown_ray()
alive = []
for t, pids in procs.items():
    for pid in pids:
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":  # exited, not yet reaped
                break
            time.sleep(0.1)
        else:
            alive.append(t)
print(json.dumps({"types": sorted(procs), "alive": alive, "initialized": ray.is_initialized()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "monitor" in got["types"] and "raylet" in got["types"] and "gcs_server" in got["types"]
    assert got["alive"] == [] and got["initialized"] is False


def test_a_local_cluster_starts_without_api_server_and_monitor_and_trials_without_a_runtime_env(tmp_path):
    # the two head processes a study on one machine never uses (~1 s of each start, BENCHMARKS.md);
    # OTSTUDY_RAY_FULL_HEAD=1 keeps Ray's defaults. Either way, while a study runs, a trial's actor
    # starts without Tune's runtime env where its workers inherit the same values (0.3-0.5 s sooner)
    code = """
import json, os, ray
from ray._private.node import Node
from study.session import init_ray, shutdown_ray
init_ray()
types = sorted(ray._private.worker._global_node.all_processes)
@ray.remote(num_cpus=1, runtime_env={"env_vars": {"OTSTUDY_X": "1"}})  # as Tune starts a trial
def trial():
    return os.environ["OTSTUDY_X"]
got = ray.get(trial.remote(), timeout=120)
restored = Node.start_api_server.__name__ == "start_api_server" and Node.start_monitor.__name__ == "start_monitor"
# a trial's actor class as Tune registers it: while a study runs, without Tune's runtime env where the
# workers inherit those values anyway; with it where a variable differs from the raylet's environment
from ray.tune.execution.class_cache import _ActorClassCache
from study.session import _trial_env_inherited
class Trial:
    def env(self, name):
        return os.environ.get(name)
def registered(cls):
    remote = _ActorClassCache().get(cls)
    actor = remote.options(num_cpus=1).remote()
    value = ray.get(actor.env.remote("RAY_CHDIR_TO_TRIAL_DIR"), timeout=120), ray.get(actor.env.remote("PL_DISABLE_FORK"))
    ray.kill(actor)
    return remote._default_options.get("runtime_env"), value
tune_env = registered(Trial)
with _trial_env_inherited():
    inherited = registered(type("Trial2", (Trial,), {}))
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # one of the variables Tune hands to each trial
    changed = registered(type("Trial3", (Trial,), {}))
shutdown_ray()
print(json.dumps({"types": types, "got": got, "restored": restored, "tune_env": tune_env, "inherited": inherited,
                  "changed": changed, "unpatched": _ActorClassCache.get.__module__}))
"""
    root = str(Path(__file__).resolve().parents[1])
    out = {}
    for full in ("", "1"):
        env = {**os.environ, "OTSTUDY_RAY_FULL_HEAD": full}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=root,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[full] = json.loads(proc.stdout.strip().splitlines()[-1])
    lean, full = out[""], out["1"]
    assert {"gcs_server", "raylet", "log_monitor"} <= set(lean["types"])
    assert "dashboard" not in lean["types"] and "monitor" not in lean["types"]
    assert "dashboard" in full["types"] and "monitor" in full["types"]
    assert lean["got"] == full["got"] == "1" and lean["restored"] and full["restored"]
    for got in (lean, full):
        assert got["tune_env"] == [{"env_vars": {"PL_DISABLE_FORK": "1"}}, [None, "1"]]  # Tune's own
        assert got["inherited"] == [None, [None, "1"]]  # the same environment, inherited
        assert got["changed"] == [{"env_vars": {"PL_DISABLE_FORK": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0"}},
                                  ["0", "1"]]
        assert got["unpatched"] == "ray.tune.execution.class_cache"  # Tune's own method again afterwards


def test_half_gpu_trials_share_one_logical_gpu_side_by_side(tmp_path):
    # A GPU cluster's usual booking, {cpu: 1, gpu: 0.5}, on Ray's logical GPUs (this machine has no CUDA;
    # the trainable's device "auto" falls back to the CPU): two trials fit one GPU and run at once
    spec, study = spec_file(tmp_path, "halfgpu", method="simclr", search={}, seeds=[0, 1],
                             fixed={"epochs": 2, "batch_size": 256, "proj_hidden": 32, "proj_dim": 16},
                             resources={"cpu": 1, "gpu": 0.5}, max_concurrent=2)
    env = {**os.environ, "OTSTUDY_RAY_NUM_GPUS": "1"}
    proc = subprocess.run([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = pd.read_parquet(study / "results.parquet")
    assert list(res["status"]) == ["completed", "completed"]
    windows = []
    for f in (study / "ray").glob("trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        windows.append((rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]))
    assert len(windows) == 2
    assert max(w[0] for w in windows) < min(w[1] for w in windows), f"the trials ran one after the other: {windows}"
    # and Tune booked them as asked: half a GPU and one CPU each (its saved state holds the booking pickled)
    import cloudpickle

    state = json.loads(next((study / "ray").glob("experiment_state*.json")).read_text())
    booked = [cloudpickle.loads(bytes.fromhex(json.loads(t[0])["placement_group_factory"])).required_resources
              for t in state["trial_data"]]
    assert booked == [{"CPU": 1.0, "GPU": 0.5}] * 2, booked
    # Ray gave each trial a GPU id (CUDA_VISIBLE_DEVICES) but there is no CUDA: they trained on the CPU and
    # say so, and the results carry the CPU's model as their hardware (overhead ratios stay within one kind)
    from trainables.pretrain_probe import cpu_model

    assert (proc.stdout + proc.stderr).count("on digits (1212 images), device cpu") == 2
    assert all(h.startswith(cpu_model()) and "cuda" not in h.lower() for h in res["hardware"]), list(res["hardware"])

