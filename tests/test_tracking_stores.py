"""Tracking URIs other than an MLflow server, and the registered student loaded as the README says.

- the metric writer on a SQLite store: it writes through MLflow's own client, and several processes writing one
  file while another holds its lock past MLflow's 20 s busy timeout store every point once;
- a writer whose sending thread dies makes `flush` and `log` fail at once, in one line naming the cause;
- a real study with `--tracking-uri sqlite:///m.db` (relative, as a user types it) finishes, every run FINISHED
  with every epoch's metrics stored once, and nothing written to ./mlruns;
- the README's snippet, run as written in the folder of a quickstart-style study on the default store after its
  embedded server stopped, loads the champion and reproduces its registered test accuracy.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script
from kdtune.errors import TrackingError
from kdtune.metric_writer import MetricWriter, writer_for


def _sqlite_runs(uri: str, count: int) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("writer", artifact_location=str(Path(uri[len("sqlite:///"):]).parent / "a"))
    return [client.create_run(experiment).info.run_id for _ in range(count)]


def _stored(db: Path) -> tuple[dict, list]:
    with sqlite3.connect(db) as conn:
        per_run = dict(conn.execute("SELECT run_uuid, count(*) FROM metrics GROUP BY run_uuid").fetchall())
        doubled = conn.execute("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step "
                               "HAVING count(*) > 1").fetchall()
    return per_run, doubled


class _Dies(MetricWriter):
    def _deliver(self, run_id, batch):
        raise RuntimeError("injected: the sender broke")


def test_a_writer_whose_thread_dies_fails_flush_and_log_at_once_naming_why(tmp_path):
    writer = _Dies(f"sqlite:///{tmp_path / 'm.db'}", retry_s=60)
    writer.log("run-a", {"val_acc": 0.5, "loss": 1.0}, step=1)
    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        writer.flush("run-a")
    assert time.monotonic() - started < 10  # not the bound of 60 s + 2 request timeouts
    message = str(error.value)
    assert "\n" not in message and "RuntimeError: injected: the sender broke" in message
    assert "2 metric point(s) of run run-a not stored" in message
    with pytest.raises(TrackingError, match="injected: the sender broke"):  # the next epoch fails at once too
        writer.log("run-a", {"val_acc": 0.6}, step=2)
    assert [p[0] for p in writer.unsent("run-a")] == ["val_acc", "loss", "val_acc"]  # kept for a checkpoint


def test_a_reused_trial_process_gets_a_new_writer_after_one_died(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = writer_for(uri)
    first._dead = "RuntimeError: gone"  # as `_run` records a death
    second = writer_for(uri)
    assert second is not first and second.dead is None


WRITER = """
import sys, time
from kdtune.metric_writer import MetricWriter
uri, run_id, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
writer = MetricWriter(uri, retry_s=150)
for step in range(1, steps + 1):
    writer.log(run_id, {f"m{k}": step * k for k in range(5)}, step, timestamp_ms=1_000_000 + step)
    if step == 1:
        print("logging", flush=True)
writer.flush(run_id)
print("retries", writer.retries, flush=True)
"""


def test_processes_writing_one_sqlite_file_retry_a_locked_database_and_store_every_point_once(tmp_path):
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    runs = _sqlite_runs(uri, 3)
    steps = 250  # 1250 points a process: two batches
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holding the file, longer than MLflow waits for it (20 s)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, run, str(steps)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for run in runs]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "logging", proc.stderr.read()[-2000:]
        time.sleep(24)
    finally:
        holder.execute("COMMIT")
        holder.close()
    outputs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    retries = [int(re.search(r"retries (\d+)", out).group(1)) for out, _ in outputs]
    assert sum(retries) >= 1  # "database is locked" was met, and retried
    per_run, doubled = _stored(db)
    assert per_run == {run: 5 * steps for run in runs} and doubled == []


@pytest.mark.parametrize("uri, says", [
    ("postgresql://kdtune:secret@127.0.0.1:1/mlflow", "kdtune mlflow serve --backend-store-uri"),
    ("file:///tmp/mlruns", "file store"),
    ("mlruns", "file store"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite:////no/such/folder/m.db", "folder /no/such/folder does not exist"),
])
def test_tracking_uris_a_study_cannot_use_are_refused_before_it_starts_in_one_line(uri, says):
    from kdtune.tracking import tracking_server

    started = []
    with pytest.raises(TrackingError) as error:
        with tracking_server(uri, "unused", meanwhile=lambda: started.append("ray")):
            pass
    message = str(error.value)
    assert says in message and "\n" not in message and "secret" not in message
    assert started == []  # before Ray (or anything else) starts


def test_a_relative_sqlite_uri_names_one_file_for_every_trial_folder(tmp_path, monkeypatch):
    from kdtune.tracking import artifact_location, local_tracking_uri

    monkeypatch.chdir(tmp_path)
    uri = local_tracking_uri("sqlite:///m.db")
    assert uri == f"sqlite:///{tmp_path / 'm.db'}" and local_tracking_uri(uri) == uri
    assert artifact_location(uri, "my study/1") == str(tmp_path / "m-artifacts" / "my_study_1")
    assert artifact_location("http://127.0.0.1:5000", "x") is None  # the server decides


def _client(uri: str):
    from kdtune.tracking import client_for

    return client_for(uri)


@pytest.mark.e2e
def test_a_study_on_a_sqlite_tracking_uri_stores_every_epoch_and_writes_no_mlruns(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    epochs = 3
    started = time.monotonic()
    result = run_script("temperature_sweep.py", "--dataset", "digits", "--temperatures", "2", "5", "--epochs",
                        str(epochs), "--teacher-epochs", str(epochs), "--tune", "none", "--fuse", "off",
                        "--tracking-uri", "sqlite:///m.db", "--store", str(tmp_path / "store"),
                        "--register-as", "sqlite-student", cwd=work, timeout=600)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.rglob("mlruns")), list(tmp_path.rglob("mlruns"))  # nor in any trial's folder
    db = work / "m.db"
    uri = f"sqlite:///{db}"
    client = _client(uri)
    experiment = client.get_experiment_by_name("temperature_sweep")
    assert experiment.artifact_location.startswith(str(work / "m-artifacts"))
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("kdtune.role") in ("student", "teacher")]
    assert sorted(r.data.tags["kdtune.role"] for r in children) == ["student"] * 3 + ["teacher"]
    stored = 0
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags.get("kdtune.failure"))
    for run in children:
        keys = ["val_acc", "epoch", "loss_hard"] + (["loss_soft"] if run.data.params.get("method") == "kd" else [])
        for key in keys:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (run.info.run_name, key)
        stored += sum(len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics)
    _, doubled = _stored(db)
    assert doubled == []
    print(f"sqlite study: {wall:.0f}s wall, {len(children)} trial runs, {stored} metric points")

    import kdtune  # the champion, from this store's registry and artifacts

    student = kdtune.load_student("models:/sqlite-student@champion", tracking_uri=uri)
    student.eval()
    from kdtune.data import load_dataset

    digits = load_dataset("digits")
    assert tuple(student(digits.test_images[:5].float() * digits.scale).shape) == (5, 10)


def readme_snippet(marker: str = "load_student(") -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README.md: {len(found)} python blocks call {marker}"
    return found[0]


@pytest.mark.e2e
def test_the_readme_snippet_loads_the_champion_after_the_quickstart_with_no_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    study = subprocess.run([sys.executable, str(REPO / "studies" / "temperature_sweep.py"), "--dataset", "digits",
                            "--temperatures", "2", "--epochs", "4", "--teacher-epochs", "6", "--tune", "none"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert study.returncode == 0, study.stderr[-3000:]
    assert "embedded server stopped" in study.stdout
    from kdtune.tracking import EmbeddedServer

    assert EmbeddedServer.running_uri(tmp_path / ".kdtune") is None  # nothing serves the store now
    prelude = ("from kdtune.data import load_dataset\n"
               "digits = load_dataset('digits')\n"
               "images = digits.test_images.float() * digits.scale\n")
    check = ("\nimport json\n"
             "accuracy = (logits.argmax(1) == digits.test_labels).float().mean().item()\n"
             "print(json.dumps({'shape': list(logits.shape), 'accuracy': accuracy, 'training': student.training}))\n")
    run = subprocess.run([sys.executable, "-c", prelude + readme_snippet() + check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    import mlflow

    store = f"sqlite:///{tmp_path / '.kdtune' / 'mlflow.db'}"
    # both URIs named: an earlier test in this process may have set mlflow's global registry URI
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("kdtune-digits-digits_student", "champion")
    assert out["shape"] == [359, 10] and out["training"] is False
    assert abs(out["accuracy"] - float(version.tags["test_acc"])) < 1e-3  # what the study measured, reproduced
