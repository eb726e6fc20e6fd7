"""How `otstudy report` scales with a study's configurations: a random-search-like study (distinct beta and eps
per configuration, 50 epochs each, beside 5 SimCLR baseline trials) of N configurations, its report written from
the Parquet files, for N in {10, 100, 300, 1000}; and a grid of 40 configurations x 25 seeds. Per study: the
report's seconds (median of --rounds), the largest figure's size, and the matplotlib warnings it raised; the ratio
is against the 10-configuration study measured in the same run.

    .venv/bin/python -m benchmarks.report_scale [--rounds 3] [--sizes 10,100,300,1000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.report import write_report
from benchmarks.common import markdown_table, record

EPOCHS = 50


def synthetic_study(d: Path, n_configs: int, seeds: int = 1, grid: bool = False, seed: int = 0) -> Path:
    """A study directory of SinSim trials over beta x eps (sampled, or a grid of 8 x 5) and 5 SimCLR trials."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    if grid:
        betas, epss = np.repeat(np.linspace(0, 1.4, 8), 5), np.tile(np.geomspace(0.01, 1, 5), 8)
    else:
        betas, epss = rng.uniform(0, 1.5, n_configs), np.exp(rng.uniform(np.log(0.01), 0.0, n_configs))
    rows, hist = [], []
    configs = [("simclr", np.nan, np.nan, s) for s in range(5)]
    configs += [("sinsim", b, e, s) for b, e in zip(betas[:n_configs], epss[:n_configs]) for s in range(seeds)]
    for i, (method, beta, eps, s) in enumerate(configs):
        tid = f"t{i:05d}"
        acc = 0.95 - 0.02 * (0 if method == "simclr" else beta) + 0.01 * rng.standard_normal()
        step = 10.0 * (1.0 if method == "simclr" else 1.1 + 0.1 * rng.random())
        rows.append({"trial_id": tid, "trial_dir": f"trial_{tid}", "status": "completed", "method": method,
                     "beta": beta, "eps": eps, "seed": s, "batch_size": 256, "n_epochs": EPOCHS,
                     "knn_acc": acc, "linear_acc": acc + 0.02, "knn5_acc": acc, "test_knn_acc": acc,
                     "test_knn5_acc": acc + 0.005, "test_linear_acc": acc + 0.02, "knn_k_used": 20.0,
                     "train_loss": 5.0, "reg_loss": 0.0 if method == "simclr" else -0.5 * beta,
                     "reg_grad_ratio": 0.0 if method == "simclr" else 0.08 * beta, "med_step_time_ms": step,
                     "med_ot_time_ms": 0.0 if method == "simclr" else 1.0, "med_epoch_time_s": 1.0,
                     "med_images_per_s": 1000.0, "peak_mem_mb": 500.0, "hardware": "CPU", "error": ""})
        curve = acc - 0.2 * np.exp(-np.arange(1, EPOCHS + 1) / 8.0)
        hist += [{"trial_id": tid, "epoch": e + 1, "knn_acc": float(curve[e]), "train_loss": 5.0,
                  "ot_marginal_err": 1e-6} for e in range(EPOCHS)]
    pd.DataFrame(rows).to_parquet(d / "results.parquet")
    pd.DataFrame(hist).to_parquet(d / "history.parquet")
    search = ({"beta": {"grid": sorted(set(betas.tolist()))}, "eps": {"grid": sorted(set(epss.tolist()))}} if grid
              else {"beta": {"low": 0.0, "high": 1.5}, "eps": {"low": 0.01, "high": 1.0, "log": True}})
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": d.name, "method": ["simclr", "sinsim"], "dataset": "digits",
                                                 "search": search, "sampler": "grid" if grid else "tpe",
                                                 "seeds": list(range(seeds)), "metric": "knn_acc"}))
    (d / "study.json").write_text(json.dumps({"n_trials": len(rows)}))
    return d


def measure(d: Path, rounds: int):
    """(median seconds, the largest PNG in bytes, the matplotlib warnings of the last round)."""
    times, caught = [], []
    for _ in range(rounds):
        shutil.rmtree(d / "report", ignore_errors=True)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            write_report(d)
            times.append(time.perf_counter() - t0)
        caught = [str(w.message).splitlines()[0][:80] for w in got]
    largest = max(p.stat().st_size for p in (d / "report").glob("*.png"))
    return statistics.median(times), largest, caught


def main():
    p = argparse.ArgumentParser(prog="python -m benchmarks.report_scale")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="10,100,300,1000")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp())
    rows, base = [], None
    try:
        studies = [(f"{n} configurations x 1 seed", synthetic_study(tmp / f"r{n}", n)) for n in sizes]
        studies.append(("grid: 40 configurations x 25 seeds", synthetic_study(tmp / "grid", 40, seeds=25, grid=True)))
        for label, d in studies:
            secs, largest, caught = measure(d, args.rounds)
            base = base or secs
            rows.append([label, secs, secs / base, f"{largest / 1e6:.2f} MB", len(caught),
                         "; ".join(sorted(set(caught)))[:120]])
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record("report_scale: otstudy report against a study's configurations",
           f"A random-search-like study of N SinSim configurations (beta, eps sampled; 1 seed, {EPOCHS} epochs each) "
           f"beside 5 SimCLR trials, and a grid of 40 configurations x 25 seeds; `write_report` from the Parquet "
           f"files, median of {args.rounds} rounds; x first = against the first study, in the same run.\n\n"
           + markdown_table(["study", "report s", "x first", "largest figure", "warnings", "which"], rows))


if __name__ == "__main__":
    main()
