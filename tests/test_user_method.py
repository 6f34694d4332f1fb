"""A researcher's own method, exactly as README's "Your own method" writes it: a package on PYTHONPATH, one
parameter of its own, run through a search study and the methods study, its parameter searched in its declared
range, logged to MLflow and shown in the table; a bad value of it refused before any run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script
from kdtune.tracking import client_for

METHOD = "mylab.methods:LogitMSE"


def readme_method() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(# mylab/methods\.py.*?)```", text, re.S)
    assert block, "README lost its 'Your own method' example"
    return block.group(1)


@pytest.fixture(scope="module")
def user_package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    (root / "mylab").mkdir()
    (root / "mylab" / "__init__.py").write_text("")
    (root / "mylab" / "methods.py").write_text(readme_method())
    return root


def with_package(root: Path):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}


def run_in(root: Path, script: str, *args: str, cwd: Path, timeout: int = 900):
    return subprocess.run([sys.executable, str(REPO / "studies" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=with_package(root))


def test_the_readme_method_is_a_method_with_its_declared_parameter(user_package, monkeypatch, digits,
                                                                   trained_digits_teacher):
    monkeypatch.syspath_prepend(str(user_package))
    from kdtune.distill import method_class, trial_config
    from kdtune.errors import ConfigError
    from kdtune.train.parts import trainer_for

    assert method_class(METHOD).name == "logit_mse"
    config = trial_config({"method": METHOD, "weight": 0.5, "epochs": 2, "lr": 0.01})
    assert config.weight == 0.5 and config.to_flat()["weight"] == 0.5
    with pytest.raises(ConfigError, match=r"weight=-1.0: must be >= 0 \(method 'logit_mse'\)"):
        trial_config({"method": METHOD, "weight": -1})
    epochs = list(trainer_for(config, digits, trained_digits_teacher[0]).epochs())
    assert {"loss_hard", "loss_mse"} <= set(epochs[-1])


def test_a_bad_value_of_its_parameter_is_refused_in_one_line_before_any_run(user_package, tmp_path):
    result = run_in(user_package, "search.py", "--dataset", "digits", "--methods", METHOD, "--set", "weight=-1",
                    "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kdtune: error: weight=-1.0: must be >= 0 (method 'logit_mse')"], result.stderr[-2000:]
    assert not (tmp_path / "store" / "mlflow.db").exists()  # nothing created: no store, no run


def test_unknown_method_references_are_one_line():
    result = run_script("search.py", "--dataset", "digits", "--methods", "nosuch.module:Method")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kdtune: error: method='nosuch.module:Method': cannot import 'nosuch.module' (No module named 'nosuch'); "
        "put its package on PYTHONPATH (or install it)"]


@pytest.mark.e2e
def test_the_readme_method_runs_in_a_search_and_in_the_methods_study(user_package, mlflow_server, tmp_path):
    search = run_in(user_package, "search.py", "--dataset", "digits", "--methods", METHOD, "--num-samples", "3",
                    "--epochs", "3", "--teacher-epochs", "6", "--tracking-uri", mlflow_server.uri,
                    "--store", str(tmp_path), cwd=tmp_path)
    assert search.returncode == 0, search.stderr[-3000:]
    assert re.search(r"logit_mse|mylab", search.stdout) and " w=" in search.stdout, search.stdout[-3000:]
    client = client_for(mlflow_server.uri)
    experiment = client.get_experiment_by_name("search")
    runs = client.search_runs([experiment.experiment_id], "params.method = 'mylab.methods:LogitMSE'")
    weights = [float(r.data.params["weight"]) for r in runs]
    assert len(weights) >= 3 and all(0.01 <= w <= 10.0 for w in weights), weights  # its declared search range
    assert len(set(weights)) > 1  # searched, not held at the default

    methods = run_in(user_package, "methods.py", "--dataset", "digits", "--methods", "kd", METHOD,
                     "--num-samples", "2", "--epochs", "3", "--seeds", "2", "--teacher-epochs", "6",
                     "--tracking-uri", mlflow_server.uri, "--store", str(tmp_path), cwd=tmp_path)
    assert methods.returncode == 0, methods.stderr[-3000:]
    table = methods.stdout[methods.stdout.index("Methods, each tuned"):]
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip() and "%" in line}
    assert {"baseline", "kd", METHOD} <= set(rows), table
    assert "w=" in rows[METHOD] and "2/2" in rows[METHOD], rows[METHOD]
