"""Tracking outages: a study keeps every run and every metric point, exactly once, across them.

- the metric writer (kdtune/metric_writer.py) against a real embedded MLflow server that is killed and started
  again on the same port: every point lands once, a re-sent batch is not doubled, and a server that stays down
  past the bound makes `flush` fail in one clear line;
- a digits sweep whose MLflow server (over a real PostgreSQL) loses its database to `pg_ctl restart`, then is
  itself killed (SIGKILL) and restarted on the same port 40 s later: every run FINISHED, every (run, metric,
  step) once in the database.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from kdtune.errors import TrackingError
from kdtune.metric_writer import MetricWriter
from kdtune.tracking import EmbeddedServer, _healthy, client_for, free_port
from test_backends import _postgres_bin, postgres  # noqa: F401  (a real PostgreSQL: the fixture)

DOWN_S = 40  # the tracking server's outage in the study (the issue asks for up to 60 s)


def _kill_server(store: Path) -> None:
    """SIGKILL the MLflow server `kdtune mlflow serve` announced in the store (its process group: uvicorn and
    its workers), as a crash would end it."""
    os.killpg(json.loads((store / "server.json").read_text())["pid"], signal.SIGKILL)


def _doubled_sqlite(db: Path) -> tuple[int, list]:
    with sqlite3.connect(db) as conn:
        total = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
        doubled = conn.execute("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step "
                               "HAVING count(*) > 1").fetchall()
    return total, doubled


def test_writer_stores_every_point_once_across_a_server_kill_and_fails_loudly_past_the_bound(tmp_path):
    store, port = tmp_path / "store", free_port()
    server = EmbeddedServer(store, port=port).start()
    try:
        client = client_for(server.uri)
        experiment = client.create_experiment("writer")
        first, second = (client.create_run(experiment).info.run_id for _ in range(2))
        writer = MetricWriter(server.uri, retry_s=240)
        for step in range(1, 151):  # 1500 points: two requests of at most 1000
            writer.log(first, {f"m{k}": step * k for k in range(10)}, step, timestamp_ms=1_000_000 + step)
        writer.flush(first)
        # the same points again, as a request that was stored but never answered would be re-sent
        for step in range(1, 11):
            writer.log(first, {f"m{k}": step * k for k in range(10)}, step, timestamp_ms=1_000_000 + step)
        writer.flush(first)

        os.killpg(server.process.pid, signal.SIGKILL)  # the server and its workers, as a crash ends them
        server.process.wait(timeout=30)
        for step in range(151, 201):  # logged while nothing listens: queued and retried
            writer.log(first, {f"m{k}": step * k for k in range(10)}, step)
            writer.log(second, {"val_acc": step / 200}, step)
        time.sleep(5)
        server = EmbeddedServer(store, port=port).start()  # the same port, the same store
        writer.flush()

        total, doubled = _doubled_sqlite(store / "mlflow.db")
        assert doubled == [] and total == 2000 + 50
        assert sorted(m.step for m in client.get_metric_history(first, "m7")) == list(range(1, 201))
        assert len(client.get_metric_history(second, "val_acc")) == 50
    finally:
        server.stop()

    # down for good: the flush gives up after the bound, naming the server, and the run's next flush says so too
    writer = MetricWriter(server.uri, retry_s=3)
    writer.log(first, {"val_acc": 1.0}, 999)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"1 metric point\(s\) of run {first} could not be stored on "
                                            rf"{server.uri}: the server did not store them"):
        writer.flush(first)
    assert time.monotonic() - started < 60  # bounded (3 s of retries), not MLflow's minutes
    with pytest.raises(TrackingError, match="could not be stored"):
        writer.flush()


def test_a_reopened_trial_run_stores_the_epochs_it_trains_again_once(tmp_path):
    """A trial cut off after its checkpoint trains the epochs since then again: the run it reopens keeps the
    points it had stored, and takes only the epochs it never stored."""
    from kdtune.tracking import ChildRun, TrackingContext

    store = tmp_path / "store"
    server = EmbeddedServer(store, port=free_port()).start()
    try:
        client = client_for(server.uri)
        experiment = client.create_experiment("reopen")
        parent = client.create_run(experiment).info.run_id
        context = TrackingContext(server.uri, experiment, parent)
        first = ChildRun(context, "trial-1", "kd T=2", {"temperature": 2}, attempt_tags={"kdtune.node_id": "a"})
        for epoch in range(1, 5):  # stored; the process then dies (its checkpoint was at epoch 2)
            first.log_epoch({"val_acc": epoch / 10, "epoch": epoch}, step=epoch)
        first.flush()
        again = ChildRun(context, "trial-1", "kd T=2", {"temperature": 2}, attempt_tags={"kdtune.node_id": "b"})
        assert again.run_id == first.run_id and not again.completed
        for epoch in range(3, 7):  # trained again from the checkpoint, then on
            again.log_epoch({"val_acc": epoch / 10, "epoch": epoch}, step=epoch)
        again.finish()

        total, doubled = _doubled_sqlite(store / "mlflow.db")
        assert doubled == [] and total == 12
        assert sorted(m.step for m in client.get_metric_history(first.run_id, "val_acc")) == [1, 2, 3, 4, 5, 6]
        run = client.get_run(first.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["kdtune.node_id"] == "b"  # where it finished
    finally:
        server.stop()


# ---- a study through a database restart and a tracking-server outage --------------------------------

def _serve(store: Path, port: int, backend: str) -> subprocess.Popen:
    log = open(store.parent / f"serve-{port}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "kdtune.cli", "mlflow", "serve", "--backend-store-uri", backend,
                             "--port", str(port), "--store", str(store), "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=store.parent)


def _wait(predicate, timeout_s: float, what: str, study: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert study.poll() is None, f"the study ended before {what}: {study.stdout.read()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s")


def _latest_epoch(uri: str) -> float:
    """The highest epoch any student run has stored so far (0 before the first, or while unreachable)."""
    try:
        client = client_for(uri)
        ids = [e.experiment_id for e in client.search_experiments(filter_string="name = 'temperature_sweep'")]
        runs = client.search_runs(ids, "tags.`kdtune.role` = 'student'", max_results=100) if ids else []
    except Exception:
        return 0
    return max([r.data.metrics.get("epoch", 0) for r in runs] or [0])


@pytest.mark.e2e
def test_sweep_survives_a_database_restart_and_the_tracking_server_killed_for_40s(postgres, tmp_path):  # noqa: F811
    store, port = tmp_path / "mlflow", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    serve = _serve(store, port, postgres)
    epochs = 12
    study = None
    try:
        deadline = time.monotonic() + 180
        while not _healthy(uri):
            assert serve.poll() is None and time.monotonic() < deadline, \
                (store.parent / f"serve-{port}.log").read_text()[-2000:]
            time.sleep(0.5)
        study = subprocess.Popen(
            [sys.executable, str(REPO / "studies" / "temperature_sweep.py"), "--dataset", "digits", "--temperatures",
             "2", "5", "--epochs", str(epochs), "--teacher-epochs", "3", "--tune", "none", "--fuse", "off",
             "--tracking-uri", uri, "--store", str(tmp_path / "store")],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

        # the database goes away under the MLflow server and comes back (its connections all dropped)
        at = _wait(lambda: _latest_epoch(uri), 420, "a student's first epoch", study)
        pg_data = Path(postgres_data_dir(postgres))
        restart = subprocess.run(pg_ctl(pg_data) + ["-l", str(pg_data.parent / "server.log"), "restart", "-m",
                                                    "fast", "-w"], capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, restart.stderr
        # writes go on after it; then the tracking server itself dies, for DOWN_S, and starts on the same port
        _wait(lambda: _latest_epoch(uri) > at, 300, "an epoch stored after the database restart", study)
        _kill_server(store)
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait(timeout=30)
        assert not _healthy(uri)
        time.sleep(DOWN_S)
        serve = _serve(store, port, postgres)
        restarted = time.time()
        output, _ = study.communicate(timeout=900)
        assert study.returncode == 0, output[-4000:]
        runs = _check_every_run_and_point_once(uri, postgres, output, epochs)
        # the outage hit running trials: they waited for the server and finished after it came back
        assert any(r.info.end_time / 1000 > restarted for r in runs if r.data.tags["kdtune.role"] == "student")
    finally:
        if study is not None and study.poll() is None:
            study.kill()
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)


def _check_every_run_and_point_once(uri: str, postgres: str, output: str, epochs: int) -> list:  # noqa: F811
    import psycopg

    client = client_for(uri)
    parent_id = re.findall(r"study run ([0-9a-f]{32})", output)[-1]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=100)
    assert sorted(r.data.tags["kdtune.role"] for r in runs) == ["student"] * 3 + ["teacher"]
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        expected = epochs if run.data.tags["kdtune.role"] == "student" else 3
        for key in ("val_acc", "train_loss"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, expected + 1)), (key, run.data.tags)
    with psycopg.connect(postgres) as conn:
        doubled = conn.execute("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step "
                               "HAVING count(*) > 1").fetchall()
    assert doubled == []  # every (run, metric, step) exactly once
    return runs


def postgres_data_dir(uri: str) -> str:
    import psycopg

    with psycopg.connect(uri) as conn:
        return conn.execute("SHOW data_directory").fetchone()[0]


def pg_ctl(data: Path) -> list[str]:
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return [*as_postgres, str(_postgres_bin() / "pg_ctl"), "-D", str(data)]
