"""A Pareto front's rows: one per front member (and per int8 twin), typed, filled in as the study finishes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdtune.results import SettingRow
from kdtune.train.costs import COST_KEYS


@dataclass
class FrontRow:
    """A front member (or its int8 twin): its costs, its confirm seeds beside the same architecture trained
    without distillation, and, once registered, its version and alias."""

    student: str
    label: str
    costs: dict  # kdtune.train.costs.Costs.as_dict(): parameters, FLOPs, latencies, device, runtime
    search_val: float  # the member's validation accuracy in the search
    front: SettingRow | None  # its confirm seeds, distilled
    baseline: SettingRow | None  # the same architecture without distillation
    baseline_tuned: bool  # False: the baseline search never tried this architecture
    params: dict  # the hyperparameters it was confirmed at
    precision: str = "float32"
    version: str | None = None  # set by registration
    alias: str = ""
    val_set: str = ""  # the validation split's fingerprint, for the registry gate
    # an int8 twin's only (kdtune/pareto/int8.py)
    trial: Any = None  # the confirm trial (TrialRecord) whose student it quantises
    model_uri: str | None = None
    fp32_version: str | None = None
    speed_ratio: float | None = None  # its speed over its fp32 file's at batch 1, timed side by side
    tags: dict = field(default_factory=dict)

    @property
    def val_acc(self) -> float | None:
        return _mean(self.front, "val_mean")

    @property
    def test_acc(self) -> float | None:
        return _mean(self.front, "test_mean")

    @property
    def baseline_test_acc(self) -> float | None:
        return _mean(self.baseline, "test_mean")

    def record(self) -> dict:
        """The row as results/pareto_front.json holds it."""
        return {"student": self.student, "precision": self.precision,
                **{k: self.costs[k] for k in (*COST_KEYS, "device", "runtime")},
                "search_val_acc": self.search_val, "val_acc": self.val_acc,
                "test_acc": self.test_acc, "test_acc_std": self.front.test_std if self.front else None,
                "baseline_val_acc": _mean(self.baseline, "val_mean"), "baseline_test_acc": self.baseline_test_acc,
                "baseline_tuned": self.baseline_tuned, "seeds": self.front.n if self.front else None,
                "version": self.version, "alias": self.alias, "hyperparameters": self.params,
                **({"fp32_version": self.fp32_version, "int8_speedup_vs_fp32_same_run": self.speed_ratio}
                   if self.precision == "int8" else {})}


def _mean(row: SettingRow | None, statistic: str) -> float | None:
    """A confirm row's statistic; None when the setting has no row or no finished seed (the front shows '-')."""
    return getattr(row, statistic) if row is not None and row.n else None
