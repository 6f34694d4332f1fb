"""Cluster-grade backends against real servers: MLflow on PostgreSQL with artifacts in S3, Tune results in S3.

The test starts a real PostgreSQL 15 (initdb into a temporary folder, loopback only) and moto's standalone S3
server (`moto_server`, a separate process: nothing inside kdtune is mocked), then `kdtune mlflow serve` over
both, and runs the temperature sweep as a user does, with `--storage s3://...`.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import REPO, run_script
from kdtune.scoped import environment_restored
from kdtune.tracking import client_for, free_port, use_tracking

pytestmark = pytest.mark.e2e

ARTIFACT_BUCKET = "kdtune-artifacts"
RESULTS_BUCKET = "kdtune-results"
MODEL_NAME = "backends-digits-student"


def _postgres_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(candidate).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s}s")


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server on a loopback port, its data in a temporary folder; yields the MLflow
    database's URI."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'kdtune[postgres]'")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="kdtune-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server in its own process; this module's environment points every AWS client
    (pyarrow, boto3, the MLflow server, the study's subprocesses) at it."""
    boto3 = pytest.importorskip("boto3")
    executable = shutil.which("moto_server")
    if executable is None:
        pytest.skip("moto_server not found: pip install 'moto[server]'")
    port = free_port()
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    aws = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
           "AWS_EC2_METADATA_DISABLED")
    try:
        with environment_restored(aws):
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
            _wait_http(f"{endpoint}/", 30, process)
            s3 = boto3.client("s3")
            for bucket in (ARTIFACT_BUCKET, RESULTS_BUCKET):
                s3.create_bucket(Bucket=bucket)
            yield s3
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdtune.cli", "mlflow", "serve", *args]


@pytest.fixture(scope="module")
def cluster_mlflow(postgres, s3_server, tmp_path_factory):
    """`kdtune mlflow serve` over PostgreSQL, artifacts proxied to S3, as cluster.yaml runs it on the head."""
    store, port = tmp_path_factory.mktemp("serve"), free_port()
    process = subprocess.Popen(_serve("--backend-store-uri", postgres, "--artifacts-destination",
                                      f"s3://{ARTIFACT_BUCKET}/mlflow", "--port", str(port), "--workers", "2",
                                      "--store", str(store)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=store)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", 180, process)
        yield uri
    finally:
        process.send_signal(signal.SIGINT)  # the command stops its server on Ctrl-C
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _all_runs(client):
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments], max_results=1000) if experiments else []


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_sweep_on_postgres_and_s3_tracks_every_trial_once_and_resumes_from_the_bucket(
        cluster_mlflow, postgres, s3_server, tmp_path, digits):
    import psycopg

    storage = f"s3://{RESULTS_BUCKET}/studies"
    args = ["--dataset", "digits", "--temperatures", "4", "--epochs", "2", "--teacher-epochs", "3", "--tune", "none",
            "--tracking-uri", cluster_mlflow, "--storage", storage, "--store", str(tmp_path / "store"),
            "--register-as", MODEL_NAME]
    result = run_script("temperature_sweep.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = next(line.split("study folder: ", 1)[1].split()[0] for line in result.stdout.splitlines()
                  if line.startswith("study folder: "))
    assert folder.startswith(f"{storage}/temperature_sweep-")

    # runs, in PostgreSQL: the study, the teacher trained once, one run per trial
    client = client_for(cluster_mlflow)
    runs = _all_runs(client)
    parents = [r for r in runs if r.data.tags.get("kdtune.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["kdtune.role"] for r in children) == ["student", "student", "teacher"]
    assert sorted(r.data.tags["kdtune.label"] for r in children if r.data.tags["kdtune.role"] == "student") == \
        ["4", "baseline"]
    with psycopg.connect(postgres) as conn:
        in_db = {row[0] for row in conn.execute("SELECT run_uuid FROM runs")}
        doubled = conn.execute("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step "
                               "HAVING count(*) > 1").fetchall()
    assert {r.info.run_id for r in runs} <= in_db
    assert doubled == []  # every metric point exactly once
    for run in children:
        assert run.info.status == "FINISHED"
        epochs = 2 if run.data.tags["kdtune.role"] == "student" else 3
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))

    # Tune's results and checkpoints, and the study file, in the bucket; models proxied to the artifact bucket
    prefix = folder.split(f"s3://{RESULTS_BUCKET}/", 1)[1]
    keys = _keys(s3_server, RESULTS_BUCKET, prefix)
    assert f"{prefix}/kdtune_study.json" in keys
    assert any("/grid/" in k and "/checkpoint_" in k for k in keys), keys[:20]
    assert any(k.endswith("/grid/tuner.pkl") for k in keys)
    artifact_keys = _keys(s3_server, ARTIFACT_BUCKET, "mlflow/")
    assert any(k.endswith("/MLmodel") for k in artifact_keys)
    assert any("report/report.html" in k for k in artifact_keys)  # built locally, logged through the server

    # the champion loads from the registry (PostgreSQL) and its weights (S3, through the server)
    use_tracking(cluster_mlflow)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    model = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}@champion", map_location="cpu")
    with torch.no_grad():
        accuracy = (model(digits.test_images.float() * digits.scale).argmax(1) == digits.test_labels).float().mean()
    assert float(version.tags["test_acc"]) == pytest.approx(accuracy.item(), abs=1e-4)

    # resume from the bucket: a finished study re-runs nothing, opens no run, logs no metric twice
    points = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_acc")) for r in children}
    # through `kdtune study resume`, which reads the study file from the bucket and re-runs its command
    again = subprocess.run([sys.executable, "-m", "kdtune.cli", "study", "resume", folder], capture_output=True,
                           text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"grid: resuming {folder}/grid" in again.stdout
    after = _all_runs(client)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in runs)
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    assert {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_acc")) for r in children} == points


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kdtune: error: "), result.stderr[-2000:]
    return lines[0]


def test_unknown_bucket_and_missing_study_are_refused_before_any_run(cluster_mlflow, s3_server, tmp_path):
    client = client_for(cluster_mlflow)
    before = {r.info.run_id for r in _all_runs(client)}
    common = ["--dataset", "digits", "--temperatures", "4", "--epochs", "1", "--tune", "none",
              "--tracking-uri", cluster_mlflow, "--store", str(tmp_path / "store")]
    started = time.monotonic()
    result = run_script("temperature_sweep.py", *common, "--storage", "s3://no-such-bucket/kdtune", cwd=tmp_path)
    line = _one_line_error(result)
    assert "--storage s3://no-such-bucket/kdtune" in line and "does not exist" in line
    result = run_script("temperature_sweep.py", *common, "--resume", f"s3://{RESULTS_BUCKET}/nothing-here",
                        cwd=tmp_path)
    line = _one_line_error(result)
    assert f"s3://{RESULTS_BUCKET}/nothing-here" in line and "not a kdtune study folder" in line
    assert time.monotonic() - started < 90  # two script starts (imports), no Ray, no training
    assert {r.info.run_id for r in _all_runs(client)} == before  # no run created
    assert not (tmp_path / "store").exists()  # no local study folder either


def test_serve_refuses_an_unreachable_database_in_one_line_within_30s(tmp_path):
    pytest.importorskip("psycopg")
    closed = free_port()
    started = time.monotonic()
    result = subprocess.run(_serve("--backend-store-uri", f"postgresql://kdtune:secret@127.0.0.1:{closed}/mlflow",
                                   "--store", str(tmp_path), "--port", str(free_port())),
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert time.monotonic() - started < 30
    line = _one_line_error(result)
    assert f"127.0.0.1:{closed}/mlflow" in line and "cannot connect" in line
    assert "secret" not in line  # the password is never printed
    assert not (tmp_path / "server.json").exists()  # nothing announced: no study would try to use it


def test_cluster_yaml_runs_mlflow_on_postgres_with_artifacts_and_results_in_s3():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema and cross-field checks
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server --host 0.0.0.0" in head and "--serve-artifacts" in head
    assert "MLFLOW_BACKEND_STORE_URI=$(cat ~/kdtune-mlflow-db)" in head  # the password never on a command line
    assert "--artifacts-destination s3://" in head and "sqlite" not in head  # no SQLite on NFS
    head_setup = " ".join(config["head_setup_commands"])
    assert "test -s ~/kdtune-mlflow-db ||" in head_setup and "install" in head_setup and "postgresql" in head_setup
    assert "postgresql://mlflow:" in head_setup  # the head's own server, unless a managed one is mounted
    assert any("'[postgres,s3,auth]'" in c for c in config["setup_commands"])  # the drivers on every node
    # MLflow's basic auth: its admin from the head's credentials file, the password only in the environment
    assert "--app-name basic-auth" in head and "MLFLOW_AUTH_CONFIG_PATH=" in head
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$(cut -d: -f2- ~/.kdtune/mlflow-credentials)" in head
    assert "~/.kdtune/mlflow-credentials" in head_setup and "umask 077" in head_setup
    # a connection per request thread in each of the 4 workers, within the head database's max_connections
    assert "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=10 MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=30" in head
    assert "--workers 4" in head and "max_connections = 200" in head_setup
    worker = config["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}  # workers write checkpoints to S3
