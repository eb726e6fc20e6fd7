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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .importance import param_importances  # noqa: E402
from .sources import EmptyStudy, from_mlflow, from_study_dir  # noqa: E402
from .stats import OVERHEAD_COLS, mean_ci, overhead_table, summarise  # noqa: E402
from .tables import (PROBES, VERDICT_NOTE, baseline_mask, knn_description, methods_as_run, primary_metric,  # noqa: E402
                     summary_table, verdict_page_table, verdict_table)

__all__ = ["write_report", "EmptyStudy"]

# how each knob is named on an axis, and whether it is drawn on a log axis or as categories
KNOBS = {
    "beta": ("β (OT weight)", "linear"),
    "eps": ("ε (entropic regularisation)", "log"),
    "tau": ("τ (temperature)", "log"),
    "sinkhorn_iters": ("K (Sinkhorn iterations)", "category"),
    "uot_lambda1": ("λ1 (row KL penalty)", "log"),
    "uot_lambda2": ("λ2 (column KL penalty)", "log"),
    "lambda_p": ("λp (uniformity penalty)", "symlog"),
    "batch_size": ("batch size N (images)", "category"),
    "relaxation": ("coupling set U", "category"),
    "ot_solver": ("OT solver", "category"),
    "method": ("method", "category"),
    "lr": ("learning rate", "log"),
}
METRICS = {"test_linear_acc": "test linear-probe accuracy (%)", "test_knn_acc": "test kNN accuracy (%)",
           "test_knn5_acc": "test 5-NN accuracy (%)", "linear_acc": "val linear-probe accuracy (%)",
           "knn_acc": "val kNN accuracy (%)"}
MARGINAL_TOL = 1e-3  # a Sinkhorn plan with a larger L1 marginal error is flagged


def _style():
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


def swept_knobs(spec: Dict[str, Any], res: pd.DataFrame) -> List[str]:
    """Knobs the study varied, in spec order (grid/range keys, then case keys, then method)."""
    search = spec.get("search") or {}
    keys = [k for k in search if k != "cases"]
    for case in search.get("cases") or []:
        keys += [k for k in case if k not in keys]
    if "method" in res.columns and res["method"].nunique() > 1 and "method" not in keys:
        keys.insert(0, "method")
    return [k for k in keys if k in res.columns]


def _config_cols(knobs: List[str]) -> List[str]:
    return (["method"] if "method" not in knobs else []) + knobs


def _label(knob: str) -> str:
    return KNOBS.get(knob, (knob, "linear"))[0]


def _save(fig, out: Path, stem: str) -> str:
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight")
    plt.close(fig)
    return f"{stem}.png"


def split_converged(done: pd.DataFrame, knob: str):
    """(trials to draw against ``knob``, trials whose plan was solved to convergence by SNS): on a plot over
    the Sinkhorn iteration count K, SinSim's ``ot_solver=sns`` trials are the converged-plan reference
    (drawn as a band), not a point at the K they did not use."""
    if knob != "sinkhorn_iters" or "ot_solver" not in done.columns:
        return done, done.iloc[:0]
    conv = done["ot_solver"] == "sns"
    return done[~conv], done[conv]


def sensitivity_plot(done: pd.DataFrame, knob: str, out: Path, metrics: List[str]) -> Optional[str]:
    """Final metric vs the knob, by method: mean and 95% CI over seeds, n annotated."""
    metrics = [m for m in metrics if m in done.columns and done[m].notna().any()]
    if not metrics or knob not in done.columns:
        return None
    scale = KNOBS.get(knob, (knob, "linear"))[1]
    done, converged = split_converged(done, knob)
    methods = sorted(done["method"].dropna().unique()) if "method" in done.columns else [None]
    base = done[baseline_mask(done)]
    # the baseline is a band where it is one configuration along this knob (SimCLR, or SinSim at beta = 0, on a
    # plot over beta or eps); where it varies along the knob (batch size, method) it is a curve of its own, and
    # a band would pool its points
    band = len(base) > 0 and knob != "method" and base[knob].nunique() <= 1
    # a categorical knob's values have one position each on the shared axis, whichever methods ran them
    cats = _categories(done[knob]) if scale == "category" or done[knob].dtype == object else None
    # a curve per method with at least two values of the knob (SimCLR, the baseline, with one); a method that
    # does not read the knob (its value unset) has no place on the axis: SimCLR is then the band
    rows = {m: done if m is None else done[done["method"] == m] for m in methods}
    drawn = [m for m in methods if knob == "method" or rows[m][knob].nunique() >= (1 if m == "simclr" else 2)]
    if not drawn:
        return None  # e.g. over beta in a SinSim x GCA study whose SinSim trials at the other betas were pruned
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        if band:
            m, lo, hi = base[metric].mean(), *_ci_bounds(base[metric])
            ax.axhspan(100 * lo, 100 * hi, color="0.85", zorder=0, label=f"SimCLR baseline (n={len(base)})")
            ax.axhline(100 * m, color="0.5", lw=1, zorder=0)
        if converged[metric].notna().any():
            vals = converged[metric].dropna()
            m, lo, hi = vals.mean(), *_ci_bounds(vals)
            ax.axhspan(100 * lo, 100 * hi, color="tab:green", alpha=0.15, zorder=0,
                       label=f"converged plan, SNS (n={len(vals)})")
            ax.axhline(100 * m, color="tab:green", lw=1, ls="--", zorder=0)
        for method in drawn:
            s = summarise(rows[method], [knob], metric)
            if cats is not None:
                x = np.array([cats.index(_tick(v)) for v in s[knob]])
                ax.set_xticks(np.arange(len(cats)), cats)
            else:
                x = s[knob].astype(float).values
            ax.errorbar(x, 100 * s["mean"], yerr=100 * s["ci"].fillna(0), marker="o", capsize=3,
                        label=str(method) if method else None)
            for xi, yi, n in zip(x, 100 * s["mean"], s["n"]):
                ax.annotate(f"n={n}", (xi, yi), textcoords="offset points", xytext=(0, 6), fontsize=7,
                            ha="center")
        if scale == "log":
            ax.set_xscale("log")
            # within a decade matplotlib labels the minor ticks as 1.2x10^-1, 1.4x10^-1, ..., overprinted: label
            # 1, 2 and 5 of each decade as plain numbers instead
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif scale == "symlog":
            ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(_label(knob))
        ax.set_ylabel(METRICS.get(metric, metric))
        ax.set_title(f"{METRICS.get(metric, metric)} vs {knob}", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, out, f"sensitivity_{knob}")


def _pooled_over(knob: str, knobs: List[str]) -> str:
    """The caption's note of the knobs a plot over ``knob`` pools (each method is its own curve)."""
    others = [_label(k) for k in knobs if k not in (knob, "method")]
    return f", pooled over {', '.join(others)}" if others else ""


def _tick(v) -> str:
    """A knob value as a tick label: K = 40, not 40.0 (a knob some cases leave unset is a float column)."""
    if v is None or (isinstance(v, float) and v != v):
        return "unset"
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _categories(values: pd.Series) -> List[str]:
    """The tick labels of a categorical knob's values, sorted by value, "unset" last."""
    return [_tick(v) for v in sorted(values.dropna().unique().tolist())] + (["unset"] if values.isna().any() else [])


def _ci_bounds(x: pd.Series):
    m, h, n = mean_ci(x.tolist())
    return (m - h, m + h) if n > 1 else (m, m)


def heatmap(done: pd.DataFrame, a: str, b: str, metric: str, out: Path) -> Optional[str]:
    if metric not in done.columns:
        return None
    pivot = done.groupby([a, b])[metric].mean().unstack(b) * 100
    fig, ax = plt.subplots(figsize=(5, 4))
    sns.heatmap(pivot, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": METRICS.get(metric, metric)})
    ax.set_xlabel(_label(b))
    ax.set_ylabel(_label(a))
    return _save(fig, out, f"heatmap_{a}_{b}")


def learning_curves(hist: pd.DataFrame, res: pd.DataFrame, knobs: List[str], out: Path) -> Optional[str]:
    """kNN accuracy (val) vs epoch, one line per trial coloured by configuration; pruned dashed."""
    if hist.empty or "knn_acc" not in hist.columns:
        return None
    cols = _config_cols(knobs)
    cfg = res.set_index("trial_id")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = {}
    palette = sns.color_palette("colorblind", 12)
    for tid, g in hist.dropna(subset=["knn_acc"]).groupby("trial_id"):
        if tid not in cfg.index:
            continue
        row = cfg.loc[tid]
        key = _describe(row, [c for c in cols if c in cfg.columns])
        color = palette[list(labels).index(key) % 12] if key in labels else palette[len(labels) % 12]
        status = row["status"]
        ax.plot(g["epoch"], 100 * g["knn_acc"], color=color, lw=1.2, alpha=0.8,
                ls="--" if status == "pruned" else (":" if status == "failed" else "-"),
                label=key if key not in labels else None)
        labels.setdefault(key, color)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs 1, 2, 3, not 1.25
    ax.set_ylabel(METRICS["knn_acc"])
    ax.set_title("learning curves (dashed: pruned, dotted: failed)", fontsize=10)
    # below the axes: inside, it covered the curves it names
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _save(fig, out, "learning_curves")


def importance_plot(imp: Dict[str, float], metric: str, out: Path) -> Optional[str]:
    if not imp:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 0.9 + 0.45 * len(imp)))
    keys = sorted(imp, key=imp.get)
    ax.barh([_label(k) for k in keys], [imp[k] for k in keys], color=sns.color_palette("colorblind")[0])
    ax.set_xlabel(f"PED-ANOVA importance for {METRICS.get(metric, metric)}")
    ax.set_xlim(0, 1)
    return _save(fig, out, "importance")


def _embed_2d(x: np.ndarray, seed: int = 0) -> tuple:
    try:
        import umap  # optional: umap-learn

        return umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        x50 = PCA(n_components=min(50, x.shape[1], len(x) - 1), random_state=seed).fit_transform(x)
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(x50), "t-SNE"


def _describe(row, cols) -> str:
    """A configuration as "method=sinsim beta=0.823 eps=0.269": a sampled value to 3 significant digits, a knob
    its method does not read (unset) left out."""
    return " ".join(f"{c}={row[c]:.3g}" if isinstance(row[c], float) else f"{c}={row[c]}" for c in cols
                    if not (isinstance(row[c], float) and row[c] != row[c]))


def embedding_plot(res: pd.DataFrame, study_dir: Optional[Path], knobs: List[str], out: Path,
                   max_points: int = 1000) -> Optional[tuple]:
    """2-D picture of the frozen test features: best configuration (by validation accuracy) vs the baseline."""
    if study_dir is None or "linear_acc" not in res.columns:
        return None
    done = res[res["status"] == "completed"]
    is_base = baseline_mask(done)
    base, rest = done[is_base], done[~is_base]
    if base.empty or rest.empty:
        return None
    cols = [c for c in _config_cols(knobs) if c in done.columns]
    best_key = rest.groupby(cols, dropna=False)["linear_acc"].mean().idxmax()
    best_key = best_key if isinstance(best_key, tuple) else (best_key,)
    # a knob the best configuration's method does not read is unset (NaN), and NaN == NaN is False
    best = rest[np.logical_and.reduce([(rest[c] == v) | (rest[c].isna() & pd.isna(v)) for c, v in zip(cols, best_key)])]
    picks = []
    for kind, rows in (("baseline", base), ("best", best)):
        row = rows.sort_values("seed").iloc[0] if "seed" in rows.columns else rows.iloc[0]
        tdir = row.get("trial_dir") if isinstance(row.get("trial_dir"), str) else f"trial_{row['trial_id']}"
        found = sorted((Path(study_dir) / "ray" / tdir).glob("checkpoint_*/embeddings.npz"))
        if not found:
            return None
        f = found[-1]
        with np.load(f) as z:
            feats, labels = z["features"][:max_points], z["labels"][:max_points]
        picks.append((f"{kind}: {_describe(row, cols)} (seed {row.get('seed')})", feats, labels))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    method = ""
    for ax, (title, feats, labels) in zip(axes, picks):
        xy, method = _embed_2d(feats.astype(np.float64))
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=list(axes), label="class", fraction=0.03)
    fig.suptitle(f"{method} of the frozen encoder features of the test split", fontsize=10)
    fig.savefig(out / "embeddings.png", dpi=120)
    fig.savefig(out / "embeddings.pdf")
    plt.close(fig)
    return "embeddings.png", method


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
    figures: List[tuple[str, str]] = []
    metrics = list(PROBES)

    numeric_knobs = [k for k in knobs if k in ("uot_lambda1", "uot_lambda2")]
    if len(numeric_knobs) == 2 and len(done):
        f = heatmap(done, "uot_lambda1", "uot_lambda2", "test_linear_acc", out)
        if f:
            figures.append((f, "Test linear-probe accuracy over λ1 × λ2 (mean over seeds)."))
    for knob in knobs:
        if knob == "ot_solver" and "sinkhorn_iters" in knobs:
            continue  # "sinkhorn" would pool every K: the SNS trials are the band on the plot over K instead
        if len(done):
            f = sensitivity_plot(done, knob, out, metrics)
            if f:
                figures.append((f, f"Final accuracy vs {_label(knob)}: mean and 95% CI over seeds (n per point)"
                                   + _pooled_over(knob, knobs) + "."))
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

    cfg_cols = [c for c in _config_cols(knobs) if c in res.columns]
    timed = res[res["n_epochs"] > 0]
    over = overhead_table(timed, cfg_cols, baseline=baseline_mask(timed)) if len(timed) else pd.DataFrame()
    if len(over):
        over.to_csv(out / "overhead.csv", index=False)
        (out / "overhead.md").write_text(_fmt_table(over).to_markdown(index=False))
        (out / "overhead.tex").write_text(_fmt_table(over).to_latex(index=False))

    summary = summary_table(done, cfg_cols)
    verdicts = verdict_table(done, cfg_cols, knobs) if cfg_cols else pd.DataFrame()
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
                 probe=knn_description(res))
    index = out / "index.html"
    index.write_text(page)
    return index


FIGURE_STEMS = ("sensitivity_*", "heatmap_*", "learning_curves", "importance", "embeddings")


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


def _html(spec, meta, counts, expected, missing, figures, summary, over, flagged, mlflow_errors, secs, *,
          verdicts: pd.DataFrame, primary: str, probe: str) -> str:
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
