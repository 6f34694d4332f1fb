"""Warm starts: a search first evaluates the best configurations an earlier study recorded in MLflow for the same
dataset, teacher and student, and names where each came from. Real Ray, a real MLflow server of its own (so
other tests' studies are not candidates), digits."""
from __future__ import annotations

import json

import pytest

from kdtune.errors import ConfigError
from kdtune.spaces import MethodSpace
from kdtune.study import Search, StudySpec, run_study
from kdtune.tracking import client_for
from kdtune.warmstart import fit

LR = {"lr": (0.003, 0.03)}
BASE = {"dataset": "digits", "teacher": "digits_teacher", "student": "digits_student", "epochs": 2}


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    from kdtune.tracking import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("warm_mlflow")).start()
    yield server
    server.stop()


def test_a_point_that_does_not_fit_the_space_is_skipped_with_its_reason():
    space = MethodSpace(("kd", "none"), recipe=LR)
    point, why = fit(space, {"method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.01}, BASE)
    assert point == {"method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.01} and why == ""
    point, why = fit(space, {"method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.00297}, BASE)
    assert point["lr"] == 0.003 and "lr 0.00297 -> 0.003" in why  # within 2 % of a bound: put on it, said so
    for bad, reason in (
            ({"method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.1}, "lr=0.1 is outside this search's range"),
            ({"method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.01, "hard_weight": 1.0},
             "sets hard_weight=1.0, which this search does not sample"),
            ({"method": "kd", "temperature": 2.0, "lr": 0.01}, "samples alpha, which the recorded point does not set"),
            ({"method": "links", "temperature": 2.0, "alpha": 0.5, "lr": 0.01}, "method='links' is not among"),
            ({"method": "kd", "temperature": 2.0, "alpha": 0.5}, "samples lr")):
        point, why = fit(space, bad, BASE)
        assert point is None and reason in why, (bad, why)


def test_a_bad_warm_start_value_is_refused_before_anything_exists(own_server, tmp_path):
    spec = StudySpec(name="test_warm_bad", dataset="digits", tracking_uri=own_server.uri, storage=str(tmp_path),
                     search=Search(MethodSpace(("none",), recipe=LR), num_samples=1), warm_start=-1)
    with pytest.raises(ConfigError, match="warm_start=-1: give the number of recorded points"):
        run_study(spec, echo=lambda *a: None)
    grid = StudySpec(name="test_warm_bad", dataset="digits", tracking_uri=own_server.uri, storage=str(tmp_path),
                     variants=[{"label": "baseline", "method": "none"}], warm_start=2)
    with pytest.raises(ConfigError, match="warm_start=2: only a search starts from recorded points"):
        run_study(grid, echo=lambda *a: None)
    assert client_for(own_server.uri).get_experiment_by_name("test_warm_bad") is None
    assert not list(tmp_path.iterdir())


def test_a_warm_started_search_runs_the_recorded_best_points_first_and_names_their_study(local_ray, own_server,
                                                                                         tmp_path):
    client = client_for(own_server.uri)
    common = dict(dataset="digits", overrides={"epochs": 2}, teacher_overrides={"epochs": 3},
                  tracking_uri=own_server.uri, storage=str(tmp_path), max_concurrent=2)
    earlier = run_study(StudySpec(name="earlier_sweep", variants=[
        {"label": "baseline", "method": "none", "lr": 0.03},
        {"label": "T=2", "method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.03},
        {"label": "T=4", "method": "kd", "temperature": 4.0, "alpha": 0.9, "lr": 0.01},
        {"label": "T=3 h", "method": "kd", "temperature": 3.0, "alpha": 0.5, "hard_weight": 1.0, "lr": 0.02}],
        fuse="auto", register_as="test-warm-earlier", **common), echo=lambda *a: None)
    recorded = sorted((t for t in earlier.trials if t.params["method"] == "kd" and "hard_weight" not in t.params),
                      key=lambda t: t.metrics["val_acc"], reverse=True)

    lines = []
    # budgets of just the recorded points: what is checked is that they come first and exactly as recorded
    spec = StudySpec(name="warm_search", search=Search(MethodSpace(("kd",), recipe=LR), num_samples=2, seed=0),
                     baseline_search=Search(MethodSpace(("none",), recipe=LR), num_samples=1, seed=0), warm_start=2,
                     register_as="test-warm-search", **common)
    result = run_study(spec, echo=lines.append)
    text = "\n".join(map(str, lines))

    def in_trial_order(trials):  # as they started (two at a time: max_concurrent=2)
        return sorted(trials, key=lambda t: client.get_run(t.run_id).info.start_time)

    first = [t.params for t in in_trial_order(result.phases["search"])][:2]
    assert sorted(first, key=json.dumps) == sorted((t.params for t in recorded), key=json.dumps)
    baseline_first = in_trial_order(result.phases["baseline_search"])[0].params
    assert baseline_first == {"method": "none", "lr": 0.03}  # the earlier study's baseline, for the baseline search
    # said, and recorded on the parent run: which point came from which study and run
    assert "warm start (search): 2 recorded point(s) run first" in text
    for trial in recorded:
        assert f"from study earlier_sweep run {earlier.parent_run_id}, trial run {trial.run_id}" in text
    if any(t.metrics["val_acc"] > recorded[-1].metrics["val_acc"] for t in earlier.trials if "hard_weight" in t.params):
        assert "sets hard_weight=1.0, which this search does not sample" in text
    tag = json.loads(client.get_run(result.parent_run_id).data.tags["kdtune.warm_start"])
    assert {(r["phase"], r["study"], r["study_run"]) for r in tag} == {
        ("search", "earlier_sweep", earlier.parent_run_id), ("baseline_search", "earlier_sweep", earlier.parent_run_id)}
    assert {r["trial_run"] for r in tag if r["phase"] == "search"} == {t.run_id for t in recorded}
