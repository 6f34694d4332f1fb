"""What kdtune needs to know when it runs on a Ray cluster rather than in one process.

- `assigned_gpu_ids()`: the GPUs Ray gave the current task or actor (a trial), or None outside one. The engine's
  `pick_device` follows it, so a trial trains where Ray placed it and never on a GPU given to another trial.
- `init_ray(address, py_modules)`: start or join Ray, shipping the user's own modules (model factories named
  by import path) to every node with Ray's runtime_env.
- `reuse_actors(asked)`, `check_tracking_reachable(uri)`: the policies that depend on the cluster's shape.
- `staging_lock(folder, name)`: an inter-process lock on a file inside `folder`, for one-time staging work
  (a dataset download) that several processes, or several nodes sharing one NFS/EFS data dir, may start at once.
  `filelock` uses flock(); Linux NFS clients (v4, EFS) turn that into POSIX locks the server enforces, so the
  lock holds across nodes too. Whoever gets the lock second finds the work done and skips it.

The cluster itself (cloud and on-premises launcher configs, submitting a study, node loss) is described in
README.md, section "On a cluster", and in cluster.yaml.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_TIMEOUT_S = 6 * 3600.0  # a CIFAR download over a slow link; a lock held longer than this is a hung process


def assigned_gpu_ids() -> list[str] | None:
    """The accelerator IDs Ray assigned to this task/actor ([] for a CPU-only trial); None outside a Ray worker.

    A fractional request (0.25 GPU) still gets one ID: the GPU it shares. Ray also sets CUDA_VISIBLE_DEVICES to
    these IDs, so inside the trial the first assigned GPU is `cuda:0`.
    """
    ray = sys.modules.get("ray")  # a trial has imported ray already; plain scripts and tests need not
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        if global_worker.mode != WORKER_MODE:  # the driver has no assignment of its own
            return None
        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # an older or newer Ray without these internals: fall back to plain CUDA detection
        return None


@contextmanager
def staging_lock(folder: str | os.PathLike, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold `folder/.<name>.lock` (created if needed) for the duration of the block; yields the lock file path.

    Raises TimeoutError naming the lock file if another process holds it for longer than `timeout_s`.
    """
    from filelock import FileLock, Timeout

    path = Path(folder) / f".{name}.lock"
    lock = FileLock(str(path), timeout=timeout_s)
    try:
        try:
            lock.acquire()
        except FileNotFoundError:  # the holder removed the folder it had made (its download failed): retry
            path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
    except Timeout:
        raise TimeoutError(f"{path}: still locked by another process after {timeout_s:.0f}s "
                           "(a download that hangs? remove the file if no kdtune process is running)") from None
    try:
        yield path
    finally:
        lock.release()


def init_ray(address: str | None, py_modules: list[str] | None = None) -> None:
    """Start a local Ray or join `address`. `py_modules` (folders or files of the user's own code) travel with
    the job to every node through Ray's runtime_env, so a `package.module:factory` model builds in any trial.
    A Ray the caller already started is used as it is (its runtime_env is the caller's)."""
    import ray

    from kdtune.errors import KdtuneError

    if ray.is_initialized():
        return
    from kdtune.mlflow_auth import worker_env

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
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
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env=runtime_env or None)
        if address is None:
            _STARTED_HERE.append(True)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise KdtuneError(f"address={address!r}: could not connect to a Ray cluster ({error})") from None


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
    """A loopback tracking URI (the embedded server) is unreachable from trials on other machines."""
    from kdtune.errors import ConfigError

    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        return
    machines = {node["NodeManagerAddress"] for node in alive_nodes()}
    if len(machines) > 1:
        raise ConfigError(f"tracking URI {uri} is on loopback, but the Ray cluster spans {len(machines)} machines "
                          "whose trials could not reach it; start an MLflow server on the head "
                          "(kdtune mlflow serve, or mlflow server --host 0.0.0.0) and pass --tracking-uri "
                          "http://HEAD:5000 or set MLFLOW_TRACKING_URI")


def trial_slots(cpus_per_trial: float, gpus_per_trial: float, max_concurrent: int | None = None) -> int:
    """How many trials the cluster can run at once with these resources (at least 1)."""
    import ray

    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // cpus_per_trial) if cpus_per_trial else 1 << 30
    if gpus_per_trial:
        slots = min(slots, int(resources.get("GPU", 0) // gpus_per_trial))
    if max_concurrent:
        slots = min(slots, max_concurrent)
    return max(1, slots)
