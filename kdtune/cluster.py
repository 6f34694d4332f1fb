"""What kdtune needs to know when it runs on a Ray cluster rather than in one process.

- `assigned_gpu_ids()` (kdtune/train/devices.py): the GPUs Ray gave the current task or actor (a trial), or
  None outside one. `pick_device` follows it, so a trial trains where Ray placed it and never on a GPU given to
  another trial.
- `init_ray(address, py_modules)`: start or join Ray, shipping the user's own modules (model factories named
  by import path) to every node with Ray's runtime_env.
- `reuse_actors(asked)`, `check_tracking_reachable(uri)`: the policies that depend on the cluster's shape.
- `probe_address(address)`: before joining a cluster, whether a Ray GCS answers there (seconds, not Ray's own
  minutes of reconnecting); `check_resources(cpus, gpus)`: whether any node (or, on an autoscaling cluster, any
  node type it can launch) has what one trial asks for, instead of trials pending forever. Both fail in one line.
The cluster itself (cloud and on-premises launcher configs, submitting a study, node loss) is described in
README.md, section "On a cluster", and in cluster.yaml.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

CONNECT_TIMEOUT_ENV = "KDTUNE_RAY_CONNECT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 10.0  # a GCS that has not answered by then is not there (ray.init itself retries for minutes)


def init_ray(address: str | None, py_modules: list[str] | None = None) -> None:
    """Start a local Ray or join `address`. `py_modules` (folders or files of the user's own code) travel with
    the job to every node through Ray's runtime_env, so a `package.module:factory` model builds in any trial.
    A Ray the caller already started is used as it is (its runtime_env is the caller's)."""
    # before Ray's first import, which reads it: Ray would otherwise rewrite a loopback --address to this machine's
    # other address, where a cluster started on loopback does not answer (the driver then hangs)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from kdtune.errors import KdtuneError

    if ray.is_initialized():
        return
    from kdtune.mlflow_auth import worker_env

    if address is None:
        # a new local Ray turns token authentication on (kept) and warns each time that it did: not news to a
        # study's reader. (Setting RAY_AUTH_MODE here instead would come too late: Ray reads it at import.)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    runtime_env = {"py_modules": list(py_modules)} if py_modules else {}
    # The tracking server's credentials (MLFLOW_TRACKING_USERNAME/PASSWORD, from the driver's environment or
    # credentials file) go to every trial and teacher task as environment variables of the job: a node needs no
    # file of its own, a driver joining with --address from another machine brings them, and every process of
    # the job uses the same ones. What it exposes: the job's runtime_env is kept in Ray's GCS and shown by the
    # dashboard and the job API (token-protected: whoever holds the Ray token can read the password), and the
    # variables are in each worker's environment (/proc/PID/environ, readable by the same OS user only).
    credentials = worker_env()
    if credentials:
        runtime_env["env_vars"] = credentials
    target = probe_address(address)  # an address nothing answers at: one line now, not a hang
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env=runtime_env or None)
        if target is None:
            _STARTED_HERE.append(True)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise KdtuneError(f"address={address!r}: could not connect to a Ray cluster ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def connect_timeout_s() -> float:
    from kdtune.errors import ConfigError

    try:
        return float(os.environ.get(CONNECT_TIMEOUT_ENV) or CONNECT_TIMEOUT_S)
    except ValueError:
        value = os.environ[CONNECT_TIMEOUT_ENV]
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={value!r}: give a number of seconds") from None


def probe_address(address: str | None, timeout_s: float | None = None) -> str | None:
    """The cluster address `ray.init(address)` would join (None: it starts a local Ray), once something answers
    there as a Ray cluster does; else KdtuneError in one line, within `timeout_s` (KDTUNE_RAY_CONNECT_TIMEOUT_S,
    10 s). ray.init itself keeps reconnecting for minutes to an address nothing answers at (measured here: 200 s
    for 127.0.0.1:1 or an unknown host, then a bare SystemExit), and for 20 s to a cluster that wants a token.

    A GCS address (HOST:PORT, `auto`, RAY_ADDRESS) is asked for its cluster id over gRPC: an answer, or a refusal
    for want of a token, is a Ray GCS; a connection refused, a name that does not resolve, no answer, or a server
    that is not Ray's (an HTTP port such as the dashboard's 8265, Redis) is refused here. A Ray Client address
    (ray://HOST:PORT) is checked for an answer only."""
    from kdtune.errors import KdtuneError

    given = address
    timeout_s = connect_timeout_s() if timeout_s is None else timeout_s
    if address and "://" in address and not address.startswith("ray://"):
        raise KdtuneError(f"address={given!r}: give the head's HOST:PORT (its GCS, port 6379 unless `ray start "
                          "--head --port` said otherwise), auto, or ray://HOST:10001 (Ray Client); an http:// address "
                          "is the dashboard's, for `ray job submit --address`")
    if address and address.startswith("ray://"):
        host, port = _host_port(given, address[len("ray://"):], default_port=10001)
        _grpc_probe(given, host, port, timeout_s, gcs=False)
        return address
    from ray._private import services

    target = address
    if address is None or address == "auto":  # as ray.init: RAY_ADDRESS, else the cluster last started here
        try:
            target = services.get_ray_address_from_environment(address, None)
        except (ConnectionError, ValueError) as error:
            raise KdtuneError(f"address={given!r}: {_first_line(error)}") from None
    if target is None or target == "local":
        return None
    host, port = _host_port(given, target, default_port=6379)
    shown = given if given else f"{target} (RAY_ADDRESS)"
    _grpc_probe(shown, host, port, timeout_s, gcs=True)
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported before init_ray could set the variable
        moved = services.resolve_ip_for_localhost(host)
        if moved != host:
            try:
                _grpc_probe(shown, moved, port, timeout_s, gcs=True)
            except KdtuneError:
                raise KdtuneError(f"address={shown!r}: Ray would join {moved}:{port} instead (it rewrites a loopback "
                                  "address to this machine's other one), where the cluster does not answer; set "
                                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment before Python starts, or "
                                  "give the head's address") from None
    return target


def _host_port(given, address: str, default_port: int) -> tuple[str, int]:
    from kdtune.errors import KdtuneError

    host, sep, port = address.rstrip("/").rpartition(":")
    if not sep:
        return address.strip("[]"), default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise KdtuneError(f"address={given!r}: {port!r} is not a port number; give HOST:PORT, e.g. 10.0.0.10:6379") \
            from None


def _grpc_probe(given: str, host: str, port: int, timeout_s: float, gcs: bool) -> None:
    """Ask host:port for the Ray cluster's id (gRPC, as ray.init would), with a deadline."""
    import grpc

    from kdtune.errors import KdtuneError

    where = f"address={given!r}"
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # a TLS cluster: a plain channel cannot ask
        _tcp_probe(where, host, port, timeout_s)
        return
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    def ask(metadata=()):
        channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        try:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
            return None, ""
        except grpc.RpcError as error:
            return error.code(), _first_line(Exception(error.details() or ""))
        finally:
            channel.close()

    code, details = ask()
    if code is None:
        return
    if code == grpc.StatusCode.UNAUTHENTICATED:  # a Ray GCS that wants the cluster's token
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise KdtuneError(f"{where}: this Ray cluster requires token authentication; set RAY_AUTH_MODE=token "
                              "(and its token in ~/.ray/auth_token, or the file RAY_AUTH_TOKEN_PATH names)")
        token = _token_metadata()
        if token is None:
            raise KdtuneError(f"{where}: RAY_AUTH_MODE=token, but there is no token here: put the cluster's in "
                              "~/.ray/auth_token (or name its file in RAY_AUTH_TOKEN_PATH)")
        if token and ask(token)[0] == grpc.StatusCode.UNAUTHENTICATED:
            raise KdtuneError(f"{where}: the cluster refuses this machine's Ray token (InvalidAuthToken); copy the "
                              "head's ~/.ray/auth_token here, or name its file in RAY_AUTH_TOKEN_PATH")
        return
    if code == grpc.StatusCode.UNIMPLEMENTED and not gcs:
        return  # a Ray Client server: it answers, with services of its own
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise KdtuneError(f"{where}: no Ray cluster answered at {host}:{port} within {timeout_s:.0f}s (a firewall, "
                          f"or no such machine?); check the head's address and port, or raise {CONNECT_TIMEOUT_ENV}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        raise KdtuneError(f"{where}: {host}:{port} answers, but not as a Ray cluster's GCS; give the head's GCS port "
                          "(6379 unless `ray start --head --port` said otherwise)")
    if "HTTP/2" in details or "http2" in details.lower() or "Socket closed" in details:
        raise KdtuneError(f"{where}: {host}:{port} answers, but not as a Ray cluster (an HTTP server, such as the "
                          "dashboard on 8265?); give the head's GCS port (6379 unless `ray start --head --port` "
                          "said otherwise)")
    raise KdtuneError(f"{where}: no Ray cluster at {host}:{port} ({details or code.name}); start one "
                      "(`ray start --head`) or leave out --address for a local Ray")


def _token_metadata() -> tuple | None:
    """The gRPC metadata ray.init sends with this machine's token (None: no token), as Ray's own interceptor."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if not loader.has_token():
            return None
        return tuple((k.lower(), v) for k, v in loader.get_token_for_http_header().items())
    except Exception:  # a Ray without these internals: ray.init will say
        return ()


def _tcp_probe(where: str, host: str, port: int, timeout_s: float) -> None:
    import socket

    from kdtune.errors import KdtuneError

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise KdtuneError(f"{where}: no Ray cluster at {host}:{port} ({type(error).__name__}: "
                          f"{_first_line(error)})") from None


_STARTED_HERE = []  # [True] once init_ray started a local Ray in this process


def runs_in_driver(gpus: float) -> bool:
    """Whether one-off work with a trial's resources (train the teacher, cache its logits) is best done in this
    process: on a Ray that kdtune started on this machine, with no GPU asked, a task would run on the same CPUs
    after starting a process of its own (about 10 s of imports on a 2-core machine). Not on a machine with a
    GPU: there this process would see the GPU that a task asking for none is kept from."""
    import torch

    return bool(_STARTED_HERE) and not gpus and not torch.cuda.is_available()


def run_like_a_trial(fn, *args, cpus: float, gpus: float, **kwargs):
    """fn(*args, **kwargs) where a trial would run it: in this process when `runs_in_driver`, else as one Ray task
    with a trial's resources (on a cluster, a node with the GPU it needs)."""
    check_resources(cpus, gpus)  # on no node: one line now, not a task pending forever
    if runs_in_driver(gpus):
        import torch

        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)  # fn may set a trial's thread count
    import ray

    return ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(fn).remote(*args, **kwargs))


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def reuse_actors(asked: bool | None) -> bool:
    """Whether a finished trial's process runs the next trial. It saves the process start-up (seconds per trial),
    which matters for short trials on one machine. On a cluster of several nodes, or one whose head takes no
    trials (an autoscaling cluster), a freed process would take over pending trials whose own processes are still
    starting on other nodes, piling the study onto whichever node started first; there, every trial gets a
    process of its own unless the user asks otherwise."""
    if asked is not None:
        return asked
    nodes = alive_nodes()
    return len(nodes) == 1 and nodes[0].get("Resources", {}).get("CPU", 0) > 0


def check_tracking_reachable(uri: str) -> None:
    """A loopback tracking URI (the embedded server), or a SQLite file on this machine, is unreachable from trials
    on other machines (and SQLite over NFS is unsafe for concurrent writers)."""
    from kdtune.errors import ConfigError

    machines = {node["NodeManagerAddress"] for node in alive_nodes()}
    if uri.startswith("sqlite:") and len(machines) > 1:
        raise ConfigError(f"tracking URI {uri} is a SQLite file on this machine, but the Ray cluster spans "
                          f"{len(machines)} machines whose trials could not write it; start an MLflow server on the "
                          "head (kdtune mlflow serve --host 0.0.0.0 --backend-store-uri "
                          f"{uri}) and pass --tracking-uri http://HEAD:5000")
    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        return
    if len(machines) > 1:
        raise ConfigError(f"tracking URI {uri} is on loopback, but the Ray cluster spans {len(machines)} machines "
                          "whose trials could not reach it; start an MLflow server on the head "
                          "(kdtune mlflow serve, or mlflow server --host 0.0.0.0) and pass --tracking-uri "
                          "http://HEAD:5000 or set MLFLOW_TRACKING_URI")


def trial_slots(cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int | None = None) -> int:
    """How many trials the cluster can run at once with these resources (at least 1)."""
    import ray

    check_resources(cpus_per_trial, gpus_per_trial)  # before Tune queues trials no node can take
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // cpus_per_trial) if cpus_per_trial else 1 << 30
    if gpus_per_trial:
        slots = min(slots, int(resources.get("GPU", 0) // gpus_per_trial))
    if max_concurrent:
        slots = min(slots, max_concurrent)
    return max(1, slots)


RESOURCE_OPTIONS = {"CPU": "--cpus-per-trial", "GPU": "--gpus-per-trial"}


def check_resources(cpus: float, gpus: float, extra: dict[str, float] | None = None,
                    options: dict[str, str] | None = None) -> None:
    """Raise ConfigError (one line) unless some node of the cluster can run one trial asking for `cpus` CPUs,
    `gpus` GPUs and `extra` custom resources ({"TPU": 1}, {"accelerator_type:A100": 0.01}, ...).

    Ray keeps a task or trial that no node can ever take pending, without an error (Tune only warns, every
    minute). On a fixed cluster the test is the nodes alive now. On an autoscaling cluster it is the node types
    the autoscaler may launch, read from the launcher's ~/ray_bootstrap_config.yaml (the head, where `ray job
    submit` runs the driver); where those are unknown (a driver elsewhere), nothing is refused."""
    from kdtune.errors import ConfigError

    asked = {k: float(v) for k, v in {"CPU": cpus, "GPU": gpus, **(extra or {})}.items() if v}
    if not asked:
        return
    nodes = [node.get("Resources", {}) for node in alive_nodes()]
    if any(_fits(asked, node) for node in nodes):
        return
    types = autoscaler_node_types()
    if types == "unknown" or (types and any(_fits(asked, t) for t in types)):
        return
    lacking = sorted({k for k in asked if not any(node.get(k, 0) >= asked[k] for node in nodes + (types or []))}) \
        or sorted(asked)  # each is on some node, but never all of them on one
    names = {**RESOURCE_OPTIONS, **(options or {})}  # the command's own option names (kdtune teacher train: --cpus)
    request = ", ".join(f"{names.get(k, 'resource ' + k)} {asked[k]:g}" for k in sorted(asked))
    shapes = _shapes(nodes, sorted({*asked, "CPU", "GPU"}))
    also = f"; the autoscaler launches {_shapes(types, sorted({*asked, 'CPU', 'GPU'}))}" if types else ""
    raise ConfigError(f"{request}: no node of the Ray cluster has {' and '.join(_amount(asked, k) for k in lacking)} "
                      f"for one trial (its nodes: {shapes}{also}); ask for less, or add a node that has it")


def _fits(asked: dict[str, float], node: dict) -> bool:
    return all(node.get(k, 0) >= v - 1e-9 for k, v in asked.items())


def _amount(asked: dict[str, float], key: str) -> str:
    if key in ("CPU", "GPU"):
        return f"{asked[key]:g} {key}{'s' if asked[key] > 1 else ''}"
    return f"{asked[key]:g} of resource {key!r}"


def _shapes(nodes: list[dict], keys: list[str], most: int = 4) -> str:
    """'2 x (CPU 8, GPU 1), 1 x (CPU 2, GPU 0)': the distinct node shapes, counted."""
    counts: dict[str, int] = {}
    for node in nodes:
        shape = ", ".join(f"{k} {node.get(k, 0):g}" for k in keys)
        counts[shape] = counts.get(shape, 0) + 1
    if not counts:
        return "none alive"
    shown = [f"{n} x ({shape})" for shape, n in list(counts.items())[:most]]
    return ", ".join(shown) + (f", and {len(counts) - most} more shapes" if len(counts) > most else "")


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` writes on the head (Ray Tune looks there too)


def autoscaler_node_types():
    """The resources of each node type an autoscaler may launch: a list of dicts; None on a cluster without an
    autoscaler; "unknown" when one runs but its node types cannot be read here."""
    import ray

    config = Path(BOOTSTRAP_CONFIG).expanduser()
    if config.exists():
        try:
            import yaml

            types = (yaml.safe_load(config.read_text()) or {}).get("available_node_types") or {}
            resources = [t.get("resources") for t in types.values() if isinstance(t, dict)]
            if resources and all(isinstance(r, dict) for r in resources):
                return [{k: float(v) for k, v in r.items()} for r in resources]
        except Exception:  # unreadable: do not guess
            pass
        return "unknown"
    if not ray.is_initialized():
        return None
    try:  # KubeRay's autoscaler (v2)
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return "unknown"
    except Exception:
        pass
    try:  # the v1 autoscaler's report in the GCS. `ray start --head` runs one too, over a read-only provider that
        # names each node's type after the node ("node_<id>"); a launcher's node types have the config's names
        import json

        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if _internal_kv_initialized():
            status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
            mapping = report.get("node_type_mapping") or {}
            if report.get("pending_launches") or any(not str(t).startswith("node_") for t in mapping.values()):
                return "unknown"
    except Exception:
        pass
    return None
