"""Bad input from a researcher's own models and data: one clear line, before any trial, nothing written.

Most cases go through `resolve_study` (what every study runs first, before the tracking server, Ray or any
folder exists); two go through a study script to check the exit status, the single line and the empty store.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from kdtune.errors import KdtuneError
from kdtune.resolve import resolve_study
from kdtune.study import StudySpec
from test_open_platform import write_png_folder, write_user_package

KD = [{"label": "kd", "method": "kd", "temperature": 4.0}]


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    root = write_user_package(tmp_path / "code")
    monkeypatch.syspath_prepend(str(root))
    return root


def refused(**fields) -> str:
    with pytest.raises(KdtuneError) as error:
        resolve_study(StudySpec(name="bad", **{"variants": KD, **fields}))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_dataset_form_lists_the_allowed_forms():
    message = refused(dataset="s3x:bucket/data")
    assert "s3x:bucket/data" in message and "folder:PATH" in message and "npz:PATH" in message


def test_a_model_module_that_fails_to_import(user_code):
    assert "nosuchpkg" in refused(student="nosuchpkg.models:tiny")


def test_a_factory_that_returns_no_module(user_code):
    message = refused(student="mypkg.models:not_a_model")
    assert "mypkg.models:not_a_model" in message and "str" in message


def test_folder_without_classes_or_with_different_classes_per_split(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    assert "class" in refused(dataset=f"folder:{tmp_path / 'empty'}")
    root = write_png_folder(tmp_path / "mixed", per_class=(3, 2))
    (root / "test" / "owl").rename(root / "test" / "bat")
    message = refused(dataset=f"folder:{root}")
    assert "owl" in message and "bat" in message


def test_an_unreadable_image_is_named(tmp_path):
    root = write_png_folder(tmp_path / "broken", per_class=(3, 2))
    (root / "train" / "dog" / "1.png").write_bytes(b"not a png")
    assert "1.png" in refused(dataset=f"folder:{root}")


def test_an_npz_without_the_expected_arrays(tmp_path):
    np.savez(tmp_path / "half.npz", x_train=np.zeros((4, 3), np.float32), y_train=np.zeros(4, np.int64))
    message = refused(dataset=f"npz:{tmp_path / 'half.npz'}")
    assert "x_test" in message and "x_train" in message


def test_a_link_path_missing_from_the_model_names_the_nearest(user_code, tmp_path):
    root = write_png_folder(tmp_path / "pets", per_class=(3, 2))
    message = refused(dataset=f"folder:{root}", teacher="torchvision:resnet18", student="mypkg.models:tiny",
                      variants=[{"label": "l", "method": "links", "links": "layer1=features.55", "beta": 1.0}])
    assert "features.55" in message and "features.5" in message and "kdtune models links" in message


def test_features_no_adapter_can_join(user_code, tmp_path):
    root = write_png_folder(tmp_path / "pets", per_class=(3, 2))
    message = refused(dataset=f"folder:{root}", teacher="torchvision:resnet18", student="mypkg.models:tiny",
                      variants=[{"label": "l", "method": "links", "links": "layer1=head.2", "beta": 1.0}])
    assert "cannot be joined by an adapter" in message
    # maps of different height and width: refused, naming both shapes, unless the user asks to interpolate
    message = refused(dataset=f"folder:{root}", teacher="torchvision:resnet18", student="mypkg.models:tiny",
                      variants=[{"label": "l", "method": "links", "links": "layer1=features.2", "beta": 1.0}])
    assert "(8, 8, 8)" in message and "(64, 4, 4)" in message and "link_spatial=interpolate" in message
    resolve_study(StudySpec(name="ok", dataset=f"folder:{root}", teacher="torchvision:resnet18",
                            student="mypkg.models:tiny",
                            variants=[{"label": "l", "method": "links", "links": "layer1=features.2", "beta": 1.0,
                                       "link_spatial": "interpolate"}]))


def test_augmentation_on_samples_that_are_not_images():
    from kdtune.data import from_arrays

    data = from_arrays(np.zeros((20, 6), np.float32), np.arange(20) % 2, np.zeros((6, 6), np.float32),
                       np.arange(6) % 2)
    assert "needs image samples" in refused(dataset=data, overrides={"augment": "flip"})


def script(*args, store: Path, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "studies" / "temperature_sweep.py"), *args, "--store",
                           str(store)], capture_output=True, text=True, timeout=300, env=env, cwd=store.parent)


def test_a_study_script_refuses_with_one_line_exit_2_and_writes_nothing(tmp_path):
    root = write_png_folder(tmp_path / "pets", per_class=(3, 2))
    (root / "test" / "owl").rename(root / "test" / "bat")
    store = tmp_path / "store"
    result = script("--dataset", f"folder:{root}", store=store)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtune: error: ") and "bat" in lines[0]
    assert not store.exists()  # no MLflow store, no study folder


def test_pretrained_weights_offline_name_the_file_and_folder_and_change_nothing(tmp_path):
    root = write_png_folder(tmp_path / "pets", per_class=(3, 2))
    store, hub = tmp_path / "store", tmp_path / "torch-home"
    result = script("--dataset", f"folder:{root}", "--teacher", "torchvision:mobilenet_v3_small",
                    "--teacher-source", "pretrained", store=store, env_extra={"TORCH_HOME": str(hub)})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mobilenet_v3_small" in lines[0]
    assert str(hub / "hub" / "checkpoints") in lines[0] and ".pth" in lines[0]
    assert not store.exists()
    assert not any(hub.rglob("*.pth")) if hub.exists() else True


def test_a_registered_teacher_trained_on_other_samples_of_the_same_name_is_refused(mlflow_server, tmp_path):
    """Two folders both called 'pets': the teacher registered for one must not teach the other (it may have
    seen the other's test images)."""
    import mlflow
    from torch import nn

    from kdtune.models.refs import model_ref
    from kdtune.registry import train_set_fingerprint
    from kdtune.sources import resolve_dataset
    from kdtune.teachers import TeacherPlan, registry_name
    from kdtune.tracking import use_tracking

    first = resolve_dataset(f"folder:{write_png_folder(tmp_path / 'a' / 'pets', per_class=(3, 2), seed=1)}")
    second = resolve_dataset(f"folder:{write_png_folder(tmp_path / 'b' / 'pets', per_class=(3, 2), seed=2)}")
    assert first.name == second.name == "pets"
    ref = model_ref("digits_teacher")
    use_tracking(mlflow_server.uri)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(nn.Linear(2, 2), name="teacher", input_example=np.zeros((1, 2), np.float32))
    name = registry_name(first.name, ref.name)
    version = mlflow.register_model(info.model_uri, name, tags={"train_set": train_set_fingerprint(first)})
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version.version)
    plan = TeacherPlan(None)
    plan.find_registered(first, ref, log=lambda *a: None)
    assert plan.registered == f"models:/{name}@champion"
    with pytest.raises(KdtuneError, match="trained on other samples .* --teacher-source train"):
        TeacherPlan(None).find_registered(second, ref, log=lambda *a: None)
