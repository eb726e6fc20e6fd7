"""otstudy's Sinkhorn vs POT and GeomLoss on the same problems, measured side by side in one run.

Problems: two clouds of n Gaussian points in d dimensions, cosine cost
C = 1 - cos (for GeomLoss the points are L2-normalised, so its p=2 cost
|x - y|^2 / 2 is the same C, and blur = sqrt(eps)). Tables:

1. a fixed 40 iterations (float32 torch for otstudy; POT on numpy float64, its
   default, and POT on float32 torch tensors): median time and L1 marginal error. A peer whose
   plan is not a solution (POT on float32 tensors when its kernel underflows: marginal error ~1)
   is shown as nan and not compared against;
2. time to reach L1 marginal error 1e-6 (float64 for everyone; SNS included), otstudy, SNS and POT in
   alternating rounds with the ratios taken within a round;
3. forward + backward at n = 2048, d = 512: time and bytes kept for backward.

``--part backward --against REV`` instead times SinSim's OT term with the unrolled gradient, this checkout's
against git revision REV's, in alternating pairs at n = 128..2048 (eps = 0.05) and n = 256, 1024 (eps = 2e-3,
more spread costs).

``--part mirrors`` times the numpy mirrors of small CPU solves (iterations, reverse pass) against the torch loops
they mirror.

    .venv/bin/python -m benchmarks.ot_solvers [--quick] [--part all|fixed|tolerance|backward [--against REV]|mirrors]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ensure_malloc_env, markdown_table, median_call, module_at, record, short_revision, timeit
from trainables.ot import sinkhorn, sinkhorn_newton_sparse

warnings.filterwarnings("ignore")


def problem(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, d, generator=g, dtype=dtype)
    return x, y, 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T


def l1_marginal_error(plan, a, b):
    plan = np.asarray(plan)
    return float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())


def saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for backward while ``fn`` builds its graph."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def geomloss_fn(x, y, eps):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), debias=False, scaling=0.5, backend="tensorized")
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return lambda: loss(xn, yn)


def fixed_iterations(sizes, dims, epss, iters=40):
    import ot

    rows = []
    for n in sizes:
        for d in dims:
            x, y, c = problem(n, d)
            c64 = c.double().numpy()
            a = np.full(n, 1.0 / n)
            a_t = torch.full((n,), 1.0 / n)
            reps = 5 if n <= 512 else 3
            for eps in epss:
                ours = sinkhorn(c, eps=eps, n_iters=iters)
                t_ours = timeit(lambda: sinkhorn(c, eps=eps, n_iters=iters), reps)
                t_ours_log = timeit(lambda: sinkhorn(c, eps=eps, n_iters=iters, domain="log"), reps)
                p_pot = ot.sinkhorn(a, a, c64, eps, numItermax=iters, stopThr=0.0)
                t_pot = timeit(lambda: ot.sinkhorn(a, a, c64, eps, numItermax=iters, stopThr=0.0), reps)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p_pot_t = ot.sinkhorn(a_t, a_t, c, eps, numItermax=iters, stopThr=0.0)
                t_pot_t = timeit(lambda: ot.sinkhorn(a_t, a_t, c, eps, numItermax=iters, stopThr=0.0), reps)
                err_pot_t = l1_marginal_error(p_pot_t.numpy(), a, a)
                if not err_pot_t <= 2 * l1_marginal_error(p_pot, a, a) + 1e-5:
                    # float32 kernel underflow: POT stops at "numerical errors at iteration 0" with a plan that
                    # is not a solution (marginal error ~1); it is no peer to be faster than
                    t_pot_t = float("nan")
                p_log = ot.sinkhorn(a, a, c64, eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
                t_pot_log = timeit(lambda: ot.sinkhorn(a, a, c64, eps, method="sinkhorn_log", numItermax=iters,
                                                       stopThr=0.0), reps)
                try:
                    gl = geomloss_fn(x, y, eps)
                    t_gl = timeit(gl, reps)
                except ImportError:
                    t_gl = float("nan")
                fastest_peer = min(t for t in (t_pot, t_pot_t, t_pot_log, t_gl) if t == t)  # NaN: not run / invalid
                rows.append([n, d, eps, ours.domain, 1e3 * t_ours, 1e3 * t_ours_log, 1e3 * t_pot, 1e3 * t_pot_t,
                             1e3 * t_pot_log, 1e3 * t_gl, t_ours / fastest_peer, ours.marginal_error,
                             l1_marginal_error(p_pot, a, a), l1_marginal_error(p_log, a, a)])
                print(rows[-1], flush=True)
    header = ["n", "d", "eps", "otstudy domain", "otstudy ms", "otstudy log ms", "POT np64 ms", "POT torch32 ms",
              "POT log ms", "GeomLoss ms", "otstudy / fastest peer", "otstudy err", "POT err", "POT log err"]
    return markdown_table(header, rows)


def paired_times(fns, pairs: int, slow_s: float = 1.0):
    """Run the callables of ``fns`` (a dict) in rounds, the order reversed every other round, after one warm-up
    round; fewer rounds (3) when a round takes over ``slow_s``. Returns ({name: last result}, {name: [seconds
    per round]})."""
    names = list(fns)
    results = {name: fns[name]() for name in names}  # warm-up
    times = {name: [] for name in names}
    k = 0
    while k < pairs:
        t_round = 0.0
        for name in (names if k % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
            t_round += times[name][-1]
        k += 1
        if t_round > slow_s and k >= 3:
            break
    return results, times


def to_tolerance(sizes, epss, tol=1e-6, cap=5000, pairs=9, log_up_to=1024):
    """Time to L1 marginal error ``tol`` (float64): otstudy's Sinkhorn, its SNS and POT's kernel Sinkhorn in
    alternating rounds (ratios within a round, medians over rounds: sub-millisecond solves at n = 128 swing
    more between runs than they differ); POT's log-domain Sinkhorn, 10-100x slower, as a median of 3 up to
    n = ``log_up_to`` only."""
    import ot

    rows = []
    for n in sizes:
        _, _, c = problem(n, 128, dtype=torch.float64)
        c64 = c.numpy()
        a = np.full(n, 1.0 / n)
        for eps in epss:
            fns = {"ours": lambda: sinkhorn(c, eps=eps, n_iters=cap, tol=tol, warn=False),
                   "sns": lambda: sinkhorn_newton_sparse(c, eps=eps, tol=tol, warn=False),
                   "pot": lambda: ot.sinkhorn(a, a, c64, eps, numItermax=cap, stopThr=tol / 10, log=True)}
            res, times = paired_times(fns, pairs)
            ours, sns, (p_pot, log) = res["ours"], res["sns"], res["pot"]
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            ratio = statistics.median(o / p for o, p in zip(times["ours"], times["pot"]))
            ratio_sns = statistics.median(o / p for o, p in zip(times["sns"], times["pot"]))
            if n <= log_up_to:
                (p_log, log2), t_pot_log = median_call(lambda: ot.sinkhorn(a, a, c64, eps, method="sinkhorn_log",
                                                                            numItermax=cap, stopThr=tol / 10,
                                                                            log=True))
                log_cols = [1e3 * t_pot_log, log2.get("niter", float("nan")), l1_marginal_error(p_log, a, a)]
            else:
                log_cols = ["n/a"] * 3
            rows.append([n, eps, med["ours"], ours.n_iters, ours.marginal_error, med["sns"], sns.n_iters,
                         sns.marginal_error, med["pot"], log.get("niter", float("nan")),
                         l1_marginal_error(p_pot, a, a), *log_cols, ratio, ratio_sns, len(times["ours"])])
            print(rows[-1], flush=True)
    header = ["n", "eps", "otstudy ms", "iters", "err", "SNS ms", "SNS iters", "SNS err", "POT ms", "POT iters",
              "POT err", "POT log ms", "POT log iters", "POT log err", "otstudy / POT (paired)",
              "SNS / POT (paired)", "rounds"]
    return markdown_table(header, rows)


def backward(n=2048, d=512, eps=0.05, iters=40):
    rows = []
    x, y, _ = problem(n, d)

    def run(mode):
        xr = x.clone().requires_grad_(True)
        cost = 1.0 - F.normalize(xr, dim=1) @ F.normalize(y, dim=1).T
        res = sinkhorn(cost, eps=eps, n_iters=iters, ot_grad=mode)
        return xr, (res.objective() if mode == "implicit" else res.transport_cost())

    for mode in ("unrolled", "implicit"):
        _, mem = saved_bytes(lambda: run(mode))

        def fb():
            xr, v = run(mode)
            v.backward()

        rows.append([f"otstudy {mode}", 1e3 * timeit(fb, 3), mem / 2**20, mem / (n * n * 4)])
    try:
        from geomloss import SamplesLoss

        loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), debias=False, scaling=0.5, backend="tensorized")

        def gl():
            xr = x.clone().requires_grad_(True)
            return xr, loss(F.normalize(xr, dim=1), F.normalize(y, dim=1))

        _, mem = saved_bytes(gl)

        def fb_gl():
            xr, v = gl()
            v.backward()

        rows.append(["GeomLoss (eps-scaling)", 1e3 * timeit(fb_gl, 3), mem / 2**20, mem / (n * n * 4)])
    except ImportError:
        pass
    return markdown_table(["solver", "forward+backward ms", "kept for backward (MiB)", "x n*n float32"], rows)


def unrolled_against(rev: str, iters=40, pairs=7):
    """SinSim's OT term with the unrolled gradient (forward and backward of <P, C> through ``iters`` iterations),
    this checkout's ``sinkhorn`` against git revision ``rev``'s, in alternating pairs; and how far apart
    their gradients are. At eps = 0.05 for n = 128..2048 (d = 512); at eps = 2e-3 for n = 256, 1024 with d = 32
    (more spread costs: (max C - min C)/eps ~ 500, beyond the float64 kernel's range), with 2 pairs where a run
    takes over 2 s."""
    old = module_at(rev, "benchmarks.ot_solvers")
    rev_id = short_revision(rev, "benchmarks.ot_solvers")
    rows = []
    for n, d, eps in [(n, 512, 0.05) for n in (128, 256, 512, 1024, 2048)] + [(256, 32, 2e-3), (1024, 32, 2e-3)]:
        x, y, _ = problem(n, d)

        def run(solver):
            xr = x.clone().requires_grad_(True)
            t0 = time.perf_counter()
            cost = 1.0 - F.normalize(xr, dim=1) @ F.normalize(y, dim=1).T
            res = solver(cost / cost.max(), eps=eps, n_iters=iters)
            t1 = time.perf_counter()
            res.transport_cost().backward()
            return t1 - t0, time.perf_counter() - t1, xr.grad, res.domain

        times = {"this": [], "rev": []}
        grads, domains = {}, {}
        order = (("this", sinkhorn), ("rev", old.sinkhorn))
        k, todo = 0, pairs
        while k <= todo:  # the first pair warms up; then alternate which one runs first
            for label, solver in (order if k % 2 == 0 else order[::-1]):
                fwd, bwd, grads[label], domains[label] = run(solver)
                if k:
                    times[label].append((fwd, bwd))
                if fwd + bwd > 2.0:
                    todo = min(todo, 2)
            k += 1
        (rf, rb), (tf, tb) = ([1e3 * statistics.median(c) for c in zip(*times[label])] for label in ("rev", "this"))
        diff = float((grads["this"] - grads["rev"]).abs().max() / grads["rev"].abs().max())
        rows.append([n, d, eps, domains["rev"], rf, rb, domains["this"], tf, tb, (tf + tb) / (rf + rb), tb / rb,
                     diff])
        print(rows[-1], flush=True)
    header = ["n", "d", "eps", f"{rev_id}: domain", f"{rev_id}: forward ms", f"{rev_id}: backward ms", "this: domain",
              "this: forward ms", "this: backward ms", f"forward+backward, this / {rev_id}",
              f"backward, this / {rev_id}", "gradient max rel. difference"]
    record(f"ot_solvers --part backward --against {rev}: unrolled gradient, this checkout vs {rev_id}",
           f"SinSim's OT term: <P, C> of {iters} Sinkhorn iterations (float32) on the max-normalised cosine cost "
           f"between n random points in d dimensions: forward = the cost and the solve, backward = <P, C> and its "
           f"backward to the points; {pairs} "
           f"alternating pairs after one warm-up pair (2 where a run took over 2 s), medians. {rev_id}'s solver "
           "is its `trainables.ot`, loaded as a module of its own.\n\n" + markdown_table(header, rows))


def mirrors(sizes=(64, 128, 256), eps=0.05, iters=40, pairs=15):
    """The numpy mirrors of small CPU problems (``trainables.ot.backend.numpy_mode`` "all"): the scaling
    iterations without a graph (``scaling._scaling_iterations_numpy``) and the unrolled gradient's reverse pass
    (``unrolled._unrolled_backward_numpy``), each against the torch loop it mirrors, forced by setting
    ``backend.NUMPY_MATVEC_MIN = 0`` with torch's products. Alternating rounds after a warm-up, medians of the
    per-round ratios."""
    from trainables.ot import backend

    rows = []
    for n in sizes:
        _, _, cost = problem(n, 128)
        x, y, _ = problem(n, 128, seed=1)

        def forward():
            return sinkhorn(cost, eps=eps, n_iters=iters)

        def backward():
            xr = x.clone().requires_grad_(True)
            c = 1.0 - F.normalize(xr, dim=1) @ F.normalize(y, dim=1).T
            res = sinkhorn(c / c.max(), eps=eps, n_iters=iters)
            t0 = time.perf_counter()
            res.transport_cost().backward()
            return time.perf_counter() - t0

        saved = backend.NUMPY_MATVEC_MIN, backend.PRODUCTS
        times = {(kind, route): [] for kind in ("forward", "backward") for route in ("numpy", "torch")}
        for k in range(pairs + 1):  # the first round warms up
            for route in (("numpy", "torch") if k % 2 == 0 else ("torch", "numpy")):
                backend.NUMPY_MATVEC_MIN, backend.PRODUCTS = saved if route == "numpy" else (0, "torch")
                t0 = time.perf_counter()
                forward()
                t_fwd = time.perf_counter() - t0
                t_bwd = backward()
                if k:
                    times[("forward", route)].append(t_fwd)
                    times[("backward", route)].append(t_bwd)
        backend.NUMPY_MATVEC_MIN, backend.PRODUCTS = saved
        for kind in ("forward", "backward"):
            ratio = statistics.median(a / b for a, b in zip(times[(kind, "numpy")], times[(kind, "torch")]))
            rows.append([n, kind, 1e3 * statistics.median(times[(kind, "numpy")]),
                         1e3 * statistics.median(times[(kind, "torch")]), ratio])
            print(rows[-1], flush=True)
    return markdown_table(["n", "what", "numpy mirror ms", "torch loop ms", "mirror / torch"], rows)


def main():
    ensure_malloc_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.ot_solvers")
    p.add_argument("--quick", action="store_true", help="n in {128, 512}, d = 128 only")
    p.add_argument("--part", choices=["all", "fixed", "tolerance", "backward", "mirrors"], default="all")
    p.add_argument("--against", metavar="REV", help="with --part backward: time this checkout's unrolled "
                   "gradient against git revision REV's (n = 128..2048 at eps 0.05; n = 256, 1024 at eps 2e-3)")
    args = p.parse_args()
    if args.against:
        if args.part != "backward":
            p.error("--against goes with --part backward")
        return unrolled_against(args.against)
    torch.manual_seed(0)
    if args.part == "mirrors":
        return record("ot_solvers --part mirrors: the numpy mirrors of small CPU solves vs the torch loops",
                      "40 Sinkhorn iterations (float32) on the cosine cost of n random points (d = 128), eps 0.05: "
                      "forward = a solve without a graph; backward = <P, C>'s backward through the unrolled "
                      "iterations; 15 alternating rounds after a warm-up, medians.\n\n" + mirrors())
    try:
        import geomloss  # noqa: F401
        body = ""
    except ImportError:
        body = ("GeomLoss is not installed here (`.venv/bin/pip install -e '.[bench]'`): its columns are n/a and "
                "it is not among the peers.\n\n")
    sizes = [128, 512] if args.quick else [128, 512, 1024, 2048]
    dims = [128] if args.quick else [128, 512]
    if args.part in ("all", "fixed"):
        body += "### Fixed 40 iterations (median ms; err = L1 marginal error after 40 iterations)\n\n"
        body += fixed_iterations(sizes, dims, [0.01, 0.05, 0.5]) + "\n\n"
    if args.part in ("all", "tolerance"):
        body += ("### Time to L1 marginal error 1e-6 (float64, capped at 5000 iterations; otstudy, SNS and POT in "
                 "alternating rounds, median times and median ratios within a round; POT log: median of 3, not "
                 "run at n = 2048)\n\n")
        body += to_tolerance([128, 512] if args.quick else [128, 512, 1024, 2048], [0.01, 0.05, 0.5]) + "\n\n"
    if args.part in ("all", "backward"):
        body += "### Forward + backward, n = 2048, d = 512, eps = 0.05, 40 iterations (float32)\n\n"
        body += backward()
    record("ot_solvers: otstudy Sinkhorn vs POT and GeomLoss", body)


if __name__ == "__main__":
    main()
