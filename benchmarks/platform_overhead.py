"""The same N short trials through `otstudy run` (Ray Tune + Optuna/grid + MLflow) vs a plain loop.

Trials: SinSim on digits, small CNN, beta in {0, 0.8} x seeds {0, 1} (N = 4), E epochs each.
* plain loop: trainables.pretrain_probe.run called 4 times in one process with torch limited
  to 1 thread (what Ray gives a trial that books 1 CPU);
* `otstudy run` with max_concurrent 1 and 2 (each trial books 1 CPU), wall time of the whole
  command (Ray start, MLflow store creation and the Parquet export included); and once more
  with a checkpoint every 5 epochs instead of every epoch.

    .venv/bin/python -m benchmarks.platform_overhead [--epochs E]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.common import ensure_malloc_env, markdown_table, record


def spec(epochs, concurrent, name, checkpoint_every=1):
    return {"name": name, "method": "sinsim", "dataset": "digits",
            "fixed": {"epochs": epochs, "batch_size": 256, "eps": 0.05, "sinkhorn_iters": 40,
                      "checkpoint_every": checkpoint_every},
            "search": {"beta": {"grid": [0.0, 0.8]}}, "sampler": "grid", "seeds": [0, 1], "metric": "knn_acc",
            "mode": "max", "resources": {"cpu": 1}, "max_concurrent": concurrent}


def plain_loop(epochs):
    from trainables.pretrain_probe import run

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train = 0.0
    for beta in (0.0, 0.8):
        for seed in (0, 1):
            hist = []
            run({"method": "sinsim", "epochs": epochs, "batch_size": 256, "eps": 0.05, "sinkhorn_iters": 40,
                 "beta": beta, "seed": seed}, lambda m, c=None: hist.append(m))
            train += sum(m["epoch_time_s"] for m in hist)
    torch.set_num_threads(2)
    return time.perf_counter() - t0, train


def through_otstudy(epochs, concurrent, checkpoint_every=1):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "s.yaml"
        f.write_text(yaml.safe_dump(spec(epochs, concurrent, f"c{concurrent}", checkpoint_every)))
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "otstudy"), "run", str(f), "--storage", d],
                       check=True, capture_output=True)
        wall = time.perf_counter() - t0
        hist = pd.read_parquet(Path(d) / f"c{concurrent}" / "history.parquet")
        return wall, float(hist["epoch_time_s"].sum())


def main():
    ensure_malloc_env()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args()
    loop_wall, loop_train = plain_loop(args.epochs)
    c1_wall, c1_train = through_otstudy(args.epochs, 1)
    c2_wall, c2_train = through_otstudy(args.epochs, 2)
    k1_wall, k1_train = through_otstudy(args.epochs, 1, checkpoint_every=5)
    rows = [["plain loop (1 thread)", 1, loop_wall, loop_train, 1.0, ""],
            ["otstudy run", 1, c1_wall, c1_train, c1_wall / loop_wall, f"{(c1_wall - loop_wall) / 4:.2f} s/trial"],
            ["otstudy run", 2, c2_wall, c2_train, c2_wall / (loop_wall / 2), ""],
            ["otstudy run, checkpoint_every 5", 1, k1_wall, k1_train, k1_wall / loop_wall,
             f"{(k1_wall - loop_wall) / 4:.2f} s/trial"]]
    body = markdown_table(["runner", "concurrent trials", "wall s", "sum of epoch times s",
                           "wall / (loop wall / concurrency)", "overhead"], rows)
    body += (f"\n\nThroughput of 2 concurrent trials vs 1 through otstudy: {c1_wall / c2_wall:.2f}x; "
             f"4 trials x {args.epochs} epochs. The otstudy wall time includes Ray's start (~7 s), the MLflow "
             f"sqlite store's creation and the export.")
    record("platform_overhead: otstudy run vs a plain loop", body)


if __name__ == "__main__":
    main()
