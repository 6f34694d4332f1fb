"""The registry gate and the `kdtune` command against a real MLflow server and real trained students."""
from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
import torch

from kdtune import cli, registry
from kdtune.train.parts import trainer_for
from kdtune.models import build_model
from kdtune.tracking import ChildRun, ServableModel, TrackingContext, client_for, get_or_create_experiment
from kdtune.distill import trial_config

NAME = "test-gate-student"


def train_and_log(context, digits, teacher_state, label, **config):
    trainer = trainer_for(trial_config({"epochs": 3, **config}), digits, teacher_state)
    for metrics in trainer.epochs():
        pass
    trainer.close()
    run = ChildRun(context, trial_key=label, run_name=label, params={}, tags={"kdtune.role": "student"})
    run.log_epoch(metrics, step=metrics["epoch"])
    model_uri = run.log_model(ServableModel(trainer.student.cpu().eval(), **{k: trainer.normalisation[k] for k in ("mean", "std")}),
                              digits.test_images[:2].float() * digits.scale)
    run.finish()
    return model_uri, metrics["test_acc"], run.run_id, metrics["val_acc"]


def accuracy_by_alias(alias, digits):
    model = mlflow.pytorch.load_model(f"models:/{NAME}@{alias}", map_location="cpu")
    with torch.no_grad():
        return (model(digits.test_images.float() * digits.scale).argmax(1) == digits.test_labels).float().mean().item()


@pytest.fixture(scope="module")
def registered(mlflow_server, digits, trained_digits_teacher):
    client = client_for(mlflow_server.uri)
    experiment = get_or_create_experiment(client, "gate")
    parent = client.create_run(experiment, tags={"kdtune.role": "study", "kdtune.study": "gate"})
    context = TrackingContext(mlflow_server.uri, experiment, parent.info.run_id)
    test_set = registry.test_set_fingerprint(digits)
    val_set = registry.validation_fingerprint(digits, 0.1)
    weak = train_and_log(context, digits, None, "weak", method="none", epochs=1, lr=0.001)
    strong = train_and_log(context, digits, trained_digits_teacher[0], "strong", method="kd", temperature=4.0,
                           alpha=0.9, lr=0.01, epochs=6)
    assert strong[1] > weak[1] + 0.2 and strong[3] > weak[3] + 0.2
    decisions = [registry.register(client, uri, NAME, {"run_id": run_id, "test_acc": f"{acc:.4f}"}, val_mean=val,
                                   seeds=1, test_mean=acc, val_set=val_set, test_set=test_set)
                 for uri, acc, run_id, val in (weak, strong, weak)]
    return client, decisions, weak, strong


def test_the_gate_moves_champion_only_for_a_better_student(registered, digits):
    client, (first, better, worse), weak, strong = registered
    assert (first.alias, better.alias, worse.alias) == ("champion", "champion", "challenger")
    assert "no champion yet" in first.reason
    assert f"mean validation accuracy {weak[3]:.4f} vs champion version {better.version}" in worse.reason
    assert "not better by more than 0" in worse.reason
    assert client.get_model_version_by_alias(NAME, "champion").version == better.version
    assert client.get_model_version(NAME, worse.version).tags["gate"] == worse.reason
    # both aliases load and give the accuracy that was recorded for them
    assert accuracy_by_alias("champion", digits) == pytest.approx(strong[1], abs=1e-6)
    assert accuracy_by_alias("challenger", digits) == pytest.approx(weak[1], abs=1e-6)


def test_the_gate_follows_validation_never_test(registered, digits):
    """A second student better on validation but worse on test takes champion; the reverse does not."""
    client, decisions, weak, strong = registered
    name = "test-gate-validation"
    val_set = registry.validation_fingerprint(digits, 0.1)
    test_set = registry.test_set_fingerprint(digits)
    first = registry.register(client, strong[0], name, {}, val_mean=0.90, seeds=3, test_mean=0.95,
                              val_set=val_set, test_set=test_set)
    second = registry.register(client, strong[0], name, {}, val_mean=0.93, seeds=3, test_mean=0.91,
                               val_set=val_set, test_set=test_set)
    third = registry.register(client, strong[0], name, {}, val_mean=0.92, seeds=3, test_mean=0.99,
                              val_set=val_set, test_set=test_set)
    assert (first.alias, second.alias, third.alias) == ("champion", "champion", "challenger")
    tag = client.get_model_version(name, second.version).tags["gate"]
    assert tag.startswith("mean validation accuracy 0.9300 vs champion version 1 0.9000 on digits:val")
    assert client.get_model_version(name, third.version).tags["test_acc_mean"] == "0.990000"  # recorded, unused
    # another validation split is not comparable: refused, whatever the numbers
    other = registry.register(client, strong[0], name, {}, val_mean=0.99, seeds=3, test_mean=0.99,
                              val_set=registry.validation_fingerprint(digits, 0.2), test_set=test_set)
    assert other.alias == "challenger" and "not comparable" in other.reason


def test_models_commands(registered, mlflow_server, digits, tmp_path, capsys):
    client, (first, better, worse), weak, strong = registered
    uri = ["--tracking-uri", mlflow_server.uri]
    assert cli.main(["models", "list", "--all", *uri]) == 0
    listing = capsys.readouterr().out
    assert f"v{better.version}" in listing and "@champion" in listing and "@challenger" in listing
    assert cli.main(["models", "promote", NAME, worse.version, *uri]) == 1
    assert "not promoted: mean validation accuracy" in capsys.readouterr().out
    assert client.get_model_version_by_alias(NAME, "champion").version == better.version
    assert cli.main(["models", "export", f"{NAME}@champion", "--out", str(tmp_path / "student.pt"), *uri]) == 0
    student = build_model("digits_student", 10, (1, 8, 8))
    student.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))  # usable as --teacher-source
    assert cli.main(["models", "promote", NAME, worse.version, "--force", *uri]) == 0
    assert client.get_model_version_by_alias(NAME, "champion").version == worse.version
    client.set_registered_model_alias(NAME, "champion", better.version)  # leave the module's state as it was


def test_errors_are_one_line(mlflow_server, capsys):
    uri = ["--tracking-uri", mlflow_server.uri]
    assert cli.main(["study", "show", "no-such-study", *uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdtune: error: study 'no-such-study': neither a study name nor a run id")
    assert cli.main(["models", "promote", NAME, "999", *uri]) == 2
    assert capsys.readouterr().err.strip() == f"kdtune: error: model '{NAME}' version '999': not found in the registry"
    assert cli.main(["models", "list", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "tracking URI http://127.0.0.1:9 is unreachable" in capsys.readouterr().err
    assert cli.main(["study", "resume", "/nonexistent"]) == 2
    assert "not a kdtune study folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["mlflow", "serve"], ["teacher", "train"], ["teacher", "list"],
                                     ["study", "list"], ["study", "show"], ["study", "report"], ["study", "resume"],
                                     ["models", "list"], ["models", "promote"], ["models", "export"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "kdtune.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: kdtune" in result.stdout
