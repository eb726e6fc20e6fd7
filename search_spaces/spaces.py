"""Define-by-run search spaces for Optuna.

Ray's OptunaSearch pickles the space by reference, so a space must be an
importable module-level object: :class:`DefineByRun` is a module-level class
whose instances carry the spec's ``search`` block as plain data.

Conditional knobs exist only where they mean something: a knob that only
some methods read (``uot_lambda1`` for gca_uot, ``lambda_p`` for iot_cl, ...)
is suggested only in trials of those methods, so Optuna's model never learns
from a value that had no effect.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from trainables.catalog import METHOD_INFO as METHODS

# integer config keys: ranges over these are sampled as integers
INT_KNOBS = ("sinkhorn_iters", "batch_size", "epochs", "warmup_epochs", "proj_hidden", "proj_dim",
             "knn_k", "probe_every")
# knobs in steps of one half: GCA's iterations (0.5 = the row update alone); a log range takes whole iterations
HALF_KNOBS = ("gca_iters",)


def knob_owners() -> Dict[str, List[str]]:
    """Config key -> the methods that read it."""
    owners: Dict[str, List[str]] = {}
    for m in METHODS.values():
        for k in m.knobs:
            owners.setdefault(k, []).append(m.name)
    return owners


class DefineByRun:
    """A define-by-run space: ``space(trial) -> constants``.

    Args:
        search: the spec's search block (knob -> {grid|choices|low/high/log}, and ``cases``).
        methods: the study's methods; more than one adds a categorical ``method``.
    """

    def __init__(self, search: Dict[str, Any], methods: List[str]):
        self.search = search
        self.methods = list(methods)

    def __call__(self, trial) -> Optional[Dict[str, Any]]:
        constants: Dict[str, Any] = {}
        cases = self.search.get("cases")
        method = self.methods[0]
        if cases:
            idx = trial.suggest_categorical("case", list(range(len(cases))))
            constants.update(cases[idx])
            method = cases[idx].get("method", method)
        if len(self.methods) > 1 and "method" not in constants:
            method = trial.suggest_categorical("method", self.methods)
        elif "method" not in constants:
            constants["method"] = method
        owners = knob_owners()
        for knob, dom in self.search.items():
            if knob == "cases" or knob in constants:
                continue
            if knob in owners and method not in owners[knob]:
                continue  # conditional: this method has no such knob
            if "grid" in dom or "choices" in dom:
                trial.suggest_categorical(knob, list(dom.get("grid", dom.get("choices"))))
            elif knob in INT_KNOBS or (knob in HALF_KNOBS and dom.get("log")):
                trial.suggest_int(knob, math.ceil(dom["low"]), int(dom["high"]), log=bool(dom.get("log", False)))
            elif knob in HALF_KNOBS:
                trial.suggest_float(knob, math.ceil(2 * dom["low"]) / 2, math.floor(2 * dom["high"]) / 2, step=0.5)
            else:
                trial.suggest_float(knob, float(dom["low"]), float(dom["high"]), log=bool(dom.get("log", False)))
        return constants
