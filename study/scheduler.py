"""ASHA whose rungs survive a resume.

Ray's ASHA keeps its rungs (the metric each trial reached at each milestone)
in memory; ``Tuner.restore`` starts it empty, so after a resume the first
trials to reach a rung are compared against nothing and never pruned, while
earlier trials were. :class:`ReplayASHA` rebuilds the rungs from the recorded
history: when Tune re-adds a trial on restore, the results it already
reported (its ``result.json``) are replayed into its bracket, exactly as they
were seen the first time. Pruning decisions after a resume are then the ones
an uninterrupted study would make.
"""
from __future__ import annotations

from typing import Optional

from ray.tune.schedulers import ASHAScheduler

from .history import read_results, trial_result_file


class ReplayASHA(ASHAScheduler):
    def __init__(self, *, experiment_dir: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self._experiment_dir = experiment_dir

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self.replay(trial)

    def replay(self, trial) -> int:
        """Feed the trial's recorded results to its bracket; returns how many were replayed."""
        f = trial_result_file(trial, self._experiment_dir)
        if f is None or self._metric is None:
            return 0
        bracket = self._trial_info[trial.trial_id]
        n = 0
        for r in read_results(f):
            if self._time_attr in r and self._metric in r and r[self._time_attr] < self._max_t:
                bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])
                n += 1
        return n
