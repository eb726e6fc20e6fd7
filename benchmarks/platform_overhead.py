"""The same N short trials through `otstudy run` (Ray Tune + grid + MLflow) vs plain Python loops.

Trials: SinSim on digits, small CNN, beta in {0, 0.8} x seeds {0, 1} (N = 4), E epochs each,
torch limited to 1 thread per trial (what Ray gives a trial that books 1 CPU).

* plain loop: trainables.pretrain_probe.run called 4 times in one process;
* 2 plain loops in parallel: two processes with 2 trials each (the hardware's own speed-up from
  running 2 one-thread trials on 2 cores, with no Ray at all);
* `otstudy run` with max_concurrent 1 and 2, wall time of the whole command (Python and torch
  imports, Ray's start, the MLflow store, the Parquet export, Ray's shutdown); and once with
  max_concurrent 1 and 2 joining a Ray started beforehand (`ray start --head`, not timed) with --address
  (a cluster's workflow: Ray's start is paid once per cluster, not per study).

The wall time of `otstudy run` is split into the time inside trials (the sum of each trial's
``time_total_s`` minus its ``setup_s``: from the training's start to its last report, measured in the
worker, as the loop measures it) and
the rest (start-up, gaps between trials, tear-down), so the fixed cost and the per-trial cost
are separated. The projected ratio for a longer study follows from the two.

    .venv/bin/python -m benchmarks.platform_overhead [--epochs E] [--rounds R]
    .venv/bin/python -m benchmarks.platform_overhead --part head [--pairs P]
    .venv/bin/python -m benchmarks.platform_overhead --part against --against REV [--pairs P] [--study-epochs E]
    .venv/bin/python -m benchmarks.platform_overhead --part actor [--pairs P]
    .venv/bin/python -m benchmarks.platform_overhead --part trace [--epochs E]

``--part head`` compares, pair by pair, a 1-trial study started with Ray's full head
(``OTSTUDY_RAY_FULL_HEAD=1``: its API server and autoscaler monitor) and with otstudy's lean one.
``--part against`` compares, pair by pair, this checkout's `otstudy run` with git revision REV's on a
1-trial study and on 2 trials run 2 at a time (1 epoch each): the time to the first trial's first line
and the wall time (with ``--study-epochs E``, also the default part's 4-trial study, E epochs, 2 at a
time: its wall time and how unevenly its two workers were loaded). ``--part actor`` times a trial's actor
started with Tune's runtime env against one started without (as otstudy's local cluster does), pair by pair.
``--part trace`` runs the 4 trials 2 at a time once and reads every process's CPU time from /proc every
0.25 s: the CPU seconds of the driver, the trial workers, Ray's processes and the rest of the machine from
the command to the first trial's line, their shares of the cores while the trials run, and after the last
result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch
import yaml

from benchmarks.common import ROOT, ensure_malloc_env, markdown_table, record, short_revision
from study.session import FULL_HEAD_ENV

TRIALS = [(beta, seed) for beta in (0.0, 0.8) for seed in (0, 1)]


def spec(epochs, concurrent, name):
    return {"name": name, "method": "sinsim", "dataset": "digits",
            "fixed": {"epochs": epochs, "batch_size": 256, "eps": 0.05, "sinkhorn_iters": 40},
            "search": {"beta": {"grid": [0.0, 0.8]}}, "sampler": "grid", "seeds": [0, 1], "metric": "knn_acc",
            "mode": "max", "resources": {"cpu": 1}, "max_concurrent": concurrent}


def _loop(epochs: int, trials) -> list:
    """Run ``trials`` one after another in this process; returns [the sum of the trials' times, the
    epochs' median training-step times in ms]."""
    from trainables.pretrain_probe import run

    torch.set_num_threads(1)
    inside, steps = 0.0, []
    for beta, seed in trials:
        t0 = time.perf_counter()
        run({"method": "sinsim", "epochs": epochs, "batch_size": 256, "eps": 0.05, "sinkhorn_iters": 40,
             "beta": beta, "seed": seed}, lambda m, c=None: steps.append(m["step_time_ms"]))
        inside += time.perf_counter() - t0
    return [inside, steps]


def plain_loops(epochs: int, processes: int) -> tuple:
    """Wall time of ``processes`` fresh Python processes sharing the 4 trials, the time in trials, and the
    median training-step time (ms) over all epochs."""
    share = [TRIALS[i::processes] for i in range(processes)]
    code = ("import json,sys; from benchmarks.platform_overhead import _loop; "
            "print(json.dumps(_loop(int(sys.argv[1]), json.loads(sys.argv[2]))))")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(epochs), json.dumps(s)], stdout=subprocess.PIPE,
                              text=True) for s in share]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    return wall, sum(o[0] for o in outs), statistics.median(x for o in outs for x in o[1])


def _timed_run(study: dict, d: str, extra=(), env=None, code: Optional[Path] = None) -> tuple:
    """Run `otstudy run` on ``study`` with storage ``d``: (wall s, s to the first trial's line, s from the
    results to the exit), from the time stamps of the command's output (where the fixed cost goes).
    ``code``: run the CLI of the checkout in that directory instead (``python -m study.cli``, with it
    first on the driver's and the workers' path)."""
    f = Path(d) / f"{study['name']}.yaml"
    f.write_text(yaml.safe_dump(study))
    cmd = [str(Path(sys.executable).parent / "otstudy")]
    if code is not None:
        cmd = [sys.executable, "-m", "study.cli"]
        env = {**(env or os.environ), "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "run", str(f), "--storage", d, *extra], cwd=code,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_trial = results_out = None
    for line in proc.stdout:
        if first_trial is None and "[otstudy trial]" in line:  # printed once the trial's data is loaded
            first_trial = time.perf_counter() - t0
        if line.startswith(f"[otstudy] {d}"):  # the last line: results exported
            results_out = time.perf_counter()
    if proc.wait() != 0:
        raise RuntimeError(f"otstudy run failed with exit code {proc.returncode}")
    end = time.perf_counter()
    return end - t0, first_trial, end - results_out if results_out is not None else float("nan")


def through_otstudy(epochs, concurrent, address=None, env=None):
    with tempfile.TemporaryDirectory() as d:
        wall, first_trial, after = _timed_run(spec(epochs, concurrent, f"c{concurrent}"), d,
                                              ["--address", address] if address else [], env)
        inside, steps = 0.0, []
        for f in (Path(d) / f"c{concurrent}" / "ray").glob("trial_*/result.json"):
            rows = [json.loads(ln) for ln in f.read_text().splitlines()]
            # from the training's start, like the loop: a fresh worker's torch import is set-up, not training
            inside += rows[-1]["time_total_s"] - rows[0].get("setup_s", 0.0)
            steps += [r["step_time_ms"] for r in rows if "step_time_ms" in r]
        # (s to the first trial's data loaded, s from the results to the exit): where the fixed cost sits
        return wall, inside, (first_trial, after), statistics.median(steps)


def with_running_ray(epochs, concurrent=1):
    """`otstudy run --address` against a Ray already started with `ray start --head` (not timed)."""
    import shutil
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a loopback cluster (see tests/test_platform.py)
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths must stay short
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
                        "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)
        return through_otstudy(epochs, concurrent, address=f"127.0.0.1:{port}", env=env)
    finally:
        from study.session import stop_ray_started_in

        stop_ray_started_in(temp)  # what this run started only: `ray stop` would stop every Ray on the machine
        shutil.rmtree(temp, ignore_errors=True)


def one_round(epochs: int, rotate: int = 0) -> dict:
    """Every runner once, one after another (a few minutes), starting with runner ``rotate`` (so that
    no runner always runs first or last): the ratios of one round compare runs made close together in
    time. This machine's speed drifts by up to ~40% over minutes (steps of the same trial measured
    101-169 ms in one run), so a single round can mislead."""
    r = {}
    runners = [("l1", lambda: plain_loops(epochs, 1)), ("l2", lambda: plain_loops(epochs, 2)),
               ("c1", lambda: through_otstudy(epochs, 1)), ("c2", lambda: through_otstudy(epochs, 2)),
               ("a1", lambda: with_running_ray(epochs)), ("a2", lambda: with_running_ray(epochs, 2))]
    for key, run in runners[rotate % len(runners):] + runners[:rotate % len(runners)]:
        out = run()
        names = ("wall", "in", "step") if key.startswith("l") else ("wall", "in", "times", "step")
        r.update({f"{key}_{n}": v for n, v in zip(names, out)})
    # ratios of this round
    r["c1_ratio"] = r["c1_wall"] / r["l1_wall"]
    r["c2_ratio"] = r["c2_wall"] / (r["l1_wall"] / 2)
    r["a1_ratio"] = r["a1_wall"] / r["l1_wall"]
    r["a2_ratio"] = r["a2_wall"] / (r["l1_wall"] / 2)
    r["throughput_address"] = r["a1_wall"] / r["a2_wall"]
    r["l2_ratio"] = r["l2_wall"] / (r["l1_wall"] / 2)
    r["fixed"] = r["c1_wall"] - r["c1_in"] - (r["l1_wall"] - r["l1_in"])  # beyond the loop's own process start
    r["per_trial"] = r["c1_in"] / r["l1_in"]
    r["throughput_otstudy"] = r["c1_wall"] / r["c2_wall"]
    r["throughput_plain"] = r["l1_wall"] / r["l2_wall"]
    r["amortised"] = 2 * r["c1_in"] / r["c2_in"]
    r["step1"] = r["c1_step"] / r["l1_step"]
    r["step2"] = r["c2_step"] / r["l2_step"]
    for key in ("c1", "c2", "a1", "a2"):  # where the fixed cost sits: time stamps of the command's output
        r[f"{key}_first"], r[f"{key}_exit"] = r[f"{key}_times"]
    return r


def _spread(rounds, key, fmt="{:.2f}"):
    vals = [r[key] for r in rounds]
    med = statistics.median(vals)
    return fmt.format(med) if len(vals) == 1 else (fmt + " (" + fmt + "-" + fmt + ")").format(med, min(vals), max(vals))


RAY_START = """
import json, time
t0 = time.perf_counter()
import ray
from study.session import init_ray, shutdown_ray
t1 = time.perf_counter()
init_ray()
t2 = time.perf_counter()
@ray.remote(num_cpus=1, runtime_env={"env_vars": {"PL_DISABLE_FORK": "1"}})  # as Tune starts a trial
def task():
    return 1
ray.get(task.remote())
t3 = time.perf_counter()
shutdown_ray()
print(json.dumps([t2 - t1, t3 - t2, time.perf_counter() - t0]))
"""


def _one_trial_study(env, code: Optional[Path] = None) -> tuple:
    """(s to the trial's first line, wall s) of `otstudy run` on a 1-trial, 1-epoch study."""
    one = {**spec(1, 1, "h"), "search": {"beta": {"grid": [0.0]}}, "seeds": [0]}
    with tempfile.TemporaryDirectory() as d:
        wall, first, _ = _timed_run(one, d, env=env, code=code)
        return first, wall


def paired_tables(runs_a: list, runs_b: list, names: List[str], b_sooner: bool = False) -> tuple:
    """(summary rows, per-pair rows) of paired runs of a and b: each one's median time, the median (range)
    of a's time minus b's within each pair, and in how many pairs a was sooner (b, with ``b_sooner``)."""
    med = statistics.median
    summary = []
    for k, name in enumerate(names):
        xs, ys = [r[k] for r in runs_a], [r[k] for r in runs_b]
        diff = [x - y for x, y in zip(xs, ys)]
        sooner = sum((d > 0) if b_sooner else (d < 0) for d in diff)
        summary.append([name, f"{med(xs):.2f}", f"{med(ys):.2f}", f"{med(diff):+.2f} ({min(diff):+.2f} to "
                        f"{max(diff):+.2f})", f"{sooner} of {len(diff)}"])
    rows = [[i, *(f"{x:.2f} / {y:.2f}" for x, y in zip(ra, rb))] for i, (ra, rb) in enumerate(zip(runs_a, runs_b), 1)]
    return summary, rows


def head_pairs(pairs: int) -> None:
    """Ray's full head (API server and autoscaler monitor, ``OTSTUDY_RAY_FULL_HEAD=1``) vs otstudy's lean
    one, ``pairs`` times each, alternately (the order flips every pair), compared pair by pair:

    * Ray alone, in a fresh process: ``session.init_ray()``, one task started as Tune starts a trial
      (in a worker with a runtime env), ``session.shutdown_ray()``;
    * a 1-trial, 1-epoch `otstudy run`: to the trial's first line, and the command's wall time.
    """

    runs = {"full": [], "lean": []}
    for i in range(pairs):
        for head in (("full", "lean") if i % 2 == 0 else ("lean", "full")):
            env = {**os.environ, FULL_HEAD_ENV: "1" if head == "full" else "0"}
            out = subprocess.run([sys.executable, "-c", RAY_START], capture_output=True, text=True, cwd=ROOT,
                                 env=env, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"Ray's start failed: {out.stderr[-2000:]}")
            ray_times = json.loads(out.stdout.strip().splitlines()[-1])
            runs[head].append([*ray_times, *_one_trial_study(env)])
            print(f"pair {i + 1}/{pairs} {head}: " + ", ".join(f"{v:.2f}" for v in runs[head][-1]), flush=True)
    names = ["ray.init s", "a trial-like task s", "Ray alone: process s", "study: first trial line s",
             "study: wall s"]
    summary, rows = paired_tables(runs["full"], runs["lean"], names, b_sooner=True)
    head = (f"{pairs} pairs, alternately (full head first in odd pairs). Medians, and the full head's time minus "
            f"the lean one's within each pair:\n\n"
            + markdown_table(["time", "full head", "lean head", "full - lean, median (range)", "lean faster in"],
                             summary)
            + "\n\nPer pair (full / lean):\n\n")
    record("platform_overhead --part head: Ray's full head vs otstudy's lean head",
           head + markdown_table(["pair", *names], rows))


ACTOR_START = """
import json, os, sys, time, ray
from study.session import init_ray, shutdown_ray
init_ray()
class Trial:
    def ready(self):
        return os.getpid()
env = ray.remote(runtime_env={"env_vars": {"PL_DISABLE_FORK": "1"}})(Trial)  # as Tune registers a trial
inherited = ray.remote(Trial)  # as otstudy does on its local cluster (the same variable, inherited)
times = {"tune": [], "inherited": []}
for i in range(int(sys.argv[1])):
    for label, cls in ((("tune", env), ("inherited", inherited)) if i % 2 == 0 else
                       (("inherited", inherited), ("tune", env))):
        t0 = time.perf_counter()
        actor = cls.options(num_cpus=1).remote()
        ray.get(actor.ready.remote())
        times[label].append(time.perf_counter() - t0)
        ray.kill(actor)
        time.sleep(1.0)  # its worker gone
shutdown_ray()
print(json.dumps(times))
"""


def actor_pairs(pairs: int) -> None:
    """A trial's actor started with Tune's runtime env (``{"env_vars": {"PL_DISABLE_FORK": "1"}}``) vs
    without one, alternately in one local cluster: the time from the actor's creation to its first answer
    (a new worker process each time)."""
    out = subprocess.run([sys.executable, "-c", ACTOR_START, str(pairs)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the actor starts failed: {out.stderr[-2000:]}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    med = statistics.median
    diff = [a - b for a, b in zip(times["tune"], times["inherited"])]
    rows = [[i, f"{a:.3f}", f"{b:.3f}"] for i, (a, b) in enumerate(zip(times["tune"], times["inherited"]), 1)]
    record("platform_overhead --part actor: a trial's actor with Tune's runtime env vs without",
           f"{pairs} pairs in one local cluster (`session.init_ray()`), alternately; seconds from the actor's "
           f"creation to its first answer. Medians: with Tune's runtime env {med(times['tune']):.3f} s, "
           f"without {med(times['inherited']):.3f} s; difference {med(diff):+.3f} s ({min(diff):+.3f} to "
           f"{max(diff):+.3f}), without sooner in {sum(d > 0 for d in diff)} of {pairs}.\n\n"
           + markdown_table(["pair", "Tune's runtime env s", "none (inherited) s"], rows))


def _worker_imbalance(study_dir: Path) -> float:
    """The difference between the busiest and the least busy trial worker's time in trials (s): the sum
    of ``time_total_s`` of the trials each worker process (``pid``) ran. With 2 workers, the time one
    of them has nothing to run at the end of the study."""
    busy = {}
    for f in study_dir.glob("ray/trial_*/result.json"):
        last = json.loads(f.read_text().splitlines()[-1])
        busy[last["pid"]] = busy.get(last["pid"], 0.0) + last["time_total_s"]
    return max(busy.values()) - min(busy.values()) if len(busy) > 1 else float("nan")


def against_pairs(rev: str, pairs: int, study_epochs: int = 0) -> None:
    """This checkout's `otstudy run` against git revision ``rev``'s (its files exported to a temporary
    directory, run with ``python -m study.cli`` there), ``pairs`` times each, alternately, on a 1-trial,
    1-epoch study and on 2 one-epoch trials run 2 at a time: each one's time to the (first) trial's first
    line and wall time, compared pair by pair. With ``study_epochs`` E > 0, also the study of the default
    part (4 trials of E epochs, 2 at a time): its wall time and the two workers' imbalance (see
    :func:`_worker_imbalance`)."""
    import shutil

    rev_id = short_revision(rev, "platform_overhead")
    old = Path(tempfile.mkdtemp(prefix=f"otstudy-{rev_id}-"))
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        two = {**spec(1, 2, "t"), "seeds": [0]}  # beta in {0, 0.8}: 2 trials, 2 at a time

        def both(code):
            first, wall = _one_trial_study(os.environ, code)
            with tempfile.TemporaryDirectory() as d:
                wall2, first2, _ = _timed_run(two, d, code=code)
            if not study_epochs:
                return [first, wall, first2, wall2]
            with tempfile.TemporaryDirectory() as d:
                wall4, _, _ = _timed_run(spec(study_epochs, 2, "c2"), d, code=code)
                return [first, wall, first2, wall2, wall4, _worker_imbalance(Path(d) / "c2")]

        order = (("this", ROOT), (rev_id, old))
        runs = {"this": [], rev_id: []}
        for i in range(pairs):
            for label, code in (order if i % 2 == 0 else order[::-1]):
                runs[label].append(both(code))
                print(f"pair {i + 1}/{pairs} {label}: " + ", ".join(f"{v:.2f}" for v in runs[label][-1]),
                      flush=True)
    finally:
        shutil.rmtree(old, ignore_errors=True)
    names = ["1 trial: first trial line s", "1 trial: wall s", "2 trials, 2 at a time: first trial line s",
             "2 trials, 2 at a time: wall s"]
    if study_epochs:
        names += [f"4 trials x {study_epochs} epochs, 2 at a time: wall s", "... its workers' imbalance s"]
    summary, rows = paired_tables(runs["this"], runs[rev_id], names)
    head = (f"{pairs} pairs, alternately (this checkout first in odd pairs); 1-epoch trials"
            + (f", and the default part's study (beta in {{0, 0.8}} x seeds {{0, 1}}, {study_epochs} epochs, "
               f"2 at a time; imbalance: the busiest worker's time in trials minus the other's)"
               if study_epochs else "")
            + f". Medians, and this checkout's time minus {rev_id}'s within each pair:\n\n"
            + markdown_table(["time", "this", rev_id, f"this - {rev_id}, median (range)", "this sooner in"],
                             summary)
            + f"\n\nPer pair (this / {rev_id}):\n\n")
    record(f"platform_overhead --part against {rev}: this checkout's `otstudy run` vs {rev_id}'s",
           head + markdown_table(["pair", *names], rows))


RAY_PROCESSES = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "agent", "ray::",
                 "default_worker.py", "monitor.py", "setup_worker.py")


def _cpu_seconds(pid: str) -> Optional[float]:
    """User + system CPU seconds of process ``pid`` so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _command_line(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def trace(epochs: int) -> None:
    """One `otstudy run` of the 4 trials, 2 at a time, with every process's CPU time read from /proc every
    0.25 s: where the CPU goes while the study starts (to the first trial's line), while the trials run,
    and after the last result, by group (the driver, the trial workers, Ray's own processes, the rest of
    the machine, this sampler). On 2 cores the start is CPU-bound and anything beside the trials takes
    from them; the groups say how much."""
    import re
    import threading

    samples: dict = {}  # pid -> [(s since the command, CPU s)]
    names: dict = {}
    events: dict = {}
    trial_pids: set = set()
    with tempfile.TemporaryDirectory() as d:
        study = spec(epochs, 2, "trace")
        f = Path(d) / "trace.yaml"
        f.write_text(yaml.safe_dump(study))
        before = {pid for pid in os.listdir("/proc") if pid.isdigit()}
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "otstudy"), "run", str(f), "--storage", d],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read():
            for line in proc.stdout:
                now = time.perf_counter() - t0
                if "[otstudy trial]" in line:
                    events.setdefault("first trial line", now)
                    trial_pids.update(re.findall(r"pid=(\d+)", line))
                if ": completed," in line:
                    events["last trial completed"] = now
                if "Configuration for experiment" in line:
                    events.setdefault("Tune's set-up printed", now)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:
            now = time.perf_counter() - t0
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    cpu = _cpu_seconds(pid)
                    if cpu is not None:
                        if pid not in names:
                            names[pid] = _command_line(pid)
                        samples.setdefault(pid, []).append((now, cpu))
            if proc.poll() is not None:
                break
            time.sleep(0.25)
        reader.join(timeout=5)
        if proc.returncode != 0:
            raise RuntimeError(f"otstudy run failed with exit code {proc.returncode}")
        events["exit"] = time.perf_counter() - t0
    if "first trial line" not in events or "last trial completed" not in events:
        raise RuntimeError("the study printed no trial line or no completed trial: nothing to trace")

    def group(pid: str) -> str:
        if pid == str(proc.pid):
            return "the driver (otstudy run)"
        if pid in trial_pids:
            return "the trial workers (2)"
        if pid == str(os.getpid()):
            return "this sampler"
        if any(k in names[pid] for k in RAY_PROCESSES) and pid not in before:
            return "Ray's processes (raylet, GCS, agents, log monitor, idle workers)"
        return "the rest of the machine"

    def cpu_at(pid: str, t: float) -> float:  # the last reading at or before t (0 before a new process ran)
        base = samples[pid][0][1] if pid in before else 0.0
        value = base
        for when, cpu in samples[pid]:
            if when > t:
                break
            value = cpu
        return value - base

    start, trials_from, trials_to = 0.0, events["first trial line"] + 1.0, events["last trial completed"]
    windows = [("start: the command to the first trial's line", start, events["first trial line"]),
               ("the trials running (from 1 s after the first trial's line to the last completed)",
                trials_from, trials_to), ("after the last result, to the exit", trials_to, events["exit"])]
    totals: dict = {}
    for pid in samples:
        g = group(pid)
        per = totals.setdefault(g, [0.0] * len(windows))
        for k, (_, lo, hi) in enumerate(windows):
            per[k] += cpu_at(pid, hi) - cpu_at(pid, lo)
    order = ["the driver (otstudy run)", "the trial workers (2)",
             "Ray's processes (raylet, GCS, agents, log monitor, idle workers)", "the rest of the machine",
             "this sampler"]
    rows = []
    for g in order:
        per = totals.get(g, [0.0] * len(windows))
        rows.append([g, f"{per[0]:.2f}", f"{100 * per[1] / (trials_to - trials_from):.1f}", f"{per[2]:.2f}"])
    cores = os.cpu_count() or 1
    spans = [hi - lo for _, lo, hi in windows]
    alls = [sum(t[k] for t in totals.values()) for k in range(len(windows))]
    rows.append([f"all ({cores} cores: at most {cores} CPU-s a second)", f"{alls[0]:.2f}",
                 f"{100 * alls[1] / spans[1]:.1f}", f"{alls[2]:.2f}"])
    timeline = [[k, f"{v:.2f}"] for k, v in sorted(events.items(), key=lambda kv: kv[1])]
    record("platform_overhead --part trace: where the CPU goes in a 2-at-a-time study",
           f"One `otstudy run` of the 4 trials x {epochs} epochs, 2 at a time (Ray started by the command), every "
           "process's user + system CPU time read from /proc every 0.25 s (this sampler's own share is its row), "
           f"grouped. Windows: the start ({spans[0]:.1f} s), the trials ({spans[1]:.1f} s), the end "
           f"({spans[2]:.1f} s).\n\n" + markdown_table(["event", "s from the command"], timeline) + "\n\n"
           + markdown_table(["process group", "CPU s in the start", "% of a core while the trials run",
                             "CPU s after the last result"], rows))


def main():
    ensure_malloc_env()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3, help="every runner once per round; medians over rounds")
    p.add_argument("--part", choices=("study", "head", "against", "actor", "trace"), default="study",
                   help="study: otstudy vs plain loops (default); head: Ray's full head vs the lean one, paired; "
                        "against: this checkout vs git revision --against, paired; actor: a trial's actor "
                        "with Tune's runtime env vs without, paired; trace: where the CPU goes in one "
                        "2-at-a-time study (/proc, by process group)")
    p.add_argument("--pairs", type=int, default=8, help="--part head / against / actor: pairs of runs")
    p.add_argument("--against", metavar="REV", help="--part against: the git revision to compare with")
    p.add_argument("--study-epochs", type=int, default=0, metavar="E",
                   help="--part against: also the default part's 4-trial study, E epochs, 2 at a time")
    args = p.parse_args()
    if args.rounds < 1 or args.epochs < 1 or args.pairs < 1:
        p.error(f"--rounds, --epochs and --pairs must be >= 1, got {args.rounds}, {args.epochs}, {args.pairs}")
    if args.study_epochs < 0 or (args.study_epochs and args.part != "against"):
        p.error(f"--study-epochs must be >= 0 and goes with --part against, got {args.study_epochs}")
    if (args.part == "against") != (args.against is not None):
        p.error("--part against and --against REV go together")
    if args.part == "head":
        head_pairs(args.pairs)
        return
    if args.part == "against":
        against_pairs(args.against, args.pairs, args.study_epochs)
        return
    if args.part == "actor":
        actor_pairs(args.pairs)
        return
    if args.part == "trace":
        trace(args.epochs)
        return
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(args.epochs, rotate=i))
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items()
                                                        if isinstance(v, float)), flush=True)
    rows = []
    for i, r in enumerate(rounds, 1):
        rows += [[i, "plain loop, 1 process", 1, r["l1_wall"], r["l1_in"], 1.0, "", r["l1_step"]],
                 [i, "plain loops, 2 processes", 2, r["l2_wall"], r["l2_in"], r["l2_ratio"], "", r["l2_step"]],
                 [i, "otstudy run", 1, r["c1_wall"], r["c1_in"], r["c1_ratio"], f"{r['c1_wall'] - r['c1_in']:.1f}",
                  r["c1_step"]],
                 [i, "otstudy run", 2, r["c2_wall"], r["c2_in"], r["c2_ratio"],
                  f"{r['c2_wall'] - r['c2_in'] / 2:.1f}", r["c2_step"]],
                 [i, "otstudy run --address (Ray already running)", 1, r["a1_wall"], r["a1_in"], r["a1_ratio"],
                  f"{r['a1_wall'] - r['a1_in']:.1f}", r["a1_step"]],
                 [i, "otstudy run --address (Ray already running)", 2, r["a2_wall"], r["a2_in"], r["a2_ratio"],
                  f"{r['a2_wall'] - r['a2_in'] / 2:.1f}", r["a2_step"]]]
    body = markdown_table(["round", "runner", "concurrent trials", "wall s", "time inside trials s",
                           "wall / (loop wall / concurrency)", "outside trials s",
                           "training step ms (median)"], rows)
    summary = [
        ["otstudy run / plain loop, 1 at a time (goal <= 1.15)", _spread(rounds, "c1_ratio")],
        ["otstudy run, 2 at a time / (plain loop / 2) (goal <= 1.15)", _spread(rounds, "c2_ratio")],
        ["otstudy run --address (Ray already running) / plain loop", _spread(rounds, "a1_ratio")],
        ["otstudy run --address, 2 at a time / (plain loop / 2)", _spread(rounds, "a2_ratio")],
        ["throughput, 2 at a time vs 1: otstudy (goal >= 1.7)", _spread(rounds, "throughput_otstudy")],
        ["throughput, 2 at a time vs 1: otstudy run --address (Ray already running)",
         _spread(rounds, "throughput_address")],
        ["throughput, 2 at a time vs 1: plain processes (the machine's own ceiling)",
         _spread(rounds, "throughput_plain")],
        ["throughput, 2 at a time vs 1, fixed cost amortised (2 x in-trial time 1 at a time / 2 at a time)",
         _spread(rounds, "amortised")],
        ["otstudy's time per trial / the loop's, 1 at a time", _spread(rounds, "per_trial", "{:.3f}")],
        ["fixed cost per study, s (outside trials, beyond the loop's own process start)",
         _spread(rounds, "fixed", "{:.1f}")],
        ["training step, otstudy / plain, 1 at a time", _spread(rounds, "step1")],
        ["training step, otstudy / plain, 2 at a time", _spread(rounds, "step2")],
        ["s from the command to the first trial's data loaded, 1 at a time", _spread(rounds, "c1_first", "{:.1f}")],
        ["... 2 at a time", _spread(rounds, "c2_first", "{:.1f}")],
        ["... 1 at a time, --address", _spread(rounds, "a1_first", "{:.1f}")],
        ["... 2 at a time, --address", _spread(rounds, "a2_first", "{:.1f}")],
        ["s from the results to the exit, 1 at a time", _spread(rounds, "c1_exit", "{:.2f}")],
    ]
    hour = 3600.0
    fixed, per_trial = (statistics.median(r[k] for r in rounds) for k in ("fixed", "per_trial"))
    head = (f"4 trials x {args.epochs} epochs, {args.rounds} round(s); in each round every runner runs once, "
            f"one after another (round i starts with the i-th runner of the table), and each ratio compares "
            f"runs of one round (this machine's speed drifts over "
            f"minutes). Medians over rounds, with the range:\n\n"
            + markdown_table(["ratio", f"median (min-max over {args.rounds} round(s))"], summary)
            + f"\n\nProjected for a study of 1 h of trials (1 at a time): "
            f"{(per_trial * hour + fixed) / hour:.3f}x the plain loop. The fixed cost is the driver's set-up (its "
            f"imports of Ray, Ray Tune and MLflow, and Ray's start unless --address), the trial worker's start and "
            f"its imports of Ray and Ray Tune before torch (the loop imports only torch), the export and Ray's "
            f"shutdown. "
            f"Per round:\n\n")
    record("platform_overhead: otstudy run vs plain loops", head + body)


if __name__ == "__main__":
    main()
