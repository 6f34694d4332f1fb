"""The MLflow tracking server kdtune talks to: the embedded one (SQLite-backed, on a loopback port, one per
store folder) or one given by URI, checked before a study starts (reachable, a real MLflow, a backend store
that answers), and quiet MLflow logging. Trials talk HTTP to one server, never to a shared SQLite file."""
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
from pathlib import Path


from kdtune import mlflow_auth
from kdtune.errors import TrackingError



UI_SUFFIX = "?workflowType=machine_learning"  # MLflow 3.17 opens the GenAI view otherwise


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
