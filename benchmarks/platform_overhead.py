"""The same N short trials through `otstudy run` (Ray Tune + grid + MLflow) vs plain Python loops.

Trials: SinSim on digits, small CNN, beta in {0, 0.8} x seeds {0, 1} (N = 4), E epochs each,
torch limited to 1 thread per trial (what Ray gives a trial that books 1 CPU).

* plain loop: trainables.pretrain_probe.run called 4 times in one process;
* 2 plain loops in parallel: two processes with 2 trials each (the hardware's own speed-up from
  running 2 one-thread trials on 2 cores, with no Ray at all);
* `otstudy run` with max_concurrent 1 and 2, wall time of the whole command (Python and torch
  imports, Ray's start, the MLflow store, the Parquet export, Ray's shutdown); and once with
  max_concurrent 1 joining a Ray started beforehand (`ray start --head`, not timed) with --address.

The wall time of `otstudy run` is split into the time inside trials (the sum of each trial's
``time_total_s`` minus its ``setup_s``: from the training's start to its last report, measured in the
worker, as the loop measures it) and
the rest (start-up, gaps between trials, tear-down), so the fixed cost and the per-trial cost
are separated. The projected ratio for a longer study follows from the two.

    .venv/bin/python -m benchmarks.platform_overhead [--epochs E]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import ensure_malloc_env, markdown_table, record

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


def through_otstudy(epochs, concurrent, address=None, env=None):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "s.yaml"
        f.write_text(yaml.safe_dump(spec(epochs, concurrent, f"c{concurrent}")))
        extra = ["--address", address] if address else []
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "otstudy"), "run", str(f), "--storage", d,
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        first_trial = results_out = None
        for line in proc.stdout:  # time stamps of the CLI's output: where the fixed cost goes
            if first_trial is None and "[otstudy trial]" in line:  # printed once the trial's data is loaded
                first_trial = time.perf_counter() - t0
            if line.startswith(f"[otstudy] {d}"):  # the last line: results exported
                results_out = time.perf_counter()
        if proc.wait() != 0:
            raise RuntimeError(f"otstudy run failed with exit code {proc.returncode}")
        end = time.perf_counter()
        wall = end - t0
        after = end - results_out if results_out is not None else float("nan")
        inside, steps = 0.0, []
        for f in (Path(d) / f"c{concurrent}" / "ray").glob("trial_*/result.json"):
            rows = [json.loads(ln) for ln in f.read_text().splitlines()]
            # from the training's start, like the loop: a fresh worker's torch import is set-up, not training
            inside += rows[-1]["time_total_s"] - rows[0].get("setup_s", 0.0)
            steps += [r["step_time_ms"] for r in rows if "step_time_ms" in r]
        # (s to the first trial's data loaded, s from the results to the exit): where the fixed cost sits
        return wall, inside, (first_trial, after), statistics.median(steps)


def with_running_ray(epochs):
    """`otstudy run --address` against a Ray already started with `ray start --head` (not timed)."""
    import os
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
        return through_otstudy(epochs, 1, address=f"127.0.0.1:{port}", env=env)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def main():
    ensure_malloc_env()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args()
    l1_wall, l1_in, l1_step = plain_loops(args.epochs, 1)
    l2_wall, l2_in, l2_step = plain_loops(args.epochs, 2)
    c1_wall, c1_in, c1_times, c1_step = through_otstudy(args.epochs, 1)
    c2_wall, c2_in, c2_times, c2_step = through_otstudy(args.epochs, 2)
    a1_wall, a1_in, a1_times, a1_step = with_running_ray(args.epochs)
    fixed = c1_wall - c1_in - (l1_wall - l1_in)  # outside trials, beyond the loop's own process start
    per_trial = c1_in / l1_in
    rows = [["plain loop, 1 process", 1, l1_wall, l1_in, 1.0, "", l1_step],
            ["plain loops, 2 processes", 2, l2_wall, l2_in, l2_wall / (l1_wall / 2), "", l2_step],
            ["otstudy run", 1, c1_wall, c1_in, c1_wall / l1_wall, f"{c1_wall - c1_in:.1f}", c1_step],
            ["otstudy run", 2, c2_wall, c2_in, c2_wall / (l1_wall / 2), f"{c2_wall - c2_in / 2:.1f}", c2_step],
            ["otstudy run --address (Ray already running)", 1, a1_wall, a1_in, a1_wall / l1_wall,
             f"{a1_wall - a1_in:.1f}", a1_step]]
    body = markdown_table(["runner", "concurrent trials", "wall s", "time inside trials s",
                           "wall / (loop wall / concurrency)", "outside trials s",
                           "training step ms (median)"], rows)
    hour = 3600.0
    body += (
        f"\n\n4 trials x {args.epochs} epochs. Through otstudy (1 at a time) each trial takes "
        f"{per_trial:.3f}x its time in the plain loop; the rest is a fixed {fixed:.1f} s per study "
        f"(Python + torch imports in the CLI, Ray's start, a worker process importing torch, the export, "
        f"Ray's shutdown). Projected for a study of 1 h of trials: {(per_trial * hour + fixed) / hour:.3f}x. "
        f"Throughput of 2 concurrent trials vs 1: otstudy {c1_wall / c2_wall:.2f}x; plain processes "
        f"{l1_wall / l2_wall:.2f}x (the machine's own ceiling: 2 one-thread trials on 2 cores); in-trial "
        f"time with 2 at a time vs 1: otstudy {c2_in / c1_in:.2f}x, plain {l2_in / l1_in:.2f}x, so in the "
        f"long run (fixed cost amortised) 2 at a time give {2 * c1_in / c2_in:.2f}x the throughput of 1. "
        f"A training step under otstudy takes {c1_step / l1_step:.2f}x the plain loop's, 1 at a time, and "
        f"{c2_step / l2_step:.2f}x the plain processes', 2 at a time (step medians over all epochs). "
        f"Joining a Ray that is already running (`ray start --head`, then `otstudy run --address`) changes the "
        f"time outside trials by {(a1_wall - a1_in) - (c1_wall - c1_in):+.1f} s. Time inside trials varies by "
        f"about +-10% between runs on this machine: compare rows of one run, and runs with each other.")
    body += "\n\nWhere the fixed cost sits (time stamps of each `otstudy run`'s output):\n\n" + markdown_table(
        ["otstudy run", "s from the command to the first trial's data loaded", "s from the results to the exit"],
        [["1 at a time", *c1_times], ["2 at a time", *c2_times], ["1 at a time, --address", *a1_times]])
    record("platform_overhead: otstudy run vs plain loops", body)


if __name__ == "__main__":
    main()
