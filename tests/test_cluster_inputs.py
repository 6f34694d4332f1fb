"""Bad cluster input fails in one line, within seconds: an --address nothing (or nothing Ray) answers at, and
resources (--cpus-per-trial, --gpus-per-trial, custom ones) that no node of the cluster has.

Before, `ray.init` kept reconnecting to 127.0.0.1:1 or an unknown host for 200 s and then exited with a bare
SystemExit, and a trial or teacher task asking for a GPU on a cluster without one stayed pending forever (Tune
only warns, every minute).
"""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from kdtune import cluster
from kdtune.errors import ConfigError, KdtuneError


@pytest.fixture(scope="module")
def http_port():
    """A port that answers, but as an HTTP server (as the dashboard's 8265 does), not as Ray's GCS."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts connections and never says anything (a hung process, a half-open firewall)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def refused_address(address: str, timeout_s: float = 3.0) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(KdtuneError) as error:
        cluster.probe_address(address, timeout_s=timeout_s)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"address={address!r}")
    return message, time.monotonic() - started


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "Connection refused"),
    ("no-such-host.invalid:6379", "no-such-host.invalid"),
    ("http://127.0.0.1:8265", "the dashboard's, for `ray job submit"),
    ("127.0.0.1:port", "'port' is not a port number"),
    ("ray://127.0.0.1:1", "no Ray cluster at 127.0.0.1:1"),
])
def test_an_address_nothing_answers_at_is_refused_at_once(address, says):
    message, seconds = refused_address(address)
    assert says in message and seconds < 5


def test_an_address_that_answers_but_not_as_ray_is_refused(http_port):
    message, seconds = refused_address(f"127.0.0.1:{http_port}")
    assert "answers, but not as a Ray cluster" in message and "6379" in message and seconds < 5


def test_an_address_that_never_answers_is_refused_after_the_timeout(silent_port):
    message, seconds = refused_address(f"127.0.0.1:{silent_port}", timeout_s=2)
    assert "within 2s" in message and cluster.CONNECT_TIMEOUT_ENV in message and seconds < 6


def test_auto_and_ray_address_are_probed_too(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # what `auto` and a job's environment resolve first
    message, seconds = refused_address("auto")
    assert "127.0.0.1:1" in message and seconds < 5
    assert cluster.probe_address("local") is None  # a new local Ray: nothing to probe


def _study(*args: str, cwd, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "studies" / "temperature_sweep.py"), "--dataset", "digits",
                             "--temperatures", "2", "--epochs", "1", "--teacher-epochs", "1", "--tune", "none",
                             "--store", str(cwd / "store"), *args], cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"},
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("kdtune: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "== Status ==" not in result.stdout  # no trial was queued
    return lines[0]


def test_a_study_given_an_unreachable_address_exits_2_in_seconds(tmp_path):
    result, seconds = _study("--address", "127.0.0.1:1", cwd=tmp_path)
    line = _one_line_error(result)
    assert line.startswith("kdtune: error: address='127.0.0.1:1': no Ray cluster at 127.0.0.1:1"), line
    assert seconds < 60, seconds  # Python, torch and the embedded server's launch; Ray alone took 200 s


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, num_gpus=0, resources={"fast_disk": 1}, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.parametrize("cpus, gpus, extra, says", [
    (1, 1, None, "--cpus-per-trial 1, --gpus-per-trial 1: no node of the Ray cluster has 1 GPU"),
    (0.5, 0.25, None, "has 0.25 GPU"),
    (3, 0, None, "--cpus-per-trial 3: no node of the Ray cluster has 3 CPUs"),
    (1, 0, {"TPU": 1}, "has 1 of resource 'TPU'"),
    (1, 0, {"fast_disk": 2}, "has 2 of resource 'fast_disk'"),
])
def test_resources_no_node_has_are_refused_in_one_line(local_ray, cpus, gpus, extra, says):
    with pytest.raises(ConfigError) as error:
        cluster.check_resources(cpus, gpus, extra)
    message = str(error.value)
    assert says in message and "\n" not in message
    assert "its nodes: 1 x (CPU 2, GPU 0" in message


def test_resources_some_node_has_pass(local_ray):
    cluster.check_resources(2, 0)
    cluster.check_resources(0.5, 0, {"fast_disk": 1})
    assert cluster.trial_slots(1, 0) == 2


@pytest.mark.timeout(120)
def test_a_task_asking_for_a_gpu_no_node_has_fails_at_once_instead_of_pending(local_ray):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="--gpus-per-trial 1"):
        cluster.run_like_a_trial(sum, [1, 2], cpus=1, gpus=1)
    assert time.monotonic() - started < 5


def test_the_autoscaler_node_types_decide_on_an_autoscaling_cluster(local_ray, tmp_path, monkeypatch):
    config = tmp_path / "ray_bootstrap_config.yaml"  # what `ray up` writes on the head (cluster.yaml's types)
    config.write_text("available_node_types:\n  head: {resources: {CPU: 0, GPU: 0}}\n"
                      "  gpu_worker: {max_workers: 8, resources: {CPU: 8, GPU: 1}}\n")
    monkeypatch.setattr(cluster, "BOOTSTRAP_CONFIG", str(config))
    cluster.check_resources(2, 0.25)  # the GPU workers come with the first trials
    with pytest.raises(ConfigError, match=r"has 2 GPUs.*the autoscaler launches"):
        cluster.check_resources(1, 2)
    config.write_text("available_node_types:\n  gpu_worker: {max_workers: 8, node_config: {}}\n")
    cluster.check_resources(1, 4)  # types without declared resources: nothing is refused


@pytest.mark.e2e
def test_a_study_asking_for_gpus_the_cluster_lacks_exits_2_before_any_trial(tmp_path):
    result, seconds = _study("--gpus-per-trial", "1", cwd=tmp_path)
    line = _one_line_error(result)
    assert "--gpus-per-trial 1: no node of the Ray cluster has 1 GPU" in line, line
    assert seconds < 120, seconds  # a local Ray's start included; before, the teacher's task pended forever
