"""Grid expansion: a grid study's configurations and trials, in the order they start, with each knob only in the
configurations of the methods that read it (the conditional rule of trainables.catalog.KNOBS, as the Optuna
samplers' define-by-run space applies it in search_spaces.spaces)."""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence

from trainables.catalog import inert_knobs, knob_owners


def configs(methods: List[str], grid_knobs: Dict[str, List[Any]], cases: List[Dict[str, Any]],
            cases_set_method: bool, datasets: Sequence[str] = ("digits",),
            fixed: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """A grid study's configurations (no seed), in the order they start: the datasets (where there are several),
    the methods, then each knob's values, then the cases, in the spec's order with the first slowest; a case's
    keys override a knob's.

    A knob only some of the study's methods read is left out of the other methods' configurations, as the
    Optuna samplers' define-by-run space leaves it out: crossed with them it ran the same trial again under
    another name (SinSim once per GCA-UOT lambda1, with the same seed: the same result twice, counted as two
    configurations by the summary and its error bars). So is a knob where another setting makes it inert
    (``catalog.inert_knobs``: IOT-CL's sinkhorn_iters under U(1) and U(a), whose plans are closed forms), with
    ``fixed`` the spec's fixed knobs."""
    owners = knob_owners()
    axes: List[List[Dict[str, Any]]] = []
    if len(datasets) > 1:
        axes.append([{"dataset": d} for d in datasets])
    if len(methods) > 1 and not cases_set_method:
        axes.append([{"method": m} for m in methods])
    axes += [[{k: v} for v in vals] for k, vals in grid_knobs.items()]
    if cases:
        axes.append([dict(c) for c in cases])
    out: List[Dict[str, Any]] = []
    seen = set()
    for combo in itertools.product(*axes):
        point: Dict[str, Any] = {}
        for part in combo:
            point.update(part)
        method = point.get("method", methods[0])
        point = {k: v for k, v in point.items() if k not in owners or method in owners[k]}
        inert = inert_knobs(method, {**(fixed or {}), **point})
        point = {k: v for k, v in point.items() if k not in inert}
        key = tuple(sorted((k, repr(v)) for k, v in point.items()))
        if key not in seen:
            seen.add(key)
            out.append(point)
    return out


def points(configs: List[Dict[str, Any]], seeds: List[int]) -> List[Dict[str, Any]]:
    """A grid study's trials, in the order they start: the methods, then each knob's values, then the
    cases, in the spec's order with the first slowest, and the seeds innermost.

    Tune's own order for several ``grid_search`` keys runs the keys in alphabetical order of their
    names, the first fastest, so ``seed`` came last: a configuration's seeds were far apart. Seeds
    innermost instead means that (1) a study stopped or crashed part-way has whole seed groups for the
    configurations it reached, each with its error bar, rather than one seed of every configuration;
    and (2) concurrent trials are mostly seeds of one configuration, which take the same time, so
    they finish together and the next ones start side by side. In Tune's order, beta in {0, 0.8} x 2
    seeds, 2 at a time, put both beta = 0 trials on one worker and both beta = 0.8 trials (10% slower
    steps with SinSim's OT term on digits) on the other, which then ran alone at the end (see
    BENCHMARKS.md, platform_overhead). The points are one ``grid_search`` over dicts (key
    ``__case__``, merged into the trial's config by :func:`study.records.flat_config`); a case's keys
    override a knob's, and a knob is left out of the methods that do not read it (:func:`configs`).
    """
    return [{**config, "seed": seed} for config in configs for seed in seeds]
