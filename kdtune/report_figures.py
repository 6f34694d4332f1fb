"""The report's figures, drawn from a study's rows and runs (matplotlib, PNG bytes): accuracy against
temperature, the alpha x temperature heatmap, link sets, loss terms, validation accuracy per epoch and the
search's parameter importance. The page that shows them is kdtune/report.py."""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kdtune.scoped import logger_level
from kdtune.records import STOPPED, TrialRecord
from kdtune.results import BASELINE_LABEL, SettingRow, mean_and_spread, pick_best

if TYPE_CHECKING:
    from kdtune.report import StudyRuns

CONFIRM_PREFIX = "best: "  # study.py labels the re-run of a search's best configuration "best: <label>"


@dataclass
class Plot:
    name: str  # file name without .png
    title: str
    caption: str
    png: bytes


def is_confirm(trial: TrialRecord) -> bool:
    from kdtune.tags import BASELINE_PREFIX, FRONT_PREFIX  # a Pareto study's confirm rows

    return trial.label == BASELINE_LABEL or trial.label.startswith((CONFIRM_PREFIX, FRONT_PREFIX, BASELINE_PREFIX))


def outcome(trial: TrialRecord) -> str:
    return {STOPPED: "stopped early"}.get(trial.status, trial.status)



def _label_order(trials: list[TrialRecord]) -> list[str]:
    """Baseline first, then labels in the order their first trial started (the study's variant order)."""
    labels = [BASELINE_LABEL] + [t.label for t in trials]
    return list(dict.fromkeys(labels))


def _finished_rows(summary: list[SettingRow], key: str) -> list[SettingRow]:
    return [r for r in summary if r.n and key in r.params and r.label != BASELINE_LABEL]


def _varies(summary: list[SettingRow], key: str) -> bool:
    return len({r.params[key] for r in _finished_rows(summary, key)}) > 1


def _is_alpha_temperature_grid(summary: list[SettingRow]) -> bool:
    """Both vary, and no two rows share a (T, alpha) cell (else another varied parameter would be hidden)."""
    rows = [r for r in summary if "temperature" in r.params and "alpha" in r.params]
    unique = len({(r.params["temperature"], r.params["alpha"]) for r in rows}) == len(rows)
    return unique and _varies(summary, "temperature") and _varies(summary, "alpha")


def _baseline(summary: list[SettingRow]) -> SettingRow | None:
    return next((r for r in summary if r.label == BASELINE_LABEL and r.n), None)


# ---- figures -------------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.5, columns: int = 1):
    # a bare Figure, not pyplot: no global backend or state in the caller's process (Agg renders the PNG)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _draw_baseline(ax, baseline: dict | None) -> None:
    if baseline:
        mean, std = 100 * baseline.test_mean, 100 * baseline.test_std
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.2,
                   label=f"baseline (no distillation) {mean_and_spread(baseline)} %")
        if std:
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)


def _series_name(params: dict, keys: list[str]) -> str:
    """e.g. 'alpha=0.5, method=kd'; a parameter a row does not set (its method's default) shows as '-'."""
    def shown(value):
        return "-" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)

    return ", ".join(f"{k}={shown(params.get(k))}" for k in keys)


def accuracy_vs_temperature(summary: list[SettingRow]) -> Plot | None:
    rows = _finished_rows(summary, "temperature")
    if len({r.params["temperature"] for r in rows}) < 2:
        return None
    # one line per combination of the other varied parameters (e.g. alpha)
    others = sorted({k for r in rows for k in r.params if k != "temperature"
                     and len({json.dumps(x.params.get(k)) for x in rows}) > 1})
    series: dict[str, list[SettingRow]] = {}
    for row in rows:
        series.setdefault(_series_name(row.params, others) if others else "distilled", []).append(row)
    figure, (ax,) = _figure()
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: r.params["temperature"])
        ax.errorbar([r.params["temperature"] for r in points], [100 * r.test_mean for r in points],
                    yerr=[100 * r.test_std for r in points], marker="o", capsize=3, label=name)
    _draw_baseline(ax, _baseline(summary))
    temperatures = [r.params["temperature"] for r in rows]
    if max(temperatures) / min(temperatures) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy vs temperature")
    ax.legend(fontsize="small")
    seeds = max(r.n for r in rows)
    return Plot("accuracy_vs_temperature", "Test accuracy vs temperature",
                f"Mean test accuracy per temperature; error bars: standard deviation over up to {seeds} seed(s). "
                "Dashed line: the student trained without distillation (band: ± std).", _png(figure))


def heatmap(summary: list[SettingRow]) -> Plot | None:
    if not _is_alpha_temperature_grid(summary):
        return None
    rows = [r for r in summary if r.n and "temperature" in r.params and "alpha" in r.params]
    temperatures = sorted({r.params["temperature"] for r in rows})
    alphas = sorted({r.params["alpha"] for r in rows})
    cells = np.full((len(temperatures), len(alphas)), np.nan)
    for r in rows:
        cells[temperatures.index(r.params["temperature"]), alphas.index(r.params["alpha"])] = 100 * r.test_mean
    baseline = _baseline(summary)
    figure, (ax,) = _figure(width=max(5.0, 1.3 * len(alphas) + 2.5), height=max(3.5, 0.6 * len(temperatures) + 1.8))
    image = ax.imshow(cells, cmap="viridis", aspect="auto", origin="lower")
    middle = np.nanmean(cells)
    for i, j in zip(*np.where(~np.isnan(cells))):
        text = f"{cells[i, j]:.2f}"
        if baseline:
            text += f"\n({cells[i, j] - 100 * baseline.test_mean:+.2f})"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if cells[i, j] < middle else "black")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_xlabel("alpha (weight of the soft term)")
    ax.set_ylabel("temperature T")
    note = f"; baseline {100 * baseline.test_mean:.2f} %" if baseline else ""
    ax.set_title(f"Test accuracy (%) over alpha x T{note}")
    figure.colorbar(image, ax=ax, label="test accuracy (%)")
    return Plot("heatmap_alpha_temperature", "Test accuracy over alpha x T",
                "Mean test accuracy over seeds per (T, alpha); in brackets: points above (+) or below (-) "
                "the baseline student.", _png(figure))


def accuracy_per_link_set(summary: list[SettingRow]) -> Plot | None:
    if len({r.params["links"] for r in _finished_rows(summary, "links")}) < 2:
        return None
    rows = [r for r in summary if r.n and r.label != BASELINE_LABEL]
    figure, (ax,) = _figure(width=max(6.0, 0.8 * len(rows) + 2))
    ax.errorbar(range(len(rows)), [100 * r.test_mean for r in rows], yerr=[100 * r.test_std for r in rows],
                fmt="o", capsize=4, label="distilled student (mean ± std)")
    _draw_baseline(ax, _baseline(summary))
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right")
    ax.set_xlabel("link set (and weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per link set")
    ax.legend(fontsize="small")
    return Plot("accuracy_per_link_set", "Test accuracy per link set",
                "Mean test accuracy per setting (error bars: std over seeds); rows without links transfer the "
                "last layer only. Dashed line: the baseline student.", _png(figure))


def _chosen_trials(final: list[TrialRecord], summary: list[SettingRow]) -> list[TrialRecord]:
    """The best distilled configuration's best seed (by validation accuracy) and the baseline's first seed."""
    chosen = []
    for label in (pick_best(summary, include_baseline=False), BASELINE_LABEL):
        finished = [t for t in final if t.label == label and t.finished]
        if finished:
            chosen.append(max(finished, key=lambda t: (t.metrics["val_acc"], -t.seed)))
    return chosen


def loss_terms(study: StudyRuns, final: list[TrialRecord], summary: list[SettingRow]) -> Plot | None:
    chosen = _chosen_trials(final, summary)
    if not chosen:
        return None
    figure, axes = _figure(width=6.0, columns=len(chosen))
    for ax, trial in zip(axes, chosen):
        terms = sorted(k for k in trial.metrics if k.startswith("loss_"))
        for term in terms:
            steps, values = zip(*study.history(trial.run_id, term))
            ax.plot(steps, values, marker="o", markersize=3, label=term[len("loss_"):])
        if len(terms) > 1:
            steps, values = zip(*study.history(trial.run_id, "train_loss"))
            ax.plot(steps, values, color="black", linestyle="--", label="total")
        _epoch_axis(ax)
        ax.set_ylabel("training loss (weighted term, epoch mean)")
        ax.set_title(f"{trial.label} (seed {trial.seed})")
        ax.legend(fontsize="small")
    return Plot("loss_terms", "Loss terms per epoch",
                "The training loss split into its terms, each already multiplied by its weight (what the engine "
                "sums), for the best distilled configuration (by validation accuracy) and the baseline.",
                _png(figure))


OUTCOME_STYLE = {  # outcome -> (colour, line width, marker at the last epoch)
    "finished": ("tab:blue", 1.0, None),
    "stopped early": ("tab:gray", 1.0, "x"),
    "failed": ("tab:red", 1.0, "X"),
    "unfinished": ("tab:purple", 1.0, ">"),
}


def val_acc_per_epoch(study: StudyRuns, trials: list[TrialRecord], summary: list[SettingRow],
                      search: bool) -> Plot | None:
    if not trials:
        return None
    best = pick_best(summary, include_baseline=False)
    figure, (ax,) = _figure(width=8.0, height=5.0)
    labelled, stops = set(), set()
    for trial in trials:
        points = study.history(trial.run_id, "val_acc")
        if not points:
            continue
        kind, (colour, width, marker) = _trial_style(trial, best, search)
        steps, values = zip(*points)
        ax.plot(steps, [100 * v for v in values], color=colour, linewidth=width, alpha=0.8, zorder=1 + width,
                label=None if kind in labelled else kind)  # thicker (highlighted) lines on top
        labelled.add(kind)
        if marker:
            ax.plot(steps[-1], 100 * values[-1], marker=marker, color=colour, markersize=9, linestyle="none",
                    zorder=3)
        if trial.stopped:
            stops.add(int(trial.metrics.get("epoch", 0)))
    for epoch in sorted(stops):
        ax.axvline(epoch, color="tab:gray", linestyle=":", linewidth=1)
    _epoch_axis(ax)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"Validation accuracy per epoch, {len(trials)} trials")
    ax.legend(fontsize="small")
    where = f"; dotted lines: epochs where ASHA stopped trials ({', '.join(map(str, sorted(stops)))})" if stops else ""
    return Plot("val_acc_per_epoch", "Validation accuracy per epoch",
                f"Every trial's validation accuracy; x: stopped early by ASHA, X: failed, >: not finished{where}.",
                _png(figure))


def _trial_style(trial: dict, best: str | None, search: bool) -> tuple[str, tuple]:
    """What a trial's line shows: the baseline and the best setting stand out; the rest by how they ended."""
    kind = outcome(trial)
    if kind == "finished" and trial.label == BASELINE_LABEL:
        return "baseline", ("black", 2.0, None)
    if kind == "finished" and trial.label == best:
        return f"best: {best}" if not search else best, ("tab:orange", 2.0, None)
    if kind == "finished" and search and is_confirm(trial):
        return "confirm re-run", ("tab:green", 1.5, None)
    if kind == "finished" and not search:
        return "other settings", OUTCOME_STYLE[kind]
    return kind, OUTCOME_STYLE[kind]


# ---- parameter importance (searches) ------------------------------------------------------------

def parameter_importance(search_trials: list[TrialRecord]) -> Plot | None:
    """fANOVA importance of each sampled parameter for validation accuracy. A conditional parameter (sampled
    only for some methods) gets its own panel over the trials that sampled it."""
    scored = [t for t in search_trials if not t.failed and "val_acc" in t.metrics and t.params]
    panels = importance_panels(scored)
    if not panels:
        return None
    figure, axes = _figure(width=5.0, height=max(2.5, 0.45 * max(len(p[2]) for p in panels) + 1.5),
                           columns=len(panels))
    for ax, (title, count, importances) in zip(axes, panels):
        names = list(importances)[::-1]
        bars = ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", padding=3)
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance (share of variance)")
        ax.set_title(f"{title}\n({count} trials)", fontsize="medium")
    return Plot("parameter_importance", "Parameter importance",
                "fANOVA importance (Optuna) of each sampled parameter for the last validation accuracy a trial "
                "reached; trials stopped early count with the accuracy they had then. Ranges are the observed "
                "ones (linear), since MLflow does not record the search space itself.", _png(figure))


def importance_panels(trials: list[TrialRecord]) -> list[tuple[str, int, dict[str, float]]]:
    """[(title, trials used, {param: importance})]: all trials over the parameters every trial has, then each
    set of conditional parameters over the trials that sampled them."""
    import optuna

    study = _rebuilt_study(trials)
    if study is None:
        return []
    names_per_trial = [frozenset(t.params) for t in study.trials]
    common = frozenset.intersection(*names_per_trial)
    groups = [common] + sorted(set(names_per_trial) - {common}, key=lambda names: (len(names), sorted(names)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    panels = []
    for names in groups:
        members = [t for t in study.trials if names <= set(t.params)]
        varied = sorted(n for n in names if len({json.dumps(t.params[n]) for t in members}) > 1)
        if not varied or len({t.value for t in members}) < 2:
            continue  # nothing to explain: fANOVA needs some variance
        fixed = sorted(names - set(varied))
        title = "all trials" if names == common else "trials with " + ", ".join(sorted(names - common))
        if fixed:
            title += " (" + ", ".join(f"{n}={members[0].params[n]}" for n in fixed) + ")"
        panels.append((title, len(members), optuna.importance.get_param_importances(
            study, evaluator=evaluator, params=varied)))
    return panels


def _rebuilt_study(trials: list[TrialRecord]):
    """An in-memory Optuna study holding the search trials; distributions inferred from the observed values."""
    import optuna

    values: dict[str, list] = {}
    for trial in trials:
        for name, value in trial.params.items():
            values.setdefault(name, []).append(value)
    distributions = {name: _distribution(seen) for name, seen in values.items()}
    if not distributions:
        return None
    with logger_level("optuna", logging.WARNING):
        study = optuna.create_study(direction="maximize")
        for trial in trials:
            study.add_trial(optuna.trial.create_trial(
                params=trial.params, distributions={n: distributions[n] for n in trial.params},
                value=trial.metrics["val_acc"]))
    return study


def _distribution(seen: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
        return IntDistribution(min(seen), max(seen))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen):
        return FloatDistribution(min(seen), max(seen))
    return CategoricalDistribution(sorted(set(seen), key=str))
