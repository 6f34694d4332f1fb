"""MLflow runs as kdtune uses them: the study's tracking context, experiments, a trial's child run (found again by
its trial key, so a retried or resumed trial continues its own run), retries across server outages, and
batched params and metrics."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdtune import metric_writer, mlflow_auth
from kdtune.errors import TrackingError
from kdtune.scoped import environment_restored

from kdtune.tags import FAILURE_TAG, MODEL_TAG, PARENT_TAG, TRIAL_KEY_TAG, WEIGHTS_TAG
from kdtune.tracking.models import log_model
from kdtune.tracking.server import _first_line, redact


@dataclass(frozen=True)
class TrackingContext:
    """What a trial needs to find its place in MLflow (picklable, shipped through Ray)."""

    uri: str
    experiment_id: str
    parent_run_id: str


_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


def use_tracking(uri: str) -> None:
    """Point this process's MLflow (fluent API: log_model, register_model, load_model) at `uri`.

    For entry points only (a trial, a teacher task, the `kdtune` command), never at import time; a study inside
    a user's own script uses `tracking_at`. Trials run in parallel: MLflow's per-run "View run at ..." lines and
    artifact progress bars would bury the study's own output, so they are off unless the user set these variables.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow_auth.load_credentials()  # a credentials file's user and password, where MLflow's client reads them
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # else the registry may default to a local ./mlflow.db


@contextlib.contextmanager
def tracking_at(uri: str):
    """`use_tracking(uri)` while the block runs, then the caller's MLflow settings back: `run_study` is called
    from users' scripts, which may have MLflow pointed elsewhere. MLflow keeps each URI twice (a module global and
    an environment variable, for subprocesses): unset both, then put the caller's variables back."""
    import mlflow

    with environment_restored(_TRACKING_ENV):
        use_tracking(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


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
                          and bool({WEIGHTS_TAG, MODEL_TAG} & set(existing.data.tags)))
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
        self.set_tags({MODEL_TAG: uri})
        return uri

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()  # a run is not FINISHED with a metric point missing: this raises instead
        self._terminate(status)

    def fail(self, reason: str) -> None:
        try:
            self.flush()
        except TrackingError as error:
            reason = f"{reason}; {error}"
        self.set_tags({FAILURE_TAG: reason[:4000]})
        self._terminate("FAILED")

    def _terminate(self, status: str) -> None:
        retrying(lambda: self.client.set_terminated(self.run_id, status=status), "close the run", self.context.uri)


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
