"""The report's figures: sensitivity curves, learning curves, a heatmap, importances, the embedding picture.
Pure matplotlib on the exported tables; each function writes its PNG and PDF and returns the PNG's name (None when
there is nothing to draw)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .stats import mean_ci, summarise  # noqa: E402
from .tables import baseline_mask, config_cols  # noqa: E402


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
    "dataset": ("dataset", "category"),
    "lr": ("learning rate", "log"),
}
METRICS = {"test_linear_acc": "test linear-probe accuracy (%)", "test_knn_acc": "test kNN accuracy (%)",
           "test_knn5_acc": "test 5-NN accuracy (%)", "linear_acc": "val linear-probe accuracy (%)",
           "knn_acc": "val kNN accuracy (%)"}


def _style():
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


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
    # a numeric knob with many values (a random or TPE study) is drawn on its numeric axis: each trial a point,
    # binned means with their 95% CIs; 1,000 category ticks took matplotlib most of a report's minute
    many = pd.api.types.is_numeric_dtype(done[knob]) and done[knob].nunique() > MANY_VALUES
    if many and scale == "category":
        vals = done[knob].dropna()
        scale = "log" if vals.min() > 0 and vals.max() > 10 * vals.min() else "linear"
    # a categorical knob's values have one position each on the shared axis, whichever methods ran them
    cats = _categories(done[knob]) if not many and (scale == "category"
                                                    or not pd.api.types.is_numeric_dtype(done[knob])) else None
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
            if many:
                _points_and_bins(ax, rows[method], knob, metric, scale, str(method) if method else None)
                continue
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


MANY_VALUES = 12  # a numeric knob with more distinct values is drawn on its axis, binned (sensitivity_plot)
BINS = 10


def _points_and_bins(ax, rows: pd.DataFrame, knob: str, metric: str, scale: str, label: Optional[str]) -> None:
    """A method's trials over a knob with many values: each trial a faint point, and the means of ``BINS`` bins
    of equal count (on the log axis for a log knob) with their 95% CIs."""
    d = rows[[knob, metric]].dropna()
    if d.empty:
        return
    x, y = d[knob].astype(float).to_numpy(), 100 * d[metric].to_numpy()
    dots = ax.scatter(x, y, s=6, alpha=0.25, linewidths=0)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, BINS + 1)))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    centres, means, halves = [], [], []
    for b in np.unique(which):
        xs, ys = x[which == b], y[which == b]
        m, h, n = mean_ci(ys.tolist())
        centres.append(float(np.exp(np.log(xs).mean())) if scale == "log" else float(xs.mean()))
        means.append(m)
        halves.append(h if n > 1 else 0.0)
    ax.errorbar(centres, means, yerr=halves, marker="o", capsize=3, color=dots.get_facecolor()[0][:3],
                label=(label or "") + f" (n={len(d)}, bin means)")


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


MAX_CONFIGS = 8  # learning curves of more configurations: the best BEST ones and the baseline, the rest in grey
BEST = 6


def learning_curves(hist: pd.DataFrame, res: pd.DataFrame, knobs: List[str], out: Path) -> Optional[str]:
    """Validation kNN accuracy (the pruning signal) vs epoch, one line per trial; pruned dashed, failed dotted.

    Up to ``MAX_CONFIGS`` configurations each have a colour and a legend entry. A study with more (a random or TPE
    search) shows the ``BEST`` configurations by their mean final validation accuracy and the baseline, coloured
    by the first numeric knob it searched (with a colour bar) or else by configuration, the other trials as faint
    grey lines behind them: a legend of 1,000 entries made a 1.8 MB figure matplotlib could not lay out."""
    if hist.empty or "knn_acc" not in hist.columns:
        return None
    cols = [c for c in config_cols(knobs) if c in res.columns]
    cfg = res.set_index("trial_id")
    curves = {tid: g for tid, g in hist.dropna(subset=["knn_acc"]).groupby("trial_id") if tid in cfg.index}
    keys = {tid: _describe(cfg.loc[tid], cols) for tid in curves}
    shown = _shown_configurations(res, cols, keys)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rest = [np.column_stack([g["epoch"], 100 * g["knn_acc"]]) for tid, g in curves.items() if keys[tid] not in shown]
    if rest:
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(rest, colors="0.75", linewidths=0.6, alpha=0.5, zorder=0))
    colour_knob = next((k for k in knobs if k in res.columns and pd.api.types.is_numeric_dtype(res[k])
                        and res[k].nunique() > 1), None) if len(set(keys.values())) > MAX_CONFIGS else None
    norm = cmap = None
    if colour_knob is not None:
        vals = res[colour_knob].dropna()
        log = vals.min() > 0 and vals.max() > 10 * vals.min()
        norm = (matplotlib.colors.LogNorm if log else matplotlib.colors.Normalize)(vals.min(), vals.max())
        cmap = matplotlib.colormaps["viridis"]
    palette = sns.color_palette("colorblind", 12)
    labelled = set()
    for tid, g in curves.items():
        key = keys[tid]
        if key not in shown:
            continue
        row = cfg.loc[tid]
        value = row.get(colour_knob) if colour_knob is not None else None
        color = cmap(norm(value)) if value is not None and value == value else palette[shown.index(key) % 12]
        status = row["status"]
        ax.plot(g["epoch"], 100 * g["knn_acc"], color=color, lw=1.2, alpha=0.9,
                ls="--" if status == "pruned" else (":" if status == "failed" else "-"),
                label=key if key not in labelled else None)
        labelled.add(key)
    if colour_knob is not None:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=_label(colour_knob))
    ax.autoscale_view()
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs 1, 2, 3, not 1.25
    ax.set_ylabel(METRICS["knn_acc"])
    n_cfg = len(set(keys.values()))
    what = f"the {len(shown)} shown of {n_cfg} configurations; " if rest else ""
    ax.set_title(f"learning curves ({what}dashed: pruned, dotted: failed)", fontsize=10)
    # below the axes: inside, it covered the curves it names
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _save(fig, out, "learning_curves")


def _shown_configurations(res: pd.DataFrame, cols: List[str], keys: Dict[str, str]) -> List[str]:
    """The configurations whose curves have colours: all of up to MAX_CONFIGS, else the BEST by mean final
    validation kNN accuracy over their seeds, and the baseline's."""
    names = list(dict.fromkeys(keys.values()))
    if len(names) <= MAX_CONFIGS or "knn_acc" not in res.columns:
        return names
    d = res[res["trial_id"].isin(list(keys))].assign(_key=lambda f: f["trial_id"].map(keys))
    best = d.groupby("_key")["knn_acc"].mean().sort_values(ascending=False).index[:BEST].tolist()
    base = d.loc[baseline_mask(d), "_key"].unique().tolist()
    return list(dict.fromkeys(best + base))


def pareto_plot(done: pd.DataFrame, over: pd.DataFrame, cols: List[str], metric: str, out: Path) -> Optional[str]:
    """What accuracy each configuration buys at what cost: its mean ``metric`` over seeds against its training
    step's time as a multiple of the baseline's (median, at the same batch size and hardware), the Pareto front
    (no other configuration both as accurate and faster) drawn through, the baseline at 1x."""
    ratio = "med_step_time_ms_ratio"
    if over is None or over.empty or ratio not in over.columns or metric not in done.columns:
        return None
    acc = done.groupby(cols, dropna=False)[metric].mean().rename("acc").reset_index()
    t = over.groupby(cols, dropna=False)[ratio].median().reset_index()
    d = acc.merge(t, on=cols, how="inner").dropna(subset=["acc", ratio])
    if len(d) < 2:
        return None
    d = d.sort_values([ratio, "acc"], ascending=[True, False])
    front = d[d["acc"] >= d["acc"].cummax()]  # faster ones first: a point is on the front if none before beats it
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(d[ratio], 100 * d["acc"], s=14, alpha=0.5, color="tab:blue", linewidths=0,
               label=f"configurations (n={len(d)})")
    ax.plot(front[ratio], 100 * front["acc"], "-o", color="tab:red", ms=4, lw=1.2, label="Pareto front")
    base = d[baseline_mask(d)] if "method" in d.columns else d.iloc[:0]
    if len(base):
        ax.scatter(base[ratio], 100 * base["acc"], marker="*", s=120, color="k", zorder=3, label="baseline")
    for _, r in front.head(8).iterrows():  # name the front's points, at most 8
        ax.annotate(_describe(r, [c for c in cols if c in r.index]), (r[ratio], 100 * r["acc"]), fontsize=6,
                    textcoords="offset points", xytext=(4, 3))
    if d[ratio].max() > 4 * d[ratio].min():
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("training step time × baseline's")
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.set_title("accuracy against cost", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out, "pareto")


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
    cols = [c for c in config_cols(knobs) if c in done.columns]
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
