"""The teacher never trains on the samples its students are validated on: a teacher trained in the study trains
on the students' training split, and a registered teacher is reused only when its training samples exclude the
study's validation split (else a clear refusal naming the fix). Real MLflow; digits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtune.errors import KdtuneError
from kdtune.resolve import resolve_study
from kdtune.study import StudySpec

KD = [{"label": "baseline", "method": "none"}, {"label": "kd", "method": "kd", "temperature": 4.0}]


def seen_by_teacher(resolved) -> int:
    """How many of the students' validation samples the teacher this study would train learns from."""
    dataset = resolved.dataset
    teacher_train = dataset.split(resolved.teacher_config.val_fraction)[0]
    student_val = torch.unique(torch.cat([dataset.split(c.val_fraction)[1] for c in resolved.configs]))
    return int(torch.isin(student_val, teacher_train).sum())


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.3])
def test_a_teacher_trained_in_the_study_trains_on_the_students_training_split(fraction):
    resolved = resolve_study(StudySpec(name="split", variants=KD, overrides={"val_fraction": fraction}))
    assert seen_by_teacher(resolved) == 0
    assert resolved.teacher_config.val_fraction == fraction  # exactly the students' training split


def test_several_validation_splits_in_one_study_are_all_kept_from_the_teacher():
    resolved = resolve_study(StudySpec(name="split", variants=KD, tune={"val_fraction": [0.1, 0.25]}))
    assert {c.val_fraction for c in resolved.configs} == {0.1, 0.25}
    assert seen_by_teacher(resolved) == 0


def test_a_teacher_split_that_overlaps_the_students_validation_is_refused_with_the_fix():
    with pytest.raises(KdtuneError) as error:
        resolve_study(StudySpec(name="split", variants=KD, overrides={"val_fraction": 0.2},
                                teacher_overrides={"val_fraction": 0.1}))
    message = str(error.value)
    assert "the teacher would train with val_fraction=0.1" in message and "(val_fraction 0.2)" in message
    assert "leave the teacher's val_fraction unset" in message and "\n" not in message


@pytest.fixture()
def registered_teacher(mlflow_server, tmp_path):
    """A teacher registered as kdtune registers one, trained with val_fraction 0.1, under a name of its own."""
    import mlflow
    from torch import nn

    from kdtune.registry import train_set_fingerprint, training_split_fingerprint
    from kdtune.sources import resolve_dataset
    from kdtune.tracking import use_tracking

    dataset = resolve_dataset("digits")
    use_tracking(mlflow_server.uri)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(nn.Linear(2, 2), name="teacher", input_example=np.zeros((1, 2), np.float32))
    name = f"test-split-teacher-{tmp_path.name}"
    version = mlflow.register_model(info.model_uri, name, tags={
        "train_set": train_set_fingerprint(dataset), "val_fraction": "0.1",
        "fit_set": training_split_fingerprint(dataset, 0.1)})
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version.version)
    return dataset, f"models:/{name}@champion", version.version


def test_a_registered_teacher_is_reused_only_where_it_never_saw_the_validation_split(registered_teacher):
    from kdtune.models.refs import model_ref
    from kdtune.teachers import plan_teacher

    dataset, uri, version = registered_teacher
    ref = model_ref("digits_teacher")
    for fraction in (0.05, 0.1):  # its validation split (or part of it): never trained on
        plan_teacher(uri, ref, dataset).find_registered(dataset, ref, log=lambda *a: None, val_fractions=(fraction,))
    with pytest.raises(KdtuneError) as error:
        plan_teacher(uri, ref, dataset).find_registered(dataset, ref, log=lambda *a: None, val_fractions=(0.2,))
    message = str(error.value)
    assert f"(version {version}) trained with val_fraction=0.1" in message
    assert "include 144 of the 287 samples this study validates its students on (val_fraction 0.2)" in message
    assert "train:S" in message and "\n" not in message


def test_the_default_registered_teacher_is_refused_for_a_larger_validation_split(mlflow_server, monkeypatch,
                                                                                  registered_teacher):
    """The registered champion a study reuses by default: refused (before anything is created) when the
    students would validate on samples it trained on, with the fix."""
    from kdtune import teachers
    from kdtune.models.refs import model_ref

    dataset, uri, _ = registered_teacher
    name = uri[len("models:/"):].split("@")[0]
    monkeypatch.setattr(teachers, "registry_name", lambda dataset, arch: name)
    ref = model_ref("digits_teacher")
    plan = teachers.TeacherPlan(None)
    plan.find_registered(dataset, ref, log=lambda *a: None, val_fractions=(0.1,))
    assert plan.registered == uri
    with pytest.raises(KdtuneError, match=r"val_fraction 0\.2\).*give --teacher-source train to train a teacher "
                                          r"on this study's training split"):
        teachers.TeacherPlan(None).find_registered(dataset, ref, log=lambda *a: None, val_fractions=(0.2,))
