"""Claims a reviewer can trust: the baseline tuned like the students, selection on validation only, failed
seeds shown and never silently averaged away, two-stage methods able to win a search. Real Ray, real MLflow."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from kdtune.records import TrialRecord
from kdtune.results import format_table, pick_best, summarise, verdict
from kdtune.spaces import MethodSpace
from kdtune.study import Search, StudySpec, run_study
from kdtune.tracking import client_for

pytestmark = pytest.mark.e2e


def record(label, seed, val, test, point="", error=None):
    status = "failed" if error else "finished"
    metrics = {} if error else {"val_acc": val, "test_acc": test}
    return TrialRecord("grid", label, {}, seed, status, metrics, error, point=point)


def test_each_setting_is_reported_at_its_own_best_point_chosen_on_validation():
    trials = [record("baseline", s, val, test, f"lr={lr}") for s in range(2)
              for lr, val, test in ((0.01, 0.90, 0.91), (0.03, 0.97, 0.96))]
    trials += [record("T=4", s, val, test, f"lr={lr}") for s in range(2)
               for lr, val, test in ((0.01, 0.95, 0.99), (0.03, 0.96, 0.93))]  # best test is not best val
    rows = {r.label: r for r in summarise(trials, order=["baseline", "T=4"])}
    assert rows["baseline"].point == "lr=0.03" and rows["T=4"].point == "lr=0.03"
    assert rows["T=4"].gain == pytest.approx(0.93 - 0.96)
    assert "lr=0.03" in format_table(list(rows.values()), "T")


def test_a_point_or_setting_with_a_failed_seed_is_flagged_and_not_chosen():
    trials = [record("baseline", s, 0.90, 0.90) for s in range(3)]
    trials += [record("T=4", 0, 0.99, 0.99), record("T=4", 1, 0, 0, error="TrainingDiverged: nan"),
               record("T=4", 2, 0.98, 0.98)]
    summary = summarise(trials, order=["baseline", "T=4"])
    kd = next(r for r in summary if r.label == "T=4")
    assert (kd.n, kd.total, kd.failed) == (2, 3, 1)
    assert pick_best(summary) == "baseline" and pick_best(summary, allow_failed=True) == "T=4"
    assert "2/3!" in format_table(summary, "T")
    assert kd.failures == ("seed 1: TrainingDiverged: nan",)
    # within a setting, a tuned point with a failed seed loses to a clean one
    points = [record("b", s, 0.99 if lr == 0.1 else 0.9, 0.9, f"lr={lr}", "nan" if lr == 0.1 and s == 0 else None)
              for s in range(2) for lr in (0.01, 0.1)]
    assert summarise(points)[0].point == "lr=0.01"


def test_agreeing_seeds_give_no_interval_and_the_verdict_says_what_the_table_shows():
    same = [record("baseline", s, 0.9, 0.9) for s in range(3)] + [record("T=4", s, 0.95, 0.95) for s in range(3)]
    kd = next(r for r in summarise(same) if r.label == "T=4")
    assert math.isnan(kd.gain_low)  # no spread measured: no point interval that reads as certainty
    tuned = "every setting at lr in {0.01, 0.03}, each chosen on validation"
    assert "no spread over seeds" in verdict(summarise(same), tuned)
    worse = [record("baseline", s, 0.9, 0.97 + 0.005 * s) for s in range(3)]
    worse += [record("T=4", s, 0.95, 0.90 + 0.005 * s) for s in range(3)]
    sentence = verdict(summarise(worse), tuned)
    assert "distillation does not help on this dataset" in sentence and "tuned as the students were" in sentence
    assert "untuned baseline" in verdict(summarise(worse), None)


def test_a_diverged_seed_shows_as_2_of_3_is_not_selected_and_is_listed(local_ray, mlflow_server, tmp_path):
    """A user's student that diverges for seed 1 at batch size 32 only: the 'fragile' setting loses that seed."""

    def fragile_student(num_classes, input_shape):
        class Fragile(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
                self.poisoned = torch.initial_seed() == 1  # kdtune seeds a student's build with its trial seed

            def forward(self, x):
                out = self.net(x)
                if self.poisoned and self.training and x.shape[0] == 32:
                    out = out * float("nan")
                return out

        return Fragile()

    spec = StudySpec(name="test_failed_seed", dataset="digits", student=fragile_student, seeds=3,
                     variants=[{"label": "baseline", "method": "none"},
                               {"label": "fragile", "method": "none", "batch_size": 32, "lr": 0.05},
                               {"label": "steady", "method": "none", "batch_size": 40, "lr": 0.05}],
                     overrides={"epochs": 3}, tracking_uri=mlflow_server.uri, storage=str(tmp_path),
                     register_as="test-failed-seed", max_failures=0)
    result = run_study(spec, echo=lambda *a: None)
    rows = {r.label: r for r in result.summary}
    assert (rows["fragile"].n, rows["fragile"].total) == (2, 3)
    assert result.best_label != "fragile"
    assert "2/3!" in result.table()
    assert any("seed 1" in f and "became nan" in f for f in rows["fragile"].failures)
    client = client_for(mlflow_server.uri)
    table = client.download_artifacts(result.parent_run_id, "results/table.txt")
    text = open(table).read()
    assert "failed: fragile seed 1" in text


def test_a_search_can_choose_a_two_stage_method(local_ray, mlflow_server, tmp_path):
    """Two-stage methods against the plain student, 2 main epochs each. ASHA judges every trial on its main
    stage (never during a first stage), so hints trials run to their last epoch, and adversarial_pretrained,
    whose 3-epoch first stage is plain training, is ahead at every rung by design and wins the search."""
    space = MethodSpace(("hints", "adversarial_pretrained", "none"), ("2",),
                        ranges={"stage1_epochs": (3, 3), "adv_weight": (0.01, 0.02), "beta": (0.5, 1.0)})
    first = [{"method": "hints", "temperature": 4.0, "alpha": 0.5, "beta": 1.0, "links": "2", "stage1_epochs": 3},
             {"method": "adversarial_pretrained", "adv_weight": 0.01, "disc_lr": 0.01, "stage1_epochs": 3},
             {"method": "none"}]
    spec = StudySpec(name="test_two_stage_search", dataset="digits", overrides={"epochs": 2, "lr": 0.05},
                     teacher_overrides={"epochs": 10},
                     search=Search(space, num_samples=6, grace_period=1, reduction_factor=2, seed=0,
                                   points_to_evaluate=first),
                     tracking_uri=mlflow_server.uri, storage=str(tmp_path), max_concurrent=2,
                     register_as="test-two-stage")
    result = run_study(spec, echo=lambda *a: None)
    search = result.phases["search"]
    hints = [t for t in search if t.params.get("method") == "hints"]
    # every hints trial got past its 3 hint epochs: a finished one ran 3 + 2 epochs, a stopped one was judged on
    # its main stage (which hints trials ASHA stops depends on the order trials report in: not asserted)
    assert hints and all(t.metrics["epoch"] == 5 if t.finished else t.metrics.get("main_epoch", 0) >= 1
                         for t in hints)
    assert all(t.metrics.get("main_epoch", 0) >= 1 for t in search if t.stopped)  # never cut in a first stage
    assert [t.label for t in result.trials][1].startswith("best: adversarial_pretrained")
    assert result.best_label.startswith("best: adversarial_pretrained")
    assert result.registration is not None


def test_search_script_tunes_the_baseline_with_the_same_budget_and_finishes_hints(mlflow_server, tmp_path):
    from conftest import run_script

    result = run_script("search.py", "--dataset", "digits", "--methods", "hints", "kd", "--num-samples", "4",
                        "--epochs", "2", "--teacher-epochs", "4", "--grace-period", "1", "--tracking-uri",
                        mlflow_server.uri, "--store", str(tmp_path), "--register-as", "test-search-script",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "a baseline tuned as the students were (its own search of 4 trials" in result.stdout
    client = client_for(mlflow_server.uri)
    experiment = client.get_experiment_by_name("search")
    runs = client.search_runs([experiment.experiment_id], "tags.`kdtune.role` = 'student'", max_results=200)
    overrides = [r.data.tags["kdtune.overrides"] for r in runs]
    assert sum('"method": "none"' in o and '"lr"' in o for o in overrides) >= 4  # the baseline's own search
    hints = [r for r in runs if '"method": "hints"' in r.data.tags["kdtune.overrides"]]
    assert hints
    for run in hints:  # finished, or stopped by ASHA in its main stage: never during the hint stage
        stopped = run.data.tags.get("kdtune.stopped_early_at_epoch")
        first_stage = int(run.data.params["stage1_epochs"])
        assert ("test_acc" in run.data.metrics) if stopped is None else int(stopped) > first_stage


def test_a_failed_trial_at_a_point_not_chosen_is_in_table_txt_and_the_report(local_ray, mlflow_server, tmp_path):
    """--tune lr=0.03,1e6: the baseline diverges at lr 1e6 (a point its row is not reported at); the study's
    results/table.txt and the HTML report rebuilt from MLflow both count and list that failure."""
    from kdtune import report

    spec = StudySpec(name="test_failed_other_point", dataset="digits",
                     variants=[{"label": "baseline", "method": "none"}], tune={"lr": [0.03, 1e6]},
                     overrides={"epochs": 1}, tracking_uri=mlflow_server.uri, storage=str(tmp_path),
                     register_as="test-failed-other-point", max_failures=0)
    result = run_study(spec, echo=lambda *a: None)
    assert result.summary[0].point == "lr=0.03" and result.summary[0].n == 1
    client = client_for(mlflow_server.uri)
    text = open(client.download_artifacts(result.parent_run_id, "results/table.txt", str(tmp_path))).read()
    assert "1/1*" in text and "other points: 1 of 1 failed" in text
    assert "1 of 2 trials failed" in text
    line = next(l for l in text.splitlines() if l.startswith("failed: baseline lr=1e+06 seed 0: "))
    assert "became nan in epoch 1" in line and line.endswith("(a point not chosen)")
    page = report.build_report(client, result.parent_run_id, tmp_path / "report").read_text()
    assert "Failed trials (1 of 2)" in page
    row = re.search(r"<tr><td>baseline</td><td>lr=1e\+06</td><td>0</td><td>a point not chosen</td>"
                    r"<td>[^<]*became nan in epoch 1[^<]*</td>", page)
    assert row is not None, page[page.find("Failed trials"):][:800]
    assert "other points: 1 of 1 failed" in page
