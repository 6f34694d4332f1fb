"""What a study knows about each trial once Tune is done with it, and what it optimises.

`TrialRecord` is one typed row per trial (phase, label, seed, status, metrics, run id, error): every consumer
(tables, selection, the registry, the report, the trials CSV) reads `status` instead of guessing "finished"
from which metrics a dict happens to hold. `OBJECTIVE` is named once and passed to Tune's searcher, ASHA,
the progress line (kdtune/progress.py) and selection.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
UNFINISHED = "unfinished"  # read back from MLflow: still running, or its driver was killed


@dataclass(frozen=True)
class Objective:
    """What selection optimises, and the stated rule that breaks its ties: on a small validation split many
    settings reach the same accuracy (6 samples allow 7 values), so the tie is broken by `tie_metric`, a
    continuous measure on the same samples (the validation cross-entropy, lower is better), and then by order."""

    metric: str = "val_acc"
    mode: str = "max"
    tie_metric: str = "val_loss"
    TIE_RULE = "the lowest validation loss (cross-entropy) among them"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def rank(self, value: float, tie: float | None) -> tuple:
        """A key whose maximum is the best item: the objective first, then the lower tie metric."""
        primary = value if self.mode == "max" else -value
        return (primary, -(tie if tie is not None and tie == tie else float("inf")))

    def best(self, items, value, tie=None):
        """The item whose value is best, ties broken by `tie(item)` (the tie metric) when given; None for none."""
        items = list(items)
        if not items:
            return None
        return max(items, key=lambda item: self.rank(value(item), tie(item) if tie else None))

    def best_trial(self, trials):
        """The best of `trials` (TrialRecords) on the objective, ties broken by the tie metric."""
        return self.best(trials, lambda t: t.metrics[self.metric], lambda t: t.metrics.get(self.tie_metric))


OBJECTIVE = Objective("val_acc", "max")  # selection is on validation; test accuracy is only reported


@dataclass
class TrialRecord:
    phase: str
    label: str
    params: dict  # what the trial set on top of the study's base configuration
    seed: int
    status: str  # finished | stopped (by the scheduler, before its last epoch) | failed | unfinished
    metrics: dict = field(default_factory=dict)  # the last reported epoch's metrics (with test_acc if finished)
    error: str | None = None
    run_id: str | None = None
    path: str | None = None
    point: str = ""  # the tuned recipe values of this trial (e.g. "lr=0.03"); "" when the study tunes none

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def stopped(self) -> bool:
        return self.status == STOPPED


def status_of(metrics: dict, error) -> str:
    """A trial finished when it reported its last epoch (epoch == epochs_total); Tune's error makes it failed."""
    if error is not None:
        return FAILED
    total = metrics.get("epochs_total")
    if total is not None and metrics.get("epoch") == total:
        return FINISHED
    return STOPPED
