"""Named study presets: the papers' ablations as data.

A preset is a spec (see ``study.spec``) without storage. Presets run on the
embedded digits data with the small CNN so they finish on a laptop; a spec
file can take the same ``search`` block and point it at CIFAR-10 with
ResNet-18 (see docs/reproduce.md).

``search`` maps a knob to ``{grid: [...]}`` (every value), ``{low, high,
log}`` (a range, sampled by random/TPE) or ``{choices: [...]}``. The special
key ``cases`` is a list of config overrides crossed with the other knobs: it
expresses conditional ablations (IOT-CL's U(a,b) with K rounds next to U(1)
and U(a), or a comparison across methods) without meaningless combinations.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

# Shared by every preset: digits, small CNN, Adam; 30 epochs take ~10 s a trial on one core.
_BASE_FIXED = {"encoder": "small_cnn", "epochs": 30, "batch_size": 256,
               "lr": 1e-3, "probe_every": 1}

# the papers' methods (the public-code variants sinsim_gibbs_kernel and gca_rince_code are run by name)
_ALL_METHODS = ["simclr", "sinsim", "gca_ince", "gca_rince", "gca_uot", "iot_cl", "vicreg", "barlow_twins"]


def _preset(description: str, method, search: Dict[str, Any], *, fixed=None, seeds=(0, 1, 2),
            sampler: str = "grid", num_samples: int = 1, metric: str = "knn_acc") -> Dict[str, Any]:
    return {
        "description": description,
        "method": method,
        "dataset": "digits",
        "fixed": {**_BASE_FIXED, **(fixed or {})},
        "search": search,
        "sampler": sampler,
        "num_samples": num_samples,
        "seeds": list(seeds),
        "scheduler": {"type": "none"},
        "metric": metric,
        "mode": "max",
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": 2,
    }


PRESETS: Dict[str, Dict[str, Any]] = {
    "sinsim_beta": _preset(
        "SinSim: OT weight beta in {0, 0.4, 0.8, 1.2} (beta=0 is SimCLR, the baseline), eps=0.05, 40 iterations, "
        "5 seeds (paired verdicts need them: 3 pairs detect only differences of several points)",
        "sinsim", {"beta": {"grid": [0.0, 0.4, 0.8, 1.2]}}, fixed={"eps": 0.05, "sinkhorn_iters": 40},
        seeds=(0, 1, 2, 3, 4)),
    "sinsim_eps": _preset(
        "SinSim: entropy eps in {0.01, 0.05, 0.1, 0.5} at beta=0.8, against SimCLR", ["simclr", "sinsim"],
        {"eps": {"grid": [0.01, 0.05, 0.1, 0.5]}}, fixed={"beta": 0.8, "sinkhorn_iters": 40}),
    "sinsim_iters": _preset(
        "SinSim: Sinkhorn iterations K in {1, 5, 10, 40, 100} at beta=0.8, eps=0.05, and the converged plan "
        "(Sinkhorn-Newton-Sparse to marginal error 1e-6, envelope gradient) as the reference; against SimCLR",
        None, {"cases": [{"method": "simclr"}] + [{"method": "sinsim", "sinkhorn_iters": k} for k in (1, 5, 10, 40, 100)]
               + [{"method": "sinsim", "ot_solver": "sns"}]},
        fixed={"beta": 0.8, "eps": 0.05}),
    "gca_iters": _preset(
        # the GCA paper's T (full Sinkhorn iterations; its code runs 10): T = 0.5 is the row update alone, InfoNCE,
        # which SimCLR at tau = eps = 0.5 also is
        "GCA-INCE: Sinkhorn iterations T in {0.5, 1, 3, 5, 10, 50} (T=0.5, the row update alone, is InfoNCE), "
        "against SimCLR (tau = eps = 0.5)", None,
        {"cases": [{"method": "simclr"}] + [{"method": "gca_ince", "gca_iters": t} for t in (0.5, 1, 3, 5, 10, 50)]},
        fixed={"eps": 0.5, "tau": 0.5}),
    "gca_uot_lambdas": _preset(
        "GCA-UOT: marginal penalties lambda1 x lambda2 in {0.1, 1, 10}^2, against SimCLR", ["simclr", "gca_uot"],
        {"uot_lambda1": {"grid": [0.1, 1.0, 10.0]}, "uot_lambda2": {"grid": [0.1, 1.0, 10.0]}},
        fixed={"eps": 0.5, "gca_iters": 5}, seeds=(0, 1)),
    "iotcl_relaxation": _preset(
        "IOT-CL: coupling set U(1), U(a), U(a,b) with K in {1, 2, 4, 8}, against SimCLR (U(a) at eps = tau is "
        "SimCLR)", None,
        {"cases": [{"method": "simclr"}, {"method": "iot_cl", "relaxation": "U1"},
                   {"method": "iot_cl", "relaxation": "Ua"}]
         + [{"method": "iot_cl", "relaxation": "Uab", "sinkhorn_iters": k} for k in (1, 2, 4, 8)]},
        fixed={"eps": 0.5, "tau": 0.5}),
    "iotcl_uniformity": _preset(
        "IOT-CL U(a): uniformity penalty lambda_p in {0, 0.1, 0.5, 1, 5, 10} (lambda_p = 0 is SimCLR, the baseline)",
        "iot_cl", {"lambda_p": {"grid": [0.0, 0.1, 0.5, 1.0, 5.0, 10.0]}}, fixed={"eps": 0.5, "relaxation": "Ua"}),
    "batch_size": _preset(
        "Batch size in {64, 128, 256, 512} for SimCLR, SinSim, GCA-INCE and IOT-CL", None,
        {"cases": [{"method": m} for m in ("simclr", "sinsim", "gca_ince", "iot_cl")],
         "batch_size": {"grid": [64, 128, 256, 512]}}, seeds=(0, 1)),
    "methods": _preset(
        "Every method at its paper defaults", None, {"cases": [{"method": m} for m in _ALL_METHODS]}),
    "overhead": _preset(
        "Timing only: every method x batch size {64, 128, 256, 512}, 3 epochs", None,
        {"cases": [{"method": m} for m in _ALL_METHODS], "batch_size": {"grid": [64, 128, 256, 512]}},
        fixed={"epochs": 3}, seeds=(0,), metric="knn_acc"),
    "sinsim_eps_tpe": _preset(
        "SinSim: TPE over beta in [0, 1.5] and eps in [0.01, 1] (log), 8 configurations x 2 seeds",
        "sinsim", {"beta": {"low": 0.0, "high": 1.5}, "eps": {"low": 0.01, "high": 1.0, "log": True}},
        sampler="tpe", num_samples=8, seeds=(0, 1), fixed={"sinkhorn_iters": 40}),
}


def get_preset(name: str) -> Dict[str, Any]:
    """A deep copy of the preset's spec dict, with ``name`` set."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    spec = copy.deepcopy(PRESETS[name])
    spec["name"] = name
    if spec["method"] is None:
        spec.pop("method")  # the methods come from the cases
    return spec
