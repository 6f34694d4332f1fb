"""The Tune trainable itself (kdtune/trial.py `distill_trial`), called in this process as a Ray worker calls it, with a
real MLflow server: what its members' runs record, and what it leaves behind in a process Ray reuses.

Outside a Tune session `tune.report` and `tune.get_checkpoint` do nothing (Ray warns) and the trial id is None,
so each test opens a study run of its own for the trial's member runs."""
from __future__ import annotations

import os

import pytest
import torch

from kdtune.models.refs import model_ref
from kdtune.train.parts import StudyParts
from kdtune.tracking import TrackingContext, client_for, get_or_create_experiment
from kdtune.trial import distill_trial

pytestmark = pytest.mark.filterwarnings("ignore:`.*` is meant to only be called inside a function")


@pytest.fixture(scope="module")
def parts(digits, trained_digits_teacher):
    return StudyParts(digits, model_ref("digits_student"), model_ref("digits_teacher"), trained_digits_teacher[0])


@pytest.fixture
def context(mlflow_server):
    client = client_for(mlflow_server.uri)
    experiment = get_or_create_experiment(client, "trial-tests")
    parent = client.create_run(experiment, tags={"kdtune.role": "study"}).info.run_id
    return TrackingContext(mlflow_server.uri, experiment, parent)


def run_trial(parts, context, variants: dict[str, dict], threads: int = 1) -> dict:
    """distill_trial on a grid config of these variants (label -> overrides), seed 0; its member runs by label."""
    config = {"group": [{"label": label, **overrides} for label, overrides in variants.items()], "seed": 0}
    distill_trial(config, parts, context, base={}, threads=threads)
    return member_runs(context)


def member_runs(context) -> dict:
    client = client_for(context.uri)
    runs = client.search_runs([context.experiment_id], f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'")
    return {r.data.tags["kdtune.label"]: r for r in runs}


def history(context, run, key: str) -> list[float]:
    points = client_for(context.uri).get_metric_history(run.info.run_id, key)
    return [m.value for m in sorted(points, key=lambda m: m.step)]


def test_after_a_member_diverges_the_survivors_log_their_share_of_each_later_epoch(parts, context):
    """Three members train epoch 1, one diverges in it, two train epochs 2 and 3: each survivor's training time
    grows by its share of each epoch among the members that trained in it (1/3, then 1/2), which is the epoch
    time it logs; before, it grew by a fixed third of every epoch."""
    kd = {"method": "kd", "temperature": 4.0, "epochs": 3}
    runs = run_trial(parts, context, {"lr 0.01": {**kd, "lr": 0.01}, "huge lr": {**kd, "lr": 1e6},
                                      "lr 0.03": {**kd, "lr": 0.03}})
    assert runs["huge lr"].info.status == "FAILED"
    for label in ("lr 0.01", "lr 0.03"):
        run = runs[label]
        assert run.info.status == "FINISHED"
        epochs, totals = history(context, run, "epoch_time_s"), history(context, run, "training_time_s")
        assert totals == pytest.approx([sum(epochs[:n]) for n in (1, 2, 3)], rel=1e-6)
        assert history(context, run, "fused_members") == [3, 2, 2]


def process_settings() -> tuple:
    cudnn = torch.backends.cudnn
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn.deterministic, cudnn.benchmark, torch.get_num_threads(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


@pytest.fixture
def plain_process(monkeypatch):
    """The process as Ray hands it to a trial: no deterministic kernels, no CUBLAS_WORKSPACE_CONFIG, 2 threads."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = process_settings()
    torch.set_num_threads(2)
    yield process_settings()
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
    torch.set_num_threads(before[4])


def test_a_deterministic_fused_trial_leaves_the_process_as_it_found_it(parts, context, plain_process):
    """Ray reuses a trial's process for the next trial: two deterministic members train, and the next trial finds
    deterministic kernels off again (before, the second member's close restored the first member's settings)."""
    assert not plain_process[0]
    kd = {"method": "kd", "temperature": 4.0, "epochs": 1, "deterministic": True}
    runs = run_trial(parts, context, {"T=4": kd, "T=2": {**kd, "temperature": 2.0}}, threads=1)
    assert [r.info.status for r in runs.values()] == ["FINISHED", "FINISHED"]
    assert process_settings() == plain_process


def test_a_failed_trial_restores_the_process_settings_too(parts, context, plain_process):
    """A plain (one-member) deterministic trial that diverges ends with an error, and still leaves the process
    as it found it: deterministic kernels off, its thread count and CUBLAS_WORKSPACE_CONFIG undone."""
    from kdtune.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged):
        run_trial(parts, context, {"huge lr": {"method": "kd", "lr": 1e6, "epochs": 2, "deterministic": True}})
    assert member_runs(context)["huge lr"].info.status == "FAILED"
    assert process_settings() == plain_process


def test_a_trial_times_no_latency_while_other_trials_share_its_device(parts, context):
    """Other trials train on the same cores or GPU while a trial runs, so a latency it timed would be theirs as
    much as its own: its run records none (the study times the registered student alone, after its trials)."""
    runs = run_trial(parts, context, {"T=4": {"method": "kd", "temperature": 4.0, "epochs": 1}})
    run = client_for(context.uri).get_run(runs["T=4"].info.run_id)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert not [key for key in run.data.metrics if "latency" in key]
