"""Searcher adapters around Ray's OptunaSearch.

Two fixes over the stock integration:

* :class:`PrunedAwareOptunaSearch` tells Optuna ``PRUNED`` for a trial the
  scheduler stopped before its last epoch (stock OptunaSearch records it as
  ``COMPLETE`` with its low-fidelity value, which misleads TPE), and adds back
  a finished trial whose Optuna record a killed driver lost (stock
  OptunaSearch raises ``KeyError`` there, which ends the study).
* :class:`SeedRepeater` runs each suggested configuration once per seed and
  tells the inner searcher the mean over seeds only when every seed has
  finished; a configuration with any pruned seed is pruned, any failed seed
  fails it. Its bookkeeping is saved with the experiment (get_state), so a
  resumed study keeps its groups; a seed that only finishes after a resume
  still completes its group. :func:`reconcile_with_snapshot` puts the groups
  back in step with Tune's recorded trials when a kill left them apart.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Dict, List, Optional

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .optuna_store import AddedTrial, publish_live, publishing

FINAL_KEY = "final"  # the trainable's last report carries final=1
logger = logging.getLogger(__name__)


class PrunedAwareOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False):
        final = bool(result and not error and result.get(FINAL_KEY))
        if trial_id not in self._ot_trials and trial_id not in self._completed_trials:
            # a suggestion whose record was lost with a killed driver (its Optuna state saved before
            # the suggestion): OptunaSearch would raise KeyError and end the study
            self._add_lost_trial(trial_id, result, error, final)
            return
        if result is not None and not final:
            result = None  # OptunaSearch records "no value, no error" as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)

    def _add_lost_trial(self, trial_id: str, result: Optional[Dict], error: bool, final: bool) -> None:
        """Tell Optuna's study a finished trial it never handed out, from the trial's ``config``.

        The distributions come from the space itself (a define-by-run space is replayed on an
        ``optuna.trial.FixedTrial`` of the config), so the sampler weighs the trial like its own.
        """
        import optuna
        from ray.tune.utils import flatten_dict

        config = flatten_dict(dict((result or {}).get("config") or {}))
        try:
            if callable(self._space):
                fixed = optuna.trial.FixedTrial(config)
                self._space(fixed)
                params, dists = fixed.params, fixed.distributions
            else:
                dists = dict(self._space)
                params = {k: config[k] for k in dists}
            value = result.get(self.metric) if final else None
            state = (optuna.trial.TrialState.COMPLETE if value is not None else
                     optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED)
            self._ot_study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                               value=value, state=state))
            added = self._ot_study.get_trials(deepcopy=False)[-1]
            self._ot_trials[trial_id] = AddedTrial(added.number, added._trial_id)  # for the Optuna storage's links
        except Exception as exc:  # no config, or one the space does not produce
            logger.warning(f"Optuna has no record of trial {trial_id} (lost with a killed driver) and it "
                           f"could not be added back ({type(exc).__name__}: {exc}); its result does not "
                           "inform the sampler")
            return
        self._completed_trials.add(trial_id)
        logger.warning(f"Optuna had no record of trial {trial_id} (lost with a killed driver): added back "
                       f"as {state.name}")


class SeedRepeater(Searcher):
    """Repeat every configuration of ``searcher`` once per seed (config key ``seed``)."""

    def __init__(self, searcher: Searcher, seeds: List[int]):
        self.searcher = searcher
        self.seeds = list(seeds)
        self._groups: Dict[str, Dict] = {}
        self._trial_group: Dict[str, str] = {}
        self._current: Optional[str] = None
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def suggest(self, trial_id: str) -> Optional[Dict]:
        # the oldest group short of seeds (only the current one, unless a resume took seeds back:
        # see reconcile_with_snapshot), else a new configuration
        gid = next((g for g, grp in self._groups.items() if len(grp["members"]) < len(self.seeds)), None)
        if gid is None:
            config = self.searcher.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                return config
            gid = self._current = trial_id
            self._groups[gid] = {"config": copy.deepcopy(config), "members": [], "outcomes": {}, "told": False}
        group = self._groups[gid]
        seed = self.seeds[len(group["members"])]
        group["members"].append(trial_id)
        self._trial_group[trial_id] = gid
        self._publish()  # a new Optuna trial, RUNNING, or a seed that joins one
        return {**group["config"], "seed": seed}

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False):
        gid = self._trial_group.get(trial_id)
        if gid is None:
            return
        group = self._groups[gid]
        value = None if not result else result.get(self.metric)
        group["outcomes"][trial_id] = {"error": bool(error), "value": value,
                                       "final": bool(result and result.get(FINAL_KEY))}
        if len(group["outcomes"]) < len(self.seeds) or group["told"]:
            return
        group["told"] = True
        outs = list(group["outcomes"].values())
        config = {"config": copy.deepcopy(group["config"])}  # lets the inner searcher add a lost trial back
        if any(o["error"] for o in outs):
            self.searcher.on_trial_complete(gid, result=config, error=True)
        elif not all(o["final"] and o["value"] is not None for o in outs):
            self.searcher.on_trial_complete(gid, result=config, error=False)  # pruned: no final flag
        else:
            mean = sum(float(o["value"]) for o in outs) / len(outs)
            if math.isnan(mean):
                self.searcher.on_trial_complete(gid, result=config, error=True)
            else:
                self.searcher.on_trial_complete(gid, result={self.metric: mean, FINAL_KEY: 1.0, **config})
        self._publish()

    def _publish(self) -> None:
        """Copy the sampler's Optuna study to the study's Optuna storage (:mod:`study.optuna_store`), each
        trial with its Tune trials (the configuration's seeds)."""
        study = getattr(self.searcher, "_ot_study", None)
        if study is None or not publishing():  # no storage in this driver: no links to build
            return
        asked = getattr(self.searcher, "_ot_trials", {})
        links = {asked[g].number: list(grp["members"]) for g, grp in self._groups.items() if g in asked}
        publish_live(study, links)

    # Tune saves a wrapper's own state with get_state() next to the base searcher's
    # save_to_dir(), and restores both: the seed groups survive a resume.
    def get_state(self) -> Dict:
        state = {k: v for k, v in self.__dict__.items() if k != "searcher"}
        return copy.deepcopy(state)

    def set_state(self, state: Dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def reconcile_with_snapshot(state: Dict, trials: Dict[str, Dict]) -> Optional[str]:
    """Make a saved ``SearchGenerator`` state (SeedRepeater inside) agree with Tune's recorded trials.

    Tune saves its trials and the search algorithm's state as separate files; a driver killed between
    them (or, on an object store, during their upload, in no fixed order) can leave seed groups that
    name a trial the snapshot never recorded (its seed would never run: the configuration's group
    never completes, Optuna never hears of it and the study ends a trial short) or a recorded trial
    the groups do not know (it would be ignored and its seed run again). ``trials`` maps the
    snapshot's trial ids to ``{"status", "config"}``. Seeds handed out but never recorded (the newest
    of their groups) are taken back, to go out again (:meth:`SeedRepeater.suggest` fills the oldest
    group short of seeds first), and recorded trials that are a group's next seeds join it (or, for
    a first seed, open a group); the trial counter and the concurrency limiter's live trials follow.
    ``state`` is changed in place. Returns what was done, or None when nothing needed doing or the
    difference is not of that kind (Tune then goes on as it would have).
    """
    rep, lim = state.get("name:SeedRepeater"), state.get("name:ConcurrencyLimiter")
    if not rep:
        return None
    handed, groups, seeds = rep["_trial_group"], rep["_groups"], rep["seeds"]
    phantoms = {t for t in handed if t not in trials}
    unknown = [t for t in trials if t not in handed]
    if not phantoms and not unknown:
        return None
    # handed out, never recorded: the newest seeds of their groups
    for gid in {handed[t] for t in phantoms}:
        members = groups[gid]["members"]
        n = len([t for t in members if t in phantoms])
        if set(members[len(members) - n:]) != {t for t in phantoms if handed[t] == gid}:
            return None
    # recorded, not handed out (as far as the saved state knows): a group's next seeds
    members = {gid: [t for t in g["members"] if t not in phantoms] for gid, g in groups.items()}
    added = []
    for t in sorted(unknown, key=lambda t: seeds.index(trials[t]["config"].get("seed"))
                    if trials[t]["config"].get("seed") in seeds else len(seeds)):
        config = trials[t]["config"]
        gid = next((g for g, grp in groups.items() if len(members[g]) < len(seeds)
                    and config.get("seed") == seeds[len(members[g])]
                    and all(config.get(k) == v for k, v in grp["config"].items())), None)
        if gid is None and seeds and config.get("seed") == seeds[0]:
            # the first seed of a configuration suggested after the groups were saved: it opens its
            # group (Optuna, whose own state was saved apart, gets it added back when the group completes)
            gid = rep["_current"] = t
            groups[gid] = {"config": {k: v for k, v in config.items() if k != "seed"}, "members": [],
                           "outcomes": {}, "told": False}
            members[gid] = []
        if gid is None:
            return None
        members[gid].append(t)
        added.append((t, gid))
    for t in phantoms:
        groups[handed.pop(t)]["outcomes"].pop(t, None)
    for t, gid in added:
        handed[t] = gid
    for gid, g in groups.items():
        g["members"] = members[gid]
    state["counter"] += len(added) - len(phantoms)
    if lim is not None:
        live = (set(lim["live_trials"]) - phantoms) | {
            t for t, _ in added if trials[t].get("status") not in ("TERMINATED", "ERROR")}
        lim["live_trials"], lim["num_unfinished_live_trials"] = live, len(live)
    parts = ([f"{len(phantoms)} seed(s) handed out but never recorded go out again"] if phantoms else []) + \
        ([f"{len(added)} recorded trial(s) join their seed groups"] if added else [])
    return "the searcher's state was out of step with the trials: " + "; ".join(parts)
