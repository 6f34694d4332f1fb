"""The study report: the paper-shaped tables and figures of one study, rebuilt from MLflow alone.

    build_report(client, parent_run_id, out_dir)  -> out_dir/report.html, the PNGs and text tables beside it
    log_report(client, parent_run_id, out_dir)    -> the same, logged under "report/" of the study's parent run
    find_study_run(client, "alpha_temperature")   -> the latest study run of that study (a run id passes through)

Everything comes from MLflow (the parent run, its child runs, their tags, params and metric histories), never
from the Ray results folder, so a report can be rebuilt after that folder is gone, and while a study runs.
Which figures appear depends on what the study varied:

    temperature varies          test accuracy vs T, error bars over seeds, baseline as a line (seed 000 Table 3)
    alpha and temperature vary  alpha x T heatmap and matrix table (seed 001 Tables 1/3)
    link sets vary              test accuracy per link set (seed 000 Table 4)
    always                      loss terms per epoch of the best trial and the baseline (seed 000 section 2.3);
                                validation accuracy per epoch of every trial, ASHA's stopping points marked
    a search                    parameter importance (fANOVA on an Optuna study rebuilt from the trials)

Statistics come from kdtune.results: child runs are turned back into the trial dicts it takes.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from kdtune import tracking
from kdtune.errors import KdtuneError
from kdtune.records import FINISHED, STOPPED, UNFINISHED, TrialRecord, status_of
from kdtune.results import (SettingRow, format_gain, format_matrix, format_table, mean_and_spread, percent,
                            baseline_tuning, format_failures, other_points_note, pick_best, summarise, verdict)
from kdtune.report_figures import (Plot, _is_alpha_temperature_grid, _label_order,
                                    accuracy_per_link_set, accuracy_vs_temperature, heatmap, is_confirm, loss_terms,
                                    outcome, parameter_importance, val_acc_per_epoch)
from kdtune.tags import (FAILURE_TAG, LABEL_TAG, OVERRIDES_TAG, POINT_TAG, ROLE_STUDENT, ROLE_STUDY, ROLE_TAG,
                         STOPPED_TAG, TEACHER_TAG)

REPORT_ARTIFACT_PATH = "report"
MATRIX_CORNER = ("T", "alpha")


# ---- finding a study -------------------------------------------------------------------------------

def find_study_run(client, study: str) -> str:
    """The parent run id of `study`: a study (experiment) name gives its latest study run; a run id is checked."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(study)
    if experiment is not None:
        runs = client.search_runs([experiment.experiment_id], "tags.`kdtune.role` = 'study'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise KdtuneError(f"study {study!r}: experiment {study!r} holds no kdtune study run "
                              "(no run tagged kdtune.role=study)")
        return runs[0].info.run_id
    try:
        run = client.get_run(study)
    except MlflowException:
        names = sorted(e.name for e in client.search_experiments())
        raise KdtuneError(f"study {study!r}: neither a study name nor a run id on {client.tracking_uri}; "
                          f"studies there: {', '.join(names) or 'none'}") from None
    if run.data.tags.get(ROLE_TAG) != ROLE_STUDY:
        raise KdtuneError(f"run {study}: not a study run (kdtune.role={run.data.tags.get('kdtune.role')!r}); "
                          "give a study's parent run id or the study name")
    return run.info.run_id


# ---- reading a study from MLflow -------------------------------------------------------------------

@dataclass
class StudyRuns:
    """One study as MLflow holds it: the parent run and its student runs, oldest first."""

    client: object
    parent: object
    experiment_name: str
    students: list
    histories: dict = field(default_factory=dict)  # (run_id, metric) -> [(step, value)], fetched on demand

    @property
    def params(self) -> dict:
        return self.parent.data.params

    @property
    def is_search(self) -> bool:
        return self.params.get("search") == "True" or any(STOPPED_TAG in r.data.tags for r in self.students)

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        key = (run_id, metric)
        if key not in self.histories:
            points = self.client.get_metric_history(run_id, metric)
            self.histories[key] = sorted((m.step, m.value) for m in points)
        return self.histories[key]


def load_study(client, parent_run_id: str) -> StudyRuns:
    parent = client.get_run(parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    children = _all_runs(client, parent.info.experiment_id, f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'")
    students = sorted((r for r in children if r.data.tags.get(ROLE_TAG) == ROLE_STUDENT),
                      key=lambda r: r.info.start_time)
    return StudyRuns(client, parent, experiment.name, students)


def _all_runs(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def trial_of(run) -> TrialRecord:
    """A child run as the TrialRecord kdtune.results takes (what study._collect builds from Tune)."""
    tags, metrics = run.data.tags, dict(run.data.metrics)
    error = tags.get(FAILURE_TAG) or ("failed" if run.info.status == "FAILED" else None)
    if tags.get(STOPPED_TAG) is not None and error is None:
        status = STOPPED
    elif "epochs_total" in metrics or error is not None:
        status = status_of(metrics, error)
        status = UNFINISHED if status == STOPPED else status  # no stop tag: still running, or its driver died
    else:  # a run recorded before kdtune logged epochs_total: its final epoch logged test_acc
        status = FINISHED if "test_acc" in metrics else UNFINISHED
    return TrialRecord("study", tags[LABEL_TAG], json.loads(tags.get(OVERRIDES_TAG, "{}")),
                       int(run.data.params.get("seed", 0)), status, metrics, error, run.info.run_id,
                       point=tags.get(POINT_TAG, ""))


# ---- the report ------------------------------------------------------------------------------------

@dataclass
class Report:
    study: StudyRuns
    trials: list[TrialRecord]  # every student trial
    summary: list[SettingRow]  # the study's table: the grid, or a search's confirm phase
    plots: list[Plot]
    texts: dict[str, str]  # file name -> text table


def build_report(client, parent_run_id: str, out_dir) -> Path:
    """Write out_dir/report.html (self-contained), a PNG per figure and the text tables; return the HTML path."""
    report = make_report(load_study(client, parent_run_id))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for plot in report.plots:
        (out / f"{plot.name}.png").write_bytes(plot.png)
    for name, text in report.texts.items():
        (out / name).write_text(text + "\n")
    page = out / "report.html"
    page.write_text(render_html(report))
    return page


def log_report(client, parent_run_id: str, out_dir) -> Path:
    """Build the report and log its folder as the artifacts "report/" of the study's parent run."""
    page = build_report(client, parent_run_id, out_dir)
    client.log_artifacts(parent_run_id, str(page.parent), REPORT_ARTIFACT_PATH)
    return page


def make_report(study: StudyRuns) -> Report:
    trials = [trial_of(r) for r in study.students]
    search = study.is_search
    final = [t for t in trials if is_confirm(t)] if search else trials
    # a trial still running (or whose driver died) is in no row of the table
    summary = summarise([t for t in final if t.status != UNFINISHED],
                        order=_label_order(final))
    # the table, then every failed trial (at the chosen points, at points not chosen, and a search's own)
    others = [dataclasses.replace(t, phase="search") for t in trials if search and not is_confirm(t)]
    texts = {"table.txt": "\n".join(filter(None, [format_table(summary, "setting"),
                                                   format_failures(summary, others)]))}
    plots = [p for p in (accuracy_vs_temperature(summary), heatmap(summary), accuracy_per_link_set(summary),
                         loss_terms(study, final, summary), val_acc_per_epoch(study, trials, summary, search))
             if p is not None]
    if _is_alpha_temperature_grid(summary):
        texts["matrix.txt"] = format_matrix(summary, "temperature", "alpha", *MATRIX_CORNER)
    from kdtune.pareto.front import report_parts

    front = report_parts(study)
    if front is not None:  # a Pareto study: its front first; T and links vary with the architecture there
        plots = [front[0]] + [p for p in plots if p.name not in (
            "accuracy_vs_temperature", "heatmap_alpha_temperature", "accuracy_per_link_set")]
        texts.pop("matrix.txt", None)
        texts["pareto_front.txt"] = front[1]
    from kdtune.results import format_teachers, read_teacher_rows

    if read_teacher_rows(study.parent.data.tags):
        texts["teachers.txt"] = "\n".join(format_teachers(read_teacher_rows(study.parent.data.tags)))
    if search:
        importance = parameter_importance([t for t in trials if not is_confirm(t)])
        if importance is not None:
            plots.append(importance)
    return Report(study, trials, summary, plots, texts)


# ---- HTML --------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
tr.best td { font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0 2em; }
figcaption, .note { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.header dt { font-weight: bold; }
dl.header dd { margin: 0; }
"""


def render_html(report: Report) -> str:
    study = report.study
    title = f"kdtune study report: {study.experiment_name}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>", _header_html(report),
             _teachers_html(study), "<h2>Results</h2>",
             # a Pareto study's result is its front (each member with its no-distillation student), not one best
             f"<pre>{_e(report.texts['pareto_front.txt'])}</pre>" if report.texts.get("pareto_front.txt")
             else _summary_html(report.summary, _tuning(study.params)), _failures_html(report)]
    if "matrix.txt" in report.texts:
        parts += ["<h2>Test accuracy (%) per temperature and alpha</h2>",
                  _matrix_html(report.texts["matrix.txt"], " \\ ".join(MATRIX_CORNER))]
    if study.is_search:
        parts += ["<h2>Search trials</h2>", _search_html([t for t in report.trials if not is_confirm(t)])]
    parts.append("<h2>Figures</h2>")
    parts += [_figure_html(plot) for plot in report.plots]
    printed = _study_table_text(study)
    if printed:
        parts.append(f"<details><summary>The table as the study printed it (results/table.txt)</summary>"
                     f"<pre>{_e(printed)}</pre></details>")
    parts.append(_base_config_html(study))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _e(text) -> str:
    return html.escape(str(text))


def _teachers_html(study: StudyRuns) -> str:
    """The teacher's (each ensemble member's, and the ensemble's) accuracy on the students' splits."""
    from kdtune.results import ENSEMBLE, read_teacher_rows

    rows = read_teacher_rows(study.parent.data.tags)
    if not rows:
        return ""
    cells = [["ensemble" if r["member"] == ENSEMBLE else (f"member {r['member']}" if len(rows) > 1 else "teacher"),
              percent(r["val_acc"]), percent(r["test_acc"]), r["source"]] for r in rows]
    note = ("<p class=\"note\">The students distil from the ensemble: at each trial's temperature T the soft target "
            "is the members' averaged probabilities, mean_i softmax(z_i / T); the ensemble's accuracy is that of "
            "its averaged probabilities at T = 1.</p>" if len(rows) > 1 else "")
    return ("<h2>Teacher</h2>" + _table(["teacher", "val acc (%)", "test acc (%)", "source"], cells,
                                        ["best" if r["member"] == ENSEMBLE else "" for r in rows]) + note)



def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join((f"<tr class=\"{_e(c)}\">" if c else "<tr>") + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>"
                   for row, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _header_html(report: Report) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _header_items(report))
    rows += f"<dt>MLflow</dt><dd>{_mlflow_links(report.study)}</dd>"
    built = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"<dl class=\"header\">{rows}</dl><p class=\"note\">Report built {built} from MLflow alone.</p>"


def _header_items(report: Report) -> list[tuple[str, str]]:
    study, parent = report.study, report.study.parent
    params, tags, info = study.params, parent.data.tags, parent.info
    teacher = params.get("teacher", "?") + (f" ({tags[TEACHER_TAG]})" if TEACHER_TAG in tags else "")
    kind = (f"Optuna search ({params.get('search.num_samples', '?')} samples) + confirm re-runs" if study.is_search
            else f"grid, {params.get('seeds', '?')} seed(s) per setting")
    counts = Counter(outcome(t) for t in report.trials)
    items = [("study", study.experiment_name), ("dataset", params.get("dataset", "?")), ("teacher", teacher),
             ("student", params.get("student", "?")), ("kind", kind),
             ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))),
             ("status", _status(parent)),
             ("trials", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none yet")]
    if "val_samples" in params:
        items.append(("splits", f"train {params.get('train_samples', '?')} (validation {params['val_samples']} of "
                                f"them, stratified by class), test {params.get('test_samples', '?')}"))
    if params.get("tune", "-") != "-":
        items.append(("tuned per setting", f"{params['tune']}, each setting chosen on validation"))
    if "wall_time_s" in parent.data.metrics:
        items.append(("wall time", f"{parent.data.metrics['wall_time_s']:.0f} s"))
    return items


def _status(parent) -> str:
    # the report logged at a study's end is built before the parent run is closed, after its results are logged
    if parent.info.status == "RUNNING" and "wall_time_s" in parent.data.metrics:
        return "FINISHED (results logged)"
    return parent.info.status


def _mlflow_links(study: StudyRuns) -> str:
    uri, info = study.client.tracking_uri, study.parent.info
    ids = f"experiment {_e(info.experiment_id)}, study run {_e(info.run_id)} on {_e(uri)}"
    if not uri.startswith(("http://", "https://")):
        return ids
    runs = tracking.ui_link(uri, info.experiment_id)
    run = f"{uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    return f"<a href=\"{_e(runs)}\">runs of this study</a> · <a href=\"{_e(run)}\">the study run</a> ({ids})"


def _tuning(params: dict) -> str | None:
    """How the study tuned its baseline, from the parent run's params."""
    tune = json.loads(params["tune"]) if params.get("tune", "-") != "-" else {}
    return baseline_tuning(tune, int(float(params.get("baseline_search", 0) or 0)))


def _summary_html(summary: list[SettingRow], tuning: str | None = None) -> str:
    if not summary:
        return "<p class=\"note\">No trial has finished yet.</p>"
    best = pick_best(summary)
    rows, classes = [], []
    for row in summary:
        notes = ", ".join(f"{count} {what}" for what, count in (("failed", row.failed), ("stopped", row.stopped))
                          if count)
        if row.failed:
            notes += " (flagged: not chosen as best)"
        notes = "; ".join(filter(None, [notes, other_points_note(row)]))
        rows.append([row.label, row.point or "-", percent(row.val_mean),
                     mean_and_spread(row) if row.n else "-",
                     percent(row.test_median), format_gain(row), f"{row.n}/{row.total}", notes])
        classes.append("best" if row.label == best else "")
    table = _table(["setting", "chosen on val", "val acc (%)", "test acc (%) mean ± std", "median",
                    "vs baseline [95% CI]", "finished", "notes"], rows, classes)
    return (table + f"<p class=\"note\">Bold: the best setting by mean validation accuracy ({_e(best)}); "
            "its test accuracy is what is reported. The gain's interval is a Welch t 95% CI over seeds; "
            f"finished: the chosen point's seeds (failures at the points not chosen are in the notes and listed "
            f"below); {_e(verdict(summary, tuning))}.</p>")


def _failures_html(report: Report) -> str:
    """Every failed student trial of the study, from MLflow: its setting, point, seed, error and run; whether it
    was at the point its setting was reported at, at a point not chosen, or a search trial."""
    failed = [t for t in report.trials if t.failed]
    if not failed:
        return ""
    chosen = {row.label: row.point for row in report.summary}
    search = report.study.is_search

    def where(trial) -> str:
        if search and not is_confirm(trial):
            return "search trial"
        if trial.label in chosen and trial.point != chosen[trial.label]:
            return "a point not chosen"
        return "the chosen point"

    rows = [[t.label, t.point or "-", str(t.seed), where(t), t.error or "", t.run_id or ""] for t in failed]
    return (f"<h3>Failed trials ({len(failed)} of {len(report.trials)})</h3>"
            + _table(["setting", "point", "seed", "where", "error", "MLflow run"], rows))


def _matrix_html(text: str, corner: str) -> str:
    """format_matrix's text as an HTML table. Its cells hold no spaces (except the corner); a row starts with a
    T value or "mean" (the column means, one cell short); any other line is a note."""
    lines = text.splitlines()
    header = [corner] + lines[0].split(corner, 1)[1].split()
    rows, notes = [], []
    for line in lines[1:]:
        cells = line.split()
        if cells[0] == "mean" or re.fullmatch(r"[-+.\deE]+", cells[0]):
            rows.append(cells + [""] * (len(header) - len(cells)))
        else:
            notes.append(line)
    return _table(header, rows) + "".join(f"<p class=\"note\">{_e(n)}</p>" for n in notes)


def _search_html(trials: list[dict]) -> str:
    ranked = sorted(trials, key=lambda t: t.metrics.get("val_acc", -1.0), reverse=True)
    rows = [[t.label, percent(t.metrics["val_acc"]) if "val_acc" in t.metrics else "-",
             str(int(t.metrics.get("epoch", 0))), outcome(t)] for t in ranked]
    return _table(["configuration", "last val acc (%)", "epochs", "outcome"], rows)


def _figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{_e(plot.title)}\">"
            f"<figcaption><b>{_e(plot.title)}</b> ({_e(plot.name)}.png). {_e(plot.caption)}</figcaption></figure>")


def _study_table_text(study: StudyRuns) -> str | None:
    if not any(a.path == "results/table.txt" for a in study.client.list_artifacts(study.parent.info.run_id, "results")):
        return None  # a study still running has not written it yet
    with tempfile.TemporaryDirectory() as folder:
        path = study.client.download_artifacts(study.parent.info.run_id, "results/table.txt", folder)
        return Path(path).read_text().rstrip()


def _base_config_html(study: StudyRuns) -> str:
    rows = [[k[len("base."):], v] for k, v in sorted(study.params.items()) if k.startswith("base.")]
    if not rows:
        return ""
    return ("<details><summary>Configuration every student trial starts from (parent run params base.*)"
            "</summary>" + _table(["field", "value"], rows) + "</details>")

