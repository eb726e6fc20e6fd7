"""The study spec: YAML in, a validated :class:`Spec` out, or one line per problem.

Validation runs before anything is created (no directory, no Ray, no MLflow):
every problem is reported as ``field.path: what is wrong (allowed: ...)``.
YAML is read with a safe loader (nothing in a spec is evaluated as code) that also reads YAML 1.2's floats:
``lr: 3e-4`` is a number, as a user means it, not the string YAML 1.1 makes of it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import urlparse

import yaml

from search_spaces import grid

from .optuna_store import url_problem
from .storage import REMOTE_SCHEMES
from trainables.catalog import DATASET_TRAIN_SIZES, DATASETS, EMBEDDED_DATASETS, KNOBS, METHOD_INFO, default, knob_owners
from trainables.config import TrialConfig
from trainables.datasets import DatasetMissing, check_available

SAMPLERS = ("grid", "random", "tpe")
SCHEDULERS = ("none", "asha")
# metrics the trainable reports every epoch (a scheduler can act on these)
EPOCH_METRICS = ("knn_acc", "train_loss")
FINAL_METRICS = ("linear_acc", "knn5_acc", "test_linear_acc", "test_knn_acc", "test_knn5_acc", "align", "uniform")
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
SEED_LIMIT = 2**31  # a trial's seed; its generators' seeds are derived from it (trainables.pretrain_probe.stream_seed)
TOP_KEYS = ("name", "description", "method", "dataset", "fixed", "search", "sampler", "sampler_seed",
            "num_samples", "seeds", "scheduler", "metric", "mode", "resources", "max_concurrent",
            "storage", "mlflow_uri", "optuna_storage", "max_failures", "keep_checkpoints")
# config keys that belong to the study, not to fixed/search
RESERVED = ("method", "seed", "dataset")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """An invalid spec; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Spec:
    name: str
    methods: List[str]
    datasets: List[str] = field(default_factory=lambda: ["digits"])
    fixed: Dict[str, Any] = field(default_factory=dict)
    search: Dict[str, Any] = field(default_factory=dict)
    sampler: str = "grid"
    sampler_seed: int = 0
    num_samples: int = 1
    seeds: List[int] = field(default_factory=lambda: [0])
    scheduler: Dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    metric: str = "knn_acc"
    mode: str = "max"
    resources: Dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: int = 2
    storage: Optional[str] = None
    mlflow_uri: Optional[str] = None
    optuna_storage: Optional[str] = None  # the Optuna study's database URL (default: optuna.db in the study directory)
    max_failures: int = 1
    keep_checkpoints: str = "last"  # a finished trial's checkpoints: its last only, or all Tune kept ("all")
    description: str = ""

    # ---------------------------------------------------------------- derived
    @property
    def dataset(self) -> str:
        """The study's dataset (its first, for a study that spans several)."""
        return self.datasets[0]

    @property
    def grid_knobs(self) -> Dict[str, List[Any]]:
        return {k: list(v["grid"] if "grid" in v else v["choices"])
                for k, v in self.search.items() if k != "cases" and ("grid" in v or "choices" in v)}

    @property
    def cases_set_method(self) -> bool:
        return any("method" in c for c in self.cases)

    @property
    def cases(self) -> List[Dict[str, Any]]:
        return list(self.search.get("cases", []))

    def grid_configs(self) -> List[Dict[str, Any]]:
        """A grid study's configurations (no seed), in the order they start (:func:`search_spaces.grid.configs`)."""
        return grid.configs(self.methods, self.grid_knobs, self.cases, self.cases_set_method, self.datasets,
                            self.fixed)

    def n_configs(self) -> int:
        return len(self.grid_configs()) if self.sampler == "grid" else self.num_samples

    def n_trials(self) -> int:
        return self.n_configs() * len(self.seeds)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for one, many in (("method", "methods"), ("dataset", "datasets")):
            d[one] = d.pop(many)
            if len(d[one]) == 1:
                d[one] = d[one][0]
        return d

    def smoke(self) -> "Spec":
        """A seconds-long version: 3 epochs, at most 2 values per knob, 2 cases, 2 seeds."""
        s = dataclasses.replace(self, fixed=dict(self.fixed), search={})
        s.fixed["epochs"] = min(int(self.fixed.get("epochs", 3)), 3)
        if "warmup_epochs" in s.fixed:
            s.fixed["warmup_epochs"] = min(int(s.fixed["warmup_epochs"]), s.fixed["epochs"])
        for k, v in self.search.items():
            if k == "cases":
                s.search[k] = list(v)[:2]
            elif "grid" in v:
                s.search[k] = {"grid": list(v["grid"])[:2]}
            elif "choices" in v:
                s.search[k] = {"choices": list(v["choices"])[:2]}
            else:
                s.search[k] = dict(v)
        s.methods = self.methods[:2]
        s.datasets = self.datasets[:2]
        s.seeds = self.seeds[:2]
        s.num_samples = min(self.num_samples, 2)
        if s.scheduler.get("type") == "asha":
            s.scheduler = {**s.scheduler, "grace_period": 1}
        return s


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's exponent floats (``3e-4``, ``1E5``; 1.1 wants ``3.0e-4``)."""


_SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SpecLoader)


def read_study(study_dir: Path) -> Spec:
    """The spec a study ran with; a clear error if ``study_dir`` is not a study."""
    f = Path(study_dir) / "spec.yaml"
    if not f.is_file():
        raise ValueError(f"{study_dir} is not an otstudy study directory (no spec.yaml)")
    return parse_spec(load_yaml(f.read_text()))


def load_spec_file(path: str | Path) -> Spec:
    p = Path(path)
    if not p.is_file():
        raise SpecError([f"{p}: no such spec file"])
    try:
        raw = load_yaml(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{p}: malformed YAML{where}: {problem}"]) from None
    if not isinstance(raw, dict):
        raise SpecError([f"{p}: a spec must be a YAML mapping (name: ..., method: ...), got {type(raw).__name__}"])
    return parse_spec(raw)


def parse_spec(raw: Dict[str, Any]) -> Spec:
    """Validate a spec dict; raise :class:`SpecError` listing every problem."""
    problems: List[str] = []
    p = problems.append
    for k in raw:
        if k not in TOP_KEYS:
            p(f"{k}: unknown field (allowed: {', '.join(TOP_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        p(f"name: must be a non-empty string of letters, digits, '_', '.', '-' (got {name!r})")
    methods = _methods(raw, p)
    datasets, fixed, search, sampler = _check_trials(raw, methods, p)
    num_samples, seeds, scheduler, metric, mode = _check_runs(raw, fixed, sampler, p)
    resources, max_concurrent, max_failures, sampler_seed = _check_resources(raw, p)
    keep_checkpoints = raw.get("keep_checkpoints", "last")
    if keep_checkpoints not in ("last", "all"):
        p(f"keep_checkpoints: {keep_checkpoints!r} is not last or all (a finished trial keeps its last checkpoint, "
          f"or all Tune kept)")
    storage, mlflow_uri = _check_places(raw, p)
    optuna_storage = raw.get("optuna_storage")
    if optuna_storage is not None:
        if sampler == "grid":
            p("optuna_storage: a grid study has no Optuna study (its sampler is grid; use tpe or random)")
        elif url_problem(optuna_storage):
            p(f"optuna_storage: {url_problem(optuna_storage)}")
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))  # a problem found once per dataset is said once
    spec = Spec(name=name, methods=methods, datasets=datasets, fixed=dict(fixed), search=dict(search),
                sampler=sampler, sampler_seed=sampler_seed, num_samples=num_samples, seeds=list(seeds),
                scheduler=dict(scheduler), metric=metric, mode=mode, resources=resources,
                max_concurrent=max_concurrent, storage=storage, mlflow_uri=mlflow_uri,
                optuna_storage=optuna_storage, max_failures=max_failures,
                keep_checkpoints=keep_checkpoints, description=str(raw.get("description", "")))
    _check_batch_size(spec)
    return spec


def _check_trials(raw, methods, p):
    """What the trials run: (datasets, fixed, search, sampler); every knob, value and range end checked against
    the knob table, and who reads each knob."""
    datasets = _datasets(raw, p)
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        p(f"fixed: must be a mapping of config keys to values (got {type(fixed).__name__})")
        fixed = {}
    search = raw.get("search", {}) or {}
    if not isinstance(search, dict):
        p(f"search: must be a mapping of config keys to domains (got {type(search).__name__})")
        search = {}
    known = set(KNOBS)
    for k in fixed:
        if k in RESERVED:
            p(f"fixed.{k}: set '{k}' at the top level of the spec" if k != "seed"
              else "fixed.seed: use the top-level 'seeds' list")
        elif k not in known:
            p(f"fixed.{k}: unknown config key (allowed: {', '.join(sorted(known - set(RESERVED)))})")
    sampler = raw.get("sampler", "grid")
    if sampler not in SAMPLERS:
        p(f"sampler: {sampler!r} is not a sampler (allowed: {', '.join(SAMPLERS)})")
    _check_search(search, known, sampler, p)
    if len(datasets) > 1 and sampler != "grid":
        p(f"dataset: a list of datasets needs the grid sampler (its trials run on each); with {sampler}, run one "
          f"study per dataset")
    # conditional knobs: a method knob must be used by at least one of the study's methods
    _check_knob_owners(methods, fixed, search, p)
    for dataset in datasets:
        base = {k: v for k, v in fixed.items() if k in known and k not in RESERVED}
        base["dataset"] = dataset
        # every grid value and range end must make a valid trial config
        if methods:
            _check_values(methods, base, search, p)
        if dataset not in EMBEDDED_DATASETS and isinstance(fixed.get("data_root", ""), (str, type(None))):
            try:
                check_available(dataset, fixed.get("data_root"), bool(fixed.get("download", False)))
            except (DatasetMissing, ValueError) as exc:
                p(f"fixed.data_root: {exc}")
    return datasets, fixed, search, sampler


def _datasets(raw, p) -> List[str]:
    """The spec's dataset, or its list of datasets (a grid study runs its trials on each)."""
    d = raw.get("dataset", "digits")
    names = [d] if isinstance(d, str) else d
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        p(f"dataset: must be a dataset name or a list of names (got {d!r})")
        return ["digits"]
    for x in names:
        if x not in DATASETS:
            p(f"dataset: unknown dataset {x!r} (allowed: {', '.join(DATASETS)})")
    if len(set(names)) != len(names):
        p(f"dataset: contains duplicates ({names})")
    return [x for x in names if x in DATASETS] or ["digits"]


def _check_runs(raw, fixed, sampler, p):
    """How many trials and how they are judged: (num_samples, seeds, scheduler, metric, mode)."""
    num_samples = raw.get("num_samples", 1)
    if not _is_int(num_samples) or num_samples < 1:
        p(f"num_samples: must be an integer >= 1 (got {num_samples!r})")
    elif sampler == "grid" and num_samples != 1:  # Tune would run every grid point that many times, seeds alike
        p(f"num_samples: the grid runs each configuration once per seed; repeat it with more seeds "
          f"(got num_samples {num_samples})")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        p(f"seeds: must be a non-empty list of integers (got {seeds!r})")
        seeds = [0]
    elif len(set(seeds)) != len(seeds):
        p(f"seeds: contains duplicates ({seeds})")
    elif not all(0 <= s < SEED_LIMIT for s in seeds):
        p(f"seeds: each must be in [0, {SEED_LIMIT}) (got {seeds})")
    scheduler = raw.get("scheduler", {"type": "none"}) or {"type": "none"}
    if isinstance(scheduler, str):
        scheduler = {"type": scheduler}
    metric = raw.get("metric", "knn_acc")
    mode = raw.get("mode", "max")
    _check_scheduler(scheduler, metric, fixed, p)
    if metric not in EPOCH_METRICS + FINAL_METRICS:
        p(f"metric: {metric!r} is not reported by the trainable (allowed: {', '.join(EPOCH_METRICS + FINAL_METRICS)})")
    if mode not in ("max", "min"):
        p(f"mode: must be 'max' or 'min' (got {mode!r})")
    return num_samples, seeds, scheduler, metric, mode


def _check_resources(raw, p):
    """What each trial books and how many run: ({cpu, gpu}, max_concurrent, max_failures, sampler_seed)."""
    resources = raw.get("resources", {"cpu": 1, "gpu": 0}) or {}
    if not isinstance(resources, dict):
        p("resources: must be a mapping like {cpu: 1, gpu: 0.5}")
        resources = {}
    for k in resources:
        if k not in ("cpu", "gpu"):
            p(f"resources.{k}: unknown resource (allowed: cpu, gpu)")
    cpu = resources.get("cpu", 1)
    gpu = resources.get("gpu", 0)
    if not _is_num(cpu) or cpu <= 0:
        p(f"resources.cpu: must be a number > 0; every trial books CPUs, also with a GPU (got {cpu!r})")
    if not _is_num(gpu) or gpu < 0:
        p(f"resources.gpu: must be a number >= 0, fractions allowed (got {gpu!r})")
    elif gpu > 1 and not float(gpu).is_integer():
        p(f"resources.gpu: fractions above 1 are not schedulable; use an integer (got {gpu})")
    max_concurrent = raw.get("max_concurrent", 2)
    if not _is_int(max_concurrent) or max_concurrent < 1:
        p(f"max_concurrent: must be an integer >= 1 (got {max_concurrent!r})")
    max_failures = raw.get("max_failures", 1)
    if not _is_int(max_failures) or max_failures < 0:
        p(f"max_failures: must be an integer >= 0 (got {max_failures!r})")
    sampler_seed = raw.get("sampler_seed", 0)
    if not _is_int(sampler_seed):
        p(f"sampler_seed: must be an integer (got {sampler_seed!r})")
    return {"cpu": cpu, "gpu": gpu}, max_concurrent, max_failures, sampler_seed


def _check_places(raw, p):
    """Where the study lives and is tracked: (storage, mlflow_uri)."""
    storage = raw.get("storage")
    if storage is not None:
        if not isinstance(storage, str) or not storage:
            p(f"storage: must be a path or URI string (got {storage!r})")
        elif urlparse(storage).scheme not in ("", "file", *REMOTE_SCHEMES):
            p(f"storage: unsupported URI scheme {urlparse(storage).scheme!r} (allowed: a local or shared-"
              f"filesystem path, file://, or an object store: {', '.join(s + '://' for s in REMOTE_SCHEMES)})")
        elif urlparse(storage).scheme in REMOTE_SCHEMES and not urlparse(storage).netloc:
            p(f"storage: {storage!r} names no bucket (e.g. s3://my-bucket/studies)")
    mlflow_uri = raw.get("mlflow_uri")
    if mlflow_uri is not None:
        if not isinstance(mlflow_uri, str) or urlparse(mlflow_uri).scheme not in TRACKING_SCHEMES:
            p(f"mlflow_uri: {mlflow_uri!r} is not a tracking URI (allowed schemes: {', '.join(TRACKING_SCHEMES)})")
    return storage, mlflow_uri


# --------------------------------------------------------------------------- helpers


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _methods(raw, p) -> List[str]:
    m = raw.get("method")
    cases = (raw.get("search") or {}).get("cases") if isinstance(raw.get("search"), dict) else None
    case_methods = [c.get("method") for c in cases or [] if isinstance(c, dict) and "method" in c]
    if m is None:
        if case_methods:
            out = []
            for cm in case_methods:
                if cm not in out:
                    out.append(cm)
            m = out
        else:
            p(f"method: required (one of {', '.join(sorted(METHOD_INFO))}, or a list of them)")
            return []
    methods = [m] if isinstance(m, str) else m
    if not isinstance(methods, list) or not methods or not all(isinstance(x, str) for x in methods):
        p(f"method: must be a method name or a list of names (got {m!r})")
        return []
    bad = [x for x in methods if x not in METHOD_INFO]
    for x in bad:
        p(f"method: unknown method {x!r} (allowed: {', '.join(sorted(METHOD_INFO))})")
    if len(set(methods)) != len(methods):
        p(f"method: contains duplicates ({methods})")
    return [] if bad else methods


def _check_search(search, known, sampler, p) -> None:
    for k, dom in search.items():
        path = f"search.{k}"
        if k == "cases":
            if not isinstance(dom, list) or not dom or not all(isinstance(c, dict) and c for c in dom):
                p(f"{path}: must be a non-empty list of non-empty mappings of config overrides")
                continue
            for i, case in enumerate(dom):
                for ck in case:
                    if ck not in known and ck != "method":
                        p(f"{path}[{i}].{ck}: unknown config key")
                    elif ck in ("seed", "dataset"):
                        p(f"{path}[{i}].{ck}: not allowed in a case")
            continue
        if k in ("seed", "dataset"):
            p(f"{path}: '{k}' cannot be searched (use 'seeds' / one study per dataset)")
            continue
        if k == "method":
            p(f"{path}: list methods in the top-level 'method' field or in 'cases'")
            continue
        if k not in known:
            p(f"{path}: unknown config key (allowed: {', '.join(sorted(known - set(RESERVED)))})")
            continue
        if not isinstance(dom, dict):
            p(f"{path}: must be {{grid: [...]}}, {{choices: [...]}} or {{low: x, high: y, log: bool}} (got {dom!r})")
            continue
        forms = [f for f in ("grid", "choices", "low") if f in dom]
        extra = set(dom) - {"grid", "choices", "low", "high", "log"}
        if extra:
            p(f"{path}: unknown domain field(s) {', '.join(sorted(extra))} (allowed: grid, choices, low, high, log)")
        if len(forms) != 1:
            p(f"{path}: give exactly one of grid, choices or low/high")
            continue
        if forms[0] in ("grid", "choices"):
            vals = dom[forms[0]]
            if not isinstance(vals, list) or not vals:
                p(f"{path}.{forms[0]}: must be a non-empty list")
        else:
            lo, hi = dom.get("low"), dom.get("high")
            if not (_is_num(lo) and _is_num(hi)) or not lo < hi:
                p(f"{path}: low and high must be numbers with low < high (got low={lo!r}, high={hi!r})")
            elif dom.get("log") and lo <= 0:
                p(f"{path}: a log range needs low > 0 (got low={lo})")
            if "log" in dom and not isinstance(dom["log"], bool):
                p(f"{path}.log: must be true or false")
            if sampler == "grid":
                p(f"{path}: a range needs sampler random or tpe; the grid sampler takes {{grid: [...]}}")


# a knob some methods read under another name now: key -> (the new key, why)
RENAMED = {"sinkhorn_iters": ("gca_iters", "GCA counts its iterations in gca_iters, full Sinkhorn iterations as the "
                                           "paper does (0.5 = the row update alone, InfoNCE); sinkhorn_iters "
                                           "counted single projections for it")}


def _check_knob_owners(methods, fixed, search, p) -> None:
    if not methods:
        return
    owners = knob_owners()

    def check(path, k, runs, what):
        if k not in owners or set(owners[k]) & set(runs):
            return
        new, why = RENAMED.get(k, (None, ""))
        if new is not None and set(owners.get(new, ())) & set(runs):
            p(f"{path}: {why}; use {new}")
        else:
            p(f"{path}: only used by {', '.join(owners[k])}; {what} runs {', '.join(runs)}")

    for where, keys in (("fixed", fixed.keys()), ("search", [k for k in search if k != "cases"])):
        for k in keys:
            check(f"{where}.{k}", k, methods, "this study")
    for i, case in enumerate(search.get("cases", []) if isinstance(search.get("cases"), list) else []):
        if not isinstance(case, dict):
            continue
        for k in case:
            check(f"search.cases[{i}].{k}", k, [case["method"]] if "method" in case else methods, "this case")


def _check_values(methods, base, search, p) -> None:
    """Build a TrialConfig for every single grid value / range end and report the failures."""

    def check(path, overrides):
        for m in methods:
            try:
                TrialConfig.from_dict({**base, "method": m, **overrides})
            except ValueError as exc:
                p(f"{path}: {exc}")
                return False
        return True

    if not check("fixed", {}):
        return
    for k, dom in search.items():
        if not isinstance(dom, (dict, list)):
            continue
        if k == "cases" and isinstance(dom, list):
            for i, case in enumerate(dom):
                if isinstance(case, dict):
                    c = dict(case)
                    m = c.pop("method", None)
                    if m is not None and m not in METHOD_INFO:
                        p(f"search.cases[{i}].method: unknown method {m!r} (allowed: {', '.join(sorted(METHOD_INFO))})")
                        continue
                    try:
                        TrialConfig.from_dict({**base, "method": m or methods[0], **c})
                    except ValueError as exc:
                        p(f"search.cases[{i}]: {exc}")
            continue
        if not isinstance(dom, dict):
            continue
        for form in ("grid", "choices"):
            if isinstance(dom.get(form), list):
                for i, v in enumerate(dom[form]):
                    check(f"search.{k}.{form}[{i}]", {k: v})
        if "low" in dom and _is_num(dom.get("low")) and _is_num(dom.get("high")):
            check(f"search.{k}.low", {k: dom["low"]})
            check(f"search.{k}.high", {k: dom["high"]})


def _check_scheduler(scheduler, metric, fixed, p) -> None:
    if not isinstance(scheduler, dict):
        p("scheduler: must be a mapping like {type: asha, grace_period: 10}")
        return
    t = scheduler.get("type", "none")
    if t not in SCHEDULERS:
        p(f"scheduler.type: {t!r} is not a scheduler (allowed: {', '.join(SCHEDULERS)})")
        return
    extra = set(scheduler) - {"type", "grace_period", "reduction_factor", "max_epochs"}
    if extra:
        p(f"scheduler: unknown field(s) {', '.join(sorted(extra))} (allowed: type, grace_period, reduction_factor, max_epochs)")
    if t == "asha":
        gp = scheduler.get("grace_period", 1)
        rf = scheduler.get("reduction_factor", 2)
        if not _is_int(gp) or gp < 1:
            p(f"scheduler.grace_period: must be an integer >= 1 epoch (got {gp!r})")
        if not _is_num(rf) or rf <= 1:
            p(f"scheduler.reduction_factor: must be a number > 1 (got {rf!r})")
        if metric not in EPOCH_METRICS:
            p(f"metric: ASHA prunes on a per-epoch metric (allowed: {', '.join(EPOCH_METRICS)}; got {metric!r})")


def _check_batch_size(spec: Spec) -> None:
    values = [spec.fixed.get("batch_size", default("batch_size"))]
    values += spec.grid_knobs.get("batch_size", [])
    values += [c["batch_size"] for c in spec.cases if "batch_size" in c]
    for dataset in spec.datasets:
        size = DATASET_TRAIN_SIZES.get(dataset)
        for v in values if size is not None else []:
            if isinstance(v, int) and v > size:
                raise SpecError([f"batch_size: {v} is larger than the {dataset} training split ({size} images)"])
