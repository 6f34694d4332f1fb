"""A researcher's own teacher, student and data, end to end: the study scripts and the Python API, a real Ray,
a real MLflow server and registry, data files written here (PNG folders, npz) and a user package on PYTHONPATH."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import REPO
from kdtune.tracking import client_for, use_tracking
from kdtune.distill import trial_config

pytestmark = pytest.mark.e2e

USER_MODELS = '''
"""A user's own models: factory(num_classes, input_shape) -> nn.Module."""
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes, channels):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def tiny(num_classes, input_shape):
    return Tiny(num_classes, input_shape[0])


def not_a_model(num_classes, input_shape):
    return "a string"


def signal_net(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(input_shape[0] * input_shape[1]), 32), nn.ReLU(),
                         nn.Linear(32, num_classes))
'''

USER_DATA = '''
"""A user's own data: 1-D signals (N x 2 x 24), three classes told apart by frequency."""
import numpy as np


def signals():
    rng = np.random.default_rng(0)
    def make(n):
        labels = rng.integers(0, 3, n)
        t = np.linspace(0, 1, 24)
        x = np.stack([np.sin(2 * np.pi * (labels[:, None] + 1) * t), np.cos(2 * np.pi * (labels[:, None] + 1) * t)], 1)
        return (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), labels
    x_train, y_train = make(240)
    x_test, y_test = make(90)
    return x_train, y_train, x_test, y_test
'''


def write_user_package(root: Path) -> Path:
    package = root / "mypkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(USER_MODELS)
    (package / "data.py").write_text(USER_DATA)
    return root


def write_png_folder(root: Path, classes=("cat", "dog", "owl"), per_class=(24, 8), size=16, seed=0) -> Path:
    """train/ and test/ of one folder per class; each class is a brighter colour channel plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
                pixels[:, :, label % 3] += 140
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run(script: str, *args: str, env_extra: dict | None = None, cwd: Path, timeout: int = 900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if env_extra and "PYTHONPATH" in env_extra and os.environ.get("PYTHONPATH"):  # the user's code, then ours
        env["PYTHONPATH"] = env_extra["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, str(REPO / "studies" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def champion(client, name):
    return client.get_model_version_by_alias(name, "champion")


def test_torchvision_teacher_and_user_student_on_an_image_folder(mlflow_server, tmp_path):
    """The issue's own check: torchvision teacher, a user's factory, a folder of PNGs; the champion classifies a
    file from that folder."""
    users = write_user_package(tmp_path / "code")
    data = write_png_folder(tmp_path / "pets")
    name = "open-folder-student"
    result = run("temperature_sweep.py", "--dataset", f"folder:{data}", "--teacher", "torchvision:resnet18",
                 "--student", "mypkg.models:tiny", "--temperatures", "4", "--epochs", "3", "--teacher-epochs", "3",
                 "--tracking-uri", mlflow_server.uri, "--store", str(tmp_path / "store"), "--register-as", name,
                 env_extra={"PYTHONPATH": str(users)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "training one" in result.stdout  # no teacher registered for this folder yet

    client = client_for(mlflow_server.uri)
    version = champion(client, name)
    assert version.tags["student"] == "mypkg.models:tiny" and version.tags["teacher"] == "torchvision:resnet18"
    teacher = champion(client, "kdtune-teacher-pets-torchvision-resnet18")
    assert teacher.tags["architecture"] == "torchvision:resnet18"

    from PIL import Image

    use_tracking(mlflow_server.uri)
    model = mlflow.pytorch.load_model(f"models:/{name}@champion", map_location="cpu")
    image = np.asarray(Image.open(data / "test" / "dog" / "0.png"), dtype=np.float32) / 255.0
    logits = model(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0))
    assert tuple(logits.shape) == (1, 3)  # three classes, in the folders' sorted order: cat, dog, owl


def test_links_by_module_path_between_torchvision_and_a_user_model(mlflow_server, tmp_path):
    users = write_user_package(tmp_path / "code")
    data = write_png_folder(tmp_path / "pets2", per_class=(16, 6))
    result = run("link_sets.py", "--dataset", f"folder:{data}", "--teacher", "torchvision:resnet18",
                 "--student", "mypkg.models:tiny", "--link-sets", "layer1=features.5", "--epochs", "2",
                 "--teacher-epochs", "2", "--tracking-uri", mlflow_server.uri, "--store", str(tmp_path / "store"),
                 "--register-as", "open-links-student", env_extra={"PYTHONPATH": str(users)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client = client_for(mlflow_server.uri)
    experiment = client.get_experiment_by_name("link_sets")
    runs = client.search_runs([experiment.experiment_id], "tags.`kdtune.role` = 'student'", max_results=100)
    linked = [r for r in runs if r.data.params.get("links") == "layer1=features.5"]
    assert linked and all(r.info.status == "FINISHED" for r in linked)
    history = client.get_metric_history(linked[0].info.run_id, "loss_intermediate")
    assert len(history) == 2 and all(m.value > 0 for m in history)


def test_npz_and_a_module_function_of_signals(mlflow_server, tmp_path):
    """Non-image samples (N x 2 x 24 signals) from a user's function, and an npz of the same arrays."""
    users = write_user_package(tmp_path / "code")
    sys.path.insert(0, str(users))
    try:
        from mypkg.data import signals

        x_train, y_train, x_test, y_test = signals()
    finally:
        sys.path.remove(str(users))
    np.savez(tmp_path / "waves.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    for dataset, name in ((f"npz:{tmp_path / 'waves.npz'}", "open-npz"), ("mypkg.data:signals", "open-func")):
        result = run("temperature_sweep.py", "--dataset", dataset, "--student", "mypkg.models:signal_net",
                     "--temperatures", "4", "--epochs", "4", "--teacher-epochs", "6", "--tracking-uri",
                     mlflow_server.uri, "--store", str(tmp_path / "store"), "--register-as", name,
                     env_extra={"PYTHONPATH": str(users)}, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        use_tracking(mlflow_server.uri)
        model = mlflow.pytorch.load_model(f"models:/{name}@champion", map_location="cpu")
        predictions = model(torch.from_numpy(x_test[:30])).argmax(1).numpy()
        assert predictions.shape == (30,)
        assert (predictions == y_test[:30]).mean() > 0.5  # the signals are easy: a trained student gets most


def test_python_api_with_arrays_a_trained_module_teacher_and_a_lambda_student(mlflow_server, tmp_path):
    import ray
    from torch import nn

    import kdtune

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 12)) * 3
    y = rng.integers(0, 4, 400)
    x = (centres[y] + rng.standard_normal((400, 12))).astype(np.float32)
    dataset = kdtune.data.from_arrays(x[:300], y[:300], x[300:], y[300:], name="blobs")
    teacher = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 4))
    optimiser = torch.optim.Adam(teacher.parameters(), lr=0.01)
    inputs, labels = torch.from_numpy(x[:300]), torch.from_numpy(y[:300])
    for _ in range(200):  # the user's own training, outside kdtune
        optimiser.zero_grad()
        nn.functional.cross_entropy(teacher(inputs), labels).backward()
        optimiser.step()
    spec = kdtune.StudySpec(name="api_blobs", dataset=dataset, teacher=teacher,
                            student=lambda n, shape: nn.Sequential(nn.Linear(shape[0], 8), nn.ReLU(), nn.Linear(8, n)),
                            variants=[{"label": "baseline", "method": "none"},
                                      {"label": "T=4", "method": "kd", "temperature": 4.0, "alpha": 0.5}],
                            overrides={"epochs": 3}, tracking_uri=mlflow_server.uri, storage=str(tmp_path),
                            register_as="api-blobs-student")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = kdtune.run_study(spec, echo=lambda *a: None)
    finally:
        ray.shutdown()
    assert [t.status for t in result.trials] == ["finished", "finished"]
    client = client_for(mlflow_server.uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["kdtune.teacher"] == "python object"  # the module given is the teacher: none trained
    assert champion(client, "api-blobs-student").tags["student"].startswith("python:")


def test_pretrained_teacher_fine_tunes_from_the_weights_file_where_the_error_said(mlflow_server, tmp_path):
    """With the torchvision weights file in the torch hub folder, --teacher-source pretrained starts from it,
    fine-tunes for --teacher-epochs and registers the teacher (tagged init=pretrained)."""
    import torchvision

    hub = tmp_path / "torch-home"
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    file = hub / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]  # where the offline error says to put it
    file.parent.mkdir(parents=True)
    torch.manual_seed(3)
    weights = torchvision.models.mobilenet_v3_small(weights=None).state_dict()  # stands in for the download
    torch.save(weights, file)
    data = write_png_folder(tmp_path / "pets3", per_class=(12, 4))
    result = run("temperature_sweep.py", "--dataset", f"folder:{data}", "--teacher", "torchvision:mobilenet_v3_small",
                 "--teacher-source", "pretrained", "--temperatures", "4", "--epochs", "1", "--teacher-epochs", "1",
                 "--tracking-uri", mlflow_server.uri, "--store", str(tmp_path / "store"),
                 "--register-as", "open-pretrained-student", env_extra={"TORCH_HOME": str(hub)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "fine-tuning torchvision:mobilenet_v3_small from its pretrained weights (1 epochs)" in result.stdout
    client = client_for(mlflow_server.uri)
    teacher = champion(client, "kdtune-teacher-pets3-torchvision-mobilenet_v3_small")
    assert teacher.tags["init"] == "pretrained"


def test_streamed_folder_trains_like_the_in_memory_one(tmp_path):
    """Same data, same seed: the DataLoader path gives the in-memory path's accuracy (up to float order)."""
    from kdtune.train.parts import trainer_for
    from kdtune.sources import resolve_dataset

    root = write_png_folder(tmp_path / "pets", per_class=(20, 6))
    config = trial_config({"dataset": "pets", "student": "digits_student", "teacher": "digits_teacher",
                                    "method": "none", "epochs": 3, "batch_size": 16, "lr": 0.05,
                                    "augment": "crop:2,flip"})
    results = []
    for stream in (False, True):
        dataset = resolve_dataset(f"folder:{root}", stream=stream)
        assert dataset.in_memory is (not stream)
        trainer = trainer_for(config, dataset)
        results.append([m for m in trainer.epochs()][-1])
    memory, streamed = results
    assert streamed["val_acc"] == pytest.approx(memory["val_acc"], abs=1e-6)
    assert streamed["test_acc"] == pytest.approx(memory["test_acc"], abs=1e-6)
    assert streamed["train_loss"] == pytest.approx(memory["train_loss"], rel=1e-4)


def test_a_folder_larger_than_the_memory_budget_streams_through_a_study(mlflow_server, tmp_path):
    data = write_png_folder(tmp_path / "pets4", per_class=(16, 6))
    result = run("temperature_sweep.py", "--dataset", f"folder:{data}", "--temperatures", "4", "--epochs", "2",
                 "--teacher-epochs", "2", "--tracking-uri", mlflow_server.uri, "--store", str(tmp_path / "store"),
                 "--register-as", "open-streamed-student", env_extra={"KDTUNE_MEMORY_BUDGET_MB": "0.01"},
                 cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "exceed the memory budget" in result.stderr
    assert "teacher logits are not cached" in result.stdout
    client = client_for(mlflow_server.uri)
    assert champion(client, "open-streamed-student").tags["dataset"] == "pets4"


def test_models_links_prints_module_paths_with_shapes(tmp_path):
    data = write_png_folder(tmp_path / "pets5", per_class=(3, 2))
    result = subprocess.run([sys.executable, "-m", "kdtune.cli", "models", "links", "torchvision:resnet18",
                             "--dataset", f"folder:{data}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.split() and l.split()[0] == "layer1")
    assert "64" in line and "4" in line  # layer1 of resnet18 on 16x16 inputs: 64 x 4 x 4
