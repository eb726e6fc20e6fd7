"""Searcher adapters around Ray's OptunaSearch.

Two fixes over the stock integration:

* :class:`PrunedAwareOptunaSearch` tells Optuna ``PRUNED`` for a trial the
  scheduler stopped before its last epoch (stock OptunaSearch records it as
  ``COMPLETE`` with its low-fidelity value, which misleads TPE).
* :class:`SeedRepeater` runs each suggested configuration once per seed and
  tells the inner searcher the mean over seeds only when every seed has
  finished; a configuration with any pruned seed is pruned, any failed seed
  fails it. Its bookkeeping is saved with the experiment (get_state), so a
  resumed study keeps its groups; a seed that only finishes after a resume
  still completes its group.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

FINAL_KEY = "final"  # the trainable's last report carries final=1


class PrunedAwareOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False):
        if result is not None and not error and not result.get(FINAL_KEY):
            result = None  # OptunaSearch records "no value, no error" as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


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
        group = self._groups.get(self._current) if self._current else None
        if group is None or len(group["members"]) >= len(self.seeds):
            config = self.searcher.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                return config
            self._current = trial_id
            group = self._groups[trial_id] = {"config": copy.deepcopy(config), "members": [],
                                              "outcomes": {}, "told": False}
        seed = self.seeds[len(group["members"])]
        group["members"].append(trial_id)
        self._trial_group[trial_id] = self._current
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
        if any(o["error"] for o in outs):
            self.searcher.on_trial_complete(gid, result=None, error=True)
        elif not all(o["final"] and o["value"] is not None for o in outs):
            self.searcher.on_trial_complete(gid, result=None, error=False)  # pruned
        else:
            mean = sum(float(o["value"]) for o in outs) / len(outs)
            if math.isnan(mean):
                self.searcher.on_trial_complete(gid, result=None, error=True)
            else:
                self.searcher.on_trial_complete(gid, result={self.metric: mean, FINAL_KEY: 1.0})

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
