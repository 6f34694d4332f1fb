"""Fused students: members that share batches and teacher train exactly what their unfused twins train, fail
alone, and keep their own runs and rows in a study."""
from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from kdtune.config import TrialConfig
from kdtune.errors import ConfigError, TrainingDiverged
from kdtune.train.fusion import fused_epochs, group_size, group_variants, parse_fuse
from kdtune.models.refs import model_ref
from kdtune.train.parts import StudyParts
from kdtune.distill import trial_config


@pytest.fixture(scope="module")
def parts(digits, trained_digits_teacher):
    return StudyParts(digits, model_ref("digits_student"), model_ref("digits_teacher"), trained_digits_teacher[0])


def fused_history(trainers, teacher) -> dict[int, list]:
    """Each member's per-epoch results (metrics, or the TrainingDiverged that ended it) from fused_epochs."""
    history = {i: [] for i in range(len(trainers))}
    for results in fused_epochs(trainers, teacher):
        for i, metrics in results.items():
            history[i].append(metrics)
    return history


def run_fused(parts, configs):
    return fused_history(*parts.fused_trainers(configs))


def test_each_member_trains_exactly_what_its_unfused_twin_trains(parts):
    """Baseline, KD at two temperatures and two learning rates, and seed 003's adversarial method (its
    discriminator has dropout: each member keeps its own random stream)."""
    configs = [trial_config({"method": m, "lr": lr, "epochs": 3, "teacher_cache": "off"}, base={"temperature": t})
               for m, t, lr in (("none", 2.0, 0.03), ("kd", 2.0, 0.03), ("kd", 5.0, 0.01), ("adversarial", 2.0, 0.03))]
    fused = run_fused(parts, configs)
    for i, config in enumerate(configs):
        alone = list(parts.trainer(config).epochs())
        for a, b in zip(alone, fused[i]):
            assert a["val_acc"] == b["val_acc"] and a["train_loss"] == b["train_loss"], config.method
        assert alone[-1]["test_acc"] == fused[i][-1]["test_acc"]


def _assert_twins(parts, configs, fused):
    for i, config in enumerate(configs):
        alone = list(parts.trainer(config).epochs())
        assert len(alone) == len(fused[i]), config.method
        for a, b in zip(alone, fused[i]):
            assert (a["stage"], a["val_acc"], a["train_loss"]) == (b["stage"], b["val_acc"], b["train_loss"]), \
                (config.method, config.links)
        assert alone[-1]["test_acc"] == fused[i][-1]["test_acc"]


def _fused_counting_teacher(parts, configs):
    """fused_epochs' results per member, and how many times the shared teacher's forward started."""
    trainers, teacher = parts.fused_trainers(configs)
    calls = []
    handle = teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fused = fused_history(trainers, teacher)
    finally:
        handle.remove()
    batches = sum(1 for _ in trainers[0].train.batches(common_batch(configs), trainers[0].batch_generator()))
    return fused, len(calls), batches


def test_feature_members_share_one_teacher_forward_and_train_what_their_twins_train(parts):
    """Two link sets, KD and the baseline in one trial: one teacher forward per batch serves them all, each
    link member's features caught by its own hooks on the shared teacher."""
    common = {"epochs": 2, "teacher_cache": "off", "lr": 0.03}
    configs = [trial_config({**common, **c}) for c in (
        {"method": "links", "links": "1,2", "beta": 1.0}, {"method": "links", "links": "2", "beta": 3.0},
        {"method": "kd", "temperature": 4.0}, {"method": "none"})]
    fused, calls, batches = _fused_counting_teacher(parts, configs)
    assert calls == 2 * batches  # once per batch, not once per member
    _assert_twins(parts, configs, fused)


def test_hint_stages_on_different_links_share_a_teacher_forward_that_stops_after_the_last_link(parts):
    common = {"stage1_epochs": 1, "epochs": 1, "teacher_cache": "off", "alpha": 0.0}
    configs = [trial_config({**common, "method": "hints", "links": links, "beta": 1.0})
               for links in ("1", "2")]
    fused, calls, batches = _fused_counting_teacher(parts, configs)
    assert [[m["stage"] for m in fused[i]] for i in range(2)] == [["hint", "main"]] * 2
    assert calls == batches  # the hint epoch, once per batch; the main stage (alpha 0) needs no teacher
    _assert_twins(parts, configs, fused)


def common_batch(configs) -> int:
    (size,) = {c.batch_size for c in configs}
    return size


def test_a_diverging_member_fails_alone(parts):
    configs = [trial_config({"method": "kd", "temperature": 4.0, "lr": lr, "epochs": 2})
               for lr in (0.01, 1e6, 0.03)]
    fused = run_fused(parts, configs)
    assert isinstance(fused[1][0], TrainingDiverged) and len(fused[1]) == 1
    assert [m["epoch"] for m in fused[0]] == [1, 2] and [m["epoch"] for m in fused[2]] == [1, 2]
    assert "test_acc" in fused[0][-1] and "test_acc" in fused[2][-1]


def test_a_members_training_time_is_its_share_of_each_epoch_among_the_members_that_trained_in_it(parts):
    """Three members train the first epoch, the one that diverges there drops out, two train the next two: each
    survivor's training time is a third of the first epoch's wall time plus half of each later one (not a fixed
    third of every epoch), and its epoch times add up to it."""
    configs = [trial_config({"method": "kd", "temperature": 4.0, "lr": lr, "epochs": 3}) for lr in (0.01, 1e6, 0.03)]
    trainers, teacher = parts.fused_trainers(configs)
    walls, history = [], {i: [] for i in range(len(configs))}
    started = time.perf_counter()
    for results in fused_epochs(trainers, teacher):
        walls.append(time.perf_counter() - started)  # the fused epoch, as the caller waits for it
        for i, metrics in results.items():
            history[i].append(metrics)
        started = time.perf_counter()
    assert isinstance(history[1][0], TrainingDiverged) and len(walls) == 3
    walls[2] -= trainers[0].test_time_s + trainers[2].test_time_s  # the last epoch's test evaluation: not training
    share = walls[0] / 3 + walls[1] / 2 + walls[2] / 2
    for i in (0, 2):
        assert [m["fused_members"] for m in history[i]] == [3, 2, 2]
        assert history[i][-1]["training_time_s"] == pytest.approx(share, rel=0.05, abs=0.005)
        assert history[i][-1]["training_time_s"] == pytest.approx(sum(m["epoch_time_s"] for m in history[i]))
    # the two survivors and the diverged member's third of its one epoch: the trial's training, counted once
    total = sum(history[i][-1]["training_time_s"] for i in (0, 2)) + walls[0] / 3
    assert total == pytest.approx(sum(walls), rel=0.05, abs=0.005)


def test_groups_hold_only_members_that_can_share_batches():
    base = {"dataset": "digits", "teacher": "digits_teacher", "student": "digits_student", "epochs": 3}
    variants = [{"label": "baseline", "method": "none"}] + [
        {"label": f"T={t}", "method": "kd", "temperature": t} for t in (1.0, 2.0, 4.0)] + [
        {"label": "links", "method": "links", "links": "2", "beta": 1.0},  # reads teacher features
        {"label": "hints", "method": "hints", "links": "2", "beta": 1.0, "stage1_epochs": 1},  # another stage 1
        {"label": "big batch", "method": "kd", "batch_size": 128}]  # other batches
    groups = group_variants(variants, base, 3)
    labels = [[v["label"] for v in g] for g in groups]
    # every method may share a trial; what decides the batches and the stages (stage1_epochs, batch size) may not
    assert labels == [["baseline", "T=1.0", "T=2.0"], ["T=4.0", "links"], ["hints"], ["big batch"]]
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
    rows = {r.label: r for r in result.summary}
    assert [rows[k].n for k in ("baseline", "T=2", "T=5")] == [2, 2, 2]
    assert rows["huge lr"].failed == 2 and rows["huge lr"].n == 0
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
    # no trial timed latency while the other trial shared the cores; the registered student was timed alone after
    assert not [key for run in runs for key in run.data.metrics if "latency" in key]
    version = client.get_model_version("test-fused-student", result.registration.version)
    assert float(version.tags["latency_ms_batch1"]) > 0 and float(version.tags["latency_ms_per_image"]) > 0
    assert version.tags["latency_device"].startswith("cpu (") and version.tags["latency_threads"] == "1"
    assert version.tags["latency_runtime"] == "torch"


# ---- batched members (TrialConfig.batched; kdtune/train/batched.py wired in by fused_epochs) ---------------------

BATCHED_MEMBERS = (("kd", 2.0, 0.05), ("kd", 4.0, 0.03), ("none", 2.0, 0.02))


def batched_configs(batched="on", members=BATCHED_MEMBERS, **extra):
    """kd at two temperatures and the baseline, each its own lr, under a step LR schedule that halves every epoch."""
    return [trial_config({"method": m, "lr": lr, "epochs": 3, "lr_step_epochs": 1, "lr_gamma": 0.5, "batched": batched,
                          **extra}, base={"temperature": t}) for m, t, lr in members]


@pytest.fixture
def batched_steps(monkeypatch):
    """How many batched steps ran (the batched path must really be taken, not the sequential fallback)."""
    from kdtune.train.batched import BatchedStudents

    count = {"steps": 0}
    step = BatchedStudents.step

    def counting(self, *args, **kwargs):
        count["steps"] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(BatchedStudents, "step", counting)
    return count


def assert_same_training(alone_trainer, alone, fused_trainer, fused):
    """Per-epoch metrics and final weights, BatchNorm-free student, momentum buffers: equal up to float order."""
    assert [m["epoch"] for m in fused] == [m["epoch"] for m in alone]
    for a, b in zip(alone, fused):
        assert b["lr"] == a["lr"]
        loss_keys = sorted(k for k in a if k.startswith("loss_"))
        assert sorted(k for k in b if k.startswith("loss_")) == loss_keys
        for key in ["train_loss", *loss_keys]:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert abs(b["val_acc"] - a["val_acc"]) <= 1.5 / len(alone_trainer.val)  # at most one sample flips
    want, got = alone_trainer.student.state_dict(), fused_trainer.student.state_dict()
    # float order differs (batched kernels vs one model's) and SGD with momentum amplifies it over the epochs: by
    # how much depends on the trajectory (measured up to 1.6e-4 of a tensor's largest weight in the full suite,
    # 1e-6 alone), so weights are judged on their own scale; the per-epoch losses above carry the 1e-5 check
    for key in want:
        scale = float(want[key].abs().max()) if want[key].is_floating_point() else 0.0
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-3 * max(scale, 1e-3),
                                   msg=lambda m: f"{key}: {m}")
    want_state, got_state = alone_trainer.optimizer.state, fused_trainer.optimizer.state
    for p_want, p_got in zip(alone_trainer.student.parameters(), fused_trainer.student.parameters()):
        want_buffer = want_state[p_want]["momentum_buffer"]  # gradient-like: judged against its own scale
        torch.testing.assert_close(got_state[p_got]["momentum_buffer"], want_buffer, rtol=1e-3,
                                   atol=1e-3 * float(want_buffer.abs().max()))  # the weights' bound, same reason


def run_batched(parts, configs):
    trainers, teacher = parts.fused_trainers(configs)
    return trainers, fused_history(trainers, teacher)


def alone(parts, config):
    trainer = parts.trainer(config.replace(batched="off"))
    return trainer, list(trainer.epochs())


@pytest.fixture(scope="module")
def ensemble_parts(digits, trained_digits_teacher):
    """Two teachers (the trained one and a perturbed copy): each member forms its own target at its T."""
    state = trained_digits_teacher[0]
    generator = torch.Generator().manual_seed(5)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in state.items()}
    return StudyParts(digits, model_ref("digits_student"), model_ref("digits_teacher"), [state, other])


@pytest.fixture(scope="module")
def cached_parts(digits, trained_digits_teacher):
    from kdtune.train.teacher_logits import teacher_logits_for

    teacher = model_ref("digits_teacher").build(digits.num_classes, digits.input_shape)
    teacher.load_state_dict(trained_digits_teacher[0])
    logits = teacher_logits_for(teacher, digits, TrialConfig().val_fraction, torch.device("cpu"))
    return StudyParts(digits, model_ref("digits_student"), model_ref("digits_teacher"), trained_digits_teacher[0],
                      teacher_logits=logits)


@pytest.mark.parametrize("teacher", ["online", "cached", "ensemble"])
def test_batched_members_train_what_their_unfused_twins_train(request, parts, batched_steps, teacher):
    chosen = {"online": parts, "cached": request.getfixturevalue("cached_parts"),
              "ensemble": request.getfixturevalue("ensemble_parts")}[teacher]
    configs = batched_configs()
    trainers, fused = run_batched(chosen, configs)
    steps_per_epoch = -(-len(trainers[0].train) // configs[0].batch_size)
    assert batched_steps["steps"] == 3 * steps_per_epoch  # every step of every epoch, all members at once
    if teacher == "cached":
        assert all(t.teacher_logits is not None for t in trainers[:2])
    for i, config in enumerate(configs):
        alone_trainer, history = alone(chosen, config)
        assert_same_training(alone_trainer, history, trainers[i], fused[i])
        assert fused[i][-1]["test_acc"] == pytest.approx(history[-1]["test_acc"], abs=1.5 / len(alone_trainer.test))
        assert fused[i][-1]["lr"] == config.lr / 4  # the schedule halved it twice
    assert fused[0][-1]["loss_soft"] > 0 and "loss_soft" not in fused[2][-1]  # the baseline has no soft term
    assert fused[1][-1]["val_acc"] > 0.3  # it did learn (chance is 0.1)


def test_a_diverging_batched_member_fails_alone(parts, batched_steps):
    configs = batched_configs(members=(("kd", 4.0, 0.01), ("kd", 4.0, 1e6), ("none", 2.0, 0.03)), epochs=2)
    trainers, fused = run_batched(parts, configs)
    assert isinstance(fused[1][0], TrainingDiverged) and len(fused[1]) == 1
    assert "became nan" in str(fused[1][0]) or "became inf" in str(fused[1][0])
    assert batched_steps["steps"] > 0
    for i in (0, 2):  # the stack is built again from the two live members for epoch 2: they still match their twins
        alone_trainer, history = alone(parts, configs[i])
        assert_same_training(alone_trainer, history, trainers[i], fused[i])


def test_a_batched_checkpoint_resumes_exactly(parts, batched_steps):
    """A checkpoint after epoch 1 (as kdtune/trial.py takes it: each member's state_dict, through torch.save),
    restored into fresh trainers, continues to what the uninterrupted batched trial reaches, bit for bit."""
    import io

    configs = batched_configs()
    straight, straight_history = run_batched(parts, configs)

    trainers, teacher = parts.fused_trainers(configs)
    first = next(fused_epochs(trainers, teacher))
    buffer = io.BytesIO()
    torch.save({"members": [t.state_dict() for t in trainers]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["members"][0]["optimizer"]["state"], "the momentum buffers are in the checkpoint"

    resumed, teacher = parts.fused_trainers(configs)
    for trainer, state in zip(resumed, saved["members"]):
        trainer.load_state_dict(state)
    history = {i: [first[i]] for i in range(len(configs))}
    for results in fused_epochs(resumed, teacher):
        for i, metrics in results.items():
            history[i].append(metrics)
    for i in range(len(configs)):
        assert [m["epoch"] for m in history[i]] == [1, 2, 3]
        for a, b in zip(straight_history[i], history[i]):
            assert (a["train_loss"], a["val_acc"], a["val_loss"], a["lr"]) == \
                (b["train_loss"], b["val_acc"], b["val_loss"], b["lr"])
        for key, value in straight[i].student.state_dict().items():
            assert torch.equal(resumed[i].student.state_dict()[key], value), (i, key)
    alone_trainer, alone_history = alone(parts, configs[1])  # and what it trains alone (momentum carried over)
    assert_same_training(alone_trainer, alone_history, resumed[1], history[1])


def test_members_that_cannot_be_batched_step_one_after_the_other(parts, batched_steps, caplog):
    """Under batched='on': seed 003's adversarial member (a discriminator, dropout) steps alone, exactly as
    unfused, while the kd and baseline members are batched; the reason is one log line, not a failure."""
    configs = batched_configs(members=(("kd", 2.0, 0.03), ("adversarial", 2.0, 0.03), ("none", 2.0, 0.03)),
                              epochs=2)
    with caplog.at_level(logging.WARNING, logger="kdtune"):
        trainers, fused = run_batched(parts, configs)
    lines = [r.getMessage() for r in caplog.records if "not batched" in r.getMessage()]
    assert lines == ["kdtune: fused member 1 (method 'adversarial') steps on its own, not batched: method "
                     "'adversarial': the batched step computes kd and none losses only"]  # once, not every epoch
    assert batched_steps["steps"] > 0
    alone_trainer, history = alone(parts, configs[1])
    assert [m["train_loss"] for m in fused[1]] == [m["train_loss"] for m in history]  # sequential: bit for bit
    for i in (0, 2):
        alone_trainer, history = alone(parts, configs[i])
        assert_same_training(alone_trainer, history, trainers[i], fused[i])


def test_a_student_with_dropout_is_not_batched_and_still_trains(digits, trained_digits_teacher, batched_steps, caplog):
    def with_dropout(num_classes, shape):
        from kdtune.models import build_model

        return nn.Sequential(build_model("digits_student", num_classes, shape), nn.Dropout(0.2))

    dropout_parts = StudyParts(digits, model_ref(with_dropout), model_ref("digits_teacher"), trained_digits_teacher[0])
    configs = batched_configs(members=(("kd", 2.0, 0.03), ("kd", 4.0, 0.03)), epochs=2)
    with caplog.at_level(logging.WARNING, logger="kdtune"):
        trainers, fused = run_batched(dropout_parts, configs)
    assert batched_steps["steps"] == 0
    assert any("not batched" in r.getMessage() and "Dropout(p=0.2)" in r.getMessage() for r in caplog.records)
    for i, config in enumerate(configs):  # sequential, each with its own dropout stream: what it draws alone
        _, history = alone(dropout_parts, config)
        assert [m["train_loss"] for m in fused[i]] == [m["train_loss"] for m in history]
        assert fused[i][-1]["val_acc"] > 0.3


def test_batched_auto_is_sequential_on_a_cpu_and_bad_values_are_refused(parts, batched_steps, caplog):
    configs = batched_configs(batched="auto", epochs=1)
    with caplog.at_level(logging.WARNING, logger="kdtune"):
        run_batched(parts, configs)
    assert batched_steps["steps"] == 0 and not caplog.records  # auto: batched on CUDA only, quietly
    assert trial_config({"batched": "off"}).batched == "off"
    with pytest.raises(ConfigError, match=r"batched='maybe': unknown; allowed: auto, off, on"):
        trial_config({"batched": "maybe"})
    # members of one fused group agree on it
    base = {"dataset": "digits", "teacher": "digits_teacher", "student": "digits_student", "epochs": 3}
    groups = group_variants([{"label": "a", "method": "kd", "batched": "on"}, {"label": "b", "method": "kd"},
                             {"label": "c", "method": "kd", "batched": "on"}], base, 3)
    assert [[v["label"] for v in g] for g in groups] == [["a", "c"], ["b"]]


def test_the_study_option_sets_batched_for_every_student_trial():
    from kdtune.options import spec_from_args, study_parser

    parser = study_parser("test")
    spec = spec_from_args(parser.parse_args(["--batched", "on", "--fuse", "auto"]), name="t", variants=[{}])
    assert spec.overrides["batched"] == "on" and spec.fuse == "auto"
    assert "batched" not in spec_from_args(parser.parse_args([]), name="t", variants=[{}]).overrides
    with pytest.raises(SystemExit):
        parser.parse_args(["--batched", "maybe"])


def test_a_student_vmap_refuses_at_its_first_step_falls_back_to_sequential(digits, trained_digits_teacher,
                                                                           batched_steps, caplog):
    """A student whose forward reads a tensor's value in Python passes every check but fails under vmap: the
    failed step changed nothing, so the members take that batch (and the rest of the trial) one after the other."""
    class Branchy(nn.Module):
        def __init__(self, num_classes, shape):
            super().__init__()
            from kdtune.models import build_model

            self.body = build_model("digits_student", num_classes, shape)

        def forward(self, x):
            logits = self.body(x)
            return logits if float(logits.detach().abs().sum()) >= 0 else -logits  # a value per member: vmap cannot

    branchy = StudyParts(digits, model_ref(Branchy), model_ref("digits_teacher"), trained_digits_teacher[0])
    configs = batched_configs(members=(("kd", 2.0, 0.03), ("none", 2.0, 0.03)), epochs=2)
    with caplog.at_level(logging.WARNING, logger="kdtune"):
        trainers, fused = run_batched(branchy, configs)
    assert batched_steps["steps"] == 1  # tried once, then not again
    assert [r.getMessage() for r in caplog.records if "vmap refused" in r.getMessage()][0].startswith(
        "kdtune: fused members [0, 1] step one after the other, not batched: vmap refused the student")
    for i, config in enumerate(configs):
        _, history = alone(branchy, config)
        assert [m["train_loss"] for m in fused[i]] == [m["train_loss"] for m in history]
