"""From finished trials to the numbers a researcher reports: per-configuration statistics, the gain over
the baseline with a confidence interval, and tables in the shape of the seed papers'.

Selection never looks at the test set: the best configuration is the one with the best mean validation
accuracy; its test accuracy is what gets reported.
"""
from __future__ import annotations

import json

import math
import statistics

from kdtune.records import OBJECTIVE, TrialRecord
from kdtune.tags import BASELINE_LABEL, TEACHERS_TAG



def point_rows(trials: list[TrialRecord], order: list[str] | None = None) -> list[dict]:
    """One row per (label, tuned point), in `order` (else as first seen): statistics over finished seeds."""
    rows: dict[tuple, dict] = {}
    rank = {label: i for i, label in enumerate(order or [])}
    for trial in sorted(trials, key=lambda t: (rank.get(t.label, len(rank)), t.seed)):
        row = rows.setdefault((trial.label, trial.point), {
            "label": trial.label, "point": trial.point, "params": trial.params, "val": [], "test": [],
            "val_loss": [], "failed": 0, "stopped": 0, "failures": []})
        if trial.failed:
            row["failed"] += 1
            row["failures"].append(f"seed {trial.seed}: {trial.error}")
        elif trial.stopped:
            row["stopped"] += 1  # stopped early by the scheduler: no final test evaluation
        else:
            row["val"].append(trial.metrics["val_acc"])
            row["test"].append(trial.metrics["test_acc"])
            if OBJECTIVE.tie_metric in trial.metrics:
                row["val_loss"].append(trial.metrics[OBJECTIVE.tie_metric])
    return [_statistics(row) for row in rows.values()]


def summarise(trials: list[TrialRecord], order: list[str] | None = None, allow_failed: bool = False) -> list[dict]:
    """One row per label: its tuned point chosen on validation (`choose_point`), mean/std/median over its
    finished seeds, finished/total, and the gain over the baseline's chosen point."""
    by_label: dict[str, list[dict]] = {}
    for row in point_rows(trials, order):
        by_label.setdefault(row["label"], []).append(row)
    summary = []
    for candidates in by_label.values():
        chosen = choose_point(candidates, allow_failed)
        row = dict(chosen)
        row["points_tried"] = [c["point"] for c in candidates]
        row.update(_other_points(chosen, candidates))
        summary.append(row)
    baseline = next((r for r in summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    for row in summary:
        row.update(gain_over(row, baseline))
    return summary


def _other_points(chosen: dict, candidates: list[dict]) -> dict:
    """What happened at a setting's tuned points that were not chosen: their trials, how many finished and failed,
    and each failure (point, seed, error), so that a table row never hides a failed trial behind its chosen
    point's finished/total."""
    others = [c for c in candidates if c["point"] != chosen["point"]]
    return {"other_total": sum(c["total"] for c in others), "other_n": sum(c["n"] for c in others),
            "other_failed": sum(c["failed"] for c in others),
            "other_failures": [f"{c['point']} {failure}".strip() for c in others for failure in c["failures"]]}


def skipped_row(label: str, reason: str) -> dict:
    """A table row for a setting the study could not run (e.g. a feature method with an ensemble teacher)."""
    nan = math.nan
    return {"label": label, "point": "", "params": {}, "n": 0, "failed": 0, "stopped": 0, "total": 0,
            "failures": [], "val": [], "test": [], "val_mean": nan, "test_mean": nan, "test_std": 0.0,
            "test_median": nan, "gain": nan, "gain_low": nan, "gain_high": nan, "skipped": reason,
            "other_total": 0, "other_n": 0, "other_failed": 0, "other_failures": []}


def choose_point(candidates: list[dict], allow_failed: bool = False) -> dict:
    """A setting's tuned point: the best mean validation accuracy among the points whose every seed finished
    (a point with a failed seed is chosen only when no clean one exists, or `allow_failed`). Points that tie on
    it are told apart by the lowest mean validation loss (OBJECTIVE's stated rule); `tied` counts them."""
    finished = [c for c in candidates if c["n"]]
    clean = [c for c in finished if not c["failed"]]
    pool = finished if allow_failed or not clean else clean
    if not pool:
        return candidates[0]
    chosen = _best_row(pool)
    return {**chosen, "tied": sum(1 for c in pool if c["val_mean"] == chosen["val_mean"])}


def _best_row(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: OBJECTIVE.rank(r["val_mean"], r.get("val_loss_mean")))


def _statistics(row: dict) -> dict:
    n = len(row["test"])
    return {
        "label": row["label"], "point": row["point"], "params": row["params"], "n": n, "failed": row["failed"],
        "stopped": row["stopped"], "total": n + row["failed"] + row["stopped"], "failures": row["failures"],
        "val": row["val"], "test": row["test"],
        "val_mean": statistics.fmean(row["val"]) if n else math.nan,
        "val_loss_mean": statistics.fmean(row["val_loss"]) if row["val_loss"] else math.nan,
        "test_mean": statistics.fmean(row["test"]) if n else math.nan,
        "test_std": statistics.stdev(row["test"]) if n > 1 else 0.0,
        "test_median": statistics.median(row["test"]) if n else math.nan,
    }


def gain_over(row: dict, baseline: dict | None, confidence: float = 0.95) -> dict:
    """Mean test-accuracy gain over the baseline and a Welch t confidence interval (nan where n < 2)."""
    if not baseline or not row["n"] or row["label"] == BASELINE_LABEL:
        return {"gain": math.nan, "gain_low": math.nan, "gain_high": math.nan}
    gain = row["test_mean"] - baseline["test_mean"]
    n1, n2 = row["n"], baseline["n"]
    if n1 < 2 or n2 < 2:
        return {"gain": gain, "gain_low": math.nan, "gain_high": math.nan}
    v1, v2 = row["test_std"] ** 2 / n1, baseline["test_std"] ** 2 / n2
    if v1 + v2 == 0:  # seeds that all agree measure no spread: a zero-width interval would read as certainty
        return {"gain": gain, "gain_low": math.nan, "gain_high": math.nan}
    dof = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    from scipy import stats

    half = stats.t.ppf(0.5 + confidence / 2, dof) * math.sqrt(v1 + v2)
    return {"gain": gain, "gain_low": gain - half, "gain_high": gain + half}


def pick_best(summary: list[dict], include_baseline: bool = True, allow_failed: bool = False) -> str | None:
    """The setting with the best mean validation accuracy. A setting with a failed seed is not picked (its
    mean covers only the seeds that survived) unless `allow_failed`."""
    finished = [r for r in summary if r["n"] and (include_baseline or r["label"] != BASELINE_LABEL)
                and (allow_failed or not r["failed"])]
    return _best_row(finished)["label"] if finished else None


def tied_with(summary: list[dict], label: str, include_baseline: bool = True) -> list[str]:
    """The other settings whose mean validation accuracy equals `label`'s: selection told them apart only by
    the tie rule (OBJECTIVE.TIE_RULE)."""
    chosen = next((r for r in summary if r["label"] == label), None)
    if chosen is None or not chosen["n"]:
        return []
    return [r["label"] for r in summary if r["label"] != label and r["n"] and r["val_mean"] == chosen["val_mean"]
            and (include_baseline or r["label"] != BASELINE_LABEL)]


def baseline_tuning(tune: dict, baseline_search_samples: int = 0) -> str | None:
    """How a study tuned its baseline, for `verdict`: the grid's tuned values, a search of the same budget, or
    None (untuned)."""
    if tune:
        values = " x ".join(f"{k} in {{{_values(v)}}}" for k, v in tune.items())
        return f"every setting at {values}, each chosen on validation"
    if baseline_search_samples:
        return f"its own search of {baseline_search_samples} trials, the distillation search's budget"
    return None


def verdict(summary: list[dict], baseline_tuning: str | None = None) -> str:
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


def _verdict(summary: list[dict], baseline_tuning: str | None) -> str:
    baseline = next((r for r in summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    best_label = pick_best(summary, include_baseline=False)
    if baseline is None or best_label is None:
        return "no comparison: the baseline or every distilled setting has no finished trial"
    best = next(r for r in summary if r["label"] == best_label)
    how = (f"a baseline tuned as the students were ({baseline_tuning})" if baseline_tuning
           else "an untuned baseline (the recipe's values; --tune lr=... gives a fair comparison)")
    gain = f"{100 * best['gain']:+.2f} pt"
    if best["gain_low"] != best["gain_low"]:  # no interval
        reason = "one seed" if min(best["n"], baseline["n"]) < 2 else "no spread over seeds"
        return (f"against {how}, the best distilled setting ({best_label}) differs by {gain} on test; "
                f"with {reason} there is no interval, so this is not evidence either way (use --seeds 3 or more)")
    interval = f"{gain}, 95% CI [{100 * best['gain_low']:+.2f}, {100 * best['gain_high']:+.2f}]"
    if best["gain_low"] > 0:
        return f"against {how}, distillation helps: the best setting ({best_label}) gains {interval} on test"
    if best["gain_high"] < 0:
        return (f"against {how}, distillation does not help on this dataset: the best setting ({best_label}) "
                f"loses {interval} on test")
    return (f"against {how}, distillation does not beat the baseline on this dataset: the best setting "
            f"({best_label}) is within noise of it ({interval} on test)")


def _values(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def percent(value: float) -> str:
    """A fraction as percent with two decimals; empty for nan (no finished trial)."""
    return "" if value != value else f"{100 * value:.2f}"


def mean_and_spread(row: dict) -> str:
    """Test accuracy as "mean ± std" in percent; one seed has no spread to show, so only its value."""
    if row["n"] < 2:
        return percent(row["test_mean"])
    return f"{percent(row['test_mean'])} ± {percent(row['test_std'])}"


def format_gain(row: dict) -> str:
    if row["gain"] != row["gain"]:
        return ""
    text = f"{100 * row['gain']:+.2f} pt"
    if row["gain_low"] == row["gain_low"]:
        text += f" [{100 * row['gain_low']:+.2f}, {100 * row['gain_high']:+.2f}]"
    return text


def format_table(summary: list[dict], label_header: str, show_median: bool = False) -> str:
    """Seed 000 Tables 3/4 shape: one row per setting; its tuned point when the study tuned one, test accuracy
    mean ± std (and the median, which seed 003 reports), gain over the baseline with its 95% CI, and
    finished/total seeds. A setting with failed seeds is flagged with '!'."""
    tuned = any(row.get("point") for row in summary)
    width = max([18, len(label_header)] + [len(row["label"]) for row in summary])
    point_width = max([15] + [len(row.get("point", "")) + (len(f" (tie of {row['tied']})")
                                                              if row.get("tied", 1) > 1 else 0) for row in summary])
    point_header = f"  {'chosen (on val)':>{point_width}}" if tuned else ""
    median_header = f"  {'median':>7}" if show_median else ""
    lines = [f"{label_header:>{width}}{point_header}  {'val acc':>8}  {'test acc':>17}{median_header}  "
             f"{'vs baseline [95% CI]':>26}  {'done':>5}"]
    tie_note = any(row.get("tied", 1) > 1 for row in summary)
    for row in summary:
        shown = row.get("point", "") + (f" (tie of {row['tied']})" if row.get("tied", 1) > 1 else "")
        point = f"  {shown:>{point_width}}" if tuned else ""
        done = f"{row['n']}/{row['total']}" + ("!" if row["failed"] else "") + ("*" if row.get("other_failed") else "")
        other = other_points_note(row)
        if not row["n"]:
            note = (f"skipped: {row['skipped']}" if row.get("skipped") else
                    f"{row['failed']} failed" if row["failed"] else f"{row['stopped']} stopped early")
            note = "; ".join(filter(None, [note, other]))
            median = f"  {'-':>7}" if show_median else ""
            lines.append(f"{row['label']:>{width}}{point}  {'-':>8}  {'-':>17}{median}  {'':>26}  {done:>5}  ({note})")
            continue
        test = f"{mean_and_spread(row)} %"
        median = f"  {percent(row['test_median']):>6}%" if show_median else ""
        notes = "; ".join(filter(None, [", ".join(f"{row[k]} {k}" for k in ("failed", "stopped") if row[k]), other]))
        lines.append(f"{row['label']:>{width}}{point}  {percent(row['val_mean']):>7}%  {test:>17}{median}  "
                     f"{format_gain(row):>26}  {done:>5}" + (f"  ({notes})" if notes else ""))
    if tie_note:
        lines.append(f"(tie of N): N tuned points reached the same validation accuracy; the one shown has "
                     f"{OBJECTIVE.TIE_RULE}")
    if any(row.get("other_failed") for row in summary):
        lines.append("done: finished/total seeds at the chosen point; *: trials at points not chosen failed "
                     "(listed below)")
    return "\n".join(lines)


def other_points_note(row: dict) -> str:
    """e.g. "other points: 1 of 6 failed": failures at a setting's tuned points that were not chosen."""
    if not row.get("other_failed"):
        return ""
    return f"other points: {row['other_failed']} of {row['other_total']} failed"


def format_failures(summary: list[dict], others: list[TrialRecord] = ()) -> str:
    """Every failed trial with its setting, point, seed and reason (empty when none failed): the chosen points'
    and those at points not chosen, per setting; then `others` (trials of other phases, e.g. a search's), each
    with its phase. Headed by the count, out of every trial the study ran."""
    others = list(others)
    lines = [f"failed: {row['label']}{' ' + row['point'] if row.get('point') else ''} {failure}"
             for row in summary for failure in row.get("failures", [])]
    lines += [f"failed: {row['label']} {failure} (a point not chosen)"
              for row in summary for failure in row.get("other_failures", [])]
    lines += [f"failed ({t.phase}): {t.label}{' ' + t.point if t.point else ''} seed {t.seed}: {t.error}"
              for t in others if t.failed]
    if not lines:
        return ""
    total = sum(row["total"] + row.get("other_total", 0) for row in summary) + len(others)
    return "\n".join([f"{len(lines)} of {total} trials failed:"] + lines)


def format_matrix(summary: list[dict], row_key: str, col_key: str, row_header: str, col_header: str) -> str:
    """Seed 001 Tables 1/3 shape: test accuracy per (row value, column value), with row and column means."""
    cells = {(r["params"].get(row_key), r["params"].get(col_key)): r for r in summary
             if row_key in r["params"] and col_key in r["params"]}
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
            value = cell["test_mean"] if cell and cell["n"] else math.nan
            line += f"{percent(value) or '-':>{width}}"
            if value == value:
                values.append(value)
                col_values[c].append(value)
        line += f"{percent(statistics.fmean(values)) if values else '-':>{width}}"
        lines.append(line)
    lines.append(f"{'mean':>10}" + "".join(
        f"{percent(statistics.fmean(col_values[c])) if col_values[c] else '-':>{width}}" for c in cols))
    baseline = next((r for r in summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    if baseline:
        lines.append(f"baseline student (no distillation): {mean_and_spread(baseline)} % "
                     f"over {baseline['n']} seed(s)")
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
