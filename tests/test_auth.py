"""Who may write: `kdtune mlflow serve --auth` runs MLflow's basic-auth app, which refuses every request without
the credentials (writing runs, moving the `champion` alias); a study given them in a credentials file (what
cluster.yaml mounts on every node) runs to the end, its trials authenticated through Ray's runtime_env."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from conftest import run_script
from kdtune.mlflow_auth import FILE_ENV, PASSWORD_ENV, USER_ENV
from kdtune.tracking import _healthy, client_for, free_port

pytestmark = pytest.mark.e2e

MODEL_NAME = "auth-digits-student"


def _clean_env(home, **extra) -> dict:
    """This machine's environment without any MLflow credentials (HOME elsewhere: no ~/.kdtune file either)."""
    env = {k: v for k, v in os.environ.items() if k not in (USER_ENV, PASSWORD_ENV, FILE_ENV, "MLFLOW_TRACKING_URI")}
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app: pip install 'kdtune[auth]'")
    root = tmp_path_factory.mktemp("auth")
    credentials = root / "mlflow-credentials"
    password = secrets.token_hex(12)
    credentials.write_text(f"kdtune:{password}\n")
    credentials.chmod(0o600)
    port = free_port()
    log = open(root / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "kdtune.cli", "mlflow", "serve", "--auth", "--port", str(port),
                                "--store", str(root / "store")], env=_clean_env(root, **{FILE_ENV: str(credentials)}),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(uri):
            assert process.poll() is None and time.monotonic() < deadline, (root / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        yield uri, credentials, password
    finally:
        process.send_signal(signal.SIGINT)  # the command stops its server on Ctrl-C
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _status(uri: str, path: str, body: dict | None = None, user: str | None = None, password: str = "") -> int:
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kdtune: error: "), result.stderr[-2000:]
    return lines[0]


def test_requests_without_the_credentials_are_refused_in_one_line(auth_server, tmp_path):
    uri, _, password = auth_server
    assert _status(uri, "experiments/search?max_results=1") == 401
    assert _status(uri, "experiments/create", {"name": "intruder"}) == 401
    assert _status(uri, "registered-models/alias", {"name": MODEL_NAME, "alias": "champion", "version": "1"}) == 401
    assert _status(uri, "experiments/search?max_results=1", user="kdtune", password="not-the-password") == 401
    assert _status(uri, "experiments/search?max_results=1", user="kdtune", password=password) == 200

    kdtune = [sys.executable, "-m", "kdtune.cli", "study", "list", "--tracking-uri", uri]
    result = subprocess.run(kdtune, capture_output=True, text=True, timeout=120, env=_clean_env(tmp_path))
    line = _one_line_error(result)
    assert f"tracking server {uri} refused a request without credentials (401" in line
    assert f"set {USER_ENV} and {PASSWORD_ENV}" in line
    wrong = _clean_env(tmp_path, **{USER_ENV: "kdtune", PASSWORD_ENV: "not-the-password"})
    line = _one_line_error(subprocess.run(kdtune, capture_output=True, text=True, timeout=120, env=wrong))
    assert f"tracking server {uri} refused user 'kdtune' (401" in line and "not-the-password" not in line

    # a server with --auth needs credentials to make its admin from, and MLflow's minimum password length
    serve = [sys.executable, "-m", "kdtune.cli", "mlflow", "serve", "--auth", "--port", str(free_port()),
             "--store", str(tmp_path / "s")]
    line = _one_line_error(subprocess.run(serve, capture_output=True, text=True, timeout=120, env=_clean_env(tmp_path)))
    assert "--auth: no credentials" in line and USER_ENV in line
    short = _clean_env(tmp_path, **{USER_ENV: "kdtune", PASSWORD_ENV: "short"})
    line = _one_line_error(subprocess.run(serve, capture_output=True, text=True, timeout=120, env=short))
    assert "at least 12" in line
    assert not (tmp_path / "s" / "server.json").exists()


def test_a_study_given_the_credentials_file_runs_to_the_end(auth_server, tmp_path, monkeypatch):
    uri, credentials, password = auth_server
    for key in (USER_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(FILE_ENV, str(credentials))
    result = run_script("temperature_sweep.py", "--dataset", "digits", "--temperatures", "4", "--epochs", "2",
                        "--teacher-epochs", "3", "--tune", "none", "--fuse", "off", "--tracking-uri", uri,
                        "--store", str(tmp_path / "store"), "--register-as", MODEL_NAME, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = client_for(uri)  # authenticated from the file
    experiments = client.search_experiments(filter_string="name = 'temperature_sweep'")
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=100)
    children = [r for r in runs if r.data.tags.get("kdtune.role") in ("student", "teacher")]
    assert sorted(r.data.tags["kdtune.role"] for r in children) == ["student", "student", "teacher"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in children:
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) >= 2
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    # nobody without the credentials moves it
    assert _status(uri, "registered-models/alias", {"name": MODEL_NAME, "alias": "champion", "version": "1"}) == 401
    assert _status(uri, "registered-models/alias", {"name": MODEL_NAME, "alias": "champion", "version": "1"},
                   user="kdtune", password="not-the-password") == 401
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version
