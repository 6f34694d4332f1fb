"""Studies through run_study and the scripts: search with ASHA, failures, resume. Real Ray, real MLflow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from kdtune.spaces import MethodSpace
from kdtune.study import Search, StudySpec, run_study
from kdtune.tracking import client_for, find_child_run

pytestmark = pytest.mark.e2e


def child_runs(client, result):
    return client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
                              max_results=1000)


def test_search_stops_weak_trials_early_and_samples_only_applicable_parameters(local_ray, mlflow_server, tmp_path):
    space = MethodSpace(("kd", "links"), ("2", "3", "2,3"))
    spec = StudySpec(name="test_search", dataset="digits", overrides={"epochs": 4},
                     teacher_overrides={"epochs": 8},
                     search=Search(space, num_samples=8, grace_period=1, reduction_factor=2, seed=1,
                                   points_to_evaluate=[{"method": "kd", "temperature": 4.0, "alpha": 0.9}]),
                     tracking_uri=mlflow_server.uri, storage=str(tmp_path), max_concurrent=2,
                     register_as="test-search-student")
    import mlflow

    mine = f"sqlite:///{tmp_path / 'my-own.db'}"  # the user's script has MLflow pointed at its own store
    mlflow.set_tracking_uri(mine)
    try:
        result = run_study(spec, echo=lambda *a: None)
        # run_study pointed MLflow at the study's server only while it ran
        assert mlflow.get_tracking_uri() == mine and os.environ.get("MLFLOW_TRACKING_URI") == mine
    finally:
        mlflow.set_tracking_uri(None)
    search = result.phases["search"]
    assert len(search) == 8
    epochs = [t.metrics["epoch"] for t in search]
    assert min(epochs) < 4 and max(epochs) == 4  # ASHA stopped some trials before the last epoch
    allowed = {"kd": {"method", "temperature", "alpha"}, "links": {"method", "temperature", "alpha", "beta", "links"}}
    for trial in search:
        assert set(trial.params) == allowed[trial.params["method"]], trial.params
    # the confirm phase re-runs the baseline and the best search configuration
    best = max(search, key=lambda t: t.metrics["val_acc"] if t.finished else -1)
    assert [t.label for t in result.trials] == ["baseline", f"best: {best.label}"]
    client = client_for(mlflow_server.uri)
    runs = child_runs(client, result)
    students = [r for r in runs if r.data.tags.get("kdtune.role") == "student"]
    assert len(students) == 8 + 2  # one run per trial, no doubles
    assert all(r.info.status == "FINISHED" for r in students)
    stopped = [r for r in students if "kdtune.stopped_early_at_epoch" in r.data.tags]
    assert len(stopped) == sum(1 for e in epochs if e < 4)
    for run in students:  # MLflow shows what the search sampled for each trial, and nothing else
        overrides = json.loads(run.data.tags["kdtune.overrides"])
        assert set(overrides) <= allowed.get(overrides.get("method"), {"method"})
    assert client.get_model_version_by_alias("test-search-student", "champion").tags["study"] == "test_search"


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(local_ray, mlflow_server, tmp_path):
    spec = StudySpec(name="test_divergence", dataset="digits", overrides={"epochs": 3}, max_failures=1,
                     variants=[{"label": "baseline", "method": "none"},
                               {"label": "huge lr", "method": "none", "lr": 1e6}],
                     tracking_uri=mlflow_server.uri, storage=str(tmp_path), register_as="test-divergence")
    result = run_study(spec, echo=lambda *a: None)
    rows = {r.label: r for r in result.summary}
    assert rows["baseline"].n == 1 and rows["huge lr"].n == 0 and rows["huge lr"].failed == 1
    failed = next(t for t in result.trials if t.label == "huge lr")
    assert failed.failed and "loss term 'hard' became nan in epoch 1" in failed.error
    client = client_for(mlflow_server.uri)
    run = next(r for r in child_runs(client, result) if r.data.tags.get("kdtune.label") == "huge lr")
    assert run.info.status == "FAILED" and "became nan" in run.data.tags["kdtune.failure"]
    assert result.best_label == "baseline"


def test_resume_after_the_driver_is_killed_keeps_finished_trials_and_one_run_per_trial(mlflow_server, tmp_path):
    args = [sys.executable, str(REPO / "studies" / "temperature_sweep.py"), "--temperatures", "1", "2", "3", "4",
            "--tune", "none", "--fuse", "off",
            "--epochs", "10", "--teacher-epochs", "6", "--max-concurrent", "1", "--tracking-uri", mlflow_server.uri,
            "--storage", str(tmp_path / "results"), "--register-as", "test-resume"]
    log = open(tmp_path / "first.log", "w")
    started = time.time()
    driver = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = client_for(mlflow_server.uri)
    finished_before: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        experiment = client.get_experiment_by_name("temperature_sweep")
        if experiment:
            runs = client.search_runs([experiment.experiment_id], "tags.`kdtune.role` = 'student' and "
                                      "attributes.status = 'FINISHED'", max_results=100)
            mine = [r for r in runs if r.info.start_time / 1000 > started]
            if len(mine) >= 2:
                finished_before = {r.data.tags["kdtune.trial_key"]: r.info.run_id for r in mine}
                break
        time.sleep(0.3)
    assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    output = (tmp_path / "first.log").read_text()
    folder = next(line.split("study folder: ", 1)[1].split("  (")[0] for line in output.splitlines()
                  if line.startswith("study folder: "))

    again = subprocess.run(args + ["--resume", folder], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    saved = json.loads(open(os.path.join(folder, "kdtune_study.json")).read())
    runs = client.search_runs([saved["experiment_id"]], f"tags.`mlflow.parentRunId` = '{saved['parent_run_id']}'",
                              max_results=100)
    students = [r for r in runs if r.data.tags.get("kdtune.role") == "student"]
    keys = [r.data.tags["kdtune.trial_key"] for r in students]
    assert len(students) == 5 and len(set(keys)) == 5  # baseline + 4 temperatures, one run each
    assert all(r.info.status == "FINISHED" for r in students), [
        (r.data.tags["kdtune.label"], r.info.status, r.data.tags.get("kdtune.failure")) for r in students]
    for run in students:  # the trial cut off mid-way trained some epochs again: each is stored once
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
        assert steps == list(range(1, 11)), (run.data.tags["kdtune.label"], steps)
    for key, run_id in finished_before.items():  # finished trials were kept, not trained again
        assert find_child_run(client, _context(saved, mlflow_server.uri), key).info.run_id == run_id
        assert len(client.get_metric_history(run_id, "val_acc")) == 10
    assert client.get_run(saved["parent_run_id"]).info.status == "FINISHED"


def _context(saved, uri):
    from kdtune.tracking import TrackingContext

    return TrackingContext(uri, saved["experiment_id"], saved["parent_run_id"])


def test_every_method_trains_inside_a_tune_trial_and_logs_its_terms(local_ray, mlflow_server, tmp_path):
    expected = {
        "kd": {"loss_hard", "loss_soft"},
        "links": {"loss_hard", "loss_soft", "loss_intermediate"},
        "hints": {"loss_hint", "loss_hard", "loss_soft"},
        "adversarial": {"loss_hard", "loss_l1", "loss_gan"},
        "adversarial_pretrained": {"loss_hard", "loss_adv"},
    }
    variants = [
        {"label": "kd", "method": "kd", "temperature": 4.0},
        {"label": "links", "method": "links", "links": "3", "beta": 0.5},
        {"label": "hints", "method": "hints", "links": "2", "beta": 1.0, "stage1_epochs": 1},
        {"label": "adversarial", "method": "adversarial"},
        {"label": "adversarial_pretrained", "method": "adversarial_pretrained", "stage1_epochs": 1,
         "hard_weight": 1.0},
    ]
    spec = StudySpec(name="test_methods_in_tune", dataset="digits", overrides={"epochs": 2},
                     teacher_overrides={"epochs": 4}, variants=variants, tracking_uri=mlflow_server.uri,
                     storage=str(tmp_path), register_as="test-methods")
    result = run_study(spec, echo=lambda *a: None)
    assert all(t.finished for t in result.trials), [t.error for t in result.trials]
    client = client_for(mlflow_server.uri)
    for run in child_runs(client, result):
        label = run.data.tags.get("kdtune.label")
        if label not in expected:
            continue
        logged = {k for k in run.data.metrics if k.startswith("loss_")}
        assert expected[label] <= logged, (label, logged)
        epochs = client.get_metric_history(run.info.run_id, "val_acc")
        assert len(epochs) == (3 if label in ("hints", "adversarial_pretrained") else 2)  # both stages reported
