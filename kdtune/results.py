"""From finished trials to the numbers a researcher reports: per-configuration statistics, the gain over
the baseline with a confidence interval, and tables in the shape of the seed papers'.

Selection never looks at the test set: the best configuration is the one with the best mean validation
accuracy; its test accuracy is what gets reported.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, fields, replace

from kdtune.records import OBJECTIVE, TrialRecord
from kdtune.tags import BASELINE_LABEL, TEACHERS_TAG



@dataclass(frozen=True)
class SettingRow:
    """One line of a study's table: a setting (its label) at one tuned point, with statistics over its finished
    seeds. `summarise` gives each setting's chosen point (on validation), its gain over the baseline and what
    happened at the points it did not choose."""

    label: str
    point: str = ""  # the tuned values, e.g. "lr=0.03" ("" when the study tuned nothing)
    params: dict = field(default_factory=dict)  # the setting's own values (method, temperature...)
    val: tuple[float, ...] = ()  # per finished seed
    test: tuple[float, ...] = ()
    val_loss: tuple[float, ...] = ()
    failed: int = 0
    stopped: int = 0  # stopped early by the scheduler: no final test evaluation
    failures: tuple[str, ...] = ()  # "seed 1: <error>"
    tied: int = 1  # tuned points with the chosen one's validation accuracy (the tie rule chose among them)
    points_tried: tuple[str, ...] = ()
    other_total: int = 0  # trials at the points not chosen
    other_n: int = 0
    other_failed: int = 0
    other_failures: tuple[str, ...] = ()
    gain: float = math.nan  # mean test accuracy minus the baseline's, and its Welch 95% interval
    gain_low: float = math.nan
    gain_high: float = math.nan
    skipped: str = ""  # why the study could not run this setting

    @property
    def n(self) -> int:
        """Finished seeds."""
        return len(self.test)

    @property
    def total(self) -> int:
        return self.n + self.failed + self.stopped

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val) if self.val else math.nan

    @property
    def val_loss_mean(self) -> float:
        return statistics.fmean(self.val_loss) if self.val_loss else math.nan

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test) if self.test else math.nan

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0

    @property
    def test_median(self) -> float:
        return statistics.median(self.test) if self.test else math.nan

    def as_dict(self) -> dict:
        """Every field and statistic, e.g. for a JSON file or a DataFrame."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                **{name: getattr(self, name) for name in ("n", "total", "val_mean", "val_loss_mean", "test_mean",
                                                          "test_std", "test_median")}}


def point_rows(trials: list[TrialRecord], order: list[str] | None = None) -> list[SettingRow]:
    """One row per (label, tuned point), in `order` (else as first seen): statistics over finished seeds."""
    found: dict[tuple, dict] = {}
    rank = {label: i for i, label in enumerate(order or [])}
    for trial in sorted(trials, key=lambda t: (rank.get(t.label, len(rank)), t.seed)):
        row = found.setdefault((trial.label, trial.point), {
            "label": trial.label, "point": trial.point, "params": trial.params, "val": [], "test": [],
            "val_loss": [], "failed": 0, "stopped": 0, "failures": []})
        if trial.failed:
            row["failed"] += 1
            row["failures"].append(f"seed {trial.seed}: {trial.error}")
        elif trial.stopped:
            row["stopped"] += 1
        else:
            row["val"].append(trial.metrics["val_acc"])
            row["test"].append(trial.metrics["test_acc"])
            if OBJECTIVE.tie_metric in trial.metrics:
                row["val_loss"].append(trial.metrics[OBJECTIVE.tie_metric])
    return [SettingRow(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
            for row in found.values()]


def summarise(trials: list[TrialRecord], order: list[str] | None = None,
              allow_failed: bool = False) -> list[SettingRow]:
    """One row per label: its tuned point chosen on validation (`choose_point`), its statistics over its
    finished seeds, and the gain over the baseline's chosen point."""
    by_label: dict[str, list[SettingRow]] = {}
    for row in point_rows(trials, order):
        by_label.setdefault(row.label, []).append(row)
    summary = []
    for candidates in by_label.values():
        chosen = choose_point(candidates, allow_failed)
        others = [c for c in candidates if c.point != chosen.point]
        # what happened at the points not chosen: a row never hides a failed trial behind its chosen point
        summary.append(replace(chosen, points_tried=tuple(c.point for c in candidates),
                               other_total=sum(c.total for c in others), other_n=sum(c.n for c in others),
                               other_failed=sum(c.failed for c in others),
                               other_failures=tuple(f"{c.point} {failure}".strip()
                                                    for c in others for failure in c.failures)))
    baseline = next((r for r in summary if r.label == BASELINE_LABEL and r.n), None)
    return [replace(row, **gain_over(row, baseline)) for row in summary]


def skipped_row(label: str, reason: str) -> SettingRow:
    """A table row for a setting the study could not run (e.g. a feature method with an ensemble teacher)."""
    return SettingRow(label, skipped=reason)


def choose_point(candidates: list[SettingRow], allow_failed: bool = False) -> SettingRow:
    """A setting's tuned point: the best mean validation accuracy among the points whose every seed finished
    (a point with a failed seed is chosen only when no clean one exists, or `allow_failed`). Points that tie on
    it are told apart by the lowest mean validation loss (OBJECTIVE's stated rule); `tied` counts them."""
    finished = [c for c in candidates if c.n]
    clean = [c for c in finished if not c.failed]
    pool = finished if allow_failed or not clean else clean
    if not pool:
        return candidates[0]
    chosen = _best_row(pool)
    return replace(chosen, tied=sum(1 for c in pool if c.val_mean == chosen.val_mean))


def _best_row(rows: list[SettingRow]) -> SettingRow:
    return max(rows, key=lambda r: OBJECTIVE.rank(r.val_mean, r.val_loss_mean))


def gain_over(row: SettingRow, baseline: SettingRow | None, confidence: float = 0.95) -> dict:
    """Mean test-accuracy gain over the baseline and a Welch t confidence interval (nan where n < 2)."""
    if not baseline or not row.n or row.label == BASELINE_LABEL:
        return {"gain": math.nan, "gain_low": math.nan, "gain_high": math.nan}
    gain = row.test_mean - baseline.test_mean
    n1, n2 = row.n, baseline.n
    if n1 < 2 or n2 < 2:
        return {"gain": gain, "gain_low": math.nan, "gain_high": math.nan}
    v1, v2 = row.test_std ** 2 / n1, baseline.test_std ** 2 / n2
    if v1 + v2 == 0:  # seeds that all agree measure no spread: a zero-width interval would read as certainty
        return {"gain": gain, "gain_low": math.nan, "gain_high": math.nan}
    dof = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    from scipy import stats

    half = stats.t.ppf(0.5 + confidence / 2, dof) * math.sqrt(v1 + v2)
    return {"gain": gain, "gain_low": gain - half, "gain_high": gain + half}


def pick_best(summary: list[SettingRow], include_baseline: bool = True, allow_failed: bool = False) -> str | None:
    """The setting with the best mean validation accuracy. A setting with a failed seed is not picked (its
    mean covers only the seeds that survived) unless `allow_failed`."""
    finished = [r for r in summary if r.n and (include_baseline or r.label != BASELINE_LABEL)
                and (allow_failed or not r.failed)]
    return _best_row(finished).label if finished else None


def tied_with(summary: list[SettingRow], label: str, include_baseline: bool = True) -> list[str]:
    """The other settings whose mean validation accuracy equals `label`'s: selection told them apart only by
    the tie rule (OBJECTIVE.TIE_RULE)."""
    chosen = next((r for r in summary if r.label == label), None)
    if chosen is None or not chosen.n:
        return []
    return [r.label for r in summary if r.label != label and r.n and r.val_mean == chosen.val_mean
            and (include_baseline or r.label != BASELINE_LABEL)]


def baseline_tuning(tune: dict, baseline_search_samples: int = 0) -> str | None:
    """How a study tuned its baseline, for `verdict`: the grid's tuned values, a search of the same budget, or
    None (untuned)."""
    if tune:
        values = " x ".join(f"{k} in {{{_values(v)}}}" for k, v in tune.items())
        return f"every setting at {values}, each chosen on validation"
    if baseline_search_samples:
        return f"its own search of {baseline_search_samples} trials, the distillation search's budget"
    return None


def verdict(summary: list[SettingRow], baseline_tuning: str | None = None) -> str:
    """One sentence on what the table shows: does the best distilled setting (chosen on validation) beat the
    baseline on test, by its 95% interval? It says how the baseline was tuned (`baseline_tuning`: the same
    grid or search the students had; None: untuned), when the evidence is thin, and when the best setting tied
    others on validation (then it was chosen by the tie rule, not by accuracy)."""
    sentence = _verdict(summary, baseline_tuning)
    best_label = pick_best(summary, include_baseline=False)
    tied = tied_with(summary, best_label, include_baseline=False) if best_label else []
    if tied:
        sentence += (f"; note: on validation {best_label} ties with {', '.join(tied)} (the same accuracy), chosen "
                     f"by {OBJECTIVE.TIE_RULE}: the validation split cannot tell them apart")
    return sentence


def _verdict(summary: list[SettingRow], baseline_tuning: str | None) -> str:
    baseline = next((r for r in summary if r.label == BASELINE_LABEL and r.n), None)
    best_label = pick_best(summary, include_baseline=False)
    if baseline is None or best_label is None:
        return "no comparison: the baseline or every distilled setting has no finished trial"
    best = next(r for r in summary if r.label == best_label)
    how = (f"a baseline tuned as the students were ({baseline_tuning})" if baseline_tuning
           else "an untuned baseline (the recipe's values; --tune lr=... gives a fair comparison)")
    gain = f"{100 * best.gain:+.2f} pt"
    if best.gain_low != best.gain_low:  # no interval
        reason = "one seed" if min(best.n, baseline.n) < 2 else "no spread over seeds"
        return (f"against {how}, the best distilled setting ({best_label}) differs by {gain} on test; "
                f"with {reason} there is no interval, so this is not evidence either way (use --seeds 3 or more)")
    interval = f"{gain}, 95% CI [{100 * best.gain_low:+.2f}, {100 * best.gain_high:+.2f}]"
    if best.gain_low > 0:
        return f"against {how}, distillation helps: the best setting ({best_label}) gains {interval} on test"
    if best.gain_high < 0:
        return (f"against {how}, distillation does not help on this dataset: the best setting ({best_label}) "
                f"loses {interval} on test")
    return (f"against {how}, distillation does not beat the baseline on this dataset: the best setting "
            f"({best_label}) is within noise of it ({interval} on test)")


def _values(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def percent(value: float) -> str:
    """A fraction as percent with two decimals; empty for nan (no finished trial)."""
    return "" if value != value else f"{100 * value:.2f}"


def mean_and_spread(row: SettingRow) -> str:
    """Test accuracy as "mean ± std" in percent; one seed has no spread to show, so only its value."""
    if row.n < 2:
        return percent(row.test_mean)
    return f"{percent(row.test_mean)} ± {percent(row.test_std)}"


def format_gain(row: SettingRow) -> str:
    if row.gain != row.gain:
        return ""
    text = f"{100 * row.gain:+.2f} pt"
    if row.gain_low == row.gain_low:
        text += f" [{100 * row.gain_low:+.2f}, {100 * row.gain_high:+.2f}]"
    return text


def format_table(summary: list[SettingRow], label_header: str, show_median: bool = False) -> str:
    """Seed 000 Tables 3/4 shape: one row per setting; its tuned point when the study tuned one, test accuracy
    mean ± std (and the median, which seed 003 reports), gain over the baseline with its 95% CI, and
    finished/total seeds. A setting with failed seeds is flagged with '!'."""
    tuned = any(row.point for row in summary)
    width = max([18, len(label_header)] + [len(row.label) for row in summary])
    point_width = max([15] + [len(row.point) + (len(f" (tie of {row.tied})") if row.tied > 1 else 0)
                              for row in summary])
    point_header = f"  {'chosen (on val)':>{point_width}}" if tuned else ""
    median_header = f"  {'median':>7}" if show_median else ""
    lines = [f"{label_header:>{width}}{point_header}  {'val acc':>8}  {'test acc':>17}{median_header}  "
             f"{'vs baseline [95% CI]':>26}  {'done':>5}"]
    tie_note = any(row.tied > 1 for row in summary)
    for row in summary:
        shown = row.point + (f" (tie of {row.tied})" if row.tied > 1 else "")
        point = f"  {shown:>{point_width}}" if tuned else ""
        done = f"{row.n}/{row.total}" + ("!" if row.failed else "") + ("*" if row.other_failed else "")
        other = other_points_note(row)
        if not row.n:
            note = (f"skipped: {row.skipped}" if row.skipped else
                    f"{row.failed} failed" if row.failed else f"{row.stopped} stopped early")
            note = "; ".join(filter(None, [note, other]))
            median = f"  {'-':>7}" if show_median else ""
            lines.append(f"{row.label:>{width}}{point}  {'-':>8}  {'-':>17}{median}  {'':>26}  {done:>5}  ({note})")
            continue
        test = f"{mean_and_spread(row)} %"
        median = f"  {percent(row.test_median):>6}%" if show_median else ""
        counts = ", ".join(f"{count} {what}" for what, count in (("failed", row.failed), ("stopped", row.stopped))
                           if count)
        notes = "; ".join(filter(None, [counts, other]))
        lines.append(f"{row.label:>{width}}{point}  {percent(row.val_mean):>7}%  {test:>17}{median}  "
                     f"{format_gain(row):>26}  {done:>5}" + (f"  ({notes})" if notes else ""))
    if tie_note:
        lines.append(f"(tie of N): N tuned points reached the same validation accuracy; the one shown has "
                     f"{OBJECTIVE.TIE_RULE}")
    if any(row.other_failed for row in summary):
        lines.append("done: finished/total seeds at the chosen point; *: trials at points not chosen failed "
                     "(listed below)")
    return "\n".join(lines)


def other_points_note(row: SettingRow) -> str:
    """e.g. "other points: 1 of 6 failed": failures at a setting's tuned points that were not chosen."""
    if not row.other_failed:
        return ""
    return f"other points: {row.other_failed} of {row.other_total} failed"


def format_failures(summary: list[SettingRow], others: list[TrialRecord] = ()) -> str:
    """Every failed trial with its setting, point, seed and reason (empty when none failed): the chosen points'
    and those at points not chosen, per setting; then `others` (trials of other phases, e.g. a search's), each
    with its phase. Headed by the count, out of every trial the study ran."""
    others = list(others)
    lines = [f"failed: {row.label}{' ' + row.point if row.point else ''} {failure}"
             for row in summary for failure in row.failures]
    lines += [f"failed: {row.label} {failure} (a point not chosen)"
              for row in summary for failure in row.other_failures]
    lines += [f"failed ({t.phase}): {t.label}{' ' + t.point if t.point else ''} seed {t.seed}: {t.error}"
              for t in others if t.failed]
    if not lines:
        return ""
    total = sum(row.total + row.other_total for row in summary) + len(others)
    return "\n".join([f"{len(lines)} of {total} trials failed:"] + lines)


def format_matrix(summary: list[SettingRow], row_key: str, col_key: str, row_header: str, col_header: str) -> str:
    """Seed 001 Tables 1/3 shape: test accuracy per (row value, column value), with row and column means."""
    cells = {(r.params.get(row_key), r.params.get(col_key)): r for r in summary
             if row_key in r.params and col_key in r.params}
    rows = sorted({k[0] for k in cells})
    cols = sorted({k[1] for k in cells})
    width = 9
    corner = f"{row_header} \\ {col_header}"
    lines = [f"{corner:>10}" + "".join(f"{c:>{width}g}" for c in cols) + f"{'mean':>{width}}"]
    col_values: dict = {c: [] for c in cols}
    for r in rows:
        values = []
        line = f"{r:>10g}"
        for c in cols:
            cell = cells.get((r, c))
            value = cell.test_mean if cell and cell.n else math.nan
            line += f"{percent(value) or '-':>{width}}"
            if value == value:
                values.append(value)
                col_values[c].append(value)
        line += f"{percent(statistics.fmean(values)) if values else '-':>{width}}"
        lines.append(line)
    lines.append(f"{'mean':>10}" + "".join(
        f"{percent(statistics.fmean(col_values[c])) if col_values[c] else '-':>{width}}" for c in cols))
    baseline = next((r for r in summary if r.label == BASELINE_LABEL and r.n), None)
    if baseline:
        lines.append(f"baseline student (no distillation): {mean_and_spread(baseline)} % "
                     f"over {baseline.n} seed(s)")
    return "\n".join(lines)


# ---- an ensemble teacher's rows (kdtune/ensemble.py writes them to the study run; the report reads them) ----

ENSEMBLE = "ensemble"  # the row of the members' averaged probabilities


def format_teachers(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    what = "ensemble teacher" if len(rows) > 1 else "teacher"
    lines = [f"{what} (accuracy on the students' validation and test splits):",
             f"  {'':<10} {'val acc':>8} {'test acc':>9}  source"]
    for row in rows:
        name = "ensemble" if row["member"] == ENSEMBLE else (f"member {row['member']}" if len(rows) > 1 else "teacher")
        lines.append(f"  {name:<10} {100 * row['val_acc']:>7.2f}% {100 * row['test_acc']:>8.2f}%  {row['source']}")
    return lines


def read_teacher_rows(tags: dict) -> list[dict]:
    try:
        return json.loads(tags.get(TEACHERS_TAG, "[]"))
    except ValueError:
        return []
