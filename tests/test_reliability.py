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
from study.worker import load_checkpoint, restore_state
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
    # epochs 1-3 reached result.json; the driver died after Tune persisted the checkpoints of epochs 4 and
    # 5 but before their results reached storage; the trial continued from epoch 5's checkpoint and sent
    # the metrics of its last epochs along
    from study.history import read_results

    rows = [{"epoch": e, "train_loss": 1.0 / e, "restored_metrics": "[]" if e == 1 else None,
             "trial_id": "t1"} for e in range(1, 4)]
    recent = [{"epoch": float(e), "train_loss": 1.0 / e} for e in range(2, 5)] + \
        [{"epoch": 5.0, "train_loss": 0.2, "knn_acc": 0.5}]
    rows.append({"epoch": 6, "train_loss": 1 / 6, "trial_id": "t1", "node_id": "n",
                 "restored_metrics": json.dumps(recent)})
    # a second resume from epoch 6, whose result is already there: nothing added (a study from before
    # recent_metrics sent the checkpoint's epoch alone, as an object)
    rows.append({"epoch": 7, "train_loss": 1 / 7, "trial_id": "t1",
                 "restored_metrics": json.dumps({"epoch": 6.0, "train_loss": 1 / 6})})
    # the trial had finished (epoch 8) before the driver died, and reports its final checkpoint again:
    # epoch 7 is there, so nothing is added
    rows.append({"epoch": 8, "train_loss": 1 / 8, "trial_id": "t1", "final": 1,
                 "restored_metrics": json.dumps([{"epoch": float(e), "train_loss": 1 / e} for e in (7, 8)])})
    f = tmp_path / "result.json"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 9, "tra')  # cut by a crash
    got = read_results(f)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert got[3] == {"epoch": 4, "train_loss": 0.25, "trial_id": "t1", "node_id": "n", "restored": 1}
    assert got[4] == {"epoch": 5, "train_loss": 0.2, "knn_acc": 0.5, "trial_id": "t1", "node_id": "n",
                      "restored": 1}
    assert all("restored" not in r for r in got[:3] + got[5:])
    # a finished trial restored at its last epoch: the epochs before it come back, the final one is not doubled
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + rows[5:]))
    got = read_results(f)
    assert [(r["epoch"], r.get("restored", 0)) for r in got] == [(1, 0), (2, 0), (3, 0), (7, 1), (8, 0)]
    record("driver killed between a checkpoint and its result", "test_a_history_gap_left_by_a_killed_driver_"
           "is_filled_from_the_restored_checkpoint", "the epochs' rows are rebuilt from the metrics of its last "
           "16 epochs the continued trial sends with its first result (marked restored: 1); no duplicate when "
           "they are there")


def test_a_trial_restarted_in_a_new_directory_is_counted_once_with_the_attempt_that_ran(tmp_path):
    # the driver died after starting trial t_00001 but before the state snapshot named its directory;
    # on resume Tune started it afresh in trial_t_00001_<4 hex> (seen in the object-store kill test)
    from study.export import collect

    exp = tmp_path / "ray"

    def trial(name, epochs, final=False):
        (exp / name).mkdir(parents=True)
        (exp / name / "params.json").write_text(json.dumps({"beta": 0.5}))
        (exp / name / "result.json").write_text("".join(
            json.dumps({"epoch": e, "train_loss": 1.0 / e, **({"final": 1} if final and e == epochs else {})}) + "\n"
            for e in range(1, epochs + 1)))

    trial("trial_t_00000", 3, final=True)
    trial("trial_t_00001", 2)  # the superseded attempt
    trial("trial_t_00001_9f3c", 3, final=True)
    trial("trial_t_00002", 1)  # started after the snapshot: not in the state at all
    states = [("t_00000", "trial_t_00000"), ("t_00001", "trial_t_00001_9f3c")]
    (exp / "experiment_state-1.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": tid, "status": "TERMINATED", "relative_logdir": d}), "{}"] for tid, d in states]}))
    res, hist = collect(tmp_path)
    res = res.set_index("trial_id")
    assert sorted(res.index) == ["t_00000", "t_00001", "t_00002"]
    assert res.loc["t_00001", "trial_dir"] == "trial_t_00001_9f3c" and res.loc["t_00001", "status"] == "completed"
    assert sorted(hist[hist["trial_id"] == "t_00001"]["epoch"]) == [1, 2, 3]
    assert res.loc["t_00002", "trial_dir"] == "trial_t_00002" and res.loc["t_00002", "n_epochs"] == 1
    assert (exp / "trial_t_00001" / "result.json").exists()  # kept on disk
    # exported while the resumed run goes on, before a snapshot names the new directory: the newest attempt
    os.utime(exp / "trial_t_00001" / "result.json", (1, 1))
    states[1] = ("t_00001", None)
    (exp / "experiment_state-1.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": tid, "status": "RUNNING", "relative_logdir": d}), "{}"] for tid, d in states]}))
    res = collect(tmp_path)[0].set_index("trial_id")
    assert sorted(res.index) == ["t_00000", "t_00001", "t_00002"]
    assert res.loc["t_00001", "trial_dir"] == "trial_t_00001_9f3c"
    record("driver killed between starting a trial and the next state snapshot",
           "test_a_trial_restarted_in_a_new_directory_is_counted_once_with_the_attempt_that_ran",
           "Tune restarts the trial in trial_<id>_<4 hex>; export, report, MLflow backfill and ASHA replay "
           "read the directory Tune's state names (else the newest attempt): one row, a complete history")


@pytest.mark.parametrize("handed_out, recorded", [(2, 1), (1, 2), (2, 2)])
def test_the_grid_generator_is_put_back_at_the_recorded_trials(tmp_path, handed_out, recorded, capsys):
    # Tune saves its trials and its grid generator as two files; a driver killed between them (or while
    # an object store receives them) leaves a generator ahead of the trials (a grid point never run: seen
    # in the object-store kill test, whose resumed study ended one trial short) or behind them (a grid
    # point run twice under one trial id)
    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from study.repairs import repair_grid_generator

    def make():
        gen = BasicVariantGenerator(max_concurrent=2)
        gen.add_configurations([Experiment("grid", lambda config: None, storage_path=str(tmp_path / "store"),
                                           config={"beta": tune.grid_search([0.0, 0.4, 0.8]),
                                                   "seed": tune.grid_search([0, 1])})])
        return gen

    exp = tmp_path / "ray"
    exp.mkdir()
    gen = make()
    trials = [gen.next_trial() for _ in range(handed_out)]
    gen.save_to_dir(str(exp), "2026-01-01_00-00-00")
    if recorded > handed_out:
        trials.append(make().next_trial())  # only its id and config matter: the generator's next one
        trials[-1].trial_id = trials[0].trial_id[:-5] + "00001"
    states = [json.dumps({"trial_id": t.trial_id, "status": "TERMINATED" if i == 0 else "RUNNING"})
              for i, t in enumerate(trials[:recorded])]
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[st, "{}"] for st in reversed(states)]}))  # Tune lists them in no fixed order
    before = (exp / "basic-variant-state-2026-01-01_00-00-00.json").read_bytes()
    what = repair_grid_generator(tmp_path)
    if handed_out == recorded:
        assert what is None and (exp / "basic-variant-state-2026-01-01_00-00-00.json").read_bytes() == before
        return
    assert what == (f"the grid generator had handed out {handed_out} trials, the snapshot records {recorded}: "
                    f"it goes on from trial {recorded + 1}") and what in capsys.readouterr().out
    restored = make()
    restored.restore_from_dir(str(exp))
    prefix = trials[0].trial_id[:-5]
    rest = []
    while (t := restored.next_trial()) is not None:
        rest.append((t.trial_id, t.config))
        restored.on_trial_complete(t.trial_id)
    restored.on_trial_complete(prefix + "00001")  # the recorded running trial ends
    while (t := restored.next_trial()) is not None:
        rest.append((t.trial_id, t.config))
        restored.on_trial_complete(t.trial_id)
    grid = [{"beta": b, "seed": s} for s in (0, 1) for b in (0.0, 0.4, 0.8)]
    assert rest == [(prefix + "%05d" % i, grid[i]) for i in range(recorded, 6)]
    record("driver killed between saving its trials and its grid generator",
           "test_the_grid_generator_is_put_back_at_the_recorded_trials",
           "a generator 1 trial ahead of the snapshot (a grid point would never run) or behind it (a point run "
           "twice under one id) is rebuilt at the recorded trials: the resumed grid hands out exactly the "
           "missing points, in order")


def test_a_trial_finished_before_the_driver_died_gets_its_last_epochs_from_its_checkpoint(tmp_path, capsys):
    # Tune's snapshot says TERMINATED, but result.json reached storage without the last epochs (seen in
    # the object-store kill test: the finished trial was exported as pruned, its final metrics lost)
    from study.export import collect, read_results
    from study.repairs import recover_finished_trials

    exp = tmp_path / "ray"

    def trial(name, results, ckpt_epoch, epochs=6):
        d = exp / name
        (d / f"checkpoint_{ckpt_epoch:06d}").mkdir(parents=True)
        (d / "params.json").write_text(json.dumps({"beta": 0.5}))
        metric = [{"epoch": float(e), "train_loss": 1.0 / e, **({"final": 1.0} if e == epochs else {})}
                  for e in range(1, epochs + 1)]
        (d / "result.json").write_text("".join(json.dumps({**m, "epoch": int(m["epoch"])}) + "\n"
                                               for m in metric[:results]))
        torch.save({"epoch": ckpt_epoch, "metrics": metric[ckpt_epoch - 1], "recent_metrics": metric[:ckpt_epoch]},
                   d / f"checkpoint_{ckpt_epoch:06d}" / "state.pt")

    trial("trial_t_00000", 4, 6)  # finished; epochs 5 and 6 never reached result.json
    trial("trial_t_00001", 3, 3)  # pruned by ASHA at epoch 3: nothing to recover
    trial("trial_t_00002", 6, 6)  # complete
    (exp / "experiment_state-1.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": f"t_0000{i}", "status": "TERMINATED", "relative_logdir": f"trial_t_0000{i}"}), "{}"]
        for i in range(3)]}))
    assert recover_finished_trials(tmp_path) == ["t_00000"]
    assert "trial_t_00000: finished before the driver stopped; epoch(s) 5, 6 recovered" in capsys.readouterr().out
    got = read_results(exp / "trial_t_00000" / "result.json")
    assert [(r["epoch"], r.get("restored", 0)) for r in got] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]
    res = collect(tmp_path)[0].set_index("trial_id")
    assert list(res["status"]) == ["completed", "pruned", "completed"]
    assert res.loc["t_00000", "train_loss"] == pytest.approx(1 / 6) and res.loc["t_00000", "n_epochs"] == 6
    assert recover_finished_trials(tmp_path) == []  # once
    record("driver killed after a trial finished, before its last results reached storage",
           "test_a_trial_finished_before_the_driver_died_gets_its_last_epochs_from_its_checkpoint",
           "the resume recovers the missing epochs (final metrics included) from the trial's last checkpoint "
           "(marked restored: 1): exported as completed, not as pruned; a pruned trial is left as it is")


def test_on_an_object_store_a_trial_with_only_checkpoints_is_mirrored_and_set_aside(tmp_path):
    # on an object store a trial's results reach the bucket with the driver's syncs, its checkpoints
    # straight from the worker: a trial started shortly before the driver died holds only checkpoints
    # there, and the mirror (which skips checkpoints) had no directory for it, so its MLflow run stayed
    # RUNNING after the resume (the bucket is a file:// URI here; the mirroring is pyarrow's either way)
    import yaml
    from mlflow.tracking import MlflowClient

    from study.export import collect
    from study.records import default_tracking_uri
    from study.repairs import set_aside_abandoned_trials
    from study.storage import Remote
    from study.tracking import TRIAL_TAG

    bucket, local = tmp_path / "bucket" / "ab", tmp_path / "local" / "ab"
    local.mkdir(parents=True)
    (local / "spec.yaml").write_text(yaml.safe_dump(
        {"name": "ab", "method": "simclr", "dataset": "digits", "search": {"lr": {"low": 1e-4, "high": 1e-2}},
         "sampler": "random", "num_samples": 2, "seeds": [0], "metric": "knn_acc", "mode": "max"}))
    files = {"ray/experiment_state-1.json": json.dumps({"trial_data": [[json.dumps(
                 {"trial_id": "t1", "status": "TERMINATED", "relative_logdir": "trial_t1"}), "{}"]]}),
             "ray/trial_t1/result.json": json.dumps({"epoch": 1, "knn_acc": 0.5, "final": 1.0}) + "\n",
             "ray/trial_t1/checkpoint_000000/state.pt": "weights",
             "ray/trial_t1/checkpoint_000000/embeddings.npz": "features",
             "ray/trial_t2/checkpoint_000000/state.pt": "weights"}
    for rel, text in files.items():
        (bucket / rel).parent.mkdir(parents=True, exist_ok=True)
        (bucket / rel).write_text(text)
    remote = Remote(bucket.as_uri())
    assert remote.pull_experiment(local) == 3  # the state, t1's results and its embeddings
    exp = local / "ray"
    assert (exp / "trial_t2").is_dir() and not any((exp / "trial_t2").iterdir())
    assert not list(exp.rglob("state.pt")) and (exp / "trial_t1" / "checkpoint_000000" / "embeddings.npz").is_file()
    client = MlflowClient(default_tracking_uri(local))
    eid = client.create_experiment("ab")
    runs = {t: client.create_run(eid, tags={TRIAL_TAG: t}).info.run_id for t in ("t1", "t2")}
    client.set_terminated(runs["t1"], status="FINISHED")
    assert set_aside_abandoned_trials(local, remote) == ["t2"]
    assert client.get_run(runs["t2"]).info.status == "KILLED"
    assert json.loads((bucket / "ray" / "abandoned_trials.json").read_text()) == {"t2": "trial_t2"}
    assert list(collect(local)[0]["trial_id"]) == ["t1"]
    assert (bucket / "ray" / "trial_t2" / "checkpoint_000000" / "state.pt").is_file()  # kept in the bucket
    record("object store: driver killed after starting a trial that had written only checkpoints",
           "test_on_an_object_store_a_trial_with_only_checkpoints_is_mirrored_and_set_aside",
           "the mirror keeps an empty directory for it, so the resume sets it aside like on local storage: "
           "its MLflow run ended as KILLED, left out of the results, its checkpoints kept in the bucket")


def test_trials_started_after_the_last_snapshot_are_set_aside_once(tmp_path, capsys):
    # seen in a 3-kill random-sampler study: two trials started after the dead driver's last snapshot
    # were handed out again under new ids by the resumed searcher, and their directories (checkpoints,
    # no results) were exported as 2 extra pending trials, their MLflow runs left RUNNING for ever
    import yaml
    from mlflow.tracking import MlflowClient

    from study.export import collect
    from study.records import default_tracking_uri
    from study.repairs import set_aside_abandoned_trials
    from study.tracking import TRIAL_TAG

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(
        {"name": "ab", "method": "simclr", "dataset": "digits", "search": {"lr": {"low": 1e-4, "high": 1e-2}},
         "sampler": "random", "num_samples": 2, "seeds": [0, 1], "metric": "knn_acc", "mode": "max"}))
    exp = tmp_path / "ray"
    for name in ("trial_t1", "trial_t1_ab12", "trial_t2", "trial_t3"):  # t1_ab12: a restart of t1
        (exp / name / "checkpoint_000000").mkdir(parents=True)
    for name in ("trial_t1", "trial_t1_ab12", "trial_t3"):
        (exp / name / "result.json").write_text(json.dumps({"epoch": 1, "knn_acc": 0.5, "final": 1.0}) + "\n")
    (exp / "experiment_state-1.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": t, "status": "TERMINATED", "relative_logdir": f"trial_{t}"}), "{}"]
        for t in ("t1", "t3")]}))
    client = MlflowClient(default_tracking_uri(tmp_path))
    eid = client.create_experiment("ab")
    runs = {t: client.create_run(eid, tags={TRIAL_TAG: t}).info.run_id for t in ("t1", "t2")}
    client.set_terminated(runs["t1"], status="FINISHED")
    assert set_aside_abandoned_trials(tmp_path) == ["t2"]
    assert "1 trial(s) started after the last snapshot were lost with the driver (t2)" in capsys.readouterr().out
    assert json.loads((exp / "abandoned_trials.json").read_text()) == {"t2": "trial_t2"}
    assert (exp / "trial_t2" / "checkpoint_000000").is_dir()  # kept
    assert client.get_run(runs["t2"]).info.status == "KILLED"
    assert "otstudy.abandoned" in client.get_run(runs["t2"]).data.tags
    assert client.get_run(runs["t1"]).info.status == "FINISHED" and "otstudy.abandoned" not in \
        client.get_run(runs["t1"]).data.tags
    res = collect(tmp_path)[0]
    assert sorted(res["trial_id"]) == ["t1", "t3"] and set(res["status"]) == {"completed"}
    assert set_aside_abandoned_trials(tmp_path) == []  # once
    # a grid study's generator numbers its trials: the same id runs again, so nothing is set aside
    spec = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    spec.update(sampler="grid", num_samples=1, search={"lr": {"grid": [1e-3, 1e-2]}})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (exp / "trial_t4" / "checkpoint_000000").mkdir(parents=True)
    assert set_aside_abandoned_trials(tmp_path) == [] and "t4" in set(collect(tmp_path)[0]["trial_id"])
    record("driver killed after starting trials, before its next snapshot",
           "test_trials_started_after_the_last_snapshot_are_set_aside_once",
           "the resume sets the lost trials aside (their configurations run again under new ids): their "
           "directories are kept but left out of the results, their MLflow runs ended as KILLED and tagged "
           "otstudy.abandoned; a restart of a recorded trial is not touched")


@pytest.mark.parametrize("handed_out, recorded", [(2, 1), (1, 2), (3, 1), (2, 3)])
def test_the_seed_groups_are_put_back_in_step_with_the_recorded_trials(tmp_path, handed_out, recorded, capsys):
    # the same two files for an Optuna study: the search generator's state (trial count, seed groups,
    # concurrency limiter) and the snapshot's trials, out of step after a kill
    import optuna
    from ray.tune.experiment import Experiment
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    from study.repairs import repair_search_generator
    from study.searcher import PrunedAwareOptunaSearch, SeedRepeater

    def make():
        inner = PrunedAwareOptunaSearch(space={"beta": optuna.distributions.FloatDistribution(0, 1)},
                                        metric="knn_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0))
        gen = SearchGenerator(ConcurrencyLimiter(SeedRepeater(inner, [0, 1]), max_concurrent=4))
        gen.add_configurations([Experiment("opt", lambda config: None, config={"lr": 0.1}, num_samples=6,
                                           storage_path=str(tmp_path / "store"))])
        return gen

    exp = tmp_path / "ray"
    exp.mkdir()
    gen = make()
    trials = [gen.next_trial() for _ in range(min(handed_out, recorded))]
    gen.save_to_dir(str(exp), "s1")
    trials += [gen.next_trial() for _ in range(max(handed_out, recorded) - len(trials))]
    if handed_out > recorded:
        gen.save_to_dir(str(exp), "s1")  # the generator's state is the newer file
    (exp / "experiment_state-s1.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": t.trial_id, "status": "RUNNING", "config": t.config}), "{}"]
        for t in reversed(trials[:recorded])]}))
    what = repair_search_generator(tmp_path)
    assert what is not None and what in capsys.readouterr().out
    restored = make()
    restored.restore_from_dir(str(exp))
    lim, rep = restored.searcher, restored.searcher.searcher
    assert lim.live_trials == {t.trial_id for t in trials[:recorded]} and restored._counter == recorded
    nxt = [restored.next_trial() for _ in range(4 - recorded)]
    configs = [(t.config["beta"], t.config["seed"]) for t in trials[:recorded] + nxt]
    # every configuration runs once per seed, in order, whatever the kill left behind
    assert [c[1] for c in configs] == [0, 1, 0, 1]
    assert configs[0][0] == configs[1][0] and configs[2][0] == configs[3][0] != configs[0][0]
    for t in trials[:recorded] + nxt:  # each trial's result reaches its group and Optuna
        restored.on_trial_complete(t.trial_id, result={"knn_acc": 0.5, "final": 1.0})
    assert all(g["told"] for g in rep._groups.values()) and len(rep._groups) == 2
    # (2, 3): the second configuration was suggested after Optuna's state was saved; Optuna's study
    # never handed it out, and gets it added back with its parameters and its mean
    told = sorted((t.params["beta"], t.state.name, t.value) for t in rep.searcher._ot_study.trials)
    assert told == sorted([(configs[0][0], "COMPLETE", 0.5), (configs[2][0], "COMPLETE", 0.5)])
    record("driver killed between saving its trials and its searcher",
           "test_the_seed_groups_are_put_back_in_step_with_the_recorded_trials",
           "seed groups naming a trial never recorded (its seed would never run, the study a trial short) or "
           "missing a recorded one are put back in step: every configuration runs once per seed and Optuna "
           "hears each mean")


def test_a_trial_optuna_lost_is_added_back_with_its_parameters_and_outcome(caplog):
    # the define-by-run space of a real study (a method choice and a conditional knob): trials whose
    # Optuna record was lost with a killed driver are added back as COMPLETE / PRUNED / FAIL from
    # their config, and the sampler then counts them
    import optuna

    from search_spaces.spaces import DefineByRun
    from study.searcher import PrunedAwareOptunaSearch

    space = DefineByRun({"beta": {"low": 0.1, "high": 1.0, "log": True}, "sinkhorn_iters": {"grid": [5, 40]},
                         "lr": {"low": 1e-3, "high": 1e-1}}, ["sinsim", "simclr"])
    search = PrunedAwareOptunaSearch(space=space, metric="knn_acc", mode="max",
                                     sampler=optuna.samplers.RandomSampler(seed=0))
    own = search.suggest("own")
    search.on_trial_complete("own", result={"knn_acc": 0.7, "final": 1.0, "config": own})
    sinsim = {"method": "sinsim", "beta": 0.3, "sinkhorn_iters": 40, "lr": 0.01, "seed": 3}
    with caplog.at_level("WARNING"):
        search.on_trial_complete("lost1", result={"knn_acc": 0.9, "final": 1.0, "config": sinsim})
        search.on_trial_complete("lost2", result={"knn_acc": 0.2, "config": {"method": "simclr", "lr": 0.02}})
        search.on_trial_complete("lost3", result={"config": {**sinsim, "beta": 0.5}}, error=True)
        search.on_trial_complete("lost4", result={"knn_acc": 0.9, "final": 1.0})  # no config: cannot
    trials = search._ot_study.trials
    assert [(t.state.name, t.value) for t in trials] == [("COMPLETE", 0.7), ("COMPLETE", 0.9),
                                                          ("PRUNED", None), ("FAIL", None)]
    assert trials[1].params == {"method": "sinsim", "beta": 0.3, "sinkhorn_iters": 40, "lr": 0.01}
    assert trials[2].params == {"method": "simclr", "lr": 0.02}  # simclr has no beta, no iterations
    assert trials[1].distributions["beta"] == optuna.distributions.FloatDistribution(0.1, 1.0, log=True)
    assert search._ot_study.best_value == 0.9
    assert "added back as COMPLETE" in caplog.text and "could not be added back (ValueError" in caplog.text
    search.on_trial_complete("lost1", result={"knn_acc": 0.1, "final": 1.0, "config": sinsim})
    assert len(search._ot_study.trials) == 4  # told once
    record("Optuna's record of a trial lost with a killed driver",
           "test_a_trial_optuna_lost_is_added_back_with_its_parameters_and_outcome",
           "the finished trial is added back to Optuna's study from its config (parameters and distributions "
           "replayed through the space; COMPLETE with its mean, PRUNED or FAIL), so the sampler counts it; "
           "without a config it warns instead of ending the study")


def test_the_live_mlflow_run_gets_the_restored_epochs_once(tmp_path):
    # the tracker logs the restored epochs the store lacks with the result that carried them, and a
    # new driver (a fresh tracker on the same store) does not log them twice
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from study.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial = SimpleNamespace(trial_id="t1", config={"seed": 0, "beta": 0.5})

    def result(epoch, recent=()):
        return {"epoch": epoch, "train_loss": 1.0 / epoch, "trial_id": "t1",
                "restored_metrics": json.dumps([{"epoch": float(e), "train_loss": 1.0 / e} for e in recent])}

    tracker = MLflowTracker(uri, "gap", str(tmp_path), {"search": {"beta": {}}})
    for r in (result(1), result(2), result(5, recent=(2, 3, 4))):  # epochs 3 and 4 never reached it
        tracker.on_trial_result(0, [], trial, r)
    again = MLflowTracker(uri, "gap", str(tmp_path), {"search": {"beta": {}}})
    again.on_trial_result(0, [], trial, result(7, recent=(4, 5, 6)))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gap").experiment_id],
                                filter_string="tags.`otstudy.role` = 'trial'")
    hist = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in hist) == [(e, pytest.approx(1.0 / e)) for e in range(1, 8)]
    assert tracker.failures == again.failures == 0


def test_the_tracker_holds_its_calls_until_the_store_is_prepared_then_makes_them_in_order(tmp_path, monkeypatch):
    # the study starts while a driver thread still prepares the MLflow store (records.STORE_PREP): the
    # tracker must neither touch the store meanwhile (a sqlite migration in progress) nor lose a call
    import threading
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from study import records
    from study.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    release = threading.Event()
    prep = threading.Thread(target=release.wait, daemon=True)
    prep.start()
    monkeypatch.setattr(records, "STORE_PREP", prep)
    trials = [SimpleNamespace(trial_id=t, config={"seed": 0, "beta": b}, status="TERMINATED",
                              last_result={"epoch": 2, "final": 1.0}) for t, b in (("t1", 0.0), ("t2", 0.5))]
    tracker = MLflowTracker(uri, "held", str(tmp_path), {"search": {"beta": {}}})
    tracker.setup()
    for t in trials:
        tracker.on_trial_start(0, trials, t)
    tracker.on_trial_result(0, trials, trials[0], {"epoch": 1, "train_loss": 1.0})
    tracker.on_trial_result(0, trials, trials[0], {"epoch": 2, "train_loss": 0.5, "final": 1.0})
    tracker.on_trial_complete(0, trials, trials[0])
    assert not (tmp_path / "mlflow.db").exists() and len(tracker._pending) == 6  # held, in order
    release.set()
    prep.join()
    tracker.on_trial_result(0, trials, trials[1], {"epoch": 1, "train_loss": 2.0})
    assert tracker._pending == []
    tracker.on_experiment_end(trials)
    client = MlflowClient(uri)
    runs = {r.data.tags["otstudy.trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name("held").experiment_id], filter_string="tags.`otstudy.role` = 'trial'")}
    assert sorted(runs) == ["t1", "t2"] and runs["t1"].info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(runs["t1"].info.run_id, "train_loss")] == \
        [(1, 1.0), (2, 0.5)]
    assert [m.value for m in client.get_metric_history(runs["t2"].info.run_id, "train_loss")] == [2.0]
    assert tracker.failures == 0


def test_staged_checkpoints_of_dead_trial_processes_are_swept(tmp_path):
    from study.worker import CKPT_STAGING, sweep_checkpoint_staging

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

    from study.worker import _Reporter

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
    if name == "gca_rince" and eps == 1e-3:  # RINCE's unnormalised exp(q cos / eps) would overflow: refused
        bound = r"rince_q \(1/eps \+ log\(max\(rince_lam, 1\) 2 batch_size\)\) = 50[0-9] > 80"
        with pytest.raises(ValueError, match=bound):
            compute_loss(name, *tensors, knobs)
        return
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
def test_a_dataset_file_that_cannot_be_read_fails_each_trial_once_and_the_study_exits_1(tmp_path):
    # a truncated CIFAR-10 batch (an interrupted copy): each trial fails with one line naming the file, its retry
    # fails at once from the marker without loading anything, and since no trial completed the study says so and
    # exits 1, so that `otstudy run ... && otstudy report ...` stops there
    from test_datasets import write_cifar10

    data = tmp_path / "data"
    write_cifar10(data, n=40)
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    spec, study = spec_file(tmp_path, "unreadable", method="simclr", dataset="cifar10", seeds=[0, 1], search={},
                            fixed={"data_root": str(data), "verify_data": False, "epochs": 1, "batch_size": 32,
                                   "proj_hidden": 32, "proj_dim": 16})
    proc = subprocess.run([OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = f"dataset cifar10: {batch} cannot be read ("
    assert "no trial completed" in proc.stdout and line in proc.stdout, proc.stdout[-3000:]
    res = pd.read_parquet(study / "results.parquet")
    assert len(res) == 2 and (res["status"] == "failed").all() and res["error"].str.contains(line, regex=False).all()
    for tid in res["trial_id"]:  # the marker a retry reads: it raised the same error at once
        assert (study / "ray" / f"trial_{tid}" / "final_error.txt").read_text().startswith(f"DatasetUnreadable: {line}")
    record("unreadable dataset file", "test_a_dataset_file_that_cannot_be_read_fails_each_trial_once_and_the_study_"
           "exits_1", "every trial FAILED with one line naming the truncated batch, its retry at once from the "
           "marker; the study said no trial completed and exited 1")


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
    restored = [json.loads(r["restored_metrics"]) for r in first if r.get("restored_metrics", "[]") != "[]"]
    assert len(restored) == 1 and restored[0][-1]["epoch"] >= 2
    assert [m["epoch"] for m in restored[0]] == list(range(1, int(restored[0][-1]["epoch"]) + 1))
    for m in restored[0]:
        assert hist[(hist["trial_id"] == tid) & (hist["epoch"] == m["epoch"])]["train_loss"].item() \
            == pytest.approx(m["train_loss"])
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
    # 12 trials: two run side by side and often finish together, so a kill "after 2 more finished" may come
    # after 4; with 8 trials the third kill had once nothing left to wait for
    betas = [0.0, 0.2, 0.4, 0.8, 1.2, 1.6]
    spec, study = spec_file(tmp_path, "kill3", search={"beta": {"grid": betas}}, seeds=[0, 1],
                            fixed={"epochs": 6, "batch_size": 256, "proj_hidden": 64, "proj_dim": 32})
    n = 2 * len(betas)
    reruns = 0
    cmd = [OTSTUDY, "run", str(spec), "--storage", str(tmp_path / "studies")]
    for kill in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = len(_finished(study)) + 2 if study.exists() else 2
        try:
            wait_for(lambda: len(_finished(study)) >= target or proc.poll() is not None, 600, f"kill {kill + 1}")
            assert proc.poll() is None, f"the study ended before kill {kill + 1}"
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
    assert len(res) == n and (res["status"] == "completed").all() and reruns == 0
    assert all(sorted(g) == list(range(1, 7)) for _, g in hist.groupby("trial_id")["epoch"])
    assert len(trials) == n and len(parents) == 1
    record("driver killed 3 times (kill -9)", "test_three_driver_kills_in_one_study (make reliability)",
           f"{n}/{n} trials finished, {reruns} finished trials rerun, no epoch lost, {len(trials)} child runs "
           f"for {n} trials (0 duplicates)")
