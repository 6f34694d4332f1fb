"""The tracking layer: MLflow. The server kdtune talks to (server.py), runs (runs.py), trained students as MLflow
models (models.py), the metric writer of trials (metric_writer.py), MLflow auth (kdtune/mlflow_auth.py), the
registry and its gate (kdtune/registry.py). Inside: server <- models <- runs, imports one way.

The names below are the layer's API, used as `tracking.NAME` across kdtune.
"""

from kdtune.tracking.server import (  # noqa: F401
    UI_SUFFIX, free_port, EmbeddedServer, default_workers, DATABASE_WORKERS, REQUEST_THREADS, RESERVED_CONNECTIONS, pool_settings, database_max_connections, redact, DRIVER_HINTS, check_backend_store_uri, _first_line, _log_tail, _die_with_parent, _healthy, server_answers, local_tracking_uri, check_tracking_uri, tracking_server, ui_link, quiet_mlflow)
from kdtune.tracking.runs import (  # noqa: F401
    TrackingContext, use_tracking, tracking_at, client_for, artifact_location, get_or_create_experiment, find_child_run, numeric_metrics, retrying, _failure_kind, EPOCH_KEY, ChildRun, log_params, log_metrics)
from kdtune.tracking.models import (  # noqa: F401
    log_model, log_onnx_model, model_signature, ServableModel, network_state, register_model)
from kdtune.tags import PARENT_TAG, TRIAL_KEY_TAG  # noqa: F401  (the run tags this layer reads and writes)
