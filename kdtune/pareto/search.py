"""Ray Tune's OptunaSearch with a second objective, the cost of the trial's student (kdtune/pareto/run.py).

OptunaSearch takes a list of metrics and modes and then creates a multi-objective Optuna study
(`directions=[...]`; TPE and NSGA-II both handle several objectives; Optuna gets no intermediate values then,
only each trial's final ones). Tune's `TuneConfig` and ASHA take one metric, and Tune checks that every result
holds each metric its searcher names. Trials report validation accuracy; the cost of a student is a property of
its architecture, measured once per architecture before the search (kdtune/train/costs.py), so this searcher names
only validation accuracy to Tune and tells Optuna both values when a trial completes, the cost looked up in
that table: no trial times anything while other trials share the device.
"""
from __future__ import annotations

import logging

from ray.tune.search.optuna import OptunaSearch

from kdtune.records import OBJECTIVE

logger = logging.getLogger(__name__)


class CostSearch(OptunaSearch):
    """metric=[val_acc, cost_metric], mode=["max", "min"]; `costs`: student spec -> {cost key: value}."""

    def __init__(self, *, costs: dict, cost_key: str, cost_metric: str, default_student: str, **kwargs):
        self._costs, self._cost_key, self._cost_metric = costs, cost_key, cost_metric
        self._default_student = default_student
        self._students: dict[str, str] = {}
        super().__init__(metric=[OBJECTIVE.metric, cost_metric], mode=[OBJECTIVE.mode, "min"], **kwargs)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self._students[trial_id] = config.get("student", self._default_student)
        return config

    @property
    def metric(self):  # what Tune checks in every result: the one metric trials report
        return OBJECTIVE.metric

    @property
    def mode(self):
        return OBJECTIVE.mode

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return  # a multi-objective Optuna study takes no intermediate values

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        student = self._students.get(trial_id)
        values = None
        if not error and result and OBJECTIVE.metric in result and student in self._costs:
            values = [float(result[OBJECTIVE.metric]), float(self._costs[student][self._cost_key])]
        state = TrialState.COMPLETE if values else (TrialState.FAIL if error else TrialState.PRUNED)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], values, state=state)
        except Exception as exc:  # e.g. a NaN accuracy: Optuna refuses it, the study goes on
            logger.warning(exc)
        self._completed_trials.add(trial_id)
