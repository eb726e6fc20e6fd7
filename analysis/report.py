"""The study report: sensitivity curves, learning curves, overhead tables, index.html.

Reads only files in the study directory (``results.parquet``,
``history.parquet``, ``spec.yaml``, ``study.json``, ``mlflow_errors.log``);
never imports ray or torch, so a report regenerates in seconds on a laptop,
for a finished, running or crashed study.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from .figures import (MANY_VALUES, _label, _pooled_over, _style, embedding_plot, heatmap,  # noqa: F401
                      importance_plot, learning_curves, pareto_plot, sensitivity_plot, split_converged)
from .importance import param_importances
from .sources import EmptyStudy, from_mlflow, from_study_dir
from .stats import OVERHEAD_COLS, overhead_table
from .tables import (PROBES, VERDICT_NOTE, baseline_mask, config_cols, cross_dataset_table, knn_description,
                     methods_as_run, primary_metric, summary_table, verdict_page_table, verdict_table)

MARGINAL_TOL = 1e-3  # a Sinkhorn plan with a larger L1 marginal error is flagged

__all__ = ["write_report", "EmptyStudy"]

# how each knob is named on an axis, and whether it is drawn on a log axis or as categories
def swept_knobs(spec: Dict[str, Any], res: pd.DataFrame) -> List[str]:
    """Knobs the study varied, in spec order (grid/range keys, then case keys, then method)."""
    search = spec.get("search") or {}
    keys = [k for k in search if k != "cases"]
    for case in search.get("cases") or []:
        keys += [k for k in case if k not in keys]
    if "method" in res.columns and res["method"].nunique() > 1 and "method" not in keys:
        keys.insert(0, "method")
    if "dataset" in res.columns and res["dataset"].nunique() > 1:
        keys.insert(0, "dataset")
    return [k for k in keys if k in res.columns]


def flags(res: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """Trials whose Sinkhorn did not converge (any epoch) or whose loss diverged / failed."""
    rows = []
    if not hist.empty and "ot_marginal_err" in hist.columns:
        worst = hist.groupby("trial_id")["ot_marginal_err"].max()
        for tid, err in worst.items():
            if np.isfinite(err) and err > MARGINAL_TOL:
                rows.append({"trial_id": tid, "flag": "sinkhorn not converged",
                             "detail": f"max marginal error {err:.2e} > {MARGINAL_TOL:g}"})
    for _, r in res[res["status"] == "failed"].iterrows():
        kind = "loss diverged" if "diverged" in str(r.get("error", "")).lower() or "nan" in str(r.get("error", "")) \
            else "failed"
        rows.append({"trial_id": r["trial_id"], "flag": kind, "detail": str(r.get("error", ""))[:200]})
    return pd.DataFrame(rows, columns=["trial_id", "flag", "detail"])


def _listed(value) -> str:
    """A spec's list (methods, seeds) as "simclr, sinsim", a single value as itself."""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _fmt_table(df: pd.DataFrame) -> pd.DataFrame:
    d = df.copy()
    for c in d.columns:
        if d[c].dtype.kind == "f":
            d[c] = d[c].map(lambda v: "" if pd.isna(v) else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"))
    return d


def write_report(study_dir: Optional[Path] = None, out_dir: Optional[Path] = None, *,
                 mlflow_uri: Optional[str] = None, experiment: Optional[str] = None) -> Path:
    """Write ``report/`` for a study directory (or an MLflow experiment) and return its index.html path."""
    t0 = time.perf_counter()
    if mlflow_uri:
        if not experiment or out_dir is None:
            raise ValueError("a report from MLflow needs the experiment name and an output directory")
        res, hist, spec, meta = from_mlflow(mlflow_uri, experiment)
        study_dir = None
    else:
        study_dir = Path(study_dir)
        res, hist, spec, meta = from_study_dir(study_dir)
    if res.empty:
        raise EmptyStudy(f"{study_dir or experiment} has no trials yet")
    out = Path(out_dir) if out_dir else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    _style()
    knobs = swept_knobs(spec, res)
    done = res[res["status"] == "completed"].copy()
    figures, importance = _knob_figures(done, res, hist, knobs, out, study_dir)
    cfg_cols = [c for c in config_cols(knobs) if c in res.columns]
    timed = res[res["n_epochs"] > 0]
    over = overhead_table(timed, cfg_cols, baseline=baseline_mask(timed)) if len(timed) else pd.DataFrame()
    if len(over):
        over.to_csv(out / "overhead.csv", index=False)
        (out / "overhead.md").write_text(_fmt_table(over).to_markdown(index=False))
        (out / "overhead.tex").write_text(_fmt_table(over).to_latex(index=False))
        f = pareto_plot(done, over, cfg_cols, primary_metric(spec), out)
        if f:
            figures.append((f, "What each configuration's accuracy costs: its mean test accuracy (the primary probe) "
                               "against its training step time as a multiple of the baseline's, the Pareto front "
                               "through the configurations no other is both as accurate as and faster than."))

    summary = summary_table(done, cfg_cols)
    across = cross_dataset_table(done, cfg_cols, primary_metric(spec))
    if len(across):
        across.to_csv(out / "datasets.csv", index=False)
    verdicts = verdict_table(done, cfg_cols, knobs, trials=res) if cfg_cols else pd.DataFrame()
    primary = primary_metric(spec)
    (summary.merge(verdicts, on=cfg_cols, how="left") if len(verdicts) and len(summary) else summary).to_csv(
        out / "summary.csv", index=False)
    flagged = flags(res, hist)
    flagged.to_csv(out / "flags.csv", index=False)

    expected = int(meta.get("n_trials", len(res)))
    counts = res["status"].value_counts().to_dict()
    finished = sum(counts.get(s, 0) for s in ("completed", "pruned", "failed"))
    missing = max(0, expected - finished)
    mlflow_errors = int(meta.get("mlflow_errors", 0))
    pd.DataFrame(sorted(importance.items(), key=lambda kv: -kv[1]),
                 columns=["knob", "importance"]).to_csv(out / "importance.csv", index=False)
    _remove_stale_figures(out, {Path(f).stem for f, _ in figures})
    page = _html(spec, meta, counts, expected, missing, figures, summary, over, flagged, mlflow_errors,
                 time.perf_counter() - t0, verdicts=verdict_page_table(verdicts, cfg_cols, primary), primary=primary,
                 probe=knn_description(res), across=across)
    index = out / "index.html"
    index.write_text(page)
    return index


def _knob_figures(done, res, hist, knobs: List[str], out: Path, study_dir: Optional[Path]):
    """The figures over the study's knobs, with their captions: the lambda heatmap of a grid, a sensitivity plot
    per knob, the learning curves, the knobs' importances (also returned) and the embedding picture."""
    figures: List[tuple[str, str]] = []
    metrics = list(PROBES)

    numeric_knobs = [k for k in knobs if k in ("uot_lambda1", "uot_lambda2")]
    # a grid's heatmap; sampled lambdas (more than MANY_VALUES each) are the sensitivity plots' points instead
    if len(numeric_knobs) == 2 and len(done) and all(done[k].nunique() <= MANY_VALUES for k in numeric_knobs):
        f = heatmap(done, "uot_lambda1", "uot_lambda2", "test_linear_acc", out)
        if f:
            figures.append((f, "Test linear-probe accuracy over λ1 × λ2 (mean over seeds)."))
    for knob in knobs:
        if knob == "ot_solver" and "sinkhorn_iters" in knobs:
            continue  # "sinkhorn" would pool every K: the SNS trials are the band on the plot over K instead
        if len(done):
            f = sensitivity_plot(done, knob, out, metrics)
            if f:
                many = done[knob].nunique() > MANY_VALUES
                how = ("each trial a point, binned means with 95% CIs" if many
                       else "mean and 95% CI over seeds (n per point)")
                figures.append((f, f"Final accuracy vs {_label(knob)}: {how}" + _pooled_over(knob, knobs) + "."))
    f = learning_curves(hist, res, knobs, out)
    if f:
        figures.append((f, "Validation kNN accuracy (the pruning signal) per trial."))
    # importance needs at least two knobs to rank (with one, it is trivially 1)
    importance = param_importances(res, knobs, "test_linear_acc") \
        if "test_linear_acc" in res.columns and len(knobs) >= 2 else {}
    f = importance_plot(importance, "test_linear_acc", out)
    if f:
        n_done = int((res["status"] == "completed").sum())
        figures.append((f, f"Which knob moves the final accuracy most: Optuna's PED-ANOVA over the {n_done} "
                           "completed trials."))
    emb = embedding_plot(res, study_dir, knobs, out)
    if emb:
        figures.append((emb[0], f"{emb[1]} of the frozen test features: the best configuration (by validation "
                                f"linear accuracy) next to the baseline, coloured by class."))

    return figures, importance


FIGURE_STEMS = ("sensitivity_*", "heatmap_*", "learning_curves", "importance", "embeddings", "pareto")


def _remove_stale_figures(out: Path, written: set) -> None:
    """Delete the figures an earlier report of this study wrote and this one did not (a running study's
    report regenerated after a knob's plot lost its last curve), so that report/ holds this page's figures
    only. Only files named as this module names its figures are touched."""
    for pattern in FIGURE_STEMS:
        for ext in ("png", "pdf"):
            for f in out.glob(f"{pattern}.{ext}"):
                if f.stem not in written:
                    f.unlink()


# the regulariser's columns of the summary table, as the page names them
REG_COLS = {"reg_loss": "regulariser (β·W)", "reg_share": "regulariser / rest of loss",
            "reg_grad_ratio": "‖∇ regulariser‖ / ‖∇ rest‖"}


def _readable(df: pd.DataFrame) -> pd.DataFrame:
    """Column names with units for the page (the CSV/Markdown/LaTeX files keep the data names)."""
    names = dict(REG_COLS)
    for c in df.columns:
        base = c[:-len("_ratio")] if c.endswith("_ratio") else c
        if base in OVERHEAD_COLS:
            names[c] = OVERHEAD_COLS[base] + (" × baseline" if c.endswith("_ratio") else "")
    return df.rename(columns={c: n for c, n in names.items() if c in df.columns})


def _table_html(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "<p><em>none</em></p>"
    return _fmt_table(_readable(df)).to_html(index=False, border=0, classes="t", escape=True)


def _across_html(across: pd.DataFrame, primary: str) -> str:
    if across is None or across.empty:
        return ""
    return (f"<h2>Across datasets</h2>\n<p>{html.escape(PROBES.get(primary, primary))} test accuracy "
            f"(<code>{html.escape(primary)}</code>), mean ± 95% CI half-width over seeds, in %: a configuration per "
            f"row, a dataset per column, as the papers' tables are laid out (also "
            f"<a href=\"datasets.csv\">datasets.csv</a>).</p>\n{_table_html(across)}")


def _html(spec, meta, counts, expected, missing, figures, summary, over, flagged, mlflow_errors, secs, *,
          verdicts: pd.DataFrame, primary: str, probe: str, across: pd.DataFrame) -> str:
    name = html.escape(str(spec.get("name", "study")))
    status = ", ".join(f"{v} {html.escape(str(k))}" for k, v in sorted(counts.items()))
    warn = ""
    if missing:
        warn += (f"<p class='warn'>{missing} of {expected} trials have not finished "
                 f"(the study is running or crashed; resume it with <code>otstudy resume</code>). "
                 f"The figures show what finished.</p>")
    if mlflow_errors:
        warn += (f"<p class='warn'>MLflow logging failed {mlflow_errors} time(s) (see mlflow_errors.log); "
                 f"these results come from the Parquet export.</p>")
    methods = spec.get("method") or []
    methods = [methods] if isinstance(methods, str) else list(methods)
    for case in (spec.get("search") or {}).get("cases") or []:
        if case.get("method") and case["method"] not in methods:
            methods.append(case["method"])
    as_run = "".join(f"<li>{html.escape(line)}</li>" for line in methods_as_run(methods))
    verdict_part = (f"<p>{html.escape(VERDICT_NOTE)}</p>\n{_table_html(verdicts)}" if len(verdicts) else
                    "<p><em>No baseline in this study (SimCLR, or the method with its regulariser off), so no "
                    "paired verdicts: add SimCLR to the study's methods to get them.</em></p>")
    figs = "\n".join(f"<figure><img src='{html.escape(f)}' alt='{html.escape(f)}'><figcaption>{html.escape(c)}"
                     f"</figcaption></figure>" for f, c in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>otstudy report: {name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table.t {{ border-collapse: collapse; font-size: 0.85em; }}
table.t td, table.t th {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 0.9em; color: #555; }}
.warn {{ background: #fff3cd; padding: 0.5em 1em; border-left: 4px solid #e0a800; }}
code {{ background: #f4f4f4; padding: 0 3px; }}
</style></head><body>
<h1>otstudy report: {name}</h1>
<p>{html.escape(str(spec.get('description', '')))}</p>
<p><b>Trials:</b> {status} (expected {expected}). Method(s): {html.escape(_listed(spec.get('method')))};
dataset: {html.escape(str(spec.get('dataset')))}; seeds: {html.escape(_listed(spec.get('seeds')))};
signal for search and pruning: {html.escape(str(spec.get('metric')))} on the validation split ({html.escape(probe)},
temperature 0.1, on frozen encoder features, every probe epoch). Every trial ends with three probes of its frozen
features on the held-out test split, which no selection looked at: the {html.escape(probe)} (<code>test_knn_acc</code>),
a plain 5-NN vote (<code>test_knn5_acc</code>) and a linear probe (logistic regression, weight decay chosen on the
validation split; <code>test_linear_acc</code>). The primary comparison is <code>{html.escape(primary)}</code>, the
test counterpart of the search signal.</p>
{warn}
<h2>Methods as run</h2>
<ul>{as_run}</ul>
<h2>Paired verdicts against the baseline</h2>
{verdict_part}
{_across_html(across, primary)}
<h2>Results by configuration</h2>
<p>Test accuracies (and the validation kNN) as mean ± 95% CI half-width (Student t) over seeds, in %. For a method
with a weighted regulariser (SinSim's β·W, IOT-CL's λp·KL), at the last epoch and averaged over seeds: its value
(<code>reg_loss</code>; SinSim's entropic W = &lt;P, C&gt; − ε H(P) is negative where the entropy term outweighs the
cost), that over the rest of the loss (<code>reg_share</code>), and the norm of its gradient on the encoder features
over the norm of the rest's (<code>reg_grad_ratio</code>, first batch of the epoch): how hard β really pulled, which
β alone does not say, since W's size depends on the encoder.</p>
{_table_html(summary)}
<h2>Figures</h2>
{figs}
<h2>Overhead</h2>
<p>Medians over trials of the per-trial median step time (first epoch excluded), OT share = OT solve / step;
ratios against the baseline (SimCLR, else SinSim at β = 0 or IOT-CL U(a) at λp = 0) at the same batch size, on the same hardware (the GPU,
or the CPU's model and torch's threads, as each trial recorded it). Also in
<a href="overhead.csv">overhead.csv</a>, <a href="overhead.md">overhead.md</a>, <a href="overhead.tex">overhead.tex</a>.</p>
{_table_html(over)}
<h2>Flags</h2>
<p>Sinkhorn plans with L1 marginal error above {MARGINAL_TOL:g}, diverged or failed trials.</p>
{_table_html(flagged)}
<p style="color:#888;font-size:0.8em">git {html.escape(str(meta.get('git_revision', '?'))[:12])};
created {html.escape(str(meta.get('created', '?')))}; report written in {secs:.1f} s.</p>
</body></html>
"""
