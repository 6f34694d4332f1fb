"""The MLflow layer: the embedded server, parent and child runs, batched metrics, models and the registry.

Trials talk HTTP to one tracking server (never to a shared SQLite file directly, which locks under parallel
writers). Without `--tracking-uri`, kdtune serves a SQLite-backed MLflow on a loopback port for the study.
A trial's child run is found again by its `kdtune.trial_key` tag, so a retried or resumed trial continues its
own run instead of opening a second one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdtune import metric_writer, mlflow_auth
from kdtune.errors import TrackingError

PARENT_TAG = "mlflow.parentRunId"
TRIAL_KEY_TAG = "kdtune.trial_key"
UI_SUFFIX = "?workflowType=machine_learning"  # MLflow 3.17 opens the GenAI view otherwise


# ---- the embedded server ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    """`mlflow server` over a backend store (default: SQLite under the store folder) and an artifact
    destination (default: the store's artifacts/ folder; or s3://bucket/prefix), proxying artifacts, so
    clients (trials) need no credentials for the artifact store.

    The store folder always holds the server's log (server.log) and, for `kdtune mlflow serve`, server.json.
    """

    def __init__(self, store_dir: str | Path, port: int | None = None, announce: bool = False,
                 backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                 host: str = "127.0.0.1", workers: int | None = None):
        # announce: write server.json so studies and commands use this server. Only a long-lived server
        # (`kdtune mlflow serve`) announces itself: a study's own server stops when that study ends.
        self.announce = announce
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.host = host
        self.uri = f"http://127.0.0.1:{self.port}"  # where this machine reaches it (0.0.0.0 includes loopback)
        self.process: subprocess.Popen | None = None
        self._backend_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination or str(self.store_dir / "artifacts")
        self.workers = workers or default_workers(self.backend_uri)
        self.extra_env: dict[str, str] = {}  # e.g. the basic-auth app's settings (kdtune/mlflow_auth.py)
        self.extra_args: list[str] = []

    @property
    def backend_uri(self) -> str:
        return self._backend_uri or f"sqlite:///{self.store_dir / 'mlflow.db'}"

    def command(self) -> list[str]:
        # the backend URI travels in the environment (MLFLOW_BACKEND_STORE_URI), not on the command line,
        # where `ps` would show a database password to every user of the machine
        return [
            sys.executable, "-m", "mlflow", "server",
            "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers), *self.extra_args,
        ]

    def start(self, timeout_s: float = 120.0) -> "EmbeddedServer":
        """Launch the server and wait until it answers."""
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> "EmbeddedServer":
        """Start the server process and return at once: its start-up (tens of seconds on a busy 2-core machine)
        can overlap other start-up work; call `wait_ready()` before the first request."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.store_dir / "server.log"
        self._log_start = log_file.stat().st_size if log_file.exists() else 0  # this start's lines begin here
        log = open(self.store_dir / "server.log", "ab")
        # MLflow 3's server also starts a GenAI job runner (8 more processes on a 2-core machine, and a slower
        # start); kdtune uses none of its jobs.
        env = {**pool_settings(self.backend_uri, self.workers), **os.environ,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": self.backend_uri,
               **self.extra_env}
        self.pool = {k: v for k, v in env.items() if k.startswith("MLFLOW_SQLALCHEMYSTORE_")}  # for messages
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> "EmbeddedServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = _log_tail(self.store_dir / "server.log", self._log_start)
                raise TrackingError(f"the MLflow server exited with code {self.process.returncode}"
                                    f"{f' ({tail})' if tail else ''}; see {self.store_dir / 'server.log'}")
            if _healthy(self.uri):
                if self.announce:
                    self._info_file.write_text(json.dumps({"pid": self.process.pid, "uri": self.uri}))
                return self
            time.sleep(0.2)
        self.stop()
        raise TrackingError(f"the embedded MLflow server did not answer on {self.uri} within {timeout_s:.0f}s; "
                            f"see {self.store_dir / 'server.log'}")

    @property
    def _info_file(self) -> Path:
        return self.store_dir / "server.json"

    @staticmethod
    def running_uri(store_dir: str | Path) -> str | None:
        """The URI of a server already serving this store (e.g. `kdtune mlflow serve`), if one answers."""
        try:
            info = json.loads((Path(store_dir).resolve() / "server.json").read_text())
        except (OSError, ValueError):
            return None
        return info.get("uri") if _healthy(info.get("uri", ""), timeout_s=2.0) else None

    def stop(self) -> None:
        if self.process is not None and self.announce:
            self._info_file.unlink(missing_ok=True)
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def default_workers(backend_uri: str) -> int:
    """Server worker processes: one for the embedded SQLite store (a one-machine study writes from a few trials
    at once), four over a database server. benchmarks/RESULTS.md (tracking), 64 concurrent trial writers:
    4 workers serve 10-20x the calls of 1, whose single connection pool (MLflow's 5 + 10) times out."""
    return 1 if backend_uri.startswith("sqlite:") else DATABASE_WORKERS


DATABASE_WORKERS = 4
REQUEST_THREADS = 40  # anyio's default thread limit: the most requests one uvicorn worker serves at once
RESERVED_CONNECTIONS = 10  # left to the database's superusers, migrations, psql, `kdtune mlflow serve`'s check


def pool_settings(backend_uri: str, workers: int, max_connections: int | None = None) -> dict[str, str]:
    """MLflow's SQLAlchemy pool per server worker, over a database server (SQLite keeps MLflow's 5 + 10).

    MLflow's default pool (5 + 10 overflow) is smaller than the requests a worker serves at once (40 threads):
    under 64 writers the rest waited 30 s for a connection and failed (benchmarks/RESULTS.md, tracking). So each
    worker gets a connection per request thread, as far as the database's `max_connections`, shared by every
    worker, allows. Variables the user set win (the caller puts os.environ after these)."""
    if backend_uri.startswith("sqlite:"):
        return {}
    if max_connections is None:
        max_connections = database_max_connections(backend_uri) or 100  # PostgreSQL's and MySQL's default
    per_worker = max(2, min(REQUEST_THREADS, (max_connections - RESERVED_CONNECTIONS) // max(1, workers)))
    size = max(1, per_worker // 4)  # kept open; the overflow is opened under load and closed after
    # MLflow ignores an overflow of 0 (falls back to 10): never pass one
    return {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(size),
            "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(max(1, per_worker - size))}


def database_max_connections(uri: str, timeout_s: float = 10.0) -> int | None:
    """The database server's `max_connections` (PostgreSQL, MySQL); None if it cannot be read."""
    try:
        import sqlalchemy

        url = sqlalchemy.engine.make_url(uri)
        backend = url.get_backend_name()
        query = {"postgresql": "SHOW max_connections", "mysql": "SELECT @@max_connections"}.get(backend)
        if query is None:
            return None
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": int(timeout_s)},
                                          poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                return int(connection.execute(sqlalchemy.text(query)).scalar())
        finally:
            engine.dispose()
    except Exception:  # unreachable or no driver: check_backend_store_uri reports that in one line
        return None


def redact(uri: str) -> str:
    """A database URI without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(uri).render_as_string(hide_password=True)
    except Exception:
        return uri.split("@", 1)[-1] if "@" in uri else uri


DRIVER_HINTS = {"postgresql": "pip install 'kdtune[postgres]'",
                "mysql": "pip install pymysql and write mysql+pymysql://..."}


def check_backend_store_uri(uri: str, timeout_s: float = 20.0) -> None:
    """Before the server starts: the backend store URI parses, its driver is installed and the database
    answers within `timeout_s` (else one line naming the URI, password hidden)."""
    shown = redact(uri)
    if uri.startswith("sqlite:"):
        path = uri.split(":///", 1)[-1]
        if ":memory:" not in uri and path and not Path(path).parent.is_dir():
            raise TrackingError(f"backend store {shown}: folder {Path(path).parent} does not exist")
        return
    try:
        import sqlalchemy
        from sqlalchemy.engine import make_url

        url = make_url(uri)
    except Exception as error:
        raise TrackingError(f"backend store {shown}: not a database URI ({_first_line(error)}); use e.g. "
                            "postgresql://USER:PASSWORD@HOST:5432/DB or sqlite:///PATH.db") from None
    backend = url.get_backend_name()
    connect_args = {"connect_timeout": max(1, int(timeout_s) - 2)} if backend in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as error:
        hint = DRIVER_HINTS.get(backend, "install its SQLAlchemy driver")
        raise TrackingError(f"backend store {shown}: the {backend} driver is not installed "
                            f"({_first_line(error)}); {hint}") from None
    from kdtune.deadlines import with_deadline

    def connect():
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))

    try:
        with_deadline(connect, timeout_s, TrackingError(f"backend store {shown}: no answer within {timeout_s:.0f}s"))
    except TrackingError:
        raise
    except Exception as error:  # reported in one line
        cause = getattr(error, "orig", None) or error
        raise TrackingError(f"backend store {shown}: cannot connect ({_first_line(cause)})") from None
    engine.dispose()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _log_tail(path: Path, start: int = 0) -> str:
    """The last error line the server wrote to its log since `start` (bytes), for a one-line message."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            text = [line for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in text if "Error" in line or "error" in line]
    return (errors or text)[-1].strip()[:300] if text else ""


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies (even by SIGKILL), so a killed
    study leaves no orphan server behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _healthy(uri: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_answers(uri: str) -> bool:
    """Whether an MLflow server answers at `uri` now (a database or file URI has no server to answer)."""
    return uri.startswith(("http://", "https://")) and _healthy(uri, timeout_s=2.0)


def local_tracking_uri(uri: str) -> str:
    """A SQLite tracking URI with its path made absolute: trials run with their trial folder as working directory,
    where `sqlite:///m.db` would name another database. Other URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail early, with one line, if the tracking URI cannot be used.

    http(s): an MLflow server, which every trial talks to. sqlite:///PATH: the trials of a one-machine study open
    the database file themselves (kdtune/metric_writer.py retries while another holds its lock); its artifacts go
    next to it (`artifact_location`). A database server or MLflow's file store: refused, with what to do."""
    if uri.startswith(("http://", "https://")):
        if not _healthy(uri, timeout_s=5.0):
            raise TrackingError(
                f"tracking URI {uri} is unreachable (no answer from {uri.rstrip('/')}/health); start a server "
                "(`kdtune mlflow serve`) or leave out --tracking-uri to use kdtune's embedded one"
            )
        mlflow_auth.check_access(uri)  # a server with authentication: the credentials, before anything starts
    elif uri.startswith("sqlite:"):
        path = uri[len("sqlite:///"):].partition("?")[0] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:" or "mode=memory" in uri:
            raise TrackingError(f"tracking URI {uri}: an in-memory database lives in one process, and every trial is "
                                "a process of its own; name a file, sqlite:///PATH.db")
        folder = Path(path).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {folder} does not exist")
    elif "://" in uri and uri.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mssql"):
        raise TrackingError(f"tracking URI {redact(uri)}: trials talk HTTP to one MLflow server; start one over "
                            "this database (`kdtune mlflow serve --backend-store-uri URI`) and pass its "
                            "http://host:port")
    else:
        raise TrackingError(f"tracking URI {uri!r}: use http(s)://host:port (an MLflow server) or sqlite:///path.db "
                            "(MLflow's file store, a folder or file:, is deprecated and not supported)")


@contextlib.contextmanager
def tracking_server(uri: str | None, store_dir: str | Path, echo=print, meanwhile=None):
    """The tracking URI to use: the given one (checked), a server already serving the store, or an embedded
    server started for the duration of the block. `meanwhile()` (e.g. starting Ray) runs while an embedded
    server starts: the two start-ups, each seconds long, overlap."""
    meanwhile = meanwhile or (lambda: None)
    if uri:
        uri = local_tracking_uri(uri)
        check_tracking_uri(uri)
        meanwhile()
        yield uri
        return
    running = EmbeddedServer.running_uri(store_dir)
    if running:
        echo(f"mlflow: using the server already running at {running} for {Path(store_dir).resolve()}")
        mlflow_auth.check_access(running)
        meanwhile()
        yield running
        return
    echo(f"mlflow: starting the embedded server (store: {Path(store_dir).resolve()})")
    server = EmbeddedServer(store_dir).launch()
    try:
        meanwhile()
        server.wait_ready()
        yield server.uri
    finally:
        server.stop()
        echo(f"mlflow: embedded server stopped; browse the results with: kdtune mlflow serve --store {store_dir}")


def ui_link(uri: str, experiment_id: str) -> str:
    if not uri.startswith(("http://", "https://")):  # a database: no UI until a server serves it
        return (f"{uri} (browse it with `mlflow ui --backend-store-uri {redact(uri)}` and open "
                f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs{UI_SUFFIX})")
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs{UI_SUFFIX}"


# ---- runs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrackingContext:
    """What a trial needs to find its place in MLflow (picklable, shipped through Ray)."""

    uri: str
    experiment_id: str
    parent_run_id: str


def use_tracking(uri: str) -> None:
    """Point this process's MLflow (fluent API: log_model, register_model, load_model) at `uri`.

    Called by entry points only (a study's driver, a trial, a teacher task, the `kdtune` command), never at
    import time. Trials run in parallel: MLflow's per-run "View run at ..." lines and artifact progress bars
    would bury the study's own output, so they are off unless the user set these variables.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow_auth.load_credentials()  # a credentials file's user and password, where MLflow's client reads them
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # else the registry may default to a local ./mlflow.db


def client_for(uri: str):
    """A client bound to `uri`; it changes nothing process-wide but the credentials (`use_tracking`)."""
    import mlflow

    mlflow_auth.load_credentials()
    return mlflow.MlflowClient(uri, registry_uri=uri)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: the server decides over HTTP (None); beside a SQLite database
    (`<dir>/<db name>-artifacts/<experiment>`), never MLflow's default ./mlruns of whichever process created it."""
    if not uri.startswith("sqlite:///"):
        return None
    import re

    database = Path(uri[len("sqlite:///"):].partition("?")[0])
    folder = re.sub(r"[^\w.-]+", "_", experiment).strip(".") or "_"
    return str(database.parent / f"{database.stem}-artifacts" / folder)


def get_or_create_experiment(client, name: str) -> str:
    uri = str(getattr(client, "tracking_uri", "") or "")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    if experiment.artifact_location.startswith("mlflow-artifacts:") and not uri.startswith(("http://", "https://")):
        raise TrackingError(f"experiment {name!r} in {redact(uri)} keeps its artifacts behind an MLflow server "
                            f"({experiment.artifact_location}); serve that store (kdtune mlflow serve "
                            "--backend-store-uri URI) and pass its http:// URI as --tracking-uri")
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def find_child_run(client, context: TrackingContext, trial_key: str):
    runs = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{context.parent_run_id}' and tags.`{TRIAL_KEY_TAG}` = '{trial_key}'",
        max_results=1,
    )
    return runs[0] if runs else None


def numeric_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def retrying(call, what: str, uri: str, retry_s: float | None = None):
    """`call()`, retried with backoff while the tracking server is down, overloaded or restarting its database.

    MLflow's client already retries each request on refused connections, 5xx and 429 (7 times, backoff 2 s:
    about 4 minutes); what reaches here is a request it gave up on, or one it does not retry (a 400 for an
    exhausted connection pool). Retried for `retry_s` (KDTUNE_TRACKING_RETRY_S, 300 s) past the first failure,
    then raised as one line naming the server. A refused credential is raised at once."""
    retry_s = metric_writer.retry_seconds() if retry_s is None else retry_s
    started, delay = time.monotonic(), 1.0
    while True:
        try:
            return call()
        except Exception as error:
            kind = _failure_kind(error)
            if kind in (401, 403):
                raise mlflow_auth.refused(uri, kind) from None
            if kind != "transient":
                raise
            waited = time.monotonic() - started
            if waited + delay > retry_s:
                raise TrackingError(f"mlflow: could not {what} on {uri} for {waited:.0f}s "
                                    f"({_first_line(error)})") from None
        time.sleep(delay)
        delay = min(2 * delay, 10.0)


def _failure_kind(error: Exception):
    """"transient" (worth retrying), 401/403 (the credentials), or None (a real error: raise it)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return "transient"
    if not isinstance(error, MlflowException):  # e.g. SQLite's OperationalError opening a locked store
        return "transient" if metric_writer.transient_text(str(error)) else None
    code, text = str(getattr(error, "error_code", "")), str(error)
    if code == "UNAUTHENTICATED" or "error code 401" in text:
        return 401
    if code == "PERMISSION_DENIED" or "error code 403" in text:
        return 403
    if code in metric_writer.TRANSIENT or metric_writer.transient_text(text) or "Max retries exceeded" in text:
        return "transient"
    return None


EPOCH_KEY = "epoch"  # the metric every epoch logs; its stored steps are the epochs a run has


class ChildRun:
    """A trial's child run: opened once, continued after a retry or resume, closed with the model logged."""

    def __init__(self, context: TrackingContext, trial_key: str, run_name: str, params: dict, tags: dict | None = None,
                 attempt_tags: dict | None = None):
        """tags: set when the run is created. attempt_tags: what describes this attempt (node, device): set at
        creation too, and again when a retry or resume reopens the run."""
        self.context = context
        self._stored_steps: set[int] = set()
        use_tracking(context.uri)  # a trial or teacher task is an entry point: its models go to this server
        self.client = client_for(context.uri)
        self.writer = metric_writer.writer_for(context.uri)
        existing = retrying(lambda: find_child_run(self.client, context, trial_key), "find the trial's run",
                            context.uri)
        # A run that finished with its model logged is complete even if Tune never heard of it (the driver
        # died between the trial's end and Tune's next save): the trial reports it instead of training again.
        self.completed = (existing is not None and existing.info.status == "FINISHED"
                          and bool({"kdtune.weights_uri", "kdtune.model_uri"} & set(existing.data.tags)))
        self.recorded = existing.data if existing is not None else None
        if existing is not None:
            self.run_id = existing.info.run_id
            if not self.completed:
                retrying(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen the run",
                         context.uri)
                if attempt_tags:
                    self.set_tags(attempt_tags)
                # The epochs this run stored before it was cut off are trained again from the last checkpoint
                # (or from scratch); their points are already there, with other timestamps: not sent twice.
                self._stored_steps = {m.step for m in retrying(lambda: self.client.get_metric_history(
                    self.run_id, EPOCH_KEY), "read the run's stored epochs", context.uri)}
        else:
            attempts = []

            def create():
                # a create that failed may still have reached the server: look for the run before a second one
                found = find_child_run(self.client, context, trial_key) if attempts else None
                attempts.append(1)
                return found or self.client.create_run(
                    context.experiment_id, run_name=run_name,
                    tags={PARENT_TAG: context.parent_run_id, TRIAL_KEY_TAG: trial_key, **(tags or {}),
                          **{k: str(v) for k, v in (attempt_tags or {}).items()}})

            self.run_id = retrying(create, "create the trial's run", context.uri).info.run_id
            retrying(lambda: log_params(self.client, self.run_id, params), "log the params", context.uri)

    def log_epoch(self, metrics: dict, step: int) -> None:
        """Queued: a background thread sends it (kdtune/metric_writer.py); `flush` waits until it is stored.
        A step this run stored before it was reopened is not sent again (see __init__)."""
        if step in self._stored_steps:
            return
        points = numeric_metrics(metrics)
        if EPOCH_KEY in points:  # last: the writer sends in order, so a stored epoch point means the whole step is
            points[EPOCH_KEY] = points.pop(EPOCH_KEY)
        self.writer.log(self.run_id, points, step=step)

    def unsent(self) -> list[tuple]:
        """This run's metric points not known to be stored yet (kdtune/metric_writer.py)."""
        return self.writer.unsent(self.run_id)

    def resend(self, points: list[tuple]) -> None:
        self.writer.resend(self.run_id, points)

    def flush(self) -> None:
        """Block until this run's logged metrics are stored (when the run ends); raises TrackingError naming
        the server if some could not be stored within the bounded wait."""
        self.writer.flush(self.run_id)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        retrying(lambda: self.client.log_batch(self.run_id, tags=items), "set tags", self.context.uri)

    def log_model(self, model: nn.Module, input_example: torch.Tensor, name: str = "student") -> str:
        """Log the model with an input example; return its model URI (what the registry takes)."""
        uri = log_model(self.client, self.run_id, model, input_example, name)
        self.set_tags({"kdtune.model_uri": uri})
        return uri

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()  # a run is not FINISHED with a metric point missing: this raises instead
        self._terminate(status)

    def fail(self, reason: str) -> None:
        try:
            self.flush()
        except TrackingError as error:
            reason = f"{reason}; {error}"
        self.set_tags({"kdtune.failure": reason[:4000]})
        self._terminate("FAILED")

    def _terminate(self, status: str) -> None:
        retrying(lambda: self.client.set_terminated(self.run_id, status=status), "close the run", self.context.uri)


def log_model(client, run_id: str, model: nn.Module, input_example: torch.Tensor, name: str = "student") -> str:
    """Log a servable model into run `run_id` (its status unchanged) with its input example (real samples) and
    the signature inferred from the model's outputs on them; return its model URI."""
    import mlflow

    signature = model_signature(model, input_example)
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # torch.export's pt2 packaging warns that weights are not on a GPU: they are on the CPU on purpose
        warnings.filterwarnings("ignore", message="No complete tensor found")
        info = mlflow.pytorch.log_model(
            model, name=name, input_example=input_example.numpy(), signature=signature,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "kdtune"],
        )
    if status != "FINISHED":  # start_run's context marks the run FINISHED on exit
        client.update_run(run_id, status=status)
    return info.model_uri


def log_onnx_model(client, run_id: str, path, input_example, name: str) -> str:
    """Log the ONNX file `path` as an MLflow ONNX model into run `run_id` (its status unchanged), with the input
    example (real samples, float32) and the signature of what onnxruntime returns on it; return its model URI."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from kdtune.train.model_files import onnx_session

    session = onnx_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: input_example})[0]
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.onnx.log_model(onnx.load(str(path)), name=name, input_example=input_example,
                                     signature=infer_signature(input_example, outputs),
                                     pip_requirements=["onnxruntime", "onnx"], save_as_external_data=False)
    if status != "FINISHED":
        client.update_run(run_id, status=status)
    return info.model_uri


def model_signature(model: nn.Module, batch: torch.Tensor):
    """The MLflow signature of `model` on a real batch: float32 samples in, logits out, the batch dimension
    variable (-1). Inferred from what the model returns, not left to MLflow's best effort, which logs no
    signature (only a warning) when its own inference fails."""
    from mlflow.models import infer_signature

    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(batch.to(device))
    finally:
        model.train(was_training)
    return infer_signature(batch.cpu().numpy(), outputs.detach().cpu().numpy())


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


# ---- datasets -----------------------------------------------------------------------------------

DATASET_CONTEXTS = ("training", "validation", "testing")


def log_dataset(client, run_id: str, dataset, val_fraction: float) -> dict[str, str]:
    """The study's dataset as inputs of its (parent) run, as `mlflow.log_input` logs them: one input per split,
    named after the dataset, with context training (the training set as given, validation included: what a
    registered teacher is matched on), validation (carved from it, what selection and the registry gate use)
    and testing. Each digest is the hash part of kdtune's fingerprint of that split (kdtune/registry.py), the
    same value a registered version's `val_set`/`test_set` tag holds, so a registered student leads back to
    the study run and the exact samples it was chosen on. Tags: kdtune.samples (the split's size; for training:
    the samples trials train on, validation left out), kdtune.fingerprint. Returns context -> fingerprint."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from kdtune import registry

    _, val_idx = dataset.split(val_fraction)
    n_val, n_test = len(val_idx), len(dataset.test_labels)
    fingerprints = {"training": registry.train_set_fingerprint(dataset),
                    "validation": registry.validation_fingerprint(dataset, val_fraction),
                    "testing": registry.test_set_fingerprint(dataset)}
    sizes = {"training": dataset.num_train - n_val, "validation": n_val, "testing": n_test}
    rows = {"training": dataset.num_train, "validation": n_val, "testing": n_test}
    shape = [int(d) for d in dataset.input_shape]
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape), "samples"),
                     TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    source = CodeDatasetSource({"kdtune.dataset": dataset.name, "num_classes": int(dataset.num_classes),
                                "stored": "memory" if dataset.in_memory else "files",
                                "val_fraction": float(val_fraction)})
    inputs = []
    for context in DATASET_CONTEXTS:
        meta = MetaDataset(source, name=dataset.name, digest=fingerprints[context].rsplit(":", 1)[1], schema=schema)
        profile = {"num_rows": rows[context], "samples_used": sizes[context], "num_classes": int(dataset.num_classes),
                   "sample_shape": shape}
        entity = DatasetEntity(**{**meta.to_dict(), "profile": json.dumps(profile)})
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("kdtune.samples", str(sizes[context])),
                InputTag("kdtune.fingerprint", fingerprints[context])]
        if context == "training":
            tags.append(InputTag("kdtune.validation_held_out", str(n_val)))
        inputs.append(DatasetInput(entity, tags))
    retrying(lambda: client.log_inputs(run_id, datasets=inputs), "log the study's dataset", client.tracking_uri)
    return fingerprints


# ---- models -------------------------------------------------------------------------------------

class ServableModel(nn.Module):
    """The student with its input normalisation built in: takes samples scaled to [0, 1] (images N x C x H x W,
    or any other shape; statistics are per channel, dim 1), returns logits."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], sample_dims: int = 3):
        super().__init__()
        self.model = model
        shape = (1, -1, *([1] * (sample_dims - 1)))  # broadcast over dim 1 of a batch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def network_state(loaded: nn.Module) -> dict:
    """The network's weights inside a logged ServableModel. MLflow may hand the model back as an exported
    GraphModule rather than the class kdtune logged, so take the weights by their "model." prefix."""
    return {k[len("model."):]: v for k, v in loaded.state_dict().items() if k.startswith("model.")}


@contextlib.contextmanager
def quiet_mlflow():
    """MLflow's own progress lines ("Registered model ... already exists", "Waiting up to 300 seconds ...") off
    for the block: kdtune prints what it registered, in one line. Failures still raise."""
    from mlflow.utils import logging_utils

    was = logging_utils.MLFLOW_LOGGING_STREAM.enabled
    logging_utils.disable_logging()
    try:
        yield
    finally:
        if was:
            logging_utils.enable_logging()


def register_model(model_uri: str, name: str, alias: str, tags: dict) -> str:
    """Register a logged model as a new version of `name`, tag it and point `alias` at it; return the version."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="kdtune students (alias 'champion' = current best)")
    with quiet_mlflow():
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
