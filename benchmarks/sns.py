"""Sinkhorn-Newton-Sparse vs plain Sinkhorn: iterations and time to L1 marginal error 1e-6.

Two kinds of problems, as in Tang et al. (ICLR 2024), and the kind SinSim solves:
* random point clouds: n = 512 Gaussian points in 2-D, squared Euclidean cost / max;
* images: two digits (sklearn's 8x8, upsampled to 28x28 like MNIST), pixel intensities as
  masses (plus 1e-3 so every pixel carries mass), squared distance between pixel positions / max;
* cosine costs between 512 unit vectors in 128-D and noisy copies of them (two views' features): at small
  eps a near-permutation plan, where Sinkhorn crawls.
Both solvers are otstudy's (float64); Sinkhorn is capped at 20,000 iterations and runs in the domain
``sinkhorn`` picks itself (the kernel domain while the kernel fits float64, else the stabilised kernel), so the
time ratio is against otstudy's fastest Sinkhorn. The solvers run in alternating rounds, ratios taken within
a round (medians).

``--against REV`` instead times this checkout's SNS against the one in git revision REV (its
``trainables.ot`` loaded as a module of its own), in alternating pairs on the same problems: how a change
to the solver moved its iterations and its time.

    .venv/bin/python -m benchmarks.sns [--against REV]
    .venv/bin/python -m benchmarks.sns --part warm-start

``--part warm-start`` times SNS from a warm start at 4 eps (``warm_start_factor=4``) against its default
warm-up at eps, in alternating pairs: fewer iterations, at what time. ``--part handover`` times SNS with
``handover_error`` None (the paper's early handover), 0.02, 0.05 (the default) and 0.1 against the default, in
rotating rounds: where Sinkhorn should hand over to Newton on this machine.

    .venv/bin/python -m benchmarks.sns --part handover

``--part steps`` reports where SNS's iterations and time go (``OTResult.newton``), with the paper's fixed warm-up
and with the default: Sinkhorn iterations + Newton steps (damped, refused), CG products per step, and a Newton
step's time in Sinkhorn iterations beside the most it may cost for SNS to tie with Sinkhorn.

    .venv/bin/python -m benchmarks.sns --part steps

``--part fewest`` finds the fewest iterations SNS reaches 1e-6 in over its settings (warm-up 1-5 or a warm start at
2 or 4 eps, CG to 1e-2 or 1e-5, the Hessian sparsified or exact), against the 10x goal: iterations only.

    .venv/bin/python -m benchmarks.sns --part fewest
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import ensure_malloc_env, markdown_table, module_at, record, short_revision
from trainables.ot import sinkhorn, sinkhorn_newton_sparse

CAP = 20000
ROUNDS = 7


def clouds(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0
    c = torch.cdist(x, y) ** 2
    return c / c.max(), None, None


def digits_pair(i=0, j=1, size=28):
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images, dtype=torch.float64)[[i, j]][:, None]  # (2, 1, 8, 8)
    imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False).clamp_min(0)[:, 0]
    masses = imgs.reshape(2, -1) + 1e-3
    masses = masses / masses.sum(1, keepdim=True)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1)
    c = torch.cdist(pos, pos) ** 2
    return c / c.max(), masses[0], masses[1]


def rotating_rounds(fns: dict, rounds: int, slow_s: float = float("inf")):
    """Run the callables of ``fns`` in ``rounds`` rounds, the order rotating from round to round (each runs
    first, second, ... in turn); at least 2 rounds, fewer than ``rounds`` once a round takes over ``slow_s``.
    Returns ({name: last result}, {name: [seconds per round]})."""
    names = list(fns)
    times = {name: [] for name in names}
    out = {}
    for k in range(rounds):
        start = time.perf_counter()
        for name in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.perf_counter()
            out[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > slow_s and k >= 1:
            break
    return out, times


def solve(cost, a, b, eps, rounds: int = ROUNDS, slow_s: float = 2.0):
    """Sinkhorn, SNS and SNS with the paper's fixed warm-up in alternating rounds (the order rotating), each
    time ratio taken within a round and its median reported (medians of separate runs let this machine's
    drift into a ratio: digits at eps 0.01 read 0.81x in one run and 1.6x in the run before); fewer rounds
    once a round takes over ``slow_s``."""
    solvers = {
        "plain": lambda: sinkhorn(cost, eps=eps, n_iters=CAP, tol=1e-6, a=a, b=b, warn=False),
        "sns": lambda: sinkhorn_newton_sparse(cost, eps=eps, tol=1e-6, a=a, b=b, warn=False),
        "fixed": lambda: sinkhorn_newton_sparse(cost, eps=eps, tol=1e-6, a=a, b=b, warn=False, sinkhorn_budget=0),
    }
    out, times = rotating_rounds(solvers, rounds, slow_s)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = {name: statistics.median(p / t for p, t in zip(times["plain"], times[name])) for name in ("sns", "fixed")}
    plain, sns, fixed = out["plain"], out["sns"], out["fixed"]
    return [plain.n_iters, plain.domain, plain.marginal_error, 1e3 * med["plain"], sns.n_iters, sns.marginal_error,
            1e3 * med["sns"], plain.n_iters / sns.n_iters, ratio["sns"], fixed.n_iters, 1e3 * med["fixed"],
            ratio["fixed"], len(times["plain"])]


def near_permutation(n=512, d=128, seed=0):
    """Cosine costs between unit vectors and noisy copies of them (two views' features, as in SinSim): at
    small eps the plan is nearly a permutation and splits into blocks that exchange mass through ~0 entries."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return 1 - x @ y.T, None, None


def problems():
    return (("clouds n=512", clouds()), ("clouds n=1024", clouds(1024)), ("digits 28x28 (n=784)", digits_pair()),
            ("cosine, near-permutation (n=512)", near_permutation()))


def solver_at(rev: str):
    """``sinkhorn_newton_sparse`` as it is in git revision ``rev``."""
    return module_at(rev, "benchmarks.sns").sinkhorn_newton_sparse


def against(rev: str, pairs: int = 5):
    old = solver_at(rev)
    rev_id = short_revision(rev, "benchmarks.sns")
    order = (("this", sinkhorn_newton_sparse), ("rev", old))
    rows = []
    for name, (cost, a, b) in problems():
        for eps in (0.01, 0.005, 0.002, 0.001):
            times = {"this": [], "rev": []}
            iters, errs = {}, {}
            for k in range(pairs):  # alternate which one runs first
                for label, solve_ in (order if k % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    res = solve_(cost, eps=eps, tol=1e-6, a=a, b=b, warn=False)
                    times[label].append(time.perf_counter() - t0)
                    iters[label], errs[label] = res.n_iters, res.marginal_error
            this_ms, rev_ms = (1e3 * statistics.median(times[k]) for k in ("this", "rev"))
            rows.append([name, eps, iters["rev"], errs["rev"], rev_ms, iters["this"], errs["this"], this_ms,
                         this_ms / rev_ms])
            print(rows[-1], flush=True)
    header = ["problem", "eps", f"{rev_id}: SNS iters", f"{rev_id}: err", f"{rev_id}: ms", "this: SNS iters",
              "this: err", "this: ms", f"time, this / {rev_id}"]
    record(f"sns --against {rev}: this checkout's SNS vs {rev_id}'s",
           f"Both to L1 marginal error 1e-6 in float64, {pairs} alternating pairs per problem, median times. "
           f"{rev_id}'s solver is its `trainables.ot`, loaded as a module of its own.\n\n"
           + markdown_table(header, rows))


def warm_start(pairs: int = 9, factor: float = 4.0):
    """SNS from a warm start at ``factor`` eps (``warm_start_factor``) against the default warm-up at eps, in
    alternating pairs: iterations (against Sinkhorn's) and time."""
    rows = []
    for name, (cost, a, b) in problems():
        for eps in (0.01, 0.005, 0.002, 0.001):
            plain = sinkhorn(cost, eps=eps, n_iters=CAP, tol=1e-6, a=a, b=b, warn=False)
            times = {1.0: [], factor: []}
            iters = {}
            for k in range(pairs):  # alternate which one runs first
                for wf in ((1.0, factor) if k % 2 == 0 else (factor, 1.0)):
                    t0 = time.perf_counter()
                    res = sinkhorn_newton_sparse(cost, eps=eps, tol=1e-6, a=a, b=b, warn=False, warm_start_factor=wf)
                    times[wf].append(time.perf_counter() - t0)
                    iters[wf] = res.n_iters
            ratios = [w / d for w, d in zip(times[factor], times[1.0])]
            rows.append([name, eps, plain.n_iters, iters[1.0], plain.n_iters / iters[1.0], iters[factor],
                         plain.n_iters / iters[factor], 1e3 * statistics.median(times[1.0]),
                         1e3 * statistics.median(times[factor]), statistics.median(ratios),
                         f"{min(ratios):.2f}-{max(ratios):.2f}"])
            print(rows[-1], flush=True)
    header = ["problem", "eps", "Sinkhorn iters", "SNS iters (warm-up at eps)", "iteration ratio",
              f"SNS iters (warm start at {factor:g} eps)", "iteration ratio", "ms (at eps)", f"ms ({factor:g} eps)",
              f"time, {factor:g} eps / at eps (median of pairs)", "range"]
    record(f"sns --part warm-start: SNS from {factor:g} eps vs from eps",
           f"SNS (to L1 error 1e-6, float64) from its default warm-up at eps against `warm_start_factor={factor:g}` "
           f"(3 Sinkhorn iterations at {factor:g} eps; Sinkhorn then goes on at eps only where their rate predicts "
           f"1e-6 within `sinkhorn_budget`), {pairs} alternating pairs per problem; ratios within a pair. Sinkhorn "
           f"capped at {CAP} iterations.\n\n" + markdown_table(header, rows))


def handover(pairs: int = 5, settings=(None, 0.02, 0.05, 0.1)):
    """SNS with each ``handover_error`` in ``settings`` (None: the paper's early handover), in alternating rounds
    (the order rotating), time ratios against the default's within a round (medians): where Sinkhorn should hand
    over to Newton on this machine. The default was chosen from this comparison (and the budgets from ad hoc
    runs), so re-run it on another CPU or a GPU before trusting the default there."""
    default = inspect.signature(sinkhorn_newton_sparse).parameters["handover_error"].default
    if default not in settings:
        settings = (*settings, default)
    rows = []
    for name, (cost, a, b) in problems():
        for eps in (0.01, 0.005, 0.002, 0.001):
            plain = sinkhorn(cost, eps=eps, n_iters=CAP, tol=1e-6, a=a, b=b, warn=False)
            out, times = rotating_rounds({h: (lambda h=h: sinkhorn_newton_sparse(
                cost, eps=eps, tol=1e-6, a=a, b=b, warn=False, handover_error=h)) for h in settings}, pairs)
            row = [name, eps, plain.n_iters]
            for h in settings:
                ratio = statistics.median(t / d for t, d in zip(times[h], times[default]))
                row += [out[h].n_iters, 1e3 * statistics.median(times[h]), ratio]
            rows.append(row)
            print(rows[-1], flush=True)
    header = ["problem", "eps", "Sinkhorn iters"]
    for h in settings:
        label = "None (paper)" if h is None else f"{h:g}" + (" (default)" if h == default else "")
        header += [f"{label}: iters", f"{label}: ms", f"{label}: time / default's"]
    record("sns --part handover: where Sinkhorn hands over to Newton",
           f"SNS to L1 error 1e-6 (float64) with `handover_error` in {list(settings)} (None: Newton as soon as "
           f"Sinkhorn's rate predicts more than `sinkhorn_budget` iterations, the paper's handover), {pairs} rounds "
           "in rotating order, time ratios against the default's within a round (medians). Sinkhorn's own "
           f"iterations to 1e-6 (capped at {CAP}) for reference.\n\n" + markdown_table(header, rows))


def _split(stats: dict) -> str:
    """'Sinkhorn iterations + Newton steps (damped, refused)' from ``OTResult.newton``."""
    notes = [f"{stats['damped_steps']} damped"] if stats["newton_steps"] else []
    if stats["failed_steps"]:
        notes.append(f"{stats['failed_steps']} refused")
    return f"{stats['sinkhorn_iters']:g} + {stats['newton_steps']}" + (f" ({', '.join(notes)})" if notes else "")


def steps(rounds: int = ROUNDS):
    """Where SNS's iterations and time go (``OTResult.newton``), with the paper's fixed warm-up and with the
    default handover, beside Sinkhorn's time per iteration (alternating rounds, the order rotating): what a
    Newton step costs in Sinkhorn iterations on this machine, and how many it may cost for SNS to tie with
    Sinkhorn. Both decide whether SNS can reach 10x fewer iterations and less time at once."""
    rows = []
    for name, (cost, a, b) in problems():
        for eps in (0.01, 0.005, 0.002, 0.001):
            newton_s = {"fixed": [], "default": []}

            def sns_run(key, **kw):
                def run():
                    res = sinkhorn_newton_sparse(cost, eps=eps, tol=1e-6, a=a, b=b, warn=False, **kw)
                    newton_s[key].append(res.newton["newton_s"])
                    return res
                return run

            out, times = rotating_rounds({
                "plain": lambda: sinkhorn(cost, eps=eps, n_iters=CAP, tol=1e-6, a=a, b=b, warn=False),
                "fixed": sns_run("fixed", sinkhorn_budget=0), "default": sns_run("default")}, rounds, slow_s=2.0)
            plain = out["plain"]
            per_iter = statistics.median(times["plain"]) / plain.n_iters
            row = [name, eps, plain.n_iters, 1e3 * per_iter, plain.n_iters / 10]
            for key in ("fixed", "default"):
                st, k = out[key].newton, out[key].newton["newton_steps"]
                step_s = statistics.median(newton_s[key]) / k if k else float("nan")
                row += [_split(st), st["cg_products"] / k if k else float("nan"), 1e3 * step_s, step_s / per_iter,
                        statistics.median(p / t for p, t in zip(times["plain"], times[key]))]
                if key == "fixed":  # the Sinkhorn iterations a Newton step may cost for a tie
                    row.append((plain.n_iters - st["sinkhorn_iters"]) / k if k else float("nan"))
            rows.append(row)
            print(rows[-1], flush=True)
    header = ["problem", "eps", "Sinkhorn iters", "Sinkhorn ms / iter", "10x: SNS iters at most",
              "fixed warm-up: iters (Sinkhorn + Newton)", "CG products / step", "ms / Newton step",
              "Newton step in Sinkhorn iters", "time ratio (Sinkhorn / SNS)",
              "break-even: Newton step in Sinkhorn iters", "default: iters (Sinkhorn + Newton)", "CG products / step",
              "ms / Newton step", "Newton step in Sinkhorn iters", "time ratio (Sinkhorn / SNS)"]
    record("sns --part steps: where SNS's iterations and time go",
           "SNS to L1 error 1e-6 (float64) with the paper's fixed warm-up (`sinkhorn_budget=0`) and with the "
           "default handover, beside Sinkhorn (capped at "
           f"{CAP} iterations), in up to {rounds} rounds in rotating order (2 once a round takes over 2 s), median "
           "times. From `OTResult.newton`: the Sinkhorn iterations before Newton + the Newton steps (damped: a step "
           "length below 1; refused: directions without ascent, replaced by Sinkhorn iterations, counted with "
           "Sinkhorn's), CG's Hessian products per step, and the Newton phase's median time per step taken "
           "(refused directions included), also in Sinkhorn iterations (Sinkhorn's median time / its iterations). "
           "Break-even: (Sinkhorn's iterations - the warm-up's) / Newton steps, the most a step may cost for "
           "the fixed warm-up to tie with Sinkhorn.\n\n" + markdown_table(header, rows))


def _fewest_settings():
    """SNS's settings for the fewest iterations: the paper's fixed warm-up (``sinkhorn_budget=0``, no handover) of
    1-5 Sinkhorn iterations or a warm start at 2 or 4 eps, CG to 1e-2 (the default) or 1e-5 (a near-exact
    Newton direction), the Hessian sparsified (the default) or exact (``dense_above=0``)."""
    starts = [(f"warm-up {w}", {"warmup_iters": w}) for w in range(1, 6)]
    starts += [(f"warm start {k:g} eps", {"warm_start_factor": k}) for k in (2.0, 4.0)]
    for (start, kw), cg_tol, dense_above in itertools.product(starts, (1e-2, 1e-5), (0.05, 0.0)):
        label = f"{start}, CG {cg_tol:g}" + (", exact Hessian" if dense_above == 0 else "")
        yield label, dict(kw, sinkhorn_budget=0, handover_error=None, cg_tol=cg_tol, dense_above=dense_above)


def fewest():
    """The fewest iterations SNS reaches 1e-6 in over its settings (:func:`_fewest_settings`), against the 10x
    goal (Sinkhorn's iterations / 10): iterations only, no times. Where even the exact Hessian solved to 1e-5
    from the best start needs more, the limit is Newton's damped phase, not the sparsification or CG."""
    settings = list(_fewest_settings())
    rows = []
    for name, (cost, a, b) in problems():
        for eps in (0.01, 0.005, 0.002, 0.001):
            plain = sinkhorn(cost, eps=eps, n_iters=CAP, tol=1e-6, a=a, b=b, warn=False).n_iters
            runs = []
            for label, kw in settings:
                res = sinkhorn_newton_sparse(cost, eps=eps, tol=1e-6, a=a, b=b, warn=False, **kw)
                if res.marginal_error < 1e-6:
                    runs.append((res.n_iters, label, res.newton))
            if not runs:
                rows.append([name, eps, plain, plain / 10, "none reached 1e-6", "", "", "no"])
                continue
            best = min(r[0] for r in runs)
            firsts = [r for r in runs if r[0] == best]
            rows.append([name, eps, plain, plain / 10, best, "; ".join(r[1] for r in firsts[:3])
                         + (f" (+{len(firsts) - 3} more)" if len(firsts) > 3 else ""), _split(firsts[0][2]),
                         "yes" if best <= plain / 10 else f"no ({plain / best:.1f}x)"])
            print(rows[-1], flush=True)
    header = ["problem", "eps", "Sinkhorn iters", "10x: SNS iters at most", "SNS: fewest iters",
              "with (the first 3 settings that reach it)", "its iters (Sinkhorn + Newton)", "10x reached?"]
    record("sns --part fewest: the fewest iterations over SNS's settings",
           f"SNS to L1 error 1e-6 (float64) with each of {len(settings)} settings: the paper's fixed warm-up "
           "(`sinkhorn_budget=0`, `handover_error=None`) of 1-5 Sinkhorn iterations or a warm start of 3 iterations "
           "at 2 or 4 eps (`warm_start_factor`), CG to 1e-2 (the default) or 1e-5, the Hessian sparsified (the "
           "default) or exact (`dense_above=0`); Sinkhorn capped at "
           f"{CAP} iterations. Iterations only (no times): whether any setting reaches 10x fewer than Sinkhorn. "
           "Damped: Newton steps of length below 1.\n\n" + markdown_table(header, rows))


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sns")
    parser.add_argument("--against", metavar="REV", help="time this checkout's SNS against git revision REV's")
    parser.add_argument("--part", choices=("main", "warm-start", "handover", "steps", "fewest"), default="main",
                        help="warm-start: SNS from a warm start at 4 eps vs from eps, paired; handover: SNS with "
                             "handover_error None, 0.02, 0.05, 0.1, paired against the default; steps: where "
                             "SNS's iterations and time go, a Newton step's cost in Sinkhorn iterations; fewest: "
                             "the fewest iterations over SNS's settings, against the 10x goal")
    args = parser.parse_args()
    if args.against and args.part != "main":
        parser.error(f"--against and --part {args.part} are separate runs: give one of them")
    ensure_malloc_env()
    if args.against:
        return against(args.against)
    if args.part == "warm-start":
        return warm_start()
    if args.part == "handover":
        return handover()
    if args.part == "steps":
        return steps()
    if args.part == "fewest":
        return fewest()
    rows = []
    for name, (cost, a, b) in problems():
        for eps in (0.05, 0.01, 0.005, 0.002, 0.001):
            rows.append([name, eps, *solve(cost, a, b, eps)])
            print(rows[-1], flush=True)
    header = ["problem", "eps", "Sinkhorn iters", "Sinkhorn domain", "Sinkhorn err", "Sinkhorn ms", "SNS iters",
              "SNS err", "SNS ms", "iteration ratio", "time ratio (Sinkhorn / SNS)", "fixed warm-up: SNS iters",
              "SNS ms", "time ratio", "rounds"]
    d = {k: v.default for k, v in inspect.signature(sinkhorn_newton_sparse).parameters.items()}
    record("sns: Sinkhorn-Newton-Sparse vs Sinkhorn to marginal error 1e-6",
           f"SNS iterations = the Sinkhorn iterations before Newton (at least {d['warmup_iters']}, more while "
           f"Sinkhorn's rate predicts 1e-6 within `sinkhorn_budget` more: "
           + ("60 up to n = 512, 60 * 512 / n down to 30 from n = 1024 on a CPU" if d["sinkhorn_budget"] is None
              else str(d["sinkhorn_budget"])) + ", and while its "
           f"error is above {d['handover_error']:g} and its rate predicts reaching that within "
           f"{d['handover_budget']} more: `handover_error`, `handover_budget`) + Newton steps (damped or not). "
           f"The last three columns are SNS with the paper's fixed warm-up ({d['warmup_iters']} iterations, "
           "`sinkhorn_budget=0`: the fewest iterations), in the same run. "
           "Sinkhorn runs in the domain it "
           "picks (kernel while (max C - min C)/eps <= 283 in float64, else the stabilised kernel); both "
           f"solvers float64; the three run in alternating rounds (up to {ROUNDS}, 2 once a round takes over 2 s; "
           "the order rotating): median times, and time ratios as medians of the ratios within a round.\n\n"
           + markdown_table(header, rows))


if __name__ == "__main__":
    main()
