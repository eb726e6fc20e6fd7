"""A study's Optuna record in an Optuna storage, for Optuna's own tools.

``optuna.load_study``, ``optuna.visualization`` and optuna-dashboard open an Optuna storage. A study with an
Optuna sampler keeps its Optuna study in one: ``optuna.db`` (sqlite) in the study directory, or the database
URL a spec's ``optuna_storage`` (or ``otstudy run --optuna-storage``) names; the Optuna study's name is the
otstudy study's.

The storage holds a copy of the sampler's own study, trial for trial and in the same order: the same numbers,
params (the searched knobs; a knob the trial's method does not read is absent), distributions, states
(COMPLETE, PRUNED, FAIL, RUNNING) and values (the seed-averaged objective the sampler was told), and the user
attribute ``tune_trials``: the Tune trials (one per seed) of the configuration. The sampler itself works on
the in-memory study Ray's ``OptunaSearch`` pickles with the experiment, because that is the study Tune
restores after a kill and the resume repairs put in step with Tune's trials. Handing Ray the storage
instead would leave it ahead of the restored searcher after a kill -9: a trial asked after Tune's last save
of the searcher would stay RUNNING in it forever, and one told after it would be told again.

The copy is written as the searcher asks and tells (a local driver: live, for the dashboard), and brought
fully in step when a study starts, resumes and ends; when the storage holds a trial the sampler's study does
not (asked by a driver killed before Tune saved the searcher), its Optuna study is rebuilt from the
sampler's. A storage that cannot be opened when a study starts or resumes is an error (one line, exit 2,
nothing run); a write that fails during the run is one warning, and the study goes on (its end or the next
resume brings the storage in step).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence
from urllib.parse import urlparse

if TYPE_CHECKING:
    import optuna


DEFAULT_FILE = "optuna.db"
RETRY_AFTER_S = 60.0  # after a failed write, the searcher's next attempt
DIALECTS = ("sqlite", "postgresql", "mysql")  # SQLAlchemy's, as Optuna's RDBStorage takes them ("+driver" allowed)


class OptunaStorageError(ValueError):
    """An Optuna storage that cannot be opened or written (one line)."""


def storage_url(study_dir: Path, given: Optional[str]) -> str:
    """The study's Optuna storage: ``given`` (a spec's ``optuna_storage``), else ``optuna.db`` in the study
    directory (resolved where the study is now, so a moved or mirrored study finds its own)."""
    return given or f"sqlite:///{(Path(study_dir) / DEFAULT_FILE).resolve()}"


def url_problem(url: object) -> Optional[str]:
    """Why ``url`` cannot be an Optuna storage URL, or None."""
    if not isinstance(url, str) or not url:
        return f"{url!r} is not a database URL"
    parsed = urlparse(url)
    if parsed.scheme.split("+")[0] not in DIALECTS:
        return f"{display(url)} is not a database URL (allowed: {', '.join(d + '://' for d in DIALECTS)})"
    if parsed.password:
        return (f"{display(url)}: a password in the URL would be written to spec.yaml and MLflow; give it to "
                f"the database client instead (PGPASSWORD or ~/.pgpass for PostgreSQL, ~/.my.cnf for MySQL)")
    return None


def display(url: str) -> str:
    """``url`` without a password."""
    p = urlparse(url)
    return url.replace(f":{p.password}@", ":***@") if p.password else url


class OptunaStore:
    """The Optuna storage of one study, kept in step with the sampler's study (see the module docstring)."""

    def __init__(self, url: str, name: str, mode: str, lock_timeout_s: float = 10.0):
        self.url, self.name, self.lock_timeout_s = url, name, lock_timeout_s
        self.direction = "maximize" if mode == "max" else "minimize"
        self._storage = None
        self._written: Dict[int, "optuna.trial.TrialState"] = {}  # trial number -> its state in the storage
        self._ids: Dict[int, int] = {}  # trial number -> the storage's trial id
        self._linked: Dict[int, List[str]] = {}  # trial number -> the Tune trials its user attribute names
        self._warned = False
        self._retry_at = 0.0  # after a failed write, live publishes wait until then (the study's end does not)

    # ------------------------------------------------------------------ opening
    def open(self, *, new: bool) -> None:
        """Open the storage and its study (created if absent); :class:`OptunaStorageError` if it cannot be, or,
        for a ``new`` study, if the storage already holds trials under this name (another study's)."""
        import optuna  # 0.3-0.5 s: not for the CLI's spec checks, which read this module's URL rules

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB ..."
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's "experimental" notes
                self._storage = optuna.storages.RDBStorage(self.url, engine_kwargs=self._engine_kwargs())
                study = optuna.create_study(storage=self._storage, study_name=self.name, direction=self.direction,
                                            load_if_exists=True)
                held = len(study.get_trials(deepcopy=False))
        except Exception as exc:  # SQLAlchemy's errors name the problem ("file is not a database", "locked")
            self._storage = None
            raise OptunaStorageError(f"Optuna storage {display(self.url)}: cannot be opened "
                                     f"({_one_line(exc)})") from None
        if new and held:
            raise OptunaStorageError(f"Optuna storage {display(self.url)} already holds a study named {self.name} "
                                     f"({held} trials); choose another --name or optuna_storage")

    def _engine_kwargs(self) -> Dict:
        # how long to wait for another writer's lock (sqlite; 10 s by default, SQLAlchemy's is 5 s) or for a
        # database server to answer (PostgreSQL, MySQL: their drivers' connect timeout, none by default)
        if self.url.startswith("sqlite"):
            return {"connect_args": {"timeout": self.lock_timeout_s}}
        return {"connect_args": {"connect_timeout": max(1, round(self.lock_timeout_s))}}

    # ------------------------------------------------------------------ keeping in step
    def publish(self, source: "optuna.Study", links: Optional[Dict[int, List[str]]] = None, *,
                live: bool = False) -> bool:
        """Bring the storage in step with ``source`` (the sampler's study); ``links``: trial number -> its Tune
        trials. Returns whether it worked; a failure is logged once, not raised (the study goes on). A ``live``
        publish (the searcher's, at every ask and tell) is skipped for a minute after a failure, so that a
        locked file or a database that does not answer holds Tune's loop up once a minute, not at every step."""
        if live and time.monotonic() < self._retry_at:
            return False
        try:
            self._publish(source.get_trials(deepcopy=False), links or {})
            return True
        except Exception as exc:
            self._written.clear()
            self._ids.clear()  # checked afresh next time
            self._linked.clear()
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            if not self._warned:
                self._warned = True
                print(f"[otstudy] warning: Optuna storage {display(self.url)} could not be written "
                      f"({_one_line(exc)}); the study goes on, and its end or a resume brings the storage in step")
            return False

    def _publish(self, trials: Sequence["optuna.trial.FrozenTrial"], links: Dict[int, List[str]]) -> None:
        if self._storage is None:
            self.open(new=False)
        if not self._written:
            self._check(trials)
        for t in trials:
            if t.number not in self._written:
                self._add(t, links.get(t.number))
            elif self._written[t.number] != t.state:
                self._finish(t, links.get(t.number))
            elif links.get(t.number) and links[t.number] != self._linked.get(t.number) \
                    and t.state == optuna_state("RUNNING"):  # a seed joined a running configuration
                self._storage.set_trial_user_attr(self._ids[t.number], "tune_trials", list(links[t.number]))
                self._linked[t.number] = list(links[t.number])

    def _study_id(self) -> int:
        return self._storage.get_study_id_from_name(self.name)

    def _check(self, trials: Sequence["optuna.trial.FrozenTrial"]) -> None:
        """Read what the storage holds; rebuild its study when it is not a prefix of ``trials`` (a trial it
        holds that the sampler's study does not, or one that differs other than by a trial since finished)."""
        import optuna

        held = self._storage.get_all_trials(self._study_id(), deepcopy=False)
        mine = {t.number: t for t in trials}
        ok = all(h.number in mine and h.params == mine[h.number].params and
                 (h.state == mine[h.number].state and h.values == mine[h.number].values
                  or h.state == optuna.trial.TrialState.RUNNING) for h in held)
        if not ok:
            orphans = sum(h.number not in mine for h in held)
            optuna.delete_study(study_name=self.name, storage=self._storage)
            self._storage.create_new_study([_direction(self.direction)], self.name)
            print(f"[otstudy] Optuna storage {display(self.url)}: study {self.name} rebuilt from the sampler's as "
                  f"Tune last saved it (it held {orphans} trial(s) asked, or others told, by a driver after that "
                  f"save: a killed driver's)")
            held = []
        self._written = {h.number: h.state for h in held}
        self._ids = {h.number: h._trial_id for h in held}
        self._linked = {h.number: list(h.user_attrs.get("tune_trials", [])) for h in held}

    def _add(self, t: "optuna.trial.FrozenTrial", tune_trials: Optional[List[str]]) -> None:
        import optuna

        attrs = {**t.user_attrs, **({"tune_trials": list(tune_trials)} if tune_trials else {})}
        template = optuna.trial.create_trial(state=t.state, params=t.params, distributions=t.distributions,
                                             values=t.values, user_attrs=attrs)
        tid = self._storage.create_new_trial(self._study_id(), template_trial=template)
        self._written[t.number], self._ids[t.number] = t.state, tid
        self._linked[t.number] = list(tune_trials or [])
        got = self._storage.get_trial_number_from_id(tid)
        if got != t.number:  # the storage numbers its trials itself: they must be the sampler's
            raise RuntimeError(f"trial {t.number} became number {got} in the storage")

    def _finish(self, t: "optuna.trial.FrozenTrial", tune_trials: Optional[List[str]]) -> None:
        tid = self._ids[t.number]
        if tune_trials and tune_trials != self._linked.get(t.number):
            self._storage.set_trial_user_attr(tid, "tune_trials", list(tune_trials))
            self._linked[t.number] = list(tune_trials)
        self._storage.set_trial_state_values(tid, t.state, t.values)
        self._written[t.number] = t.state


def optuna_state(name: str):
    import optuna

    return optuna.trial.TrialState[name]


def _direction(direction: str):
    import optuna

    return optuna.study.StudyDirection.MAXIMIZE if direction == "maximize" else optuna.study.StudyDirection.MINIMIZE


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class AddedTrial:
    """The sampler's record of a trial added back for a configuration whose ask a killed driver lost (see
    :class:`study.searcher.PrunedAwareOptunaSearch`): its number and storage id, as an ``optuna.Trial`` has them."""

    __slots__ = ("number", "_trial_id")

    def __init__(self, number: int, trial_id: int):
        self.number, self._trial_id = number, trial_id

    def __getstate__(self):
        return (self.number, self._trial_id)

    def __setstate__(self, state):
        self.number, self._trial_id = state


# ---------------------------------------------------------------------- the driver's live copy

_LIVE: Optional[OptunaStore] = None


@contextlib.contextmanager
def live(store: Optional[OptunaStore]) -> Iterator[None]:
    """While Tune runs in this driver, the searcher publishes its study to ``store`` as it asks and tells."""
    global _LIVE
    _LIVE = store
    try:
        yield
    finally:
        _LIVE = None


def publishing() -> bool:
    """Whether the searcher in this driver has a storage to publish to (see :func:`live`)."""
    return _LIVE is not None


def publish_live(source: "optuna.Study", links: Dict[int, List[str]]) -> None:
    if _LIVE is not None:
        _LIVE.publish(source, links, live=True)
