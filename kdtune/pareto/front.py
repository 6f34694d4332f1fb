"""A Pareto study read back from MLflow alone: the report's front figure and table, and `kdtune models pareto
NAME` (the registered front, cheapest first)."""
from __future__ import annotations

from kdtune.tags import (COST_TAG, COST_TEXT, DEVICE_TAG, FRONT_STUDY_TAG, ON_FRONT_TAG, PHASE_TAG, STUDENT_TAG,
                         cost_metric)


# ---- the report's figure (from MLflow alone) -------------------------------------------------------

def is_pareto(study_runs) -> bool:
    return COST_TAG in study_runs.parent.data.tags


def report_parts(study_runs):
    """(Plot, front table text) for a Pareto study's report, or None for any other study."""
    if not is_pareto(study_runs):
        return None
    from kdtune.report_figures import Plot, _figure, _png

    key = study_runs.parent.data.tags[COST_TAG]
    metric = cost_metric(key)
    groups: dict[str, list] = {"search": [], "baseline_search": [], "front": [], "baseline": [], "on_front": []}
    for run in study_runs.students:
        tags, metrics = run.data.tags, run.data.metrics
        phase = tags.get(PHASE_TAG)
        if phase not in groups or metric not in metrics or "val_acc" not in metrics:
            continue
        groups[phase].append(run)
        if tags.get(ON_FRONT_TAG) == "1":
            groups["on_front"].append(run)

    def per_student(runs, value):
        points: dict[str, list] = {}
        for run in runs:
            if value in run.data.metrics:
                points.setdefault(run.data.tags.get(STUDENT_TAG, "?"), []).append(run)
        rows = []
        for student, members in points.items():
            values = [100 * r.data.metrics[value] for r in members]
            rows.append((members[0].data.metrics[metric], sum(values) / len(values), student))
        return sorted(rows)

    figure, (left, right) = _figure(width=6.5, height=4.8, columns=2)
    front, baseline = per_student(groups["front"], "test_acc"), per_student(groups["baseline"], "test_acc")
    if front:
        left.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:orange", linewidth=2, markersize=8,
                  label="front: distilled students", zorder=3)
        names = _short_names([p[2] for p in front])
        for x, y, student in front:
            left.annotate(names[student], (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    if baseline:
        left.plot([p[0] for p in baseline], [p[1] for p in baseline], "--s", color="black", markersize=6,
                  label="same students, no distillation", zorder=2)
    left.set_title("Front on test (mean over seeds)")
    left.set_ylabel("test accuracy (%)")
    for label, runs, style in (("search trials (distilled)", groups["search"], dict(color="tab:gray", marker="o")),
                               ("baseline search (no distillation)", groups["baseline_search"],
                                dict(color="tab:blue", marker="x"))):
        if runs:
            right.scatter([r.data.metrics[metric] for r in runs], [100 * r.data.metrics["val_acc"] for r in runs],
                          s=22, alpha=0.55, label=label, **style)
    chosen = sorted((r.data.metrics[metric], 100 * r.data.metrics["val_acc"]) for r in groups["on_front"])
    if chosen:
        right.step([c[0] for c in chosen], [c[1] for c in chosen], where="post", color="tab:orange", linewidth=2,
                   label="front (on validation)", zorder=3)
        right.scatter([c[0] for c in chosen], [c[1] for c in chosen], color="tab:orange", s=60, zorder=4)
    right.set_title("Search on validation: what chose the front")
    right.set_ylabel("validation accuracy (%)")
    values = [r.data.metrics[metric] for g in groups.values() for r in g]
    for ax in (left, right):
        ax.set_xlabel(COST_TEXT.get(key, key))
        if values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.legend(fontsize="x-small")
    device = study_runs.parent.data.tags.get(DEVICE_TAG, "?")
    plot = Plot("pareto_front", "Accuracy vs cost: the Pareto front",
                f"Left: each front member (orange) and the same architecture trained without distillation (black), "
                f"same epochs, test accuracy. Right: every search trial on validation, the front it chose "
                f"highlighted. Cost: {COST_TEXT.get(key, key)}; latency measured on {device}.", _png(figure))
    return plot, _front_text(study_runs)


def _short_names(students: list[str]) -> dict[str, str]:
    """What tells the students apart: a family's knobs that differ (e.g. 'width=0.5'), else the reference."""
    parts = {s: s.split(":", 1)[1].split(",") if ":" in s else [s] for s in students}
    common = set.intersection(*(set(p) for p in parts.values())) if len(students) > 1 else set()
    return {s: ",".join(p for p in parts[s] if p not in common) or s for s in students}


def _front_text(study_runs) -> str:
    import tempfile
    from pathlib import Path

    client, run_id = study_runs.client, study_runs.parent.info.run_id
    try:
        with tempfile.TemporaryDirectory() as folder:
            return Path(client.download_artifacts(run_id, "results/pareto_front.txt", folder)).read_text().rstrip()
    except Exception:  # a study still running has not written it yet
        return ""


# ---- `kdtune models pareto NAME` ----------------------------------------------------------------------

def list_front(client, name: str, study_run: str | None = None) -> str:
    """The front registered under `name` by its latest Pareto study (or by `study_run`), cheapest first."""
    from kdtune.errors import TrackingError

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception as error:
        raise TrackingError(f"model {name!r}: could not be read ({type(error).__name__})") from None
    members = [v for v in versions if FRONT_STUDY_TAG in v.tags]
    if not versions:
        raise TrackingError(f"model {name!r}: not in the registry (kdtune models list shows what is)")
    if not members:
        raise TrackingError(f"model {name!r}: no version was registered by a Pareto study "
                            "(studies/pareto.py registers its front)")
    if study_run is None:
        study_run = max(members, key=lambda v: int(v.version)).tags[FRONT_STUDY_TAG]
    members = [v for v in members if v.tags[FRONT_STUDY_TAG] == study_run]
    if not members:
        raise TrackingError(f"model {name!r}: no version comes from study run {study_run}")
    aliases: dict[str, list] = {}
    model = client.get_registered_model(name)
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    key = members[0].tags.get("pareto_cost", "latency_ms_batch1")
    members.sort(key=lambda v: float(v.tags.get(key, "nan") if key != "params" else v.tags.get("parameters", "nan")))
    def student(v):
        return v.tags.get("student", "?") + (" int8" if v.tags.get("precision") == "int8" else "")

    width = max([7] + [len(student(v)) for v in members])
    lines = [f"{name}: Pareto front of study run {study_run} ({len(members)} members, by {key}; latency on "
             f"{members[0].tags.get('latency_device', '?')})",
             f"{'version':<8} {'aliases':<12} {'student':<{width}}  {'ms b=1':>8}  {'ms/img':>8}  {'params':>9}  "
             f"{'MFLOPs':>8}  {'val mean':>8}  {'test mean':>9}"]
    for v in members:
        t = v.tags
        marks = " ".join(f"@{a}" for a in aliases.get(str(v.version), []))
        lines.append(f"v{v.version:<7} {marks:<12} {student(v):<{width}}  "
                     f"{float(t.get('latency_ms_batch1', 'nan')):>8.4f}  {float(t.get('latency_ms_per_image', 'nan')):>8.5f}  "
                     f"{int(t.get('parameters', 0)):>9,}  {int(t.get('flops', 0)) / 1e6:>8.3f}  "
                     f"{100 * float(t.get('val_acc_mean', 'nan')):>7.2f}%  {100 * float(t.get('test_acc_mean', 'nan')):>8.2f}%")
    return "\n".join(lines)
