"""Who may write to the tracking server: MLflow's basic-auth app, and the credentials kdtune sends it.

A server that listens beyond loopback (a cluster's head) runs with `kdtune mlflow serve --auth`: MLflow's own
basic-auth app, whose admin user is kdtune's credentials. Every other request is refused (401), including
writing runs and moving a registered model's `champion` alias.

The credentials, in this order:
- MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (what MLflow's client itself sends);
- else a file holding `USERNAME:PASSWORD` on one line: the one KDTUNE_MLFLOW_CREDENTIALS names, else
  ~/.kdtune/mlflow-credentials (cluster.yaml mounts it on every node, like Ray's token).
The study driver passes them on to every trial through Ray's runtime_env (kdtune/cluster.py `init_ray`).
"""
from __future__ import annotations

import os
import secrets
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from kdtune.errors import TrackingError

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
FILE_ENV = "KDTUNE_MLFLOW_CREDENTIALS"
DEFAULT_FILE = "~/.kdtune/mlflow-credentials"
HOW = (f"set {USER_ENV} and {PASSWORD_ENV}, or write USERNAME:PASSWORD into {DEFAULT_FILE} "
       f"(or the file {FILE_ENV} names)")
MIN_PASSWORD = 12  # MLflow refuses a shorter admin password


def _file() -> Path:
    return Path(os.environ.get(FILE_ENV) or DEFAULT_FILE).expanduser()


def credentials() -> tuple[str, str] | None:
    """(username, password) from the environment or the credentials file; None if neither has them."""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user and password:
        return user, password
    path = _file()
    if not path.is_file():
        if os.environ.get(FILE_ENV):
            raise TrackingError(f"{FILE_ENV}={path}: no such file; it should hold USERNAME:PASSWORD")
        return None
    try:
        text = path.read_text().strip()
    except OSError as error:
        raise TrackingError(f"{path}: cannot read the MLflow credentials ({error.strerror})") from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text:
        raise TrackingError(f"{path}: expected one line USERNAME:PASSWORD (the MLflow credentials)")
    return user, password


def load_credentials() -> tuple[str, str] | None:
    """Put the file's credentials into this process's environment, where MLflow's client reads them."""
    found = credentials()
    if found:
        os.environ.setdefault(USER_ENV, found[0])
        os.environ.setdefault(PASSWORD_ENV, found[1])
    return found


def worker_env() -> dict[str, str]:
    """What trial processes need in their environment to authenticate ({} without credentials)."""
    found = credentials()
    return {USER_ENV: found[0], PASSWORD_ENV: found[1]} if found else {}


def auth_header() -> dict[str, str]:
    """The Authorization header MLflow's client would send (basic auth, or MLFLOW_TRACKING_TOKEN)."""
    found = credentials()
    if found:
        return {"Authorization": "Basic " + b64encode(f"{found[0]}:{found[1]}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def refused(uri: str, status: int) -> TrackingError:
    found = credentials()
    who = f"user {found[0]!r}" if found else "a request without credentials"
    if status == 403:
        return TrackingError(f"tracking server {uri} refused {who} (403: no permission); use the credentials "
                             f"of the server's admin user: {HOW}")
    return TrackingError(f"tracking server {uri} refused {who} (401: not authenticated); {HOW}")


def check_access(uri: str, timeout_s: float = 10.0) -> None:
    """One authenticated read; a server that refuses the credentials (or their absence) ends here in one line."""
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers=auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise refused(uri, error.code) from None
    except (urllib.error.URLError, OSError):
        pass  # reachability is check_tracking_uri's to report


# ---- the server side --------------------------------------------------------------------------------

def server_settings(store_dir: Path) -> tuple[dict[str, str], list[str]]:
    """The environment and `mlflow server` arguments of the basic-auth app, its users kept in
    <store>/basic_auth.db. Raises TrackingError (one line) without usable credentials."""
    try:
        import flask_wtf  # noqa: F401  (MLflow's basic-auth app needs it; mlflow does not install it)
    except ImportError:
        raise TrackingError("--auth: MLflow's basic-auth app needs Flask-WTF: pip install 'kdtune[auth]'") from None
    found = credentials()
    if not found:
        raise TrackingError(f"--auth: no credentials for the server's admin user; {HOW}")
    user, password = found
    if len(password) < MIN_PASSWORD:
        raise TrackingError(f"--auth: the password of {user!r} has {len(password)} characters; MLflow wants at "
                            f"least {MIN_PASSWORD} (e.g. openssl rand -hex 16)")
    # the users' database on the server's own disk (SQLite, read on every request; rarely written); the
    # admin's password only in the server's environment, never in a file or on its command line
    config = Path(store_dir).resolve() / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{Path(store_dir).resolve() / 'basic_auth.db'}\n"
                      f"admin_username = {user}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      # a password check (PBKDF2) costs milliseconds of CPU per request; cached for a minute, a
                      # changed password reaches every worker within that minute
                      "auth_cache_ttl_seconds = 60\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_USERNAME": user,
           "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           # the key signs the sign-up form's CSRF token; every worker of one server shares it, so a key
           # drawn per start is enough (kdtune makes no browser sessions that must outlive a restart)
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
           or secrets.token_hex(32)}
    return env, ["--app-name", "basic-auth"]
