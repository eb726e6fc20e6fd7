"""Faults injected on purpose: nothing finished is lost, one bad trial never sinks a study.

Each test records what it measured in ``.reliability.json`` (repo root) so
docs/reliability.md can be regenerated from a test run
(`.venv/bin/python -m tests.reliability_table`).
"""
import json
import os
import signal
import socket
import subprocess
import time

import pandas as pd
import pytest
import torch
from helpers import OTSTUDY, mlflow_runs, otstudy, record, result_lines, spec_file, wait_for

from study.cli import build_parser
from study.runner import load_checkpoint, restore_state
from trainables.losses import METHODS, compute_loss
from trainables.ot import sinkhorn

# --------------------------------------------------------------------------- checkpoints


def test_corrupted_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    good, bad = tmp_path / "checkpoint_000001.pt", tmp_path / "checkpoint_000002.pt"
    torch.save({"epoch": 1, "w": torch.ones(3)}, good)
    torch.save({"epoch": 2, "w": torch.ones(3)}, bad)
    bad.write_bytes(bad.read_bytes()[:50])  # truncated by a crash mid-write
    with pytest.warns(UserWarning) as caught:
        state = restore_state([bad, good])
    assert state["epoch"] == 1
    msgs = [str(w.message) for w in caught]
    assert any("could not be loaded" in m for m in msgs) and any("older checkpoint" in m for m in msgs)
    with pytest.warns(UserWarning, match="restarts from scratch"):
        assert restore_state([bad]) is None
    record("corrupted / truncated checkpoint", "test_corrupted_checkpoint_falls_back_to_the_previous_good_one",
           "truncated last checkpoint: resumed from the previous one (epoch 1) with a warning; none loadable: "
           "fresh start with a warning")


def test_a_history_gap_left_by_a_killed_driver_is_filled_from_the_restored_checkpoint(tmp_path):
    # epochs 1-4 reached result.json; the driver died after Tune persisted epoch 5's checkpoint but before
    # epoch 5's result reached storage; the trial continued from that checkpoint and sent its metrics along
    from study.export import read_results

    rows = [{"epoch": e, "train_loss": 1.0 / e, "restored_metrics": "{}" if e == 1 else None,
             "trial_id": "t1"} for e in range(1, 5)]
    rows.append({"epoch": 6, "train_loss": 1 / 6, "trial_id": "t1", "node_id": "n",
                 "restored_metrics": json.dumps({"epoch": 5.0, "train_loss": 0.2, "knn_acc": 0.5})})
    # a second resume from epoch 6, whose result is already there: nothing added
    rows.append({"epoch": 7, "train_loss": 1 / 7, "trial_id": "t1",
                 "restored_metrics": json.dumps({"epoch": 6.0, "train_loss": 1 / 6})})
    f = tmp_path / "result.json"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 8, "tra')  # cut by a crash
    got = read_results(f)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4, 5, 6, 7]
    assert got[4] == {"epoch": 5, "train_loss": 0.2, "knn_acc": 0.5, "trial_id": "t1", "node_id": "n",
                      "restored": 1}
    assert all("restored" not in r for r in got[:4] + got[5:])
    record("driver killed between a checkpoint and its result", "test_a_history_gap_left_by_a_killed_driver_"
           "is_filled_from_the_restored_checkpoint", "the epoch's row is rebuilt from the metrics the "
           "continued trial sends with its first result (marked restored: 1); no duplicate when it is there")


def test_staged_checkpoints_of_dead_trial_processes_are_swept(tmp_path):
    from study.runner import CKPT_STAGING, sweep_checkpoint_staging

    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = tmp_path / f"{CKPT_STAGING}{os.getpid()}-abc"
    gone = tmp_path / f"{CKPT_STAGING}{dead.pid}-def"
    other = tmp_path / f"{CKPT_STAGING}xyz"  # not a name this version writes: left alone
    for d in (mine, gone, other):
        d.mkdir()
        (d / "state.pt").write_bytes(b"x")
    assert sweep_checkpoint_staging(str(tmp_path)) == 1
    assert mine.is_dir() and other.is_dir() and not gone.exists()
    record("trial process killed with a checkpoint on its way to Tune",
           "test_staged_checkpoints_of_dead_trial_processes_are_swept",
           "its staged copy in the temp directory (named by its pid) is removed by the next trial process; "
           "a live process's copy is kept")


def test_a_checkpoint_queued_when_tune_stops_the_trial_is_removed(tmp_path, monkeypatch):
    import threading

    from ray import tune

    from study.runner import _Reporter

    entered, release, seen = threading.Event(), threading.Event(), []

    def report(metrics, checkpoint=None):  # Tune's report blocks until the driver asks, then the trial stops
        seen.append(metrics["epoch"])
        entered.set()
        release.wait(10)
        raise SystemExit(0)

    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune.Checkpoint, "from_directory", staticmethod(lambda d: d))
    dirs = [tmp_path / "c1", tmp_path / "c2"]
    for d in dirs:
        d.mkdir()
    reporter = _Reporter()
    reporter.put({"epoch": 1}, str(dirs[0]))
    assert entered.wait(10)
    reporter.put({"epoch": 2}, str(dirs[1]))  # waits in the queue
    release.set()
    with pytest.raises(SystemExit):
        reporter.close(check=True)
    assert seen == [1] and not any(d.exists() for d in dirs)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_checkpoints_load_with_weights_only(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"epoch": 3, "payload": Evil()}, f)
    with pytest.warns(UserWarning, match="could not be loaded"):
        assert load_checkpoint(f) is None
    assert build_parser().parse_args(["ui", "somewhere"]).host == "127.0.0.1"
    record("security", "test_checkpoints_load_with_weights_only (+ test_spec::test_malformed_yaml_and_code_in_yaml)",
           "a checkpoint carrying code is refused (weights_only=True); the MLflow UI binds 127.0.0.1 unless "
           "--host says otherwise; YAML tags that build objects are rejected (safe_load)")


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("eps", [1e-3, 10.0])
@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("n", [2, 1024])
def test_sinkhorn_finite_over_eps_costs_and_sizes(eps, scale, n):
    g = torch.Generator().manual_seed(n)
    cost = (torch.rand(n, n, generator=g) * scale).requires_grad_(True)
    res = sinkhorn(cost, eps=eps, n_iters=20)
    res.transport_cost().backward()
    assert torch.isfinite(res.plan).all() and torch.isfinite(cost.grad).all()


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("eps", [1e-3, 10.0])
@pytest.mark.parametrize("n", [2, 1024])
def test_every_loss_finite_over_eps_and_batch_size(name, eps, n):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, 32, generator=g).requires_grad_(True) for _ in range(4)]
    knobs = {"eps": eps} if "eps" in METHODS[name].knobs else {}
    out = compute_loss(name, *tensors, knobs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(t.grad is None or torch.isfinite(t.grad).all() for t in tensors)
    if name == "barlow_twins" and n == 1024 and eps == 10.0:
        record("numerical range", "test_every_loss_finite_over_eps_and_batch_size, "
               "test_sinkhorn_finite_over_eps_costs_and_sizes, test_losses::test_every_loss_finite",
               "every loss and Sinkhorn finite (value and gradient) for eps in {1e-3, 10}, costs up to 1e3, "
               "batch 2 and 1024, collapsed and orthogonal embeddings")


# --------------------------------------------------------------------------- studies under faults

@pytest.mark.slow
def test_diverging_trial_fails_alone_and_everyone_is_told(tmp_path):
    spec, study = spec_file(tmp_path, "diverge", method="vicreg", sampler="random", sampler_seed=1,
                            num_samples=4, seeds=[0], search={"lr": {"choices": [1e-3, 1e12]}},
                            fixed={"epochs": 2, "batch_size": 256, "optimizer": "sgd", "proj_hidden": 64,
                                   "proj_dim": 32})
    otstudy("run", str(spec), "--storage", str(tmp_path / "studies"))
    res = pd.read_parquet(study / "results.parquet")
    bad, good = res[res["lr"] == 1e12], res[res["lr"] == 1e-3]
    assert len(bad) >= 1 and len(good) >= 1, "the seeded sampler should draw both learning rates"
    assert (bad["status"] == "failed").all() and bad["error"].str.contains("train_loss became").all()
    assert (good["status"] == "completed").all()
    assert (bad["searcher_state"] == "FAIL").all() and (good["searcher_state"] == "COMPLETE").all()
    _, trials, _ = mlflow_runs(study)
    by_id = {r.data.tags["otstudy.trial_id"]: r for r in trials}
    for tid in bad["trial_id"]:
        assert by_id[tid].info.status == "FAILED" and "train_loss became" in by_id[tid].data.tags["otstudy.error"]
    # the retry (max_failures=1) failed at once from the marker instead of training again
    assert all(result_lines(study)[f"trial_{t}"] <= 2 for t in bad["trial_id"])
    record("divergence (lr = 1e12)", "test_diverging_trial_fails_alone_and_everyone_is_told",
           f"{len(bad)} diverged trial(s) FAILED with the reason in Parquet and MLflow, Optuna told FAIL, "
           f"retry failed at once; {len(good)} other trial(s) completed")


@pytest.mark.slow
def test_killed_worker_is_retried_from_its_checkpoint(tmp_path):
    spec, study = spec_file(tmp_path, "workerkill", seeds=[0], search={"beta": {"grid": [0.0, 0.8]}},
                            fixed={"epochs": 8, "batch_size": 256, "proj_hidden": 64, "proj_dim": 32})
    proc = subprocess.Popen([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def victim():
        for f in (study / "ray").glob("trial_*/result.json"):
            lines = f.read_text().splitlines()
            if len(lines) >= 3:
                return f.parent.name, json.loads(lines[-1])["pid"], len(lines)
        return None

    try:
        name, pid, epochs_before = wait_for(victim, 300, "a trial at epoch 3")
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    res = pd.read_parquet(study / "results.parquet").set_index("trial_id")
    tid = name[len("trial_"):]
    assert (res["status"] == "completed").all()
    assert res.loc[tid, "num_failures"] >= 1
    hist = pd.read_parquet(study / "history.parquet")
    assert sorted(hist[hist["trial_id"] == tid]["epoch"]) == list(range(1, 9))
    lines = result_lines(study)[name]
    # resumed from its last checkpoint: at most the epoch in flight is repeated, never all of them
    assert lines <= 8 + 2
    # and the retry's first result carries the metrics of the epoch it continued from
    first = [json.loads(ln) for ln in (study / "ray" / name / "result.json").read_text().splitlines()]
    restored = [json.loads(r["restored_metrics"]) for r in first if r.get("restored_metrics", "{}") != "{}"]
    assert len(restored) == 1 and restored[0]["epoch"] >= 2
    assert hist[(hist["trial_id"] == tid) & (hist["epoch"] == restored[0]["epoch"])]["train_loss"].item() \
        == pytest.approx(restored[0]["train_loss"])
    record("trial worker killed (SIGKILL at epoch >= 3)", "test_killed_worker_is_retried_from_its_checkpoint",
           f"retried from its checkpoint (num_failures={int(res.loc[tid, 'num_failures'])}), "
           f"{lines - 8} epoch(s) repeated, study completed 2/2")


@pytest.mark.slow
def test_four_concurrent_trials_lose_no_metric_in_sqlite(tmp_path):
    spec, study = spec_file(tmp_path, "concurrent", search={"beta": {"grid": [0.0, 0.8]}}, seeds=[0, 1],
                            resources={"cpu": 0.5}, max_concurrent=4)
    otstudy("run", str(spec), "--storage", str(tmp_path / "studies"))
    hist = pd.read_parquet(study / "history.parquet")
    client, trials, _ = mlflow_runs(study)
    expected = lost = 0
    for r in trials:
        h = hist[hist["trial_id"] == r.data.tags["otstudy.trial_id"]]
        for key in ("train_loss", "knn_acc", "step_time_ms", "ot_time_ms", "nt_xent"):
            n = int(h[key].notna().sum())
            expected += n
            lost += n - len(client.get_metric_history(r.info.run_id, key))
    assert len(trials) == 4 and expected == 4 * 3 * 5 and lost == 0
    record("4 concurrent trials, sqlite store", "test_four_concurrent_trials_lose_no_metric_in_sqlite",
           f"{expected} metric values expected, {lost} lost, 4 child runs")


@pytest.mark.slow
def test_unreachable_mlflow_does_not_stop_the_study(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    spec, study = spec_file(tmp_path, "nomlflow", mlflow_uri=f"http://127.0.0.1:{port}")
    t0 = time.time()
    otstudy("run", str(spec), "--storage", str(tmp_path / "studies"))
    elapsed = time.time() - t0
    res = pd.read_parquet(study / "results.parquet")
    assert len(res) == 4 and (res["status"] == "completed").all()
    assert (study / "mlflow_errors.log").read_text().strip()
    otstudy("report", str(study))
    assert "MLflow logging failed" in (study / "report" / "index.html").read_text()
    record("MLflow unreachable (closed port)", "test_unreachable_mlflow_does_not_stop_the_study",
           f"4/4 trials completed and exported in {elapsed:.0f} s; the report says MLflow logging failed")


def _finished(study):
    return {f.parent.name for f in (study / "ray").glob("trial_*/result.json") if '"final": 1.0' in f.read_text()}


@pytest.mark.reliability
def test_three_driver_kills_in_one_study(tmp_path):
    spec, study = spec_file(tmp_path, "kill3", search={"beta": {"grid": [0.0, 0.4, 0.8, 1.2]}}, seeds=[0, 1],
                            fixed={"epochs": 6, "batch_size": 256, "proj_hidden": 64, "proj_dim": 32})
    reruns = 0
    cmd = [OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")]
    for kill in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = len(_finished(study)) + 2 if study.exists() else 2
        try:
            wait_for(lambda: len(_finished(study)) >= target, 600, f"kill {kill + 1}")
            time.sleep((kill * 1.7) % 3)  # a different moment each time
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        before = {k: v for k, v in result_lines(study).items() if k in _finished(study)}
        cmd = [OTSTUDY, "resume", str(study)]
        if kill == 2:
            otstudy("resume", str(study))
        after = result_lines(study)
        reruns += sum(1 for k, v in before.items() if after.get(k, v) - v > 1)
    res = pd.read_parquet(study / "results.parquet")
    hist = pd.read_parquet(study / "history.parquet")
    _, trials, parents = mlflow_runs(study)
    assert len(res) == 8 and (res["status"] == "completed").all() and reruns == 0
    assert all(sorted(g) == list(range(1, 7)) for _, g in hist.groupby("trial_id")["epoch"])
    assert len(trials) == 8 and len(parents) == 1
    record("driver killed 3 times (kill -9)", "test_three_driver_kills_in_one_study (make reliability)",
           f"8/8 trials finished, {reruns} finished trials rerun, no epoch lost, {len(trials)} child runs "
           f"for 8 trials (0 duplicates)")
