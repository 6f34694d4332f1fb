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


def recorded_params(point: dict, base: dict) -> dict:
    """The params MLflow holds for a trial that ran `point` on top of `base` (kdtune logs config.to_flat())."""
    from kdtune.distill.registry import trial_config

    return {k: str(v) for k, v in trial_config({**point, "seed": 1}, base).to_flat().items()}


def test_a_point_recorded_under_another_recipe_is_skipped_with_what_differs():
    space = MethodSpace(("kd", "none"), recipe=LR)
    point = {"method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.01}
    same = recorded_params(point, {**BASE, "teacher_cache": "off"})  # how it ran, not what it computed: ignored
    assert fit(space, point, BASE, same) == (point, "")
    for earlier, differs in (({**BASE, "epochs": 5}, "epochs=5 (this search: 2)"),
                             ({**BASE, "batch_size": 64}, "batch_size=64 (this search: 40)"),
                             ({**BASE, "val_fraction": 0.2}, "val_fraction=0.2 (this search: 0.1)"),
                             ({**BASE, "soft_scale": "none"}, "soft_scale=none (this search: T2)"),
                             ({**BASE, "weight_decay": 5e-4}, "weight_decay=0.0005 (this search: 2e-05)")):
        taken, why = fit(space, point, BASE, recorded_params(point, earlier))
        assert taken is None and why == f"it ran another recipe: {differs}", why
    baseline = {"method": "none", "lr": 0.01}  # the baseline too: its recipe defines the comparison
    taken, why = fit(space, baseline, BASE, recorded_params(baseline, {**BASE, "epochs": 5}))
    assert taken is None and "epochs=5 (this search: 2)" in why


def test_a_warm_start_takes_points_only_from_the_same_teacher_version_and_recipe(local_ray, tmp_path_factory):
    """@champion is the same text after the alias moved to a retrained teacher: the points distilled from the
    earlier version are skipped, naming both versions, while the earlier baseline (no teacher) carries over; a
    search under another recipe (batch size, soft_scale) takes neither. A server of its own: no other study."""
    from kdtune.tracking import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("warm_identity")).start()
    try:
        common = dict(dataset="digits", teacher_overrides={"epochs": 2}, tracking_uri=server.uri,
                      storage=str(tmp_path_factory.mktemp("ray")), max_concurrent=2, register_as="test-warm-identity")
        quiet = dict(echo=lambda *a: None)
        run_study(StudySpec(name="first", overrides={"epochs": 2}, variants=[
            {"label": "baseline", "method": "none", "lr": 0.03},
            {"label": "T=2", "method": "kd", "temperature": 2.0, "alpha": 0.5, "lr": 0.03}], **common), **quiet)

        def search(name, lines, **fields):
            return run_study(StudySpec(
                name=name, search=Search(MethodSpace(("kd",), recipe=LR), num_samples=1, seed=0),
                baseline_search=Search(MethodSpace(("none",), recipe=LR), num_samples=1, seed=0), warm_start=2,
                **{**common, **fields}), echo=lines.append)

        lines: list = []
        # a teacher trained again (one more epoch: other weights) and registered: @champion moves to it
        retrained = search("retrained", lines, teacher_source="train", teacher_overrides={"epochs": 3},
                           overrides={"epochs": 2})
        text = "\n".join(map(str, lines))
        assert "registered kdtune-teacher-digits-digits_teacher version 2 as @champion" in text
        skipped = next(str(line) for line in lines if str(line).startswith("  skipped kd") and "study first" in line)
        champion = "models:/kdtune-teacher-digits-digits_teacher@champion"
        assert f"distilled from another teacher ({champion} = version 1, weights sha1:" in skipped
        assert f"this study's: {champion} = version 2, weights sha1:" in skipped
        assert "warm start (search): no finished configuration" in text
        assert "warm start (baseline_search): 1 recorded point(s) run first" in text  # a baseline has no teacher
        assert retrained.phases["baseline_search"][0].params == {"method": "none", "lr": 0.03}

        lines = []
        search("other_recipe", lines, overrides={"epochs": 2, "batch_size": 32, "soft_scale": "none"})
        text = "\n".join(map(str, lines))
        assert f"teacher: reusing the registered {champion} (version 2)" in text
        assert "warm start (search): no finished configuration" in text
        assert "warm start (baseline_search): no finished configuration" in text
        assert "it ran another recipe: batch_size=40 (this search: 32)" in text
        kd = [line for line in lines if str(line).startswith("  skipped kd") and "study retrained" in str(line)]
        assert kd and all("soft_scale=T2 (this search: none)" in line for line in kd)  # same teacher, other recipe
    finally:
        server.stop()
