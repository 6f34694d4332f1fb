"""From finished trials to the numbers a researcher reports: per-configuration statistics, the gain over
the baseline with a confidence interval, and tables in the shape of the seed papers'.

Selection never looks at the test set: the best configuration is the one with the best mean validation
accuracy; its test accuracy is what gets reported.
"""
from __future__ import annotations

import math
import statistics

from kdtune.records import TrialRecord

BASELINE_LABEL = "baseline"


def summarise(trials: list[TrialRecord], order: list[str] | None = None) -> list[dict]:
    """One row per label (in `order`, else as first seen): mean/std/median over finished seeds, gain vs baseline."""
    rows: dict[str, dict] = {}
    rank = {label: i for i, label in enumerate(order or [])}
    for trial in sorted(trials, key=lambda t: (rank.get(t.label, len(rank)), t.seed)):
        row = rows.setdefault(trial.label, {"label": trial.label, "params": trial.params,
                                            "val": [], "test": [], "failed": 0, "stopped": 0})
        if trial.failed:
            row["failed"] += 1
        elif trial.stopped:
            row["stopped"] += 1  # stopped early by the scheduler: no final test evaluation
        else:
            row["val"].append(trial.metrics["val_acc"])
            row["test"].append(trial.metrics["test_acc"])
    summary = [_statistics(row) for row in rows.values()]
    baseline = next((r for r in summary if r["label"] == BASELINE_LABEL and r["n"]), None)
    for row in summary:
        row.update(gain_over(row, baseline))
    return summary


def _statistics(row: dict) -> dict:
    n = len(row["test"])
    return {
        "label": row["label"], "params": row["params"], "n": n, "failed": row["failed"], "stopped": row["stopped"],
        "val": row["val"], "test": row["test"],
        "val_mean": statistics.fmean(row["val"]) if n else math.nan,
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
    if v1 + v2 == 0:
        return {"gain": gain, "gain_low": gain, "gain_high": gain}
    dof = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    from scipy import stats

    half = stats.t.ppf(0.5 + confidence / 2, dof) * math.sqrt(v1 + v2)
    return {"gain": gain, "gain_low": gain - half, "gain_high": gain + half}


def pick_best(summary: list[dict], include_baseline: bool = True) -> str | None:
    finished = [r for r in summary if r["n"] and (include_baseline or r["label"] != BASELINE_LABEL)]
    return max(finished, key=lambda r: r["val_mean"])["label"] if finished else None


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
    """Seed 000 Tables 3/4 shape: one row per setting; test accuracy mean ± std (and the median, which seed 003
    reports), gain over the baseline with its 95% CI."""
    median_header = f"  {'median':>7}" if show_median else ""
    lines = [f"{label_header:>18}  {'val acc':>8}  {'test acc':>17}{median_header}  {'vs baseline [95% CI]':>26}  {'n':>2}"]
    for row in summary:
        if not row["n"]:
            note = f"{row['failed']} failed" if row["failed"] else f"{row['stopped']} stopped early"
            median = f"  {'-':>7}" if show_median else ""
            lines.append(f"{row['label']:>18}  {'-':>8}  {'-':>17}{median}  {'':>26}  {0:>2}  ({note})")
            continue
        test = f"{mean_and_spread(row)} %"
        median = f"  {percent(row['test_median']):>6}%" if show_median else ""
        notes = ", ".join(f"{row[k]} {k}" for k in ("failed", "stopped") if row[k])
        lines.append(f"{row['label']:>18}  {percent(row['val_mean']):>7}%  {test:>17}{median}  {format_gain(row):>26}  "
                     f"{row['n']:>2}" + (f"  ({notes})" if notes else ""))
    return "\n".join(lines)


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
