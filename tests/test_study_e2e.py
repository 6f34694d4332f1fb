"""The temperature sweep as a user runs it: the real script, a real local Ray, a real MLflow server."""
from __future__ import annotations

import mlflow
import pytest
import torch

from conftest import run_script, write_cifar10
from kdtune.tracking import client_for, use_tracking

pytestmark = pytest.mark.e2e


def study_runs(client, experiment="temperature_sweep"):
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kdtune.role") == "study"]
    return parents, runs


def children_of(runs, parent):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.fixture()
def fresh_mlflow_server(tmp_path_factory):
    """A server no other test has registered a teacher on: this test checks the first study trains one."""
    from kdtune.tracking import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("fresh-mlflow")).start()
    yield server
    server.stop()


def test_digits_sweep_tracks_every_trial_and_registers_a_loadable_champion(fresh_mlflow_server, tmp_path, digits):
    mlflow_server = fresh_mlflow_server
    name = "e2e-digits-student"
    result = run_script("temperature_sweep.py", "--dataset", "digits", "--temperatures", "2", "5", "--seeds", "2",
                        "--tune", "none",
                        "--epochs", "4", "--teacher-epochs", "10", "--tracking-uri", mlflow_server.uri,
                        "--store", str(tmp_path), "--register-as", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    table = out[out.index("Temperature sweep (seed 000 Table 3)"):]
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.strip()]
    assert rows[:3] == ["baseline", "2", "5"]
    assert "training one" in out  # no teacher registered yet on this server

    client = client_for(mlflow_server.uri)
    parents, runs = study_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = children_of(runs, parents[0])
    roles = sorted(r.data.tags["kdtune.role"] for r in children)
    assert roles == ["student"] * 6 + ["teacher"]  # baseline x2, T=2 x2, T=5 x2, and the teacher
    assert sorted(r.data.tags["kdtune.label"] for r in children if r.data.tags["kdtune.role"] == "student") == \
        ["2", "2", "5", "5", "baseline", "baseline"]
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 5 if run.data.tags["kdtune.role"] == "student" else 11))
        assert "loss_hard" in run.data.metrics
        if run.data.params.get("method") == "kd":
            assert len(client.get_metric_history(run.info.run_id, "loss_soft")) == 4
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "results")]
    assert sorted(artifacts) == ["results/table.txt", "results/trials.csv"]

    version = client.get_model_version_by_alias(name, "champion")
    champion_run = client.get_run(version.tags["run_id"])
    # every trial logs its student's weights; only the registered one is also a servable MLflow model
    students = [r for r in children if r.data.tags["kdtune.role"] == "student"]
    for run in students:
        assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/student.pt"]
        servable = client.get_run(run.info.run_id).data.tags.get("kdtune.model_uri")
        assert bool(servable) == (run.info.run_id == champion_run.info.run_id)
    assert champion_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    use_tracking(mlflow_server.uri)  # kdtune changes no process-wide MLflow setting: name the server (and registry)
    model = mlflow.pytorch.load_model(f"models:/{name}@champion", map_location="cpu")
    with torch.no_grad():
        logits = model(digits.test_images.float() * digits.scale)
    accuracy = (logits.argmax(1) == digits.test_labels).float().mean().item()
    assert accuracy == pytest.approx(champion_run.data.metrics["test_acc"], abs=1e-6)
    assert float(version.tags["test_acc"]) == pytest.approx(accuracy, abs=1e-4)

    # a second study on the same server reuses the registered teacher instead of training another
    again = run_script("temperature_sweep.py", "--dataset", "digits", "--temperatures", "3", "--epochs", "2",
                       "--tune", "none", "--tracking-uri", mlflow_server.uri, "--store", str(tmp_path), "--register-as", name,
                       cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the registered models:/kdtune-teacher-digits-digits_teacher@champion" in again.stdout
    parents, runs = study_runs(client)
    newest = max(parents, key=lambda r: r.info.start_time)
    assert [r.data.tags["kdtune.role"] for r in children_of(runs, newest)] == ["student", "student"]


def test_cifar10_sweep_runs_on_files_in_the_official_format(mlflow_server, tmp_path):
    write_cifar10(tmp_path / "data", per_batch=8, test=8)
    result = run_script("temperature_sweep.py", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                        "--no-download", "--temperatures", "2", "--epochs", "1", "--teacher-epochs", "1",
                        "--batch-size", "8", "--set", "val_fraction=0.2", "--tracking-uri", mlflow_server.uri,
                        "--store", str(tmp_path), "--register-as", "e2e-cifar-vgg7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered kdtune-teacher-cifar10-vgg16" in result.stdout
    client = client_for(mlflow_server.uri)
    version = client.get_model_version_by_alias("e2e-cifar-vgg7", "champion")
    assert version.tags["student"] == "vgg7" and version.tags["teacher"] == "vgg16"


@pytest.mark.parametrize("args, message", [
    (["--temperatures", "0"], "kdtune: error: temperature=0.0: must be > 0"),
    (["--alpha", "1.5"], "kdtune: error: alpha=1.5: above 1 the default hard_weight (1 - alpha) would be negative"),
    (["--dataset", "imagenet"], "kdtune: error: dataset='imagenet': unknown dataset; allowed forms: NAME (cifar10, "
                                "cifar100, digits"),
    (["--student", "resnet"], "kdtune: error: model 'resnet': unknown (close: resnet8"),
    (["--set", "links=9"], "kdtune: error: --set links: neither a shared trial key nor a parameter of this study's "
                           "methods (kd, none); their parameters: alpha, logit_standardize, soft_scale, temperature"),
    (["--tune", "colour=1,2"], "kdtune: error: --tune colour: unknown config key"),
    (["--fuse", "many"], "kdtune: error: fuse='many': expected off, auto or a group size"),
    (["--tracking-uri", "http://127.0.0.1:9"], "kdtune: error: tracking URI http://127.0.0.1:9 is unreachable"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/nothing", "--no-download"],
     "kdtune: error: cifar10: {tmp}/nothing/cifar-10-batches-py/data_batch_1 not found and downloads are off"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/offline"], "kdtune: error: could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
])
def test_bad_input_stops_before_any_trial_with_one_line(mlflow_server, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    if "--tracking-uri" not in args:
        args += ["--tracking-uri", mlflow_server.uri]
    client = client_for(mlflow_server.uri)
    runs_before = len(client.search_runs(search_all_experiments(client), max_results=1000))
    result = run_script("temperature_sweep.py", *args, "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert len(client.search_runs(search_all_experiments(client), max_results=1000)) == runs_before
    assert not (tmp_path / "store").exists()  # nothing written: no Ray results, no embedded store
    assert not (tmp_path / "offline").exists()


def search_all_experiments(client):
    return [e.experiment_id for e in client.search_experiments()]
