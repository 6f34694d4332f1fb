"""Per-epoch metrics sent to the tracking store by a background thread, in batches, never lost or doubled.

    writer = writer_for(uri)                 # one per process and tracking URI
    writer.log(run_id, {"val_acc": 0.9}, step=3)   # returns at once
    writer.flush(run_id)                     # blocks until stored; raises TrackingError if they could not be

An MLflow server (http(s)://) gets one REST `log-batch` request per batch; any other tracking URI MLflow
accepts (sqlite:///..., a database) is written through MLflow's own client (`MlflowClient(uri).log_batch`,
which opens the store in this process), with the same batches, retries and guarantees below.

A point's timestamp is fixed when it is logged, so a batch re-sent after an unanswered request is the same
(key, step, timestamp, value) again. MLflow's SQL store keeps such a point once: it is the `metrics` table's
primary key, and `SqlAlchemyStore._log_metrics` drops the points of a batch that are already stored (mlflow
3.17, store/tracking/sqlalchemy_store.py). So a re-send is idempotent and a point is never doubled.

While the server is unreachable, answers 5xx/429, or its connection pool is exhausted, or a database store is
locked or unavailable (SQLite's "database is locked" when several trial processes write one file: MLflow waits
20 s for the lock, then raises TEMPORARILY_UNAVAILABLE), a batch is retried with backoff for `retry_s`
(KDTUNE_TRACKING_RETRY_S, default 300 s). A point still not stored then is reported by every later `flush` of
its run: the trial fails with that message instead of losing the point silently.

If the sending thread itself dies (for any reason: a bug, an error no one foresaw), the writer says so in one
line at once: every later `log` and `flush` raises TrackingError naming the cause, instead of waiting for
points that no thread will send. Its unsent points stay listed by `unsent`, so a trial's checkpoint keeps them.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import deque

from kdtune.errors import TrackingError

BATCH = 1000  # MLflow's log_batch limit on metrics per request
RETRY_ENV = "KDTUNE_TRACKING_RETRY_S"
RETRY_S = 300.0
REQUEST_TIMEOUT_S = 30.0
TRANSIENT = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"}
# what a database store says while another process holds its lock or it is restarting: worth retrying
TRANSIENT_TEXT = ("database is locked", "database table is locked", "QueuePool limit", "could not connect",
                  "connection refused", "server closed the connection", "terminating connection")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def transient_text(text: str) -> bool:
    text = text.lower()
    return any(marker.lower() in text for marker in TRANSIENT_TEXT)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]


def _cause(error: BaseException) -> str:
    text = _first_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def retry_seconds() -> float:
    try:
        return float(os.environ.get(RETRY_ENV) or RETRY_S)
    except ValueError:
        raise TrackingError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r}: give a number of seconds") from None


class _Transient(Exception):
    pass


class MetricWriter:
    """Queues metric points per run and sends them from one daemon thread."""

    def __init__(self, uri: str, retry_s: float | None = None):
        self.uri = uri.rstrip("/")
        self.retry_s = retry_seconds() if retry_s is None else retry_s
        self._pending: dict[str, deque] = {}  # run id -> points not yet handed to the sender
        self._sending: dict[str, list] = {}  # run id -> points in the request under way
        self._failed: dict[str, tuple[int, str]] = {}  # run id -> (points given up on, why)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._dead: str | None = None  # why the sending thread stopped, once it has
        self._session = None  # HTTP: one requests.Session
        self._client = None  # any other store: one MlflowClient
        self.retries = 0  # transient failures met (a locked database, a server outage), for tests and benchmarks

    # ---- the caller's side ----

    def log(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        with self._cond:
            self._pending.setdefault(run_id, deque()).extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._wake(run_id)

    def _wake(self, run_id: str | None = None) -> None:
        """Start the sender if it has not started, or raise if it died (the points just queued stay `unsent`)."""
        with self._cond:
            if self.dead is not None:
                raise TrackingError(self._death_message(run_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kdtune-metrics", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @property
    def dead(self) -> str | None:
        """Why the sending thread stopped, or None while it runs (or has not started)."""
        with self._cond:
            if self._dead is None and self._thread is not None and not self._thread.is_alive():
                self._dead = "its thread ended"  # without an exception _run could catch
            return self._dead

    def _death_message(self, run_id: str | None) -> str:
        count = self._outstanding(run_id)
        which = f" of run {run_id}" if run_id is not None else ""
        return (f"mlflow: the metric writer for {self.uri} stopped ({self._dead}); {count} metric point(s){which} "
                "not stored")

    def unsent(self, run_id: str) -> list[tuple]:
        """The run's points not known to be stored yet, as (key, value, timestamp, step): a trial puts them in
        its checkpoint instead of waiting for them, and a trial restored from it sends them again (`resend`;
        those that did arrive are not doubled, see above)."""
        with self._cond:
            points = [*self._sending.get(run_id, ()), *self._pending.get(run_id, ())]
        return [(m.key, m.value, m.timestamp, m.step) for m in points]

    def resend(self, run_id: str, points: list[tuple]) -> None:
        """Queue points `unsent` returned, with their own timestamps."""
        from mlflow.entities import Metric

        with self._cond:
            self._pending.setdefault(run_id, deque()).extend(Metric(k, float(v), int(t), int(s)) for k, v, t, s in points)
        self._wake(run_id)

    def flush(self, run_id: str | None = None, timeout_s: float | None = None) -> None:
        """Wait until every point logged so far (of `run_id`, or of every run) is stored. The wait is bounded:
        the sender gives up on a point after `retry_s`, and this waits that long plus two request timeouts.
        A sender that died raises at once, naming why."""
        bound = self.retry_s + 2 * REQUEST_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + bound
        with self._cond:
            while self._outstanding(run_id):
                if self.dead is not None:
                    raise TrackingError(self._death_message(run_id))
                left = deadline - time.monotonic()
                if left <= 0:
                    count = self._outstanding(run_id)
                    raise TrackingError(f"mlflow: {count} metric point(s) not stored after waiting {bound:.0f}s "
                                        f"for the tracking store {self.uri}")
                self._cond.wait(min(left, 1.0))
            failed = [(r, f) for r, f in self._failed.items() if run_id is None or r == run_id]
        if failed:
            run, (count, why) = failed[0]
            raise TrackingError(f"mlflow: {count} metric point(s) of run {run} could not be stored on {self.uri}: "
                                f"{why}")

    def _outstanding(self, run_id: str | None) -> int:
        runs = [run_id] if run_id is not None else set(self._pending) | set(self._sending)
        return sum(len(self._pending.get(r, ())) + len(self._sending.get(r, ())) for r in runs)

    # ---- the sender ----

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # any reason at all: flush and log report it instead of waiting forever
            with self._cond:
                self._dead = _cause(error)
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not any(self._pending.values()):
                    self._cond.wait()
                run_id = next(r for r, points in self._pending.items() if points)
                queue = self._pending[run_id]
                batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
                self._sending[run_id] = batch
            error = self._deliver(run_id, batch)
            with self._cond:
                self._sending.pop(run_id, None)
                if error is not None:
                    count = self._failed.get(run_id, (0, ""))[0] + len(batch)
                    self._failed[run_id] = (count, error)
                self._cond.notify_all()

    def _deliver(self, run_id: str, batch: list) -> str | None:
        """Send one batch, retrying while the failure is transient; None when stored, else why not."""
        started, delay = time.monotonic(), 0.5
        while True:
            try:
                self._send(run_id, batch)
                return None
            except _Transient as error:
                self.retries += 1
                waited = time.monotonic() - started
                if waited + delay > self.retry_s:
                    who = "server" if is_http(self.uri) else "store"
                    return f"the {who} did not store them for {waited:.0f}s ({error})"
            except TrackingError as error:
                return str(error)
            except Exception as error:  # not foreseen: this batch fails in one line, the thread carries on
                return _cause(error)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)  # a server back from an outage is noticed within 5 s

    def _send(self, run_id: str, batch: list) -> None:
        if is_http(self.uri):
            self._send_http(run_id, batch)
        else:
            self._send_store(run_id, batch)

    def _send_store(self, run_id: str, batch: list) -> None:
        """Through MLflow's own client: the store (SQLite, a database) is opened in this process. A locked or
        unavailable database is retried; MLflow's SQL store keeps a re-sent point once (see above)."""
        from mlflow.exceptions import MlflowException

        try:
            if self._client is None:
                import mlflow

                self._client = mlflow.MlflowClient(self.uri)
            self._client.log_batch(run_id, metrics=batch, synchronous=True)
        except MlflowException as error:
            code = str(getattr(error, "error_code", ""))
            if code in TRANSIENT or transient_text(str(error)):
                raise _Transient(f"{code}: {_first_line(error)}".strip(": ")) from None
            raise TrackingError(f"{code}: {_first_line(error)}".strip(": ")) from None
        except Exception as error:  # e.g. sqlite3/SQLAlchemy OperationalError raised outside MLflow's session
            if transient_text(str(error)) or type(error).__name__ == "OperationalError":
                raise _Transient(_cause(error)) from None
            raise

    def _send_http(self, run_id: str, batch: list) -> None:
        import requests
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json

        from kdtune.mlflow_auth import auth_header, refused

        if self._session is None:
            self._session = requests.Session()
        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in batch]))
        try:
            response = self._session.post(f"{self.uri}/api/2.0/mlflow/runs/log-batch", data=body,
                                          headers={"Content-Type": "application/json", **auth_header()},
                                          timeout=REQUEST_TIMEOUT_S)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise _Transient(f"{type(error).__name__}") from None
        except requests.RequestException as error:  # an invalid URL or schema: no retry will help
            raise TrackingError(_cause(error)) from None
        if response.status_code == 200:
            return
        if response.status_code in (401, 403):
            raise refused(self.uri, response.status_code)
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        code, message = answer.get("error_code", ""), str(answer.get("message", response.text))[:300]
        # a 400 for an exhausted connection pool is MLflow's SQLAlchemy TimeoutError: load, not a bad request
        if response.status_code in (408, 429) or response.status_code >= 500 or code in TRANSIENT \
                or transient_text(message):
            raise _Transient(f"HTTP {response.status_code} {code}".strip())
        raise TrackingError(f"HTTP {response.status_code} {code}: {message}")


_writers: dict[tuple[int, str], MetricWriter] = {}
_lock = threading.Lock()


def writer_for(uri: str) -> MetricWriter:
    """This process's writer for `uri` (a forked child gets a fresh one: threads do not survive a fork). A writer
    whose thread died failed its own runs; the next run (a trial in a reused process) gets a new one."""
    key = (os.getpid(), uri.rstrip("/"))
    with _lock:
        if key not in _writers or _writers[key].dead:
            _writers[key] = MetricWriter(uri)
            # a trial the scheduler stopped leaves its last epoch's points queued: a process that exits (its
            # actor not reused) sends them first, for a while
            atexit.register(_drain, _writers[key])
        return _writers[key]


def _drain(writer: MetricWriter, bound_s: float = 30.0) -> None:
    try:
        writer.flush(timeout_s=bound_s)
    except TrackingError as error:
        print(f"kdtune: {error}", file=sys.stderr)

