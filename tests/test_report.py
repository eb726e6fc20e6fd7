"""Analysis from synthetic tables with known answers, partial studies, and the page in a real browser."""
import http.server
import json
import math
import shutil
import socketserver
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.importance import param_importances
from analysis.report import flags, write_report
from analysis.stats import mean_ci, overhead_table, summarise


def test_mean_ci_matches_student_t_by_hand():
    m, h, n = mean_ci([0.8, 0.9, 1.0])
    assert (m, n) == (pytest.approx(0.9), 3)
    assert h == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3), rel=1e-9)  # t_{0.975, 2} s / sqrt(n)
    assert math.isnan(mean_ci([0.5])[1]) and mean_ci([])[2] == 0
    s = summarise(pd.DataFrame({"beta": [0, 0, 0, 1, 1], "acc": [0.8, 0.9, 1.0, 0.5, 0.7]}), ["beta"], "acc")
    assert s["n"].tolist() == [3, 2] and s.loc[1, "mean"] == pytest.approx(0.6)
    assert s.loc[1, "ci"] == pytest.approx(12.706204736174698 * math.sqrt(0.02) / math.sqrt(2), rel=1e-9)


def test_overhead_ratios_against_simclr_at_the_same_batch_size():
    df = pd.DataFrame({
        "method": ["simclr", "simclr", "sinsim", "sinsim", "simclr", "sinsim"],
        "batch_size": [64, 64, 64, 64, 256, 256],
        "med_step_time_ms": [10.0, 12.0, 15.0, 18.0, 40.0, 50.0],
        "med_ot_time_ms": [0.0, 0.0, 3.0, 3.0, 0.0, 10.0],
        "med_epoch_time_s": [1.0, 1.0, 2.0, 2.0, 4.0, 5.0],
        "med_images_per_s": [100.0, 100.0, 50.0, 50.0, 80.0, 64.0],
        "peak_mem_mb": [100.0, 100.0, 120.0, 120.0, 200.0, 260.0],
    })
    t = overhead_table(df, ["method"], baseline=df["method"] == "simclr").set_index(["batch_size", "method"])
    assert t.loc[(64, "sinsim"), "med_step_time_ms_ratio"] == pytest.approx(16.5 / 11.0)  # medians 16.5 / 11
    assert t.loc[(256, "sinsim"), "med_step_time_ms_ratio"] == pytest.approx(1.25)
    assert t.loc[(256, "sinsim"), "peak_mem_mb_ratio"] == pytest.approx(1.3)
    assert t.loc[(64, "sinsim"), "ot_share"] == pytest.approx(np.median([3 / 15, 3 / 18]))
    assert t.loc[(64, "simclr"), "n"] == 2


def test_overhead_ratios_against_simclr_at_the_same_batch_size_when_batch_size_is_searched():
    # the batch_size preset: batch size is a configuration column too; its ratios were taken against SimCLR's
    # median over every batch size (a study at 64 and 128 showed SimCLR at 0.67x and 1.33x itself)
    df = pd.DataFrame({"method": ["simclr", "sinsim", "simclr", "sinsim"], "batch_size": [64, 64, 128, 128],
                       "hardware": ["Xeon, 1 threads"] * 4, "med_step_time_ms": [30.0, 33.0, 60.0, 66.0],
                       "med_ot_time_ms": [0.0, 1.0, 0.0, 2.0]})
    t = overhead_table(df, ["batch_size", "method"], baseline=df["method"] == "simclr")
    t = t.set_index(["batch_size", "method"])
    assert t.loc[(64, "simclr"), "med_step_time_ms_ratio"] == pytest.approx(1.0)
    assert t.loc[(128, "simclr"), "med_step_time_ms_ratio"] == pytest.approx(1.0)
    assert t.loc[(64, "sinsim"), "med_step_time_ms_ratio"] == pytest.approx(1.1)
    assert t.loc[(128, "sinsim"), "med_step_time_ms_ratio"] == pytest.approx(1.1)


def _plotted(monkeypatch, done, knob):
    """sensitivity_plot's first axis: {legend label: (x positions, y values)}, tick labels, baseline band
    labels."""
    import analysis.figures as report  # where the figures and their _save live

    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, out, stem: figs.append(fig) or f"{stem}.png")
    assert report.sensitivity_plot(done, knob, Path("."), ["test_linear_acc"]) == f"sensitivity_{knob}.png"
    ax = figs[0].axes[0]
    series = {c.get_label(): (c.lines[0].get_xdata().tolist(), c.lines[0].get_ydata().tolist())
              for c in ax.containers}
    bands = [p.get_label() for p in ax.patches if "baseline" in p.get_label()]
    return series, [t.get_text() for t in ax.get_xticklabels()], bands


def test_sensitivity_plot_puts_each_category_at_one_position_for_every_method(monkeypatch):
    # the methods and batch_size presets: every method was drawn at the first position(s) and the ticks
    # were the last method's, so SimCLR stood above "sinsim"; SimCLR's own batch sizes were pooled into a band
    rows = [{"method": m, "batch_size": b, "seed": s, "beta": 0.8 if m == "sinsim" else np.nan,
             "test_linear_acc": acc + 0.01 * s}
            for m, b, acc in (("simclr", 64, 0.90), ("simclr", 128, 0.92), ("sinsim", 128, 0.80),
                              ("sinsim", 256, 0.82)) for s in (0, 1)]
    done = pd.DataFrame(rows)
    series, ticks, bands = _plotted(monkeypatch, done, "method")
    assert ticks == ["simclr", "sinsim"] and bands == []
    assert series["simclr"][0] == [0] and series["sinsim"][0] == [1]
    assert series["simclr"][1] == [pytest.approx(91.5)] and series["sinsim"][1] == [pytest.approx(81.5)]
    series, ticks, bands = _plotted(monkeypatch, done, "batch_size")
    assert ticks == ["64", "128", "256"] and bands == []  # SimCLR varies along batch size: a curve, no band
    assert series["simclr"][0] == [0, 1] and series["sinsim"][0] == [1, 2]
    assert series["sinsim"][1] == [pytest.approx(80.5), pytest.approx(82.5)]


def test_a_log_axis_is_labelled_in_plain_numbers_that_do_not_overprint(monkeypatch):
    # TPE's eps in [0.12, 0.27]: matplotlib labelled every minor tick as 1.2x10^-1, 1.4x10^-1, ... on top of
    # each other
    import analysis.figures as report  # where the figures and their _save live

    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, out, stem: figs.append(fig) or f"{stem}.png")
    for values, expected in (([0.123, 0.269], {"0.2"}), ([0.01, 0.05, 0.1, 0.5], {"0.01", "0.05", "0.1", "0.5"})):
        done = pd.DataFrame([{"method": "sinsim", "eps": e, "seed": s, "test_linear_acc": 0.9}
                             for e in values for s in (0, 1)])
        report.sensitivity_plot(done, "eps", Path("."), ["test_linear_acc"])
        ax = figs[-1].axes[0]
        figs[-1].canvas.draw()
        lo, hi = ax.get_xlim()
        shown = [t.get_text() for t in ax.xaxis.get_majorticklabels() if lo <= t.get_position()[0] <= hi]
        assert expected <= set(shown), shown
        assert all(float(t) > 0 for t in shown)  # plain numbers, no 10^k
        assert not [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]


def test_learning_curves_tick_whole_epochs(monkeypatch):
    import analysis.figures as report  # where the figures and their _save live

    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, out, stem: figs.append(fig) or f"{stem}.png")
    res = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "beta": [0.4]})
    hist = pd.DataFrame({"trial_id": ["a"] * 3, "epoch": [1, 2, 3], "knn_acc": [0.5, 0.6, 0.7]})
    assert report.learning_curves(hist, res, ["beta"], Path(".")) == "learning_curves.png"
    ticks = figs[0].axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)  # were 1.00, 1.25, ... 3.00
    # a sampled value is named to 3 significant digits in the legend (was beta=0.8232202558909871)
    res = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "beta": [0.8232202558909871], "method": ["x"]})
    report.learning_curves(hist, res, ["beta"], Path("."))
    assert [t.get_text() for t in figs[-1].axes[0].get_legend().get_texts()] == ["method=x beta=0.823"]
    # a knob the trial's method does not read is left out (was "beta=nan")
    res = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "beta": [np.nan], "method": ["simclr"]})
    report.learning_curves(hist, res, ["beta"], Path("."))
    assert [t.get_text() for t in figs[-1].axes[0].get_legend().get_texts()] == ["method=simclr"]


def test_no_plot_over_a_knob_that_no_method_varies(monkeypatch):
    # SinSim x GCA-UOT over beta x lambda1 with ASHA: SinSim's trials at beta = 0.8 were pruned, GCA-UOT reads no
    # beta: the plot over beta was an empty frame (and matplotlib warned of a legend without artists)
    import warnings

    from analysis.report import sensitivity_plot

    rows = [{"method": "sinsim", "beta": 0.4, "seed": s, "test_linear_acc": 0.9} for s in (0, 1)]
    rows += [{"method": "gca_uot", "uot_lambda1": lam, "seed": s, "test_linear_acc": 0.95}
             for lam in (0.1, 1.0) for s in (0, 1)]
    done = pd.DataFrame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sensitivity_plot(done, "beta", Path("."), ["test_linear_acc"]) is None
    series, _, _ = _plotted(monkeypatch, done, "uot_lambda1")
    assert list(series) == ["gca_uot"]  # SinSim reads no lambda1: no points at an unset value
    # SimCLR next to SinSim over beta: SimCLR has no beta, so it is the band, no curve; where the study runs
    # SimCLR, SimCLR alone is the baseline (SinSim at beta = 0, another configuration, is a point of its curve)
    done = pd.DataFrame([{"method": "simclr", "seed": s, "test_linear_acc": 0.9} for s in (0, 1)]
                        + [{"method": "sinsim", "beta": b, "seed": s, "test_linear_acc": 0.8}
                           for b in (0.0, 0.8) for s in (0, 1)])
    series, _, bands = _plotted(monkeypatch, done, "beta")
    assert list(series) == ["sinsim"] and bands == ["SimCLR baseline (n=2)"]


def test_the_embedding_picture_finds_a_best_configuration_with_unset_knobs(tmp_path):
    # SimCLR, SinSim and IOT-CL over beta, eps and lambda_p: the best configuration (IOT-CL) has no beta, and
    # matching its NaN beta with == found no trial: the report failed with an IndexError
    from analysis.report import embedding_plot

    rng = np.random.default_rng(0)
    rows = []
    for i, (method, beta, lam, acc) in enumerate((("simclr", np.nan, np.nan, 0.90), ("sinsim", 0.6, np.nan, 0.85),
                                                   ("iot_cl", np.nan, 1.0, 0.95), ("iot_cl", np.nan, 0.0, 0.93))):
        ckpt = tmp_path / "ray" / f"trial_t{i}" / "checkpoint_000002"
        ckpt.mkdir(parents=True)
        np.savez(ckpt / "embeddings.npz", features=rng.normal(size=(60, 8)), labels=np.arange(60) % 10)
        rows.append({"trial_id": f"t{i}", "status": "completed", "method": method, "beta": beta, "lambda_p": lam,
                     "seed": 0, "linear_acc": acc})
    got = embedding_plot(pd.DataFrame(rows), tmp_path, ["method", "beta", "lambda_p"], tmp_path)
    assert got is not None and got[0] == "embeddings.png" and (tmp_path / "embeddings.png").stat().st_size > 0


def test_a_report_written_again_keeps_only_its_own_figures(tmp_path):
    d = synthetic_study(tmp_path / "syn", n_expected=9)
    rep = write_report(d).parent
    (rep / "sensitivity_eps.png").write_bytes(b"stale")  # a plot an earlier report drew
    (rep / "sensitivity_eps.pdf").write_bytes(b"stale")
    (rep / "my_notes.png").write_bytes(b"mine")  # not a name the report writes
    write_report(d)
    assert not (rep / "sensitivity_eps.png").exists() and not (rep / "sensitivity_eps.pdf").exists()
    assert (rep / "my_notes.png").read_bytes() == b"mine" and (rep / "sensitivity_beta.png").stat().st_size > 0


def test_sensitivity_plot_draws_the_baseline_as_a_band_where_it_is_one_configuration(monkeypatch):
    done = pd.DataFrame([{"method": "sinsim", "beta": b, "seed": s, "test_linear_acc": 0.9 - 0.1 * b + 0.01 * s}
                         for b in (0.0, 0.4, 0.8) for s in (0, 1, 2)])
    series, _, bands = _plotted(monkeypatch, done, "beta")
    assert bands == ["SimCLR baseline (n=3)"]  # SinSim at beta = 0
    assert series["sinsim"][0] == [0.0, 0.4, 0.8]


def test_overhead_ratios_are_taken_on_the_same_hardware():
    # a cluster's nodes may differ: SinSim on the fast CPU is compared with SimCLR on the fast CPU only
    df = pd.DataFrame({
        "method": ["simclr", "sinsim", "simclr", "sinsim"],
        "batch_size": [64, 64, 64, 64],
        "hardware": ["Xeon, 1 threads", "Xeon, 1 threads", "EPYC, 1 threads", "EPYC, 1 threads"],
        "med_step_time_ms": [10.0, 11.0, 20.0, 30.0],
        "med_ot_time_ms": [0.0, 1.0, 0.0, 2.0],
    })
    t = overhead_table(df, ["method"], baseline=df["method"] == "simclr")
    t = t.set_index(["batch_size", "hardware", "method"])
    assert t.loc[(64, "Xeon, 1 threads", "sinsim"), "med_step_time_ms_ratio"] == pytest.approx(1.1)
    assert t.loc[(64, "EPYC, 1 threads", "sinsim"), "med_step_time_ms_ratio"] == pytest.approx(1.5)
    assert t.loc[(64, "EPYC, 1 threads", "simclr"), "n"] == 1


def test_importance_ranks_the_knob_that_matters_first():
    rng = np.random.default_rng(0)
    rows = [{"status": "completed", "beta": rng.uniform(0, 1.2), "eps": 10 ** rng.uniform(-2, 0),
             "sinkhorn_iters": int(rng.choice([1, 5, 40]))} for _ in range(40)]
    df = pd.DataFrame(rows)
    df["test_linear_acc"] = 0.9 - 0.2 * df["beta"] + 0.001 * rng.normal(size=len(df))
    df.loc[0, "status"] = "pruned"  # ignored
    imp = param_importances(df, ["beta", "eps", "sinkhorn_iters"], "test_linear_acc")
    assert max(imp, key=imp.get) == "beta" and imp["beta"] > 0.8
    assert sum(imp.values()) == pytest.approx(1.0)


def synthetic_study(d: Path, *, n_expected=12, with_running=False, mlflow_errors=0):
    """A study directory with known results: sinsim, beta in {0, 0.4, 0.8} x 3 seeds."""
    d.mkdir(parents=True)
    rows, hist = [], []
    i = 0
    for beta in (0.0, 0.4, 0.8):
        for seed in range(3):
            tid = f"t{i}"
            acc = 0.95 - 0.1 * beta + 0.01 * seed
            rows.append({"trial_id": tid, "status": "completed", "method": "sinsim", "beta": beta, "seed": seed,
                         "batch_size": 256, "n_epochs": 3, "linear_acc": acc, "test_linear_acc": acc,
                         "test_knn_acc": acc - 0.05, "knn_acc": acc - 0.05, "med_step_time_ms": 10 + 10 * beta,
                         "med_ot_time_ms": 2.0 * (beta > 0), "med_epoch_time_s": 1.0, "med_images_per_s": 100.0,
                         "peak_mem_mb": 500.0, "error": ""})
            for e in (1, 2, 3):
                hist.append({"trial_id": tid, "epoch": e, "knn_acc": acc - 0.1 / e,
                             "ot_marginal_err": 0.5 if (beta == 0.8 and seed == 0) else 1e-6})
            i += 1
    if with_running:
        rows.append({**rows[0], "trial_id": "t9", "status": "running", "n_epochs": 1, "test_linear_acc": np.nan})
        rows.append({**rows[0], "trial_id": "t10", "status": "failed", "n_epochs": 1, "test_linear_acc": np.nan,
                     "error": "TrialDiverged: train_loss became nan at epoch 1"})
    pd.DataFrame(rows).to_parquet(d / "results.parquet")
    pd.DataFrame(hist).to_parquet(d / "history.parquet")
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": "syn", "method": "sinsim", "dataset": "digits",
                                                 "search": {"beta": {"grid": [0.0, 0.4, 0.8]}},
                                                 "seeds": [0, 1, 2], "metric": "knn_acc"}))
    (d / "study.json").write_text(json.dumps({"n_trials": n_expected}))
    if mlflow_errors:
        (d / "mlflow_errors.log").write_text("x\n" * mlflow_errors)
    return d


def test_report_of_a_synthetic_study(tmp_path):
    d = synthetic_study(tmp_path / "syn", n_expected=9)
    index = write_report(d)
    rep = index.parent
    summary = pd.read_csv(rep / "summary.csv")
    row = summary[summary["beta"] == 0.4].iloc[0]
    m, h, _ = mean_ci([0.91, 0.92, 0.93])
    assert row["test_linear_acc"] == f"{100 * m:.2f} ± {100 * h:.2f}" and row["n"] == 3
    over = pd.read_csv(rep / "overhead.csv").set_index("beta")
    assert over.loc[0.8, "med_step_time_ms_ratio"] == pytest.approx(1.8)
    fl = pd.read_csv(rep / "flags.csv")
    assert fl["trial_id"].tolist() == ["t6"] and fl["flag"].iloc[0] == "sinkhorn not converged"
    page = index.read_text()
    assert "have not finished" not in page
    assert "Method(s): sinsim;" in page and "seeds: 0, 1, 2;" in page
    assert "step time (ms) × baseline" in page
    for f in ("sensitivity_beta.png", "sensitivity_beta.pdf", "learning_curves.png",
              "overhead.tex", "overhead.md"):
        assert (rep / f).stat().st_size > 0, f


def test_report_of_a_cases_study_where_some_cases_leave_a_knob_unset(tmp_path):
    # IOT-CL's preset: U(1) and U(a) set no K, U(a,b) sets K; Optuna's importance refused the missing K
    # ("`nan` is invalid value") and the whole report failed
    d = tmp_path / "iot"
    d.mkdir()
    rows, hist = [], []
    for i, (rel, k, seed) in enumerate((r, k, s) for r, k in (("U1", None), ("Ua", None), ("Uab", 1), ("Uab", 4))
                                       for s in range(3)):
        acc = 0.9 + 0.01 * seed + (0.02 if rel == "Uab" else 0.0)
        rows.append({"trial_id": f"t{i}", "status": "completed", "method": "iot_cl", "relaxation": rel, "seed": seed,
                     "batch_size": 256, "n_epochs": 3, "linear_acc": acc, "test_linear_acc": acc,
                     "test_knn_acc": acc, "knn_acc": acc, "med_step_time_ms": 10.0, "med_ot_time_ms": 1.0,
                     "med_epoch_time_s": 1.0, "med_images_per_s": 100.0, "peak_mem_mb": 1.0, "error": "",
                     **({"sinkhorn_iters": k} if k else {})})
        hist.append({"trial_id": f"t{i}", "epoch": 1, "knn_acc": acc, "ot_marginal_err": 1e-6})
    pd.DataFrame(rows).to_parquet(d / "results.parquet")
    pd.DataFrame(hist).to_parquet(d / "history.parquet")
    cases = [{"relaxation": "U1"}, {"relaxation": "Ua"}] + [{"relaxation": "Uab", "sinkhorn_iters": k} for k in (1, 4)]
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": "iot", "method": "iot_cl", "dataset": "digits",
                                                 "search": {"cases": cases}, "seeds": [0, 1, 2],
                                                 "metric": "knn_acc"}))
    (d / "study.json").write_text(json.dumps({"n_trials": 12}))
    rep = write_report(d).parent
    imp = pd.read_csv(rep / "importance.csv")
    assert set(imp["knob"]) == {"relaxation", "sinkhorn_iters"} and imp["importance"].sum() == pytest.approx(1.0)
    assert len(pd.read_csv(rep / "summary.csv")) == 4  # U(1), U(a) and U(a,b) with K = 1, 4
    assert (rep / "sensitivity_relaxation.png").stat().st_size > 0
    page = (rep / "index.html").read_text()
    # the plot over U pools U(a,b)'s K values, and says so; the importance names how many trials it read
    assert "Final accuracy vs coupling set U: mean and 95% CI over seeds (n per point), pooled over K" in page
    assert "PED-ANOVA over the 12 completed trials." in page


def test_converged_sns_trials_are_the_reference_band_on_the_plot_over_k(tmp_path):
    # the sinsim_iters preset: K in {1, 40} next to ot_solver=sns (no K); the SNS trials are drawn as a band on
    # the plot over K, not pooled into a point, and no plot over ot_solver pools every K into "sinkhorn"
    from analysis.report import split_converged
    from search_spaces.presets import get_preset

    cases = get_preset("sinsim_iters")["search"]["cases"]
    assert {"method": "sinsim", "ot_solver": "sns"} in cases and {"method": "sinsim", "sinkhorn_iters": 40} in cases
    d = tmp_path / "iters"
    d.mkdir()
    rows, hist = [], []
    for i, (case, seed) in enumerate((c, s) for c in ({"sinkhorn_iters": 1}, {"sinkhorn_iters": 40},
                                                     {"ot_solver": "sns"}) for s in range(3)):
        acc = 0.9 + 0.01 * seed + (0.03 if case.get("ot_solver") else 0.0)
        rows.append({"trial_id": f"t{i}", "status": "completed", "method": "sinsim", "seed": seed, "beta": 0.8,
                     "batch_size": 256, "n_epochs": 3, "linear_acc": acc, "test_linear_acc": acc,
                     "test_knn_acc": acc, "knn_acc": acc, "med_step_time_ms": 10.0, "med_ot_time_ms": 1.0,
                     "med_epoch_time_s": 1.0, "med_images_per_s": 100.0, "peak_mem_mb": 1.0, "error": "", **case})
        hist.append({"trial_id": f"t{i}", "epoch": 1, "knn_acc": acc, "ot_marginal_err": 1e-6})
    res = pd.DataFrame(rows)
    res.to_parquet(d / "results.parquet")
    pd.DataFrame(hist).to_parquet(d / "history.parquet")
    search = {"cases": [{"sinkhorn_iters": 1}, {"sinkhorn_iters": 40}, {"ot_solver": "sns"}]}
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": "iters", "method": "sinsim", "dataset": "digits",
                                                 "search": search, "seeds": [0, 1, 2], "metric": "knn_acc"}))
    (d / "study.json").write_text(json.dumps({"n_trials": 9}))
    curve, band = split_converged(res, "sinkhorn_iters")
    assert sorted(band["trial_id"]) == ["t6", "t7", "t8"] and band["sinkhorn_iters"].isna().all()
    assert len(curve) == 6 and len(split_converged(res, "beta")[1]) == 0
    rep = write_report(d).parent
    assert (rep / "sensitivity_sinkhorn_iters.png").stat().st_size > 0
    assert not (rep / "sensitivity_ot_solver.png").exists()
    assert len(pd.read_csv(rep / "summary.csv")) == 3


def test_report_of_a_crashed_study_says_what_is_missing(tmp_path):
    d = synthetic_study(tmp_path / "crashed", n_expected=14, with_running=True, mlflow_errors=3)
    page = write_report(d).read_text()
    # 9 completed + 1 failed finished; 14 expected -> 4 missing (the running one included)
    assert "4 of 14 trials have not finished" in page
    assert "9 completed" in page and "1 failed" in page and "1 running" in page
    assert "MLflow logging failed 3 time(s)" in page
    fl = pd.read_csv(d / "report" / "flags.csv")
    assert "loss diverged" in fl["flag"].tolist()


def test_flags_threshold():
    res = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "error": [""]})
    hist = pd.DataFrame({"trial_id": ["a", "a"], "ot_marginal_err": [1e-4, 9e-4]})
    assert flags(res, hist).empty


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900)
    return shutil.which("chromium")


def test_index_html_loads_every_image_in_headless_chromium(tmp_path):
    browser = _chromium()
    if not browser:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` did not provide it")
    d = synthetic_study(tmp_path / "browse", n_expected=9)
    rep = write_report(d).parent
    (rep / "check.html").write_text("""<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="f" src="index.html" style="width:1200px;height:800px"></iframe>
<script>
document.getElementById('f').onload = () => {
  const imgs = [...document.getElementById('f').contentDocument.images];
  const wait = () => {
    if (!imgs.every(i => i.complete)) { setTimeout(wait, 50); return; }
    document.getElementById('out').textContent =
      'IMAGES ' + imgs.length + ' LOADED ' + imgs.filter(i => i.naturalWidth > 0).length;
  };
  wait();
};
</script></body></html>""")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(rep), **k)  # noqa: E731
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as httpd:
        port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            with tempfile.TemporaryDirectory() as profile:
                out = subprocess.run(
                    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                     f"http://127.0.0.1:{port}/check.html"], capture_output=True, text=True, timeout=120).stdout
        finally:
            httpd.shutdown()
    n_images = len(list(rep.glob("*.png")))
    assert f"IMAGES {n_images} LOADED {n_images}" in out, out[-2000:]


def test_the_report_gives_paired_verdicts_the_probes_and_the_ot_terms_strength(tmp_path):
    # beta = 0.4 costs 5 points at every seed (give or take 0.2), beta = 0.8 costs nothing (give or take 0.2):
    # "worse" and "no detectable difference", paired by seed although the seeds themselves spread by 3 points
    d = tmp_path / "v"
    d.mkdir()
    rng = np.random.default_rng(0)
    seed_shift = [0.0, 0.03, -0.02, 0.01, -0.03]
    rows = []
    for i, (beta, seed) in enumerate((b, s) for b in (0.0, 0.4, 0.8) for s in range(5)):
        acc = 0.9 + seed_shift[seed] - (0.05 if beta == 0.4 else 0.0) + rng.normal(0, 0.002)
        rows.append({"trial_id": f"t{i}", "status": "completed", "method": "sinsim", "beta": beta, "seed": seed,
                     "batch_size": 256, "n_epochs": 3, "linear_acc": acc, "test_linear_acc": acc, "knn_acc": acc,
                     "test_knn_acc": acc, "test_knn5_acc": acc, "knn_k_used": 20.0, "train_loss": 5.0,
                     "reg_loss": 0.5 * beta, "reg_grad_ratio": 0.25 * beta, "med_step_time_ms": 10.0,
                     "med_ot_time_ms": 1.0, "error": ""})
    pd.DataFrame(rows).to_parquet(d / "results.parquet")
    pd.DataFrame([{"trial_id": r["trial_id"], "epoch": 3, "knn_acc": r["knn_acc"]} for r in rows]).to_parquet(
        d / "history.parquet")
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": "v", "method": "sinsim", "dataset": "digits",
                                                 "search": {"beta": {"grid": [0.0, 0.4, 0.8]}},
                                                 "seeds": list(range(5)), "metric": "knn_acc"}))
    index = write_report(d)
    summary = pd.read_csv(index.parent / "summary.csv").set_index("beta")
    assert summary.loc[0.4, "test_knn_acc_verdict"] == "worse"
    assert summary.loc[0.8, "test_knn_acc_verdict"] == "no detectable difference"
    assert summary.loc[0.4, "test_knn_acc_diff"] == pytest.approx(-5.0, abs=0.3)
    assert summary.loc[0.4, "test_knn_acc_diff_lo"] < -5.0 + 0.05 < summary.loc[0.4, "test_knn_acc_diff_hi"] + 0.1
    assert 0 < summary.loc[0.8, "test_knn_acc_mde"] < 1.5 and summary.loc[0.4, "test_knn_acc_pairs"] == 5
    assert pd.isna(summary.loc[0.0, "test_knn_acc_verdict"])  # the baseline is not compared with itself
    assert summary.loc[0.8, "reg_grad_ratio"] == pytest.approx(0.2) and summary.loc[0.8, "reg_share"] == \
        pytest.approx(0.4 / 4.6)
    page = index.read_text()
    assert "Paired verdicts against the baseline" in page and "kNN (primary)" in page and "detectable (80%)" in page
    assert "weighted kNN, k = 20" in page and "5-NN" in page
    assert "sinsim: arXiv 2502.10478. W = the entropic objective OT_eps of Eq. 3" in page


def test_report_exports_again_only_when_the_trials_files_are_newer(tmp_path):
    # Parquet is the analysis's source of truth: a hand-edited (or merged) results.parquet is reported as it is;
    # trial files newer than it (a running study), or --export, export again; Parquet + spec alone report too
    import os
    import shutil

    from study.cli import main

    d = tmp_path / "s"
    trial = d / "ray" / "trial_t1"
    trial.mkdir(parents=True)
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": "s", "method": "simclr", "dataset": "digits",
                                                 "seeds": [0], "metric": "knn_acc"}))
    (trial / "params.json").write_text(json.dumps({"method": "simclr", "seed": 0}))
    result = trial / "result.json"
    result.write_text(json.dumps({"epoch": 1, "knn_acc": 0.5, "test_linear_acc": 0.9, "final": 1.0, "done": True})
                      + "\n")
    os.utime(result, (1_700_000_000, 1_700_000_000))

    def reported():
        assert main(["report", str(d)]) == 0
        return pd.read_parquet(d / "results.parquet")["test_linear_acc"].tolist()

    assert reported() == [0.9]  # no Parquet yet: exported first
    res = pd.read_parquet(d / "results.parquet")
    res.loc[0, "test_linear_acc"] = 0.7
    res.to_parquet(d / "results.parquet")
    assert reported() == [0.7]  # the hand edit stands
    assert "70.00" in (d / "report" / "index.html").read_text()
    os.utime(result)  # the trial reported since
    assert reported() == [0.9]
    res.to_parquet(d / "results.parquet")
    assert main(["report", str(d), "--export"]) == 0
    assert pd.read_parquet(d / "results.parquet")["test_linear_acc"].tolist() == [0.9]
    shutil.rmtree(d / "ray")
    res.to_parquet(d / "results.parquet")
    assert reported() == [0.7] and (d / "report" / "index.html").exists()


def test_a_study_across_datasets_gets_a_table_of_methods_by_datasets_and_pairs_within_a_dataset(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    rows = []
    for i, (dataset, method, seed) in enumerate((ds, m, s) for ds in ("digits", "mnist5k")
                                                for m in ("simclr", "sinsim") for s in range(3)):
        acc = (0.95 if dataset == "digits" else 0.80) + 0.01 * seed - (0.03 if method == "sinsim" else 0.0)
        rows.append({"trial_id": f"t{i}", "status": "completed", "method": method, "dataset": dataset, "seed": seed,
                     "batch_size": 256, "n_epochs": 3, "linear_acc": acc, "test_linear_acc": acc, "knn_acc": acc,
                     "test_knn_acc": acc + 0.001 * (seed % 2), "test_knn5_acc": acc, "med_step_time_ms": 10.0,
                     "med_ot_time_ms": 1.0, "error": ""})
    pd.DataFrame(rows).to_parquet(d / "results.parquet")
    pd.DataFrame([{"trial_id": r["trial_id"], "epoch": 3, "knn_acc": r["knn_acc"]} for r in rows]).to_parquet(
        d / "history.parquet")
    (d / "spec.yaml").write_text(yaml.safe_dump({"name": "x", "method": ["simclr", "sinsim"],
                                                 "dataset": ["digits", "mnist5k"], "seeds": [0, 1, 2],
                                                 "metric": "knn_acc"}))
    index = write_report(d)
    across = pd.read_csv(index.parent / "datasets.csv").set_index("method")
    m, h, _ = mean_ci([0.80, 0.811, 0.82])  # the primary probe, test_knn_acc, on mnist5k
    assert list(across.columns) == ["digits", "mnist5k"]
    assert across.loc["simclr", "mnist5k"] == f"{100 * m:.2f} ± {100 * h:.2f}"
    summary = pd.read_csv(index.parent / "summary.csv")
    sinsim = summary[summary["method"] == "sinsim"].set_index("dataset")
    # paired within a dataset: 3 points worse on each, not the 15-point gap between the datasets
    assert sinsim["test_linear_acc_diff"].tolist() == pytest.approx([-3.0, -3.0])
    assert (sinsim["test_linear_acc_pairs"] == 3).all()
    assert "Across datasets" in index.read_text()


def test_a_report_of_hundreds_of_sampled_configurations_stays_legible(tmp_path, monkeypatch):
    # a TPE-like study of 300 distinct (beta, eps): the knobs on their numeric axes (not 300 category ticks), the
    # learning curves' legend capped to the best configurations and the baseline, a Pareto plot of accuracy against
    # cost; no matplotlib warning and no figure over 1 MB (the report's time is benchmarks.report_scale's)
    import warnings

    import analysis.figures as figures
    from benchmarks.report_scale import synthetic_study

    d = synthetic_study(tmp_path / "many", 300)
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, out, stem: drawn.append((stem, fig)) or save(fig, out, stem))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = write_report(d)
    assert not [str(w.message) for w in caught]
    figs = dict(drawn)
    beta_ax = figs["sensitivity_beta"].axes[0]
    assert len(beta_ax.get_xticks()) < 20 and any("bin means" in t.get_text() for t in beta_ax.get_legend().texts)
    legend = figs["learning_curves"].axes[0].get_legend().texts
    assert len(legend) <= figures.BEST + 1 and any("simclr" in t.get_text() for t in legend)
    assert len(figs["learning_curves"].axes) == 2  # the colour bar of the searched knob
    assert "pareto" in figs and (index.parent / "pareto.png").exists()
    assert max(p.stat().st_size for p in index.parent.glob("*.png")) < 1_000_000
