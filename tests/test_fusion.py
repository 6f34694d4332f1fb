"""Fused students: members that share batches and teacher train exactly what their unfused twins train, fail
alone, and keep their own runs and rows in a study."""
from __future__ import annotations

import pytest

from kdtune.config import TrialConfig
from kdtune.errors import ConfigError, TrainingDiverged
from kdtune.fusion import fused_epochs, group_size, group_variants, parse_fuse
from kdtune.models.refs import model_ref
from kdtune.parts import StudyParts


@pytest.fixture(scope="module")
def parts(digits, trained_digits_teacher):
    return StudyParts(digits, model_ref("digits_student"), model_ref("digits_teacher"), trained_digits_teacher[0])


def run_fused(parts, configs):
    trainers, teacher = parts.fused_trainers(configs)
    history = {i: [] for i in range(len(configs))}
    for results in fused_epochs(trainers, teacher):
        for i, metrics in results.items():
            history[i].append(metrics)
    return history


def test_each_member_trains_exactly_what_its_unfused_twin_trains(parts):
    """Baseline, KD at two temperatures and two learning rates, and seed 003's adversarial method (its
    discriminator has dropout: each member keeps its own random stream)."""
    configs = [TrialConfig.from_flat({"method": m, "temperature": t, "lr": lr, "epochs": 3, "teacher_cache": "off"})
               for m, t, lr in (("none", 2.0, 0.03), ("kd", 2.0, 0.03), ("kd", 5.0, 0.01), ("adversarial", 2.0, 0.03))]
    fused = run_fused(parts, configs)
    for i, config in enumerate(configs):
        alone = list(parts.trainer(config).epochs())
        for a, b in zip(alone, fused[i]):
            assert a["val_acc"] == b["val_acc"] and a["train_loss"] == b["train_loss"], config.method
        assert alone[-1]["test_acc"] == fused[i][-1]["test_acc"]


def test_a_diverging_member_fails_alone(parts):
    configs = [TrialConfig.from_flat({"method": "kd", "temperature": 4.0, "lr": lr, "epochs": 2})
               for lr in (0.01, 1e6, 0.03)]
    fused = run_fused(parts, configs)
    assert isinstance(fused[1][0], TrainingDiverged) and len(fused[1]) == 1
    assert [m["epoch"] for m in fused[0]] == [1, 2] and [m["epoch"] for m in fused[2]] == [1, 2]
    assert "test_acc" in fused[0][-1] and "test_acc" in fused[2][-1]


def test_groups_hold_only_members_that_can_share_batches():
    base = {"dataset": "digits", "teacher": "digits_teacher", "student": "digits_student", "epochs": 3}
    variants = [{"label": "baseline", "method": "none"}] + [
        {"label": f"T={t}", "method": "kd", "temperature": t} for t in (1.0, 2.0, 4.0)] + [
        {"label": "links", "method": "links", "links": "2", "beta": 1.0},  # reads teacher features: alone
        {"label": "hints", "method": "hints", "links": "2", "beta": 1.0, "stage1_epochs": 1},  # two stages
        {"label": "big batch", "method": "kd", "batch_size": 128}]  # other batches
    groups = group_variants(variants, base, 3)
    labels = [[v["label"] for v in g] for g in groups]
    assert labels == [["baseline", "T=1.0", "T=2.0"], ["T=4.0"], ["links"], ["hints"], ["big batch"]]
    assert group_variants(variants, base, 1) == [[v] for v in variants]
    assert parse_fuse("auto") == 8 and parse_fuse("off") == 1 and parse_fuse("4") == 4
    # auto keeps every trial slot busy: 30 settings on 2 slots fuse 8 at a time, on 64 slots not at all
    assert group_size("auto", 30, 2) == 8 and group_size("auto", 30, 8) == 4 and group_size("auto", 30, 64) == 1
    with pytest.raises(ConfigError, match="fuse='many': expected off, auto or a group size"):
        parse_fuse("many")


@pytest.mark.e2e
def test_a_fused_grid_keeps_a_run_a_row_and_a_failure_per_member(local_ray, mlflow_server, tmp_path):
    from kdtune.study import StudySpec, run_study
    from kdtune.tracking import client_for

    spec = StudySpec(name="test_fused_grid", dataset="digits", seeds=2, fuse="auto",
                     variants=[{"label": "baseline", "method": "none"},
                               {"label": "T=2", "method": "kd", "temperature": 2.0},
                               {"label": "T=5", "method": "kd", "temperature": 5.0},
                               {"label": "huge lr", "method": "kd", "temperature": 5.0, "lr": 1e6}],
                     overrides={"epochs": 3}, teacher_overrides={"epochs": 6}, tracking_uri=mlflow_server.uri,
                     storage=str(tmp_path), register_as="test-fused-student")
    result = run_study(spec, echo=lambda *a: None)
    rows = {r["label"]: r for r in result.summary}
    assert [rows[k]["n"] for k in ("baseline", "T=2", "T=5")] == [2, 2, 2]
    assert rows["huge lr"]["failed"] == 2 and rows["huge lr"]["n"] == 0
    assert len(result.trials) == 8  # 4 settings x 2 seeds, from 2 fused trials
    assert len({t.path for t in result.trials}) == 2
    client = client_for(mlflow_server.uri)
    runs = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' "
                              "and tags.`kdtune.role` = 'student'", max_results=100)
    assert len(runs) == 8
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        diverged = run.data.tags["kdtune.label"] == "huge lr"  # in its first epoch: no epoch to log
        assert sorted(steps) == ([] if diverged else [1, 2, 3])
        assert run.info.status == ("FAILED" if diverged else "FINISHED")
        if diverged:
            assert "became nan" in run.data.tags["kdtune.failure"]
    # a member's training time is its share of the fused trial's, so the study's sum stays honest
    assert result.training_time_s < result.wall_time_s
