"""The ``otstudy`` command line.

    otstudy presets                       list the named studies
    otstudy knobs [METHOD]                the config keys: type, allowed values, defaults, who reads them
    otstudy run SPEC.yaml | --preset NAME [--storage DIR|URI] [--name NAME] [--address ADDR] [--smoke-test]
    otstudy resume DIR|URI [--address ADDR] [--restart-errored]
    otstudy status DIR                    trial states, best so far, time used and left
    otstudy export DIR                    results.parquet + history.parquet (also mid-study)
    otstudy report DIR [--export]         report/index.html from the Parquet files (exported again when stale)
    otstudy ui DIR [--host H] [--port P]  MLflow UI on that study's store (127.0.0.1 by default)
    otstudy optuna-dashboard DIR [--host H] [--port P]   optuna-dashboard on its Optuna storage (ditto)

Bad input prints one line per problem on stderr and exits with status 2,
before anything is created.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

EXIT_BAD_INPUT = 2

# Ray folds worker lines that differ only in numbers into "[repeated 2x across cluster] (Ray
# deduplicates logs by default ...)", printed seconds later (after a study's results, for the last
# trials): each trial's own "[otstudy trial] ..." line is shown as it comes. Read when ray is
# first imported, hence here.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"\[otstudy trial\]")


class CliError(ValueError):
    pass


def _fail(lines) -> int:
    for ln in ([lines] if isinstance(lines, str) else lines):
        print(f"otstudy: error: {ln}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _study_dir(arg: str, workdir: str = "studies", refresh: bool = True) -> Path:
    """The local study directory for ``arg`` (a directory, or the home URI of a study on an object store)."""
    from study.storage import StorageError, is_remote, materialize

    d = Path(arg)
    if is_remote(arg) or (d / "study.json").is_file():  # a study on an object store: refresh its mirror
        try:
            d, _ = materialize(arg, workdir, refresh=refresh)
        except StorageError as exc:
            raise CliError(str(exc)) from None
        if is_remote(arg):
            print(f"[otstudy] {arg.split('?')[0]} is mirrored in {d}")
    if not d.exists():
        raise CliError(f"{d}: no such study directory")
    if not (d / "spec.yaml").is_file():
        raise CliError(f"{d} is not an otstudy study directory (no spec.yaml)")
    return d


# --------------------------------------------------------------------------- commands


def cmd_presets(args) -> int:
    from search_spaces.presets import PRESETS, get_preset
    from study.spec import parse_spec

    width = max(len(n) for n in PRESETS)
    for name in PRESETS:
        spec = parse_spec(get_preset(name))
        print(f"{name:<{width}}  {spec.n_trials():>3} trials  {PRESETS[name]['description']}")
    return 0


def cmd_knobs(args) -> int:
    from trainables.catalog import KNOBS, METHOD_INFO

    if args.method and args.method not in METHOD_INFO:
        raise CliError(f"unknown method {args.method!r} (allowed: {', '.join(sorted(METHOD_INFO))})")
    for k in KNOBS.values():
        if args.method and args.method not in k.methods:
            continue
        allowed = k.allowed()
        what = ("one of " + ", ".join(map(str, allowed))) if allowed else (
            k.type.__name__ if k.type not in (int, float) else f"{k.type.__name__} {k.range_text()}"
            + (f", in steps of {k.step:g}" if k.step else ""))
        if k.methods:
            defaults = "; ".join(f"{m}: {v}" for m, v in k.methods.items() if not args.method or m == args.method)
        else:
            defaults = f"default {k.default}" + (" (unset: decided by the trial)" if k.nullable else "")
        print(f"{k.name:<16} {what:<40} {defaults}\n{'':<17}{k.doc}")
    return 0


def _load_run_spec(args):
    from search_spaces.presets import get_preset
    from study.spec import load_spec_file, parse_spec

    if bool(args.spec) == bool(args.preset):
        raise CliError("give a spec file or --preset NAME (not both)")
    if args.preset:
        try:
            raw = get_preset(args.preset)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if args.name:
            raw["name"] = args.name
        spec = parse_spec(raw)
    else:
        spec = load_spec_file(args.spec)
        if args.name:
            from study.spec import NAME_RE

            if not NAME_RE.match(args.name):
                raise CliError(f"--name {args.name!r}: use letters, digits, '_', '.', '-'")
            spec.name = args.name
    if args.optuna_storage:
        spec = parse_spec({**spec.to_dict(), "optuna_storage": args.optuna_storage})
    if args.dataset:  # a preset (or spec) on other data: validated again as a whole
        names = [d.strip() for d in args.dataset.split(",") if d.strip()]
        name = spec.name if args.name else f"{spec.name}-{'-'.join(names)}"  # beside the spec's own study
        spec = parse_spec({**spec.to_dict(), "name": name, "dataset": names[0] if len(names) == 1 else names})
    return spec.smoke() if args.smoke_test else spec


def cmd_run(args) -> int:
    from study.session import ResourceError
    from study.runner import OptunaStorageError, StudyExists, run_study, study_dir_for
    from study.spec import SpecError

    try:
        spec = _load_run_spec(args)
    except SpecError as exc:
        return _fail(exc.problems)
    from study.storage import REMOTE_SCHEMES, StorageError, is_remote

    if args.storage and "://" in args.storage and not args.storage.startswith("file://") \
            and not is_remote(args.storage):
        return _fail(f"--storage {args.storage.split('?')[0]}: unsupported URI scheme (allowed: a path, "
                     f"file://, or {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    target = study_dir_for(spec, args.storage, args.workdir)
    if target.exists() and any(target.iterdir()):
        return _fail(f"{target} already exists; resume it with `otstudy resume {target}` or pass "
                     f"--storage/--name for a new study")
    if args.dry_run:
        print(f"[otstudy] spec is valid: {spec.n_trials()} trials would run in {target}")
        return 0
    try:
        done = run_study(spec, storage=args.storage, address=args.address, smoke=args.smoke_test,
                         workdir=args.workdir)
    except (StudyExists, StorageError, ResourceError, OptunaStorageError) as exc:
        return _fail(str(exc))
    return _exit_code(done)


def _exit_code(end) -> int:
    """130, as for Ctrl-C, when the study stopped before every trial finished (Tune handles SIGINT itself and
    returns as if done); 1 when every trial finished but none completed (all failed or were pruned: nothing to
    report, e.g. a dataset file that cannot be read); else 0, also when some trials failed (a diverging learning
    rate is an outcome of a search, and the study said which). So `otstudy run S && otstudy report D` stops
    where there is nothing to report."""
    if end.unfinished:
        return 130
    return 0 if end.completed else 1


def cmd_resume(args) -> int:
    from study.session import ResourceError
    from study.runner import OptunaStorageError, resume_study

    d = _study_dir(args.dir, args.workdir, refresh=False)  # resume_study refreshes the mirror itself
    try:
        done = resume_study(d, address=args.address, restart_errored=args.restart_errored)
    except (ResourceError, OptunaStorageError) as exc:
        return _fail(f"{exc}; the study is unchanged")
    return _exit_code(done)


def cmd_export(args) -> int:
    from study.export import export_study

    d = _study_dir(args.dir, args.workdir)
    res, hist = export_study(d)
    print(f"[otstudy] wrote {d / 'results.parquet'} ({len(res)} trials) and "
          f"{d / 'history.parquet'} ({len(hist)} trial-epochs)")
    return 0


def training_left(res, hist, spec: dict, expected: int):
    """(trial-seconds of training the study still needs, wall seconds at its ``max_concurrent`` trials at a time),
    or None when nothing is left or no epoch has a time yet. The epochs still to run are
    :func:`study.records.epochs_to_run`'s (a trial finished unless running or pending): a trial's at its median
    epoch time (the study's median where it has none yet), the trials not yet proposed at the study's. Training
    only, as ``time used`` (probes and starts are not in ``epoch_time_s``); with ASHA an upper bound."""
    from study.records import epochs_to_run

    if hist.empty or "epoch_time_s" not in hist.columns or not hist["epoch_time_s"].notna().any():
        return None
    per_trial = hist.groupby("trial_id")["epoch_time_s"].median()
    typical = float(hist["epoch_time_s"].median())
    fixed = (spec.get("fixed") or {}).get("epochs")

    def number(x) -> Optional[float]:  # None for a missing value (None or NaN)
        return None if x is None or x != x else float(x)

    known = [(number(row.get("epochs")), number(row.get("n_epochs")) or 0.0,
              row["status"] not in ("running", "pending")) for _, row in res.iterrows()]
    left, unseen = epochs_to_run(known, expected, int(fixed) if fixed is not None else None)
    times = [float(per_trial.get(tid, typical)) for tid in res["trial_id"]]
    seconds = sum(e * (typical if t != t else t) for e, t in zip(left, times)) + unseen * typical
    if seconds <= 0:
        return None
    return seconds, seconds / max(int(spec.get("max_concurrent") or 1), 1)


def cmd_status(args) -> int:
    import json

    import pandas as pd

    from study.export import collect

    d = _study_dir(args.dir, args.workdir)
    res, hist = collect(d)
    meta = json.loads((d / "study.json").read_text()) if (d / "study.json").exists() else {}
    expected = meta.get("n_trials", len(res))
    if res.empty:
        print(f"{d}: no trials have started (expected {expected})")
        return 0
    import yaml

    spec = yaml.safe_load((d / "spec.yaml").read_text())
    metric = spec.get("metric", "knn_acc")
    counts = res["status"].value_counts().to_dict()
    print(f"{d}: {len(res)} of {expected} trials known: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    cols = [c for c in ["trial_id", "status", "method", *[k for k in (spec.get("search") or {}) if k != "cases"],
                        "seed", "n_epochs", metric, "test_linear_acc", "error"] if c in res.columns]
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.max_colwidth", 60):
        print(res[cols].to_string(index=False))
    if metric in res.columns and res[metric].notna().any():
        best = res.loc[res[metric].idxmax() if spec.get("mode", "max") == "max" else res[metric].idxmin()]
        print(f"best so far: trial {best['trial_id']} {metric}={best[metric]:.4f}")
    if not hist.empty and "epoch_time_s" in hist.columns:
        print(f"time used: {hist['epoch_time_s'].sum() / 60:.1f} trial-minutes of training")
    left = training_left(res, hist, spec, expected)
    if left is not None:
        bound = "at most " if (spec.get("scheduler") or {}).get("type") == "asha" else ""
        print(f"time left: {bound}~{left[0] / 60:.1f} trial-minutes of training, ~{left[1] / 60:.1f} min at "
              f"{spec.get('max_concurrent') or 1} at a time (at the epoch times so far; resume continues a "
              "stopped study)")
    return 0


def cmd_report(args) -> int:
    from analysis.report import EmptyStudy, write_report

    if args.mlflow:
        if not args.experiment or not args.out:
            raise CliError("--mlflow needs --experiment NAME and --out DIR")
        try:
            index = write_report(None, Path(args.out), mlflow_uri=args.mlflow, experiment=args.experiment)
        except EmptyStudy as exc:
            raise CliError(str(exc)) from None
        print(f"[otstudy] report: {index}")
        return 0
    if not args.dir:
        raise CliError("give a study directory, or --mlflow URI --experiment NAME --out DIR")
    d = _study_dir(args.dir, args.workdir)
    if (d / "ray").is_dir():
        from study.export import export_is_stale, export_study

        # Parquet is the analysis's source: exported again only when Tune's files are newer (a running or crashed
        # study reports what exists now) or when asked; merged or hand-edited Parquet files are reported as they are
        if args.export or export_is_stale(d):
            export_study(d)
    try:
        index = write_report(d, Path(args.out) if args.out else None)
    except EmptyStudy as exc:
        raise CliError(str(exc)) from None
    print(f"[otstudy] report: {index}")
    return 0


def cmd_ui(args) -> int:
    import json
    import subprocess

    d = _study_dir(args.dir)
    meta = json.loads((d / "study.json").read_text()) if (d / "study.json").exists() else {}
    uri = meta.get("tracking_uri") or f"sqlite:///{(d / 'mlflow.db').resolve()}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    print(f"[otstudy] MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C to stop)")
    return subprocess.call(cmd)


def cmd_optuna_dashboard(args) -> int:
    from study.optuna_store import display, storage_url
    from study.spec import read_study

    d = _study_dir(args.dir)
    spec = read_study(d)
    if spec.sampler == "grid":
        raise CliError(f"{d}: a grid study has no Optuna study (its sampler is grid)")
    try:
        import optuna_dashboard
    except ImportError:
        raise CliError("optuna-dashboard is not installed: pip install 'otstudy[dashboard]'") from None
    url = storage_url(d, spec.optuna_storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise CliError(f"{d}: no Optuna storage yet ({url[len('sqlite:///'):]} does not exist)")
    print(f"[otstudy] optuna-dashboard on http://{args.host}:{args.port} for {display(url)}, study {spec.name} "
          f"(Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(url, host=args.host, port=args.port)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otstudy", description="Hyperparameter and ablation studies of "
                                "optimal-transport contrastive learning (Ray Tune + Optuna + MLflow).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("presets", help="list the named studies (the papers' ablations)")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("knobs", help="the config keys a spec may set: type, allowed values, defaults, the methods "
                       "that read them (trainables.catalog.KNOBS)")
    s.add_argument("method", nargs="?", help="only the knobs this method reads")
    s.set_defaults(fn=cmd_knobs)

    s = sub.add_parser("run", help="validate a spec and run the study")
    s.add_argument("spec", nargs="?", help="study spec (YAML)")
    s.add_argument("--preset", help="run a named preset instead of a spec file (see `otstudy presets`)")
    s.add_argument("--storage", help="where studies live: a directory (default ./studies or the spec's storage) or an "
                   "object store URI such as s3://bucket/studies")
    s.add_argument("--workdir", default="studies", help="local parent directory of the study's mirror when the "
                   "storage is an object store (default ./studies)")
    s.add_argument("--name", help="override the study name (its directory name)")
    s.add_argument("--dataset", help="run on this dataset instead of the spec's (e.g. mnist5k), or on several, "
                   "comma-separated (a grid study runs its trials on each, and the report compares them)")
    s.add_argument("--address", help="Ray cluster to join: 'auto', 'HOST:PORT' or 'ray://HOST:PORT' (default: a local instance)")
    s.add_argument("--smoke-test", action="store_true", help="3 epochs, <= 2 values per knob, <= 2 seeds: seconds, not minutes")
    s.add_argument("--optuna-storage", help="database URL of the study's Optuna storage (default: sqlite, optuna.db "
                   "in the study directory; e.g. postgresql://host/db, shared by a cluster's studies)")
    s.add_argument("--dry-run", action="store_true", help="validate the spec and print the trial count, run nothing")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("resume", help="continue a stopped or crashed study; finished trials are not rerun")
    s.add_argument("dir", help="study directory, or its home URI (s3://bucket/studies/NAME)")
    s.add_argument("--workdir", default="studies", help="where to mirror a study given by its object-store URI")
    s.add_argument("--address", help="Ray cluster to join (default: a local instance)")
    s.add_argument("--restart-errored", action="store_true", help="restart failed trials from scratch instead of their last checkpoint")
    s.set_defaults(fn=cmd_resume)

    s = sub.add_parser("status", help="trial states, best so far, time used and left")
    s.add_argument("dir", help="study directory, or its home URI")
    s.add_argument("--workdir", default="studies", help="where to mirror a study given by its object-store URI")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("export", help="write results.parquet and history.parquet (works mid-study)")
    s.add_argument("dir", help="study directory, or its home URI")
    s.add_argument("--workdir", default="studies", help="where to mirror a study given by its object-store URI")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("report", help="write report/ (figures, tables, index.html) from the Parquet files")
    s.add_argument("dir", nargs="?", help="study directory, or its home URI")
    s.add_argument("--workdir", default="studies", help="where to mirror a study given by its object-store URI")

    s.add_argument("--mlflow", metavar="URI", help="read the trials from this MLflow tracking URI instead")
    s.add_argument("--experiment", help="MLflow experiment name (with --mlflow)")
    s.add_argument("--out", help="output directory (default DIR/report; required with --mlflow)")
    s.add_argument("--export", action="store_true", help="export the Parquet files again first, even when they are "
                   "newer than the trials' files (by default only then)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("ui", help="start the MLflow UI on the study's store")
    s.add_argument("dir", help="study directory")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=5000)
    s.set_defaults(fn=cmd_ui)

    s = sub.add_parser("optuna-dashboard", help="start optuna-dashboard on the study's Optuna storage "
                       "(pip install 'otstudy[dashboard]')")
    s.add_argument("dir", help="study directory")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(fn=cmd_optuna_dashboard)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        code = args.fn(args)
        sys.stdout.flush()  # here, so that a reader gone early is met below, not in the interpreter's teardown
        return code
    except BrokenPipeError:
        # `otstudy status DIR | head`: the reader has what it wanted; leave as a command stopped by SIGPIPE
        # does, without a traceback (stdout goes to /dev/null so that the last flush at exit cannot fail)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except CliError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("\n[otstudy] interrupted; finished trials are kept. Continue with `otstudy resume DIR`.",
              file=sys.stderr)
        return 130


def _quick_exit(code: int) -> None:
    """Stop Ray if this process started or joined it, flush the output, and leave without the
    interpreter's teardown.

    After a study the results are written and printed, yet the interpreter's teardown
    (the finalisers of grpc, pyarrow, SQLAlchemy, ... in the modules a study imports) took another
    1.4 s on this machine, after ``ray.shutdown()`` (which stays: it stops the local Ray processes
    cleanly, or disconnects from a cluster; 0.35 s instead of 1.4 s, see ``session.shutdown_ray``).
    Only non-daemon work could be lost by skipping it, and none is left by then: every file is
    closed, MLflow writes synchronously.
    """
    import logging
    import os

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from .session import shutdown_ray

        shutdown_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def console_main() -> None:
    """The ``otstudy`` command."""
    code = main()
    if "ray" in sys.modules:  # a study ran (or resumed) in this process: leave quickly
        _quick_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
