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

from trainables.catalog import DECIDING_KNOBS, KNOBS, inert_knobs, knob_owners  # noqa: F401  (knob_owners re-exported)


def suggest_range(trial, knob: str, dom: Dict[str, Any]) -> None:
    """Sample a range as the knob's table entry says: integers for an int knob, multiples of its ``step`` (GCA's
    half iterations; a log range of such a knob takes whole ones), floats otherwise."""
    k = KNOBS[knob]
    log = bool(dom.get("log", False))
    if k.type is int or (k.step is not None and log):
        trial.suggest_int(knob, math.ceil(dom["low"]), int(dom["high"]), log=log)
    elif k.step is not None:
        trial.suggest_float(knob, math.ceil(dom["low"] / k.step) * k.step, math.floor(dom["high"] / k.step) * k.step,
                            step=k.step)
    else:
        trial.suggest_float(knob, float(dom["low"]), float(dom["high"]), log=log)


class DefineByRun:
    """A define-by-run space: ``space(trial) -> constants``.

    Args:
        search: the spec's search block (knob -> {grid|choices|low/high/log}, and ``cases``).
        methods: the study's methods; more than one adds a categorical ``method``.
        fixed: the spec's fixed knobs (they decide, with the sampled ones, which knobs are inert).
    """

    def __init__(self, search: Dict[str, Any], methods: List[str], fixed: Optional[Dict[str, Any]] = None):
        self.search = search
        self.methods = list(methods)
        self.fixed = dict(fixed or {})

    def __setstate__(self, state: Dict[str, Any]) -> None:  # a space pickled before ``fixed`` existed
        self.__dict__.update({"fixed": {}, **state})

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
        order = sorted(self.search, key=lambda k: k not in DECIDING_KNOBS)  # relaxation before sinkhorn_iters
        for knob in order:
            dom = self.search[knob]
            if knob == "cases" or knob in constants:
                continue
            if knob in owners and method not in owners[knob]:
                continue  # conditional: this method has no such knob
            if knob in inert_knobs(method, {**self.fixed, **trial.params, **constants}):
                continue  # and none where another setting makes it inert (IOT-CL's iterations under U(a))
            if "grid" in dom or "choices" in dom:
                trial.suggest_categorical(knob, list(dom.get("grid", dom.get("choices"))))
            else:
                suggest_range(trial, knob, dom)
        return constants
