"""Tune's experiment-state saves: how often, how large, bytes written per study; otstudy's against Tune's own.

Tune rewrites its whole experiment state (every trial's record, the searcher's and the callbacks' state) at
each save. otstudy's driver saves it on Tune's clock only and writes each trial's record smaller
(:func:`study.session._lean_experiment_state`); ``OTSTUDY_TUNE_STATE=ray`` keeps Tune's bookkeeping. This
runs the same small grid study both ways, each in its own process (the setting is read per driver), counts
the saves (``TuneController.save_to_dir``) and the bytes each wrote, and extrapolates to 1,000 trials x 50
epochs at this run's pace (its seconds per trial-epoch), a save's size growing with the trials recorded (the
measured bytes per trial): Tune's saves as often per trial-epoch as measured (it forces one every 2 checkpoints
of a trial); otstudy's on its clock, every max(10 s, size / STATE_WRITE_RATE).

    python -m benchmarks.state_saves [--trials 24] [--epochs 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, record

MODES = {"otstudy": "", "ray": "ray"}  # OTSTUDY_TUNE_STATE


def one(study_root: Path, trials: int, epochs: int) -> dict:
    """Run the study in this process with save_to_dir counted; return the counts."""
    from ray.tune.execution.tune_controller import TuneController

    from study.runner import run_study
    from study.spec import parse_spec

    saves = []
    original = TuneController.save_to_dir

    def counted(self):
        t0 = time.time()
        original(self)
        staging = Path(self._storage.experiment_driver_staging_path)
        written = sum(f.stat().st_size for f in staging.iterdir() if f.is_file() and f.stat().st_mtime >= t0 - 0.01)
        state = staging / self.experiment_state_file_name
        saves.append({"bytes": written, "state_bytes": state.stat().st_size, "trials": len(self._trials),
                      "s": time.time() - t0})

    TuneController.save_to_dir = counted
    lrs = [round(1e-3 * (1 + i), 6) for i in range(trials // 2)]
    spec = parse_spec({"name": "saves", "method": "simclr", "dataset": "digits",
                       "fixed": {"epochs": epochs, "batch_size": 256, "proj_hidden": 32, "proj_dim": 16},
                       "search": {"lr": {"grid": lrs}}, "seeds": [0, 1], "metric": "knn_acc", "mode": "max",
                       "resources": {"cpu": 1}, "max_concurrent": 2})
    t0 = time.time()
    run_study(spec, storage=str(study_root))
    wall = time.time() - t0
    last = saves[-1]
    return {"saves": len(saves), "bytes": sum(s["bytes"] for s in saves), "wall_s": wall,
            "state_bytes_per_trial": last["state_bytes"] / max(last["trials"], 1),
            "save_s": sorted(s["s"] for s in saves)[len(saves) // 2], "trial_epochs": len(lrs) * 2 * epochs}


def extrapolate(mode: str, g: dict, full_bytes: float, trial_epochs: int = 1000 * 50) -> tuple:
    """(bytes written, hours) at ``trial_epochs`` at this run's pace, the state growing to ``full_bytes``."""
    from study.session import STATE_WRITE_RATE

    wall = g["wall_s"] / g["trial_epochs"] * trial_epochs
    if mode == "ray":  # forced saves: as many per trial-epoch as measured, half the trials recorded on average
        return g["saves"] / g["trial_epochs"] * trial_epochs * full_bytes / 2, wall / 3600
    written, t, dt = 0.0, 0.0, 1.0
    while t < wall:  # a save every max(10 s, size / rate): writes min(size / 10 s, rate) per second
        written += min(full_bytes * t / wall / 10.0, STATE_WRITE_RATE) * dt
        t += dt
    return written + full_bytes, wall / 3600


def main():
    p = argparse.ArgumentParser(prog="python -m benchmarks.state_saves")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: run one study here and print its counts
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(Path(args.one), args.trials, args.epochs)), flush=True)
        return
    got = {}
    tmp = Path(tempfile.mkdtemp(prefix="saves"))
    try:
        for mode, value in MODES.items():
            env = {**os.environ, "OTSTUDY_TUNE_STATE": value}
            out = subprocess.run([sys.executable, "-m", "benchmarks.state_saves", "--one", str(tmp / mode),
                                  "--trials", str(args.trials), "--epochs", str(args.epochs)],
                                 capture_output=True, text=True, env=env, timeout=3600)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{mode}: no result\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            got[mode] = json.loads(line[len("RESULT "):])
            print(mode, got[mode], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for mode, g in got.items():
        per_te = g["saves"] / g["trial_epochs"]
        per_save_1k = g["state_bytes_per_trial"] * 1000
        written, hours = extrapolate(mode, g, per_save_1k)
        rows.append([mode, g["saves"], f"{g['bytes'] / 1e6:.2f} MB", f"{g['state_bytes_per_trial'] / 1e3:.1f} KB",
                     f"{per_te:.2f}", f"{per_save_1k / 1e6:.1f} MB", f"{written / 1e9:.1f} GB in {hours:.0f} h",
                     f"{g['wall_s']:.0f} s"])
    from study.session import STATE_WRITE_RATE

    ratio = got["ray"]["bytes"] / max(got["otstudy"]["bytes"], 1)
    record("state_saves: Tune's experiment-state saves, otstudy's against Tune's own bookkeeping",
           f"A grid of {args.trials} SimCLR trials x {args.epochs} epochs on digits (2 at a time, a checkpoint per "
           f"epoch), run once with otstudy's driver settings and once with `OTSTUDY_TUNE_STATE=ray`, each in its own "
           f"process; saves counted at `TuneController.save_to_dir`, bytes = the files each save wrote. At 1,000 "
           f"trials x 50 epochs, extrapolated at this run's pace: a save's size from the bytes per recorded trial; "
           f"Tune's saves as many per trial-epoch as measured (forced every 2 checkpoints of a trial), otstudy's "
           f"every max(10 s, size / {STATE_WRITE_RATE / 1e3:.0f} KB/s). Bytes written by Tune's bookkeeping / "
           f"otstudy's in this run ({args.trials} trials: otstudy's pacing acts from ~{STATE_WRITE_RATE * 10 / 14e3:.0f} "
           f"trials on): {ratio:.1f}x.\n\n"
           + markdown_table(["driver", "saves", "bytes written", "state per trial", "saves per trial-epoch",
                             "a save at 1,000 trials", "written at 1,000 x 50", "study wall"], rows))


if __name__ == "__main__":
    main()
