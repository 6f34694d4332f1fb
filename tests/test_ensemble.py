"""Ensemble teachers: the soft target is the members' averaged softened probabilities, the same from cached logits
as from the teachers run online; a temperature sweep distils from two registered teachers and its report lists
each member's accuracy and the ensemble's. Real Ray, real MLflow, digits."""
from __future__ import annotations

import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from kdtune.config import TrialConfig
from kdtune.distill import method_class
from kdtune.distill.losses import ensemble_logits, soft_loss
from kdtune.train.teacher_logits import teacher_logits_for
from kdtune.errors import ConfigError
from kdtune.models.refs import model_ref
from kdtune.train.parts import StudyParts
from kdtune.study import StudySpec, run_study
from kdtune.tracking import client_for
from kdtune.distill import trial_config

T = 3.0


@pytest.fixture(scope="module")
def two_teachers(digits):
    """Two digits teachers of different seeds, trained briefly with the engine."""
    from kdtune.train.parts import trainer_for

    states = []
    for seed in (0, 1):
        config = trial_config(dict(student="digits_teacher", method="none", epochs=3, lr=0.05, seed=seed))
        trainer = trainer_for(config, digits)
        for _ in trainer.epochs():
            pass
        trainer.close()
        states.append(trainer.student.state_dict())
    return states


def kd_config(**extra) -> TrialConfig:
    return trial_config(dict(student="digits_student", teacher="digits_teacher", method="kd",
                                      temperature=T, alpha=0.5, epochs=1, **extra))


def test_the_soft_target_is_the_mean_of_softened_probabilities_not_of_logits():
    torch.manual_seed(0)
    members = torch.randn(3, 16, 10) * 4
    for temperature in (0.6, 1.0, 4.0):
        logits = ensemble_logits(members, temperature)
        target = F.softmax(members / temperature, dim=2).mean(0)
        assert torch.allclose(F.softmax(logits / temperature, dim=1), target, atol=1e-6)
        averaged_logits = F.softmax(members.mean(0) / temperature, dim=1)
        assert (averaged_logits - target).abs().max() > 1e-2  # a different target at every T
    single = torch.randn(16, 10)
    assert ensemble_logits(single, T) is single  # one teacher: its logits, untouched
    assert torch.allclose(ensemble_logits(single[None], T), single)  # the 1-member case
    assert torch.allclose(ensemble_logits(torch.stack([single, single]), T), single, atol=1e-5)  # raw-logit scale


def test_each_method_reads_the_ensemble_at_its_own_temperature():
    members = torch.randn(2, 8, 10) * 3
    kd = method_class("kd")(kd_config())
    assert torch.allclose(kd.teacher_view(members), ensemble_logits(members, T))
    adversarial = method_class("adversarial")(trial_config(dict(method="adversarial")))
    view = adversarial.teacher_view(members)  # no temperature: the ensemble's own prediction, T = 1
    assert torch.allclose(F.softmax(view, dim=1), F.softmax(members, dim=2).mean(0), atol=1e-6)
    one = members[0]
    assert adversarial.teacher_view(one) is one


def test_cached_logits_give_the_online_ensembles_soft_targets_on_the_same_samples(digits, two_teachers):
    student, teacher = model_ref("digits_student"), model_ref("digits_teacher")
    online_parts = StudyParts(digits, student, teacher, two_teachers)
    online = online_parts.trainer(kd_config(teacher_cache="off"))
    cache = teacher_logits_for(online_parts.build_teacher(), digits, online.config.val_fraction)
    assert cache.shape == (2, len(digits.train_labels), digits.num_classes)  # the members' logits, not averaged
    cached_parts = StudyParts(digits, student, teacher, two_teachers, teacher_logits=cache)
    cached = cached_parts.trainer(kd_config(teacher_cache="on"))
    assert online.teacher is not None and online.teacher_logits is None
    assert cached.teacher is None and cached.teacher_logits is not None
    networks = [online_parts._network(state).eval() for state in two_teachers]
    batches = online.train.batches(64, online.batch_generator())
    for _, (images, labels, indices) in zip(range(3), batches):  # shuffled batches: rows looked up by index
        from_network = online._forward(images, labels, indices).teacher_logits
        from_cache = cached._forward(images, labels, indices).teacher_logits
        with torch.inference_mode():  # fused students: the stacked logits computed once, each forms its own target
            shared = online.teacher(images.contiguous(memory_format=torch.channels_last)).clone()
        assert shared.shape == (2, len(images), digits.num_classes)
        from_shared = online._forward(images, labels, indices, True, shared).teacher_logits
        with torch.no_grad():
            by_hand = torch.stack([F.softmax(n(images) / T, dim=1) for n in networks]).mean(0)
        assert torch.allclose(F.softmax(from_network / T, dim=1), by_hand, atol=1e-5)
        assert torch.allclose(F.softmax(from_cache / T, dim=1), by_hand, atol=1e-5)
        assert torch.allclose(F.softmax(from_shared / T, dim=1), by_hand, atol=1e-5)
        student_logits = online.student(images)
        assert torch.allclose(soft_loss(student_logits, from_network, T), soft_loss(student_logits, from_cache, T),
                              atol=1e-5)
    online.close()
    cached.close()


def test_feature_methods_and_repeated_members_are_refused_before_anything_exists(mlflow_server, tmp_path):
    client = client_for(mlflow_server.uri)
    sources = ["train:0", "train:1"]
    spec = StudySpec(name="test_ensemble_links_refused", dataset="digits", teacher_source=sources,
                     variants=[{"label": "links", "method": "links", "links": "2", "beta": 1.0}],
                     tracking_uri=mlflow_server.uri, storage=str(tmp_path))
    with pytest.raises(ConfigError, match="method 'links' reads teacher features.*give one --teacher-source"):
        run_study(spec, echo=lambda *a: None)
    for bad, message in ((["train:0", "train:0"], "given twice"), (["train:x", "train:1"], "whole number >= 0")):
        spec = StudySpec(name="test_ensemble_links_refused", dataset="digits", teacher_source=bad,
                         variants=[{"label": "kd", "method": "kd"}], tracking_uri=mlflow_server.uri,
                         storage=str(tmp_path))
        with pytest.raises(ConfigError, match=message):
            run_study(spec, echo=lambda *a: None)
    assert client.get_experiment_by_name("test_ensemble_links_refused") is None
    assert not list(tmp_path.iterdir())


def test_a_sweep_distils_from_two_registered_teachers_and_reports_each(local_ray, mlflow_server, tmp_path,
                                                                       capsys, monkeypatch):
    from kdtune import cli

    uri = ["--tracking-uri", mlflow_server.uri]
    name = "kdtune-teacher-digits-digits_teacher"
    client = client_for(mlflow_server.uri)
    for seed in (0, 1):  # `kdtune teacher train --seed S`: further teachers for an ensemble
        assert cli.main(["teacher", "train", "--dataset", "digits", "--epochs", "6", "--seed", str(seed), *uri]) == 0
    champion = client.get_model_version_by_alias(name, "champion").version
    seeded = [client.get_model_version_by_alias(name, f"seed{s}") for s in (0, 1)]
    assert seeded[0].version != seeded[1].version and seeded[1].tags["seed"] == "1"
    assert champion != seeded[1].version  # with a champion in place, --seed S leaves it where it is
    assert f"models:/{name}@seed1" in capsys.readouterr().out

    sources = [f"models:/{name}@seed0", f"models:/{name}@seed1"]
    argv = ["temperature_sweep.py", "--temperatures", "2", "5", "--epochs", "3", "--tune", "none",
            "--teacher-source", sources[0], "--teacher-source", sources[1], "--store", str(tmp_path),
            "--register-as", "test-ensemble-sweep", *uri]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(str(REPO / "studies" / "temperature_sweep.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert finished.value.code == 0, out[-3000:]
    assert "an ensemble of 2 teachers" in out
    experiment = client.get_experiment_by_name("temperature_sweep")
    parent = client.search_runs([experiment.experiment_id], "tags.`kdtune.role` = 'study'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert parent.data.tags["kdtune.teacher"] == " + ".join(sources)
    metrics = parent.data.metrics
    for key in ("teacher_member0", "teacher_member1", "teacher_ensemble"):
        assert 0.5 < metrics[f"{key}_test_acc"] <= 1 and 0.5 < metrics[f"{key}_val_acc"] <= 1
    # the study's report lists both members and the ensemble, with their accuracies
    folder = tmp_path / "report"
    from kdtune.report import build_report

    page = build_report(client, parent.info.run_id, folder).read_text()
    text = (folder / "teachers.txt").read_text()
    for line_start, key in (("member 0", "teacher_member0"), ("member 1", "teacher_member1"),
                            ("ensemble", "teacher_ensemble")):
        line = next(row for row in text.splitlines() if row.startswith("  " + line_start))
        assert f"{100 * metrics[key + '_test_acc']:.2f}%" in line and f"{100 * metrics[key + '_val_acc']:.2f}%" in line
        assert line_start in page
    assert sources[1] in text and f"{100 * metrics['teacher_ensemble_test_acc']:.2f}" in page
    # every distilled trial ran from the ensemble's cached member logits and finished
    students = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
                                  " and tags.`kdtune.role` = 'student'")
    assert sorted(r.data.tags["kdtune.label"] for r in students) == ["2", "5", "baseline"]
    assert all(r.info.status == "FINISHED" for r in students)
