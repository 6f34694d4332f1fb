"""The study report from MLflow alone: real studies through Ray Tune into a real MLflow server, then the report."""
from __future__ import annotations

import base64
import io
import re
import shutil

import pytest

from kdtune import report, report_figures
from kdtune.errors import KdtuneError
from kdtune.results import format_matrix, format_table
from kdtune.records import TrialRecord
from kdtune.spaces import MethodSpace
from kdtune.study import Search, StudySpec, run_study
from kdtune.tracking import client_for

pytestmark = pytest.mark.e2e

GRID_FIGURES = {"accuracy_vs_temperature.png", "heatmap_alpha_temperature.png", "loss_terms.png",
                "val_acc_per_epoch.png"}


def study_spec(name, mlflow_server, storage, **fields):
    return StudySpec(name=name, dataset="digits", teacher_overrides={"epochs": 4}, tracking_uri=mlflow_server.uri,
                     storage=str(storage), max_concurrent=2, register_as=f"{name}-student", **fields)


@pytest.fixture(scope="module")
def grid_study(local_ray, mlflow_server, tmp_path_factory):
    """seed 001 Tables 1/3 in miniature: baseline + KD over 2 alphas x 2 temperatures, 2 seeds, 3 epochs."""
    variants = [{"label": "baseline", "method": "none"}] + [
        {"label": f"T={t:g} a={a:g}", "method": "kd", "temperature": t, "alpha": a}
        for t in (2.0, 6.0) for a in (0.5, 0.9)]
    spec = study_spec("report_grid", mlflow_server, tmp_path_factory.mktemp("ray"), variants=variants, seeds=2,
                      overrides={"epochs": 3})
    return run_study(spec, echo=lambda *a: None)


@pytest.fixture(scope="module")
def grid_report(grid_study, mlflow_server, tmp_path_factory):
    client = client_for(mlflow_server.uri)
    return report.log_report(client, grid_study.parent_run_id, tmp_path_factory.mktemp("report") / "report")


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def assert_valid_png(data: bytes) -> None:
    from PIL import Image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        assert image.size[0] > 300 and image.size[1] > 200


def test_grid_report_holds_the_heatmap_the_temperature_curve_and_the_loss_terms(grid_study, grid_report,
                                                                                mlflow_server):
    folder = grid_report.parent
    assert {p.name for p in folder.glob("*.png")} == GRID_FIGURES  # no link-set or search figures for this grid
    page = grid_report.read_text()
    images = embedded_pngs(page)
    assert len(images) == len(GRID_FIGURES) and page.count("<img ") == len(GRID_FIGURES)
    for data in images:
        assert_valid_png(data)
    assert sorted(images) == sorted(p.read_bytes() for p in folder.glob("*.png"))  # the same PNGs as beside it
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'<(script|link|iframe)\b', page) and not re.search(r'src="(?!data:)', page)
    assert "report_grid" in page and "digits_teacher" in page and "digits_student" in page
    assert f"{mlflow_server.uri}/#/experiments/{grid_study.experiment_id}/runs?workflowType=machine_learning" in page

    # the logged report is the local one, under report/ of the study's parent run
    client = client_for(mlflow_server.uri)
    logged = {a.path for a in client.list_artifacts(grid_study.parent_run_id, "report")}
    assert logged == {f"report/{p.name}" for p in folder.iterdir()}


def test_grid_report_tables_hold_the_numbers_of_the_study(grid_study, grid_report):
    folder = grid_report.parent
    # the same statistics as the study computed from Tune's results, rebuilt here from MLflow runs
    expected = format_table(grid_study.summary, "setting").splitlines()
    table = (folder / "table.txt").read_text().splitlines()
    assert table[0] == expected[0] and sorted(table[1:]) == sorted(expected[1:])
    matrix = (folder / "matrix.txt").read_text().rstrip("\n")
    assert matrix == format_matrix(grid_study.summary, "temperature", "alpha", "T", "alpha")
    page = grid_report.read_text()
    for row in grid_study.summary:  # every setting's mean ± std is in the HTML table
        assert f"<td>{row.label}</td>" in page
        assert f"<td>{100 * row.test_mean:.2f} ± {100 * row.test_std:.2f}</td>" in page
    rows = matrix.splitlines()[1:4]  # T=2, T=6, then the column means (no overall mean)
    for line, padding in zip(rows, ["", "", "<td></td>"]):
        assert "<tr>" + "".join(f"<td>{cell}</td>" for cell in line.split()) + padding + "</tr>" in page


def test_report_is_rebuilt_from_mlflow_alone_after_the_ray_results_are_deleted(grid_study, grid_report,
                                                                              mlflow_server, tmp_path):
    shutil.rmtree(grid_study.study_dir)
    client = client_for(mlflow_server.uri)
    parent = report.find_study_run(client, "report_grid")
    assert parent == grid_study.parent_run_id
    assert report.find_study_run(client, parent) == parent
    again = report.build_report(client, parent, tmp_path / "again")
    assert sorted(p.name for p in again.parent.iterdir()) == sorted(p.name for p in grid_report.parent.iterdir())
    for name in ("table.txt", "matrix.txt"):
        assert (again.parent / name).read_text() == (grid_report.parent / name).read_text()
    for data in embedded_pngs(again.read_text()):
        assert_valid_png(data)


def test_an_unknown_study_is_one_clear_error(mlflow_server):
    client = client_for(mlflow_server.uri)
    with pytest.raises(KdtuneError, match=r"study 'no_such_study': neither a study name nor a run id on http://"):
        report.find_study_run(client, "no_such_study")


def test_search_report_shows_asha_stopping_points_and_parameter_importance(local_ray, mlflow_server, tmp_path):
    space = MethodSpace(("kd", "links"), ("2", "3", "2,3"))
    spec = study_spec("report_search", mlflow_server, tmp_path / "ray", overrides={"epochs": 4},
                      search=Search(space, num_samples=6, grace_period=1, reduction_factor=3, seed=1))
    result = run_study(spec, echo=lambda *a: None)
    client = client_for(mlflow_server.uri)
    page = report.build_report(client, result.parent_run_id, tmp_path / "report")
    pngs = {p.name for p in page.parent.glob("*.png")}
    assert {"val_acc_per_epoch.png", "parameter_importance.png", "loss_terms.png"} <= pngs
    assert "heatmap_alpha_temperature.png" not in pngs  # a search's final table is baseline vs best only
    for data in embedded_pngs(page.read_text()):
        assert_valid_png(data)

    stops = sorted({t.metrics["epoch"] for t in result.phases["search"] if t.stopped})
    assert stops, "ASHA stopped no trial: the stopping-points figure would show nothing"
    html = page.read_text()
    assert f"epochs where ASHA stopped trials ({', '.join(str(int(e)) for e in stops)})" in html
    assert html.count("<td>stopped early</td>") == sum(
        1 for t in result.phases["search"] if t.stopped)

    study = report.load_study(client, result.parent_run_id)
    trials = [t for t in map(report.trial_of, study.students) if not report.is_confirm(t)]
    panels = report_figures.importance_panels(trials)
    title, count, importances = panels[0]
    assert title == "all trials" and count == 6
    assert set(importances) <= {"method", "temperature", "alpha"}
    assert sum(importances.values()) == pytest.approx(1.0)


def test_importance_gets_a_panel_per_conditional_parameter_set():
    # beta exists only where method=links, and decides the accuracy there
    def trial(params, val):
        return TrialRecord("search", "", params, 0, "finished", {"val_acc": val})

    trials = [trial({"method": "kd", "temperature": 1.0 + i, "alpha": 0.1 * (i + 1)}, 0.5) for i in range(6)]
    trials += [trial({"method": "links", "temperature": 2.0 + (i % 3), "alpha": 0.2 + 0.1 * (i % 2),
                      "beta": 0.1 * (i + 1), "links": "2"}, 0.1 * (i + 1)) for i in range(8)]
    panels = report_figures.importance_panels(trials)
    assert [(title, count) for title, count, _ in panels] == [("all trials", 14),
                                                              ("trials with beta, links (links=2, method=links)", 8)]
    conditional = panels[1][2]
    assert set(conditional) == {"temperature", "alpha", "beta"}
    assert max(conditional, key=conditional.get) == "beta"
    assert report_figures.importance_panels(trials[:6]) == []  # equal accuracies: nothing to explain, no figure
