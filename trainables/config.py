"""One trial's configuration: the flat Tune dict, validated against the knob table (``catalog.KNOBS``)."""
from __future__ import annotations

from typing import Any, Dict

from .catalog import (BANK_SMALLEST_CLASS, KNOBS, METHOD_INFO, check_ot_choice, check_rince,
                      default_knn_k)


class TrialConfig:
    """A trial's flat config: every key of :data:`catalog.KNOBS` as an attribute (``cfg.epochs``), checked against
    its type and range there. A method's knob left unset is None; :meth:`knob` gives the method's default then,
    and :meth:`method_knobs` the method's resolved keyword arguments (once per trial)."""

    __slots__ = ("_values",)

    def __init__(self, values: Dict[str, Any]):
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):  # _values itself before it is set (copy, pickle): not a knob, no recursion
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __reduce__(self):
        return TrialConfig, (dict(self._values),)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a TrialConfig is frozen; build another with TrialConfig.from_dict")

    def __repr__(self) -> str:
        return f"TrialConfig({self._values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrialConfig) and self._values == other._values

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrialConfig":
        """Build from a flat dict; unknown keys, wrong types and bad values raise ValueError (one line)."""
        unknown = sorted(set(d) - set(KNOBS))
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        values = {name: knob.check(d[name]) if name in d else knob.default for name, knob in KNOBS.items()}
        cfg = cls(values)
        cfg._check_rules()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._values)

    def knob(self, key: str) -> Any:
        """A knob of the trial's method: the config's value, else the method's default (None if it has none)."""
        value = self._values[key]
        if value is None and key == "ot_grad" and self._values.get("ot_solver") == "sns":
            return "implicit"  # SNS's only gradient (the table's default, unrolled, is Sinkhorn's)
        return value if value is not None else KNOBS[key].methods.get(self.method)

    def method_knobs(self) -> Dict[str, Any]:
        """The method's keyword arguments: each knob it reads, resolved (the config's value or its default)."""
        return {key: self.knob(key) for key in METHOD_INFO[self.method].knobs}

    def _check_rules(self) -> None:
        """The rules across knobs, after each knob's own check."""
        smallest = BANK_SMALLEST_CLASS.get(self.dataset)
        if self.knn_k is not None and smallest is not None and self.knn_k > smallest:
            raise ValueError(f"knn_k={self.knn_k}: above the smallest class of the {self.dataset} kNN bank "
                             f"({smallest} images): every query of that class would count other classes' votes; "
                             f"use at most {smallest} (default for {self.dataset}: {default_knn_k(smallest)})")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} > epochs={self.epochs}: the learning rate would "
                             f"never reach lr nor decay; use at most {self.epochs} warm-up epochs")
        if self.ot_solver == "sns" and self.ot_grad == "unrolled":
            raise ValueError("ot_grad='unrolled': ot_solver=sns has the implicit (envelope) gradient only; set "
                             "ot_grad: implicit or leave it out")
        knobs = METHOD_INFO[self.method].knobs
        try:
            if "ot_value" in knobs:
                solver = self.knob("ot_solver")
                grad = self.ot_grad or ("implicit" if solver == "sns" else self.knob("ot_grad"))
                check_ot_choice(self.knob("ot_value"), grad, solver)
            if "rince_lam" in knobs:  # GCA-RINCE; the authors' code's form takes logs (gca_rince_code)
                check_rince(self.knob("rince_q"), self.knob("rince_lam"), self.knob("eps"), self.batch_size)
            elif "rince_q" in knobs:
                check_rince(self.knob("rince_q"), None, self.knob("eps"))
        except ValueError as exc:
            raise ValueError(f"{self.method}: {exc}") from None
