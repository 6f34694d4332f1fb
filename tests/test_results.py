"""The numbers a study reports: per-setting statistics, the gain over the baseline with its confidence
interval, the choice of the best setting, and the printed table."""
import math

import pytest
from scipy import stats

from kdtune.records import TrialRecord
from kdtune.results import format_failures, format_table, pick_best, summarise, verdict


def trial(label, seed, val=None, test=None, error=None):
    metrics = {} if val is None else {"val_acc": val}
    if test is not None:
        metrics["test_acc"] = test
    status = "failed" if error else "finished" if test is not None else "stopped"
    return TrialRecord("grid", label, {}, seed, status, metrics, error)


def study(kd_tests, baseline_tests, kd_vals=None, baseline_vals=None):
    kd_vals = kd_vals or [0.5] * len(kd_tests)
    baseline_vals = baseline_vals or [0.4] * len(baseline_tests)
    return ([trial("baseline", s, v, t) for s, (v, t) in enumerate(zip(baseline_vals, baseline_tests))]
            + [trial("T=4", s, v, t) for s, (v, t) in enumerate(zip(kd_vals, kd_tests))])


def test_statistics_per_setting_over_seeds():
    rows = {r.label: r for r in summarise(study([0.90, 0.94, 0.92], [0.85, 0.87, 0.86]))}
    kd = rows["T=4"]
    assert kd.n == 3
    assert kd.test_mean == pytest.approx(0.92)
    assert kd.test_std == pytest.approx(0.02)  # sample standard deviation (n - 1)
    assert kd.test_median == pytest.approx(0.92)


def test_gain_and_its_interval_are_welchs():
    kd_tests, baseline_tests = [0.90, 0.92, 0.94], [0.85, 0.86, 0.87]
    rows = {r.label: r for r in summarise(study(kd_tests, baseline_tests))}
    expected = stats.ttest_ind(kd_tests, baseline_tests, equal_var=False).confidence_interval(0.95)
    assert rows["T=4"].gain == pytest.approx(0.06)
    assert rows["T=4"].gain_low == pytest.approx(expected.low)
    assert rows["T=4"].gain_high == pytest.approx(expected.high)
    assert math.isnan(rows["baseline"].gain)  # the baseline is the reference, not a gain


def test_one_seed_has_a_gain_but_no_interval():
    kd = next(r for r in summarise(study([0.93], [0.90])) if r.label == "T=4")
    assert kd.gain == pytest.approx(0.03)
    assert math.isnan(kd.gain_low) and math.isnan(kd.gain_high)


def test_the_best_setting_is_chosen_on_validation_not_test():
    # T=4 has the better test accuracy but the worse validation accuracy: the baseline must win
    summary = summarise(study([0.99, 0.99], [0.80, 0.80], kd_vals=[0.70, 0.70], baseline_vals=[0.90, 0.90]))
    assert pick_best(summary) == "baseline"
    assert pick_best(summary, include_baseline=False) == "T=4"


def test_failed_and_stopped_trials_are_counted_apart_from_the_statistics():
    trials = study([0.90, 0.92], [0.85, 0.86]) + [trial("T=4", 2, error="loss became nan at epoch 3"),
                                                  trial("T=4", 3, val=0.3)]  # ASHA stopped it: no test_acc
    kd = next(r for r in summarise(trials) if r.label == "T=4")
    assert (kd.n, kd.failed, kd.stopped) == (2, 1, 1)
    assert kd.test_mean == pytest.approx(0.91)


def test_the_table_shows_spread_only_where_there_are_several_seeds():
    one_seed = format_table(summarise(study([0.93], [0.90])), "T").splitlines()
    assert "93.00 %" in one_seed[2] and "±" not in one_seed[2]  # one run has no standard deviation
    assert "+3.00 pt" in one_seed[2]
    several = format_table(summarise(study([0.90, 0.94, 0.92], [0.85, 0.87, 0.86])), "T").splitlines()
    assert "92.00 ± 2.00 %" in several[2]
    assert "+6.00 pt [+1.84, +10.16]" in several[2]


# ---- ties on a small validation split (issue 19) ----------------------------------------------------------

def tuned(label, point, val, val_loss, test, seed=0):
    return TrialRecord("grid", label, {}, seed, "finished", {"val_acc": val, "val_loss": val_loss,
                                                            "test_acc": test}, point=point)


def test_tied_points_are_shown_as_a_tie_and_broken_by_the_lowest_validation_loss():
    """6 validation samples: every lr reaches 5/6; the lowest lr came first and used to be chosen silently."""
    trials = [tuned("baseline", "lr=0.00333", 5 / 6, 0.61, 0.918), tuned("baseline", "lr=0.01", 5 / 6, 0.48, 0.95),
              tuned("baseline", "lr=0.03", 5 / 6, 0.35, 0.969)]
    (row,) = summarise(trials)
    assert row.point == "lr=0.03" and row.tied == 3
    table = format_table([row], "setting")
    assert "lr=0.03 (tie of 3)" in table
    assert "the one shown has the lowest validation loss (cross-entropy)" in table


def test_a_point_that_wins_on_accuracy_is_no_tie():
    trials = [tuned("baseline", "lr=0.01", 0.9, 0.2, 0.9), tuned("baseline", "lr=0.03", 0.95, 0.9, 0.9)]
    (row,) = summarise(trials)
    assert row.point == "lr=0.03" and row.tied == 1
    assert "tie" not in format_table([row], "setting")


def test_the_verdict_says_when_the_best_setting_ties_others_on_validation():
    trials = [tuned("baseline", "", 0.8, 0.5, 0.9, s) for s in (0, 1)] + \
             [tuned("T=2", "", 1.0, 0.30, 0.92, s) for s in (0, 1)] + [tuned("T=4", "", 1.0, 0.20, 0.95, s) for s in (0, 1)]
    summary = summarise(trials)
    assert pick_best(summary, include_baseline=False) == "T=4"  # the lower validation loss
    sentence = verdict(summary, "lr tuned")
    assert "T=4 ties with T=2" in sentence and "lowest validation loss" in sentence


def test_a_small_validation_split_is_named_before_the_study_runs():
    import numpy as np

    from kdtune.data import from_arrays
    from kdtune.resolve import _warn_small_validation

    rng = np.random.default_rng(0)
    tiny = from_arrays(rng.random((67, 1, 8, 8), dtype=np.float32), rng.integers(0, 2, 67),
                       rng.random((20, 1, 8, 8), dtype=np.float32), rng.integers(0, 2, 20))
    said = []
    _warn_small_validation(tiny, {0.1}, said.append)
    (line,) = said
    samples = len(tiny.split(0.1)[1])
    assert line.startswith(f"warning: the validation split has {samples} samples (val_fraction 0.1 of 67)")
    assert "--set val_fraction=0.5 gives" in line
    said.clear()
    from kdtune.data import load_dataset

    _warn_small_validation(load_dataset("digits"), {0.1}, said.append)  # 180 samples: nothing to say
    assert said == []


def test_a_failure_at_a_tuned_point_that_was_not_chosen_is_counted_and_listed():
    def at(label, seed, point, val=None, test=None, error=None):
        return TrialRecord("grid", label, {}, seed, "failed" if error else "finished",
                           {} if error else {"val_acc": val, "test_acc": test}, error, point=point)

    trials = [at("baseline", s, "lr=0.01", 0.9, 0.9) for s in range(2)]
    trials += [at("baseline", 0, "lr=1", error="TrainingDiverged: loss became nan"),
               at("baseline", 1, "lr=1", 0.5, 0.5)]
    summary = summarise(trials)
    table = format_table(summary, "setting")
    assert summary[0].point == "lr=0.01"
    assert "2/2*" in table and "other points: 1 of 2 failed" in table  # the row does not read as all done
    failures = format_failures(summary)
    assert "1 of 4 trials failed" in failures
    assert "failed: baseline lr=1 seed 0: TrainingDiverged: loss became nan (a point not chosen)" in failures


def test_a_summary_row_is_typed_and_reads_the_same_as_a_plain_record():
    from dataclasses import FrozenInstanceError

    kd = next(r for r in summarise(study([0.90, 0.94, 0.92], [0.85, 0.87, 0.86])) if r.label == "T=4")
    with pytest.raises(FrozenInstanceError):
        kd.gain = 1.0  # a table's numbers cannot be changed behind the table's back
    record = kd.as_dict()
    assert record["n"] == 3 and record["test_mean"] == pytest.approx(0.92) and record["label"] == "T=4"
    assert record["total"] == 3 and record["gain"] == pytest.approx(kd.gain)
