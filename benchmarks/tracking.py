"""The MLflow tracking server under a cluster's load: 64 concurrent writers, SQLite against PostgreSQL.

Each writer does what a kdtune trial does to MLflow (kdtune/tracking/runs.py ChildRun): open a child run with its
tags, log its params in one batch, one log_batch of the epoch's metrics per epoch, its final tags, a small model
file (proxied by the server to its artifact store), and close the run. Every configuration gets the same load,
back to back in one run; then the store itself (SQLite file / PostgreSQL tables, read directly) is counted:
every metric point written must be there exactly once. Each server runs as `kdtune mlflow serve` runs it,
its SQLAlchemy pool per worker sized by kdtune (`kdtune.tracking.pool_settings`: the table's "pool" column).

    python -m benchmarks --only tracking            # or: python -m benchmarks.tracking [--writers 64]

PostgreSQL is started by the benchmark (initdb into a temporary folder, as tests/test_backends.py does); without
its binaries or psycopg only SQLite is measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

METRIC_KEYS = ["train_loss", "val_loss", "val_acc", "best_val_acc", "loss_hard", "loss_soft", "lr", "epoch_time_s"]
PROCESSES = 4  # writers are threads spread over this many client processes


# ---- the servers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def postgres_server():
    """A throw-away PostgreSQL on a loopback port; yields a database URI (None if PostgreSQL is unavailable)."""
    try:
        import psycopg
    except ImportError:
        yield None
        return
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True) or \
        ([shutil.which("initdb")] if shutil.which("initdb") else [])
    if not found:
        yield None
        return
    from kdtune.tracking import free_port

    bin_dir, root = Path(found[0]).parent, Path(tempfile.mkdtemp(prefix="kdtune-bench-pg-"))
    user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    # PostgreSQL's defaults (fsync on, synchronous_commit on): what a real deployment runs
    subprocess.run([*user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            for i in range(8):
                conn.execute(f"CREATE DATABASE mlflow{i}")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ---- the writers ------------------------------------------------------------------------------------

def _writers(uri: str, experiment_id: str, parent_id: str, first: int, count: int, epochs: int,
             model_file: str, everyone=None) -> dict:
    """One client process: `count` writer threads. Returns each call's latency, errors, runs, time span."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    latencies: list[float] = []
    errors: list[str] = []
    runs: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(count)

    def timed(fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs), True
        except Exception as error:  # counted, not raised: the benchmark reports errors
            with lock:
                errors.append(f"{fn.__name__}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            return None, False
        finally:
            with lock:
                latencies.append(time.perf_counter() - started)

    def writer(index: int) -> None:
        client = MlflowClient(uri)
        start_gate.wait()
        run, ok = timed(client.create_run, experiment_id, run_name=f"writer-{index}",
                        tags={"mlflow.parentRunId": parent_id, "kdtune.trial_key": f"w{index}",
                              "kdtune.role": "student", "kdtune.label": str(index % 8)})
        if not ok:
            return
        run_id = run.info.run_id
        with lock:
            runs.append(run_id)
        timed(client.log_batch, run_id, params=[Param(f"p{k}", str(k * index)) for k in range(24)])
        for epoch in range(1, epochs + 1):
            now = int(time.time() * 1000)
            timed(client.log_batch, run_id,
                  metrics=[Metric(key, 1.0 / (epoch + k), now, epoch) for k, key in enumerate(METRIC_KEYS)])
        timed(client.log_batch, run_id, tags=[RunTag("kdtune.node_id", f"node{index % 4}"),
                                              RunTag("kdtune.model_uri", f"runs:/{run_id}/student")])
        timed(client.log_artifact, run_id, model_file, "student")
        timed(client.set_terminated, run_id, "FINISHED")

    threads = [threading.Thread(target=writer, args=(first + i,)) for i in range(count)]
    if everyone is not None:
        everyone.wait()  # every client process is up (imports done): the load starts at once
    began = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors, "runs": runs, "began": began, "ended": time.time()}


def _count_points(backend_uri: str, run_ids: list[str]) -> tuple[int, int]:
    """(metric points stored for these runs, points stored more than once), read from the store itself."""
    query = ("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step")
    if backend_uri.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(backend_uri[len("sqlite:///"):])) as conn:
            rows = conn.execute(query).fetchall()
    else:
        import psycopg

        with psycopg.connect(backend_uri) as conn:
            rows = conn.execute(query).fetchall()
    wanted = set(run_ids)
    rows = [r for r in rows if r[0] in wanted]
    return sum(r[3] for r in rows), sum(r[3] - 1 for r in rows if r[3] > 1)


def measure(label: str, backend_uri: str | None, workers: int, writers: int, epochs: int, log=print) -> dict:
    from kdtune.tracking import EmbeddedServer, client_for

    folder = Path(tempfile.mkdtemp(prefix="kdtune-bench-tracking-"))
    model_file = folder / "model.pt"
    model_file.write_bytes(os.urandom(200_000))  # a small student's weights (digits MLP: ~100-300 kB)
    server = EmbeddedServer(folder / "store", backend_store_uri=backend_uri, workers=workers)
    try:
        server.start(timeout_s=240)
        client = client_for(server.uri)
        experiment_id = client.create_experiment(f"load-{label}")
        parent = client.create_run(experiment_id, run_name="study", tags={"kdtune.role": "study"})
        with concurrent.futures.ThreadPoolExecutor(16) as warm:  # every server worker up before the clock runs
            list(warm.map(lambda _: client.get_experiment(experiment_id), range(8 * workers)))
        per = [writers // PROCESSES + (1 if i < writers % PROCESSES else 0) for i in range(PROCESSES)]
        firsts = [sum(per[:i]) for i in range(PROCESSES)]
        # spawn: a forked child of this threaded process can inherit a held lock and hang
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, \
                concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=context) as pool:
            everyone = manager.Barrier(PROCESSES)
            parts = list(pool.map(_writers, [server.uri] * PROCESSES, [experiment_id] * PROCESSES,
                                  [parent.info.run_id] * PROCESSES, firsts, per, [epochs] * PROCESSES,
                                  [str(model_file)] * PROCESSES, [everyone] * PROCESSES))
        latencies = sorted(x for p in parts for x in p["latencies"])
        errors = [e for p in parts for e in p["errors"]]
        runs = [r for p in parts for r in p["runs"]]
        span = max(p["ended"] for p in parts) - min(p["began"] for p in parts)
        stored, doubled = _count_points(server.backend_uri, runs)
        expected = len(runs) * epochs * len(METRIC_KEYS)
        finished = sum(1 for r in client.search_runs([experiment_id], max_results=1000)
                       if r.info.status == "FINISHED" and r.info.run_id != parent.info.run_id)
        models = sum(1 for r in runs if client.list_artifacts(r, "student"))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    pool = server.pool  # MLflow's SQLAlchemy pool per worker, as kdtune sized it
    result = {"label": label, "workers": workers, "writers": writers, "calls": len(latencies),
              "pool": (f"{pool['MLFLOW_SQLALCHEMYSTORE_POOL_SIZE']}+{pool['MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW']}"
                       if len(pool) >= 2 else "5+10"),
              "calls_per_s": len(latencies) / span if span else float("nan"), "p50_ms": pct(0.50),
              "p99_ms": pct(0.99), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
              "runs": len(runs), "finished": finished, "models": models, "expected": expected, "stored": stored,
              "doubled": doubled, "exactly_once": stored == expected and doubled == 0 and len(runs) == writers,
              "wall_s": span}
    log(f"  {label}, {workers} worker(s), pool {result['pool']}: {result['calls_per_s']:.0f} calls/s, "
        f"p50 {result['p50_ms']:.0f} ms, "
        f"p99 {result['p99_ms']:.0f} ms, {len(errors)} errors, points {stored}/{expected} "
        f"({doubled} doubled), {finished}/{writers} runs FINISHED, {models} models")
    for example in result["error_examples"]:
        log(f"    error: {example}")
    return result


def run(writers: int = 64, epochs: int = 10, log=print) -> tuple[list, str]:
    """Every configuration back to back; returns the rows (benchmarks.common.Row) and the side-by-side table."""
    from benchmarks.common import Row

    results = []
    with postgres_server() as postgres:
        configs = [("SQLite", None, 1), ("SQLite", None, 4)]
        if postgres is None:
            log("  PostgreSQL (server binaries or psycopg) not available: SQLite only")
        else:
            configs += [("PostgreSQL", postgres.rsplit("/", 1)[0] + f"/mlflow{i}", w)
                        for i, w in enumerate((1, 4))]
        for label, uri, workers in configs:
            results.append(measure(label, uri, workers, writers, epochs, log=log))
    lines = [f"{writers} concurrent writers x ({epochs} epochs of {len(METRIC_KEYS)} metrics in one log_batch "
             "each, params, tags, a 200 kB model through the server, run open/close)",
             f"{'backend':<11} {'workers':>7} {'pool':>6} {'calls':>6} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'errors':>6} {'points stored/written':>22} {'doubled':>7} {'runs FINISHED':>13} {'models':>6}"]
    rows = []
    for r in results:
        lines.append(f"{r['label']:<11} {r['workers']:>7} {r['pool']:>6} {r['calls']:>6} {r['calls_per_s']:>8.0f} "
                     f"{r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f} {r['errors']:>6} "
                     f"{str(r['stored']) + '/' + str(r['expected']):>22} {r['doubled']:>7} "
                     f"{str(r['finished']) + '/' + str(r['writers']):>13} {r['models']:>6}")
        name = f"{r['label']}, {r['workers']} worker(s)"
        rows += [Row("tracking", f"{name}: calls/s", r["calls_per_s"], "calls/s"),
                 Row("tracking", f"{name}: p99 latency", r["p99_ms"], "ms"),
                 Row("tracking", f"{name}: errors", r["errors"], "", "0", r["errors"] == 0),
                 Row("tracking", f"{name}: metric points exactly once", float(r["exactly_once"]), "",
                     "every point once", r["exactly_once"], f"{r['stored']}/{r['expected']}")]
    return rows, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    _, text = run(args.writers, args.epochs)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
