"""kdtune on a Ray cluster: the launcher config, the README's cluster commands, packing, node loss.

The `cluster` tests start a real two-node Ray cluster on this machine, the way README.md ("On a cluster",
"On one machine") shows it: `ray start --head --block` and `ray start --block --address ...`, each node a
separate process group with its own temp dir and ports and a token of its own (token auth stays on). The head
has no GPU, like cluster.yaml's; the worker declares 2 logical GPUs (`--num-gpus 2` on a CPU-only machine).
Teardown stops only what the fixture started: each node's process group, then any process still carrying the
fixture's marker variable (a study a job started, its trial workers). Never `ray stop`: it would stop every
Ray on the machine, other people's too.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, write_cifar10

MARKER = "KDTUNE_TEST_CLUSTER"
README = REPO / "README.md"
CLUSTER_YAML = REPO / "cluster.yaml"


# ---- helpers -------------------------------------------------------------------------------------

def readme_section(title: str = "## On a cluster") -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end != -1 else len(text)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and `&` dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line.rstrip("&").strip())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli() -> list[str]:
    """`ray` for the interpreter running the tests (its console script may belong to another Python)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def dashboard_available() -> bool:
    """`ray job submit` needs Ray's job server, which lives in the dashboard: `pip install 'ray[default]'`."""
    try:
        import aiohttp_cors  # noqa: F401  (one of ray[default]'s extras the dashboard refuses to start without)
        import grpc  # noqa: F401
        import opencensus  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _pgid_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[2])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class Node:
    """One `ray start --block` process: a Ray node, in a process group (session) of its own."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO)
        self.pgid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} node exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} node did not start within {timeout_s:.0f}s:\n{self.log()[-3000:]}")

    def group(self) -> list[int]:
        return [pid for pid in _pids() if _pgid_of(pid) == self.pgid]

    def node_id(self) -> str:
        for pid in self.group():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/raylet"):
                for arg in argv:
                    if arg.startswith(b"--node_id="):
                        return arg.split(b"=", 1)[1].decode()
        raise RuntimeError(f"no raylet in {self.name}'s process group {self.pgid}")

    def kill(self) -> None:
        """Lose the node at once: SIGKILL to its whole process group (raylet, object store, trial workers)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ctrl-C in its terminal (SIGINT to `ray start --block`), then SIGKILL to whatever is left of it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while self.group() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=30)


class LocalCluster:
    """A head and worker nodes started from README commands, each with its own ports, temp dir and token."""

    def __init__(self):
        # short: Ray puts unix sockets under <temp dir>/session_.../sockets, and those paths have a length limit
        self.root = Path(tempfile.mkdtemp(prefix="kdc", dir="/tmp"))
        self.token = self.root / "token"
        self.token.write_text(os.urandom(16).hex())
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items()
               # a node started with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 refuses to join a cluster; kdtune sets
               # it in the driver's own environment, which pytest may share
               if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token), MARKER: str(self.root),
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
        self.env = env
        self.nodes: dict[str, Node] = {}

    def isolation_args(self, name: str) -> list[str]:
        """Ports and a temp dir of the node's own (other people's Ray on this machine keeps Ray's defaults)."""
        return ["--temp-dir", str(self.root / name), "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]

    def start(self, name: str, command: str, extra_env: dict | None = None) -> Node:
        """Start a node from a README command line (`[VAR=value ...] ray start ...`)."""
        words = shlex.split(command)
        env = dict(self.env)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        env.update(extra_env or {})
        assert words[:2] == ["ray", "start"], command
        args = words[2:]
        if "--temp-dir" in args:  # the README's own temp dir: keep it, but inside this cluster's folder
            args[args.index("--temp-dir") + 1] = str(self.root / name)
        extra = self.isolation_args(name)
        if "--temp-dir" in args:
            extra = extra[2:]
        if "--dashboard-agent-listen-port" not in args:
            extra += ["--dashboard-agent-listen-port", str(free_port())]
        node = Node(name, ray_cli() + ["start", *args, *extra], env, self.root / f"{name}.log")
        self.nodes[name] = node
        node.wait_started()
        return node

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(ray_cli() + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        status = ""
        while time.monotonic() < deadline:
            result = self.ray("status", "--address", f"127.0.0.1:{self.gcs_port}")
            status = result.stdout + result.stderr
            if result.returncode == 0 and len(re.findall(r"^\s*1 node_[0-9a-f]+", status, flags=re.M)) >= count:
                return status
            time.sleep(2)
        raise TimeoutError(f"the cluster did not reach {count} nodes:\n{status[-3000:]}")

    def marked_pids(self) -> list[int]:
        """Every process carrying this cluster's marker: the nodes and all they started (jobs, trials)."""
        needle = f"{MARKER}={self.root}\0".encode()
        found = []
        for pid in _pids():
            if pid == os.getpid():
                continue
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        return found

    def teardown(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()
        for pid in self.marked_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


# ---- cluster.yaml and the README's launcher commands --------------------------------------------

def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` checks before it talks to a cloud: defaults filled in, then Ray's own validation
    (ray/autoscaler/ray-schema.json plus its cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_own_validation():
    config = prepared(cluster_config())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0} and head["max_workers"] == 0  # no trial on the head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["min_workers"] == 0 and t["max_workers"] >= 1
                           for t in workers)  # GPU workers that scale from zero
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--num-cpus=0 --num-gpus=0" in head_start
    assert "mlflow server --host 0.0.0.0 --port 5000" in head_start
    for start in (head_start, worker_start):  # token auth on every node, the shared data dir, the MLflow server
        assert "RAY_AUTH_MODE=token" in start and "KDTUNE_DATA_DIR=/mnt/kdtune/data" in start
        assert "MLFLOW_TRACKING_URI=http://" in start and ":5000" in start
    assert config["file_mounts"] == {"~/kdtune": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    setup = config["setup_commands"]
    assert any("mount -t nfs4" in c and "/mnt/kdtune" in c for c in setup)  # shared storage on every node
    assert any("install" in c and "-e ~/kdtune" in c for c in setup)  # kdtune on every node

    broken = cluster_config()
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # the schema wants whole numbers
    with pytest.raises(Exception, match="is not of type 'integer'"):
        prepared(broken)


def test_cluster_yaml_node_configs_are_valid_ec2_launch_requests():
    """Each node_config goes to EC2 RunInstances as is: check it against botocore's (offline) API model."""
    session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    model = session.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node_type in cluster_config()["available_node_types"].items():
        report = ParamValidator().validate({**node_type["node_config"], "MinCount": 1, "MaxCount": 1},
                                           model.input_shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_cluster_yaml_and_readme_pin_the_installed_ray():
    import ray

    pins = re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", CLUSTER_YAML.read_text() + readme_section())
    assert len(pins) >= 3 and set(pins) == {ray.__version__}, pins


def onprem_config() -> dict:
    section = readme_section()
    blocks = code_blocks(section[section.index("### On premises"):], "yaml")
    return yaml.safe_load(blocks[0])


def test_onprem_variant_in_the_readme_passes_rays_own_validation():
    raw = onprem_config()
    config = prepared(raw)
    assert raw["provider"]["type"] == "local"
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"]) == 2
    head_ip = raw["provider"]["head_ip"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert f"MLFLOW_TRACKING_URI=http://{head_ip}:5000" in " ".join(raw[key])
    # the same kdtune set-up as the cloud variant
    cloud = cluster_config()
    assert raw["file_mounts"] == cloud["file_mounts"] and raw["rsync_filter"] == cloud["rsync_filter"]


def _ray_command(words: list[str]):
    """Parse a `ray ...` command line with the installed ray CLI (raises click.UsageError if it is wrong)."""
    from ray.scripts.scripts import cli

    command, args, name = cli, words[1:], "ray"
    while hasattr(command, "get_command"):
        name, args = args[0], args[1:]
        command = command.get_command(None, name)
        assert command is not None, f"no such ray command: {name!r} in {' '.join(words)}"
    return command.make_context(name, list(args))


def cloud_commands() -> list[str]:
    section = readme_section()
    return commands(code_blocks(section[section.index("### In the cloud"):], "bash")[0])


def test_readme_cloud_commands_match_cluster_yaml_and_the_ray_cli(monkeypatch):
    lines = cloud_commands()
    launcher = [l for l in lines if l.startswith("ray ") and " cluster.yaml" in l]
    assert {l.split()[1] for l in launcher} >= {"up", "dashboard", "exec", "down"}
    for line in lines:
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words.pop(0)
        if words[0] == "ray":
            ctx = _ray_command(words)
            if "cluster_config_file" in ctx.params:
                assert ctx.params["cluster_config_file"] == "cluster.yaml"
    forwarded = [l for l in launcher if "--remote-port" in l]
    assert forwarded == ["ray dashboard cluster.yaml -p 5000 --remote-port 5000"]  # cluster.yaml's MLflow port

    # the submitted study: its options are the study script's, and it writes where cluster.yaml shares
    submit = shlex.split(next(l for l in lines if "ray job submit" in l))
    entry = submit[submit.index("--") + 1:]
    assert entry[:2] == ["sh", "-c"]
    study = shlex.split(entry[2])
    assert study[:2] == ["python", "studies/temperature_sweep.py"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.10:5000")
    spec = _parse_study(monkeypatch, [os.path.expandvars(a) for a in study[2:]])
    assert spec.tracking_uri == "http://10.0.0.10:5000" and spec.address is None  # the job's RAY_ADDRESS
    assert spec.storage == "/mnt/kdtune/ray_results" and spec.gpus_per_trial == 0.25
    head_start = " ".join(cluster_config()["head_start_ray_commands"])
    assert "mkdir -p /mnt/kdtune/mlflow /mnt/kdtune/ray_results /mnt/kdtune/data" in head_start


def _parse_study(monkeypatch, args: list[str]):
    """The StudySpec that studies/temperature_sweep.py would run with these arguments (nothing is run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("temperature_sweep", REPO / "studies" / "temperature_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = []
    monkeypatch.setattr(module, "finish", lambda run, study: captured.append(study) or 0)
    monkeypatch.setattr(sys, "argv", ["temperature_sweep.py", *args])
    assert module.main() == 0
    return captured[0]


def test_readme_one_machine_commands_are_the_ones_the_cluster_tests_run():
    lines = one_machine_commands()
    for line in lines:
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words.pop(0)
        if words[0] == "ray":
            _ray_command(words)
    starts = [l for l in lines if "ray start" in l]
    assert len(starts) == 2 and "--head" in starts[0] and "--num-gpus 0" in starts[0]
    assert "--num-gpus 2" in starts[1] and "--temp-dir" in starts[1]  # a second node on one machine
    for prefix in ("ray get-auth-token", "export ", "MLFLOW_TRACKING_URI=", "ray start --block --address",
                   "kdtune mlflow serve", "ray status", "ray job submit", "python studies/temperature_sweep.py",
                   "ray job list"):
        readme_command(prefix)  # exactly one each: the fixture and tests below run them
    assert len(lines) == 9



def test_actor_reuse_is_automatic_unless_the_user_chooses(monkeypatch):
    assert _parse_study(monkeypatch, ["--dataset", "digits"]).reuse_actors is None
    assert _parse_study(monkeypatch, ["--no-reuse-actors"]).reuse_actors is False
    assert _parse_study(monkeypatch, ["--reuse-actors"]).reuse_actors is True

# ---- device selection follows Ray's assignment ---------------------------------------------------

@pytest.mark.parametrize("assigned, cuda, expected, warns", [
    (None, False, "cpu", False),      # plain script or test, no CUDA
    (None, True, "cuda", False),      # plain script on a GPU machine
    ([], True, "cpu", False),         # a trial given no GPU leaves the node's GPUs to the trials that got one
    (["1"], True, "cuda", False),     # Ray's CUDA_VISIBLE_DEVICES=1 makes it cuda:0 inside the trial
    (["0"], False, "cpu", True),      # logical GPUs on a CPU-only node (`ray start --num-gpus=2`)
])
def test_pick_device_follows_what_ray_assigned(monkeypatch, caplog, assigned, cuda, expected, warns):
    from kdtune.train import devices

    monkeypatch.setattr(devices, "assigned_gpu_ids", lambda: assigned)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level("WARNING", logger="kdtune"):
        assert devices.pick_device().type == expected
    messages = [r.getMessage() for r in caplog.records]
    if warns:
        assert messages == ["kdtune: Ray assigned GPU 0 to this trial but CUDA is not available on this node "
                            "(CUDA_VISIBLE_DEVICES=0); training on the CPU"]
    else:
        assert messages == []


def test_outside_ray_there_is_no_assignment():
    from kdtune.train.devices import assigned_gpu_ids

    assert assigned_gpu_ids() is None


# ---- datasets: downloaded once into a shared data dir ---------------------------------------------

class _ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves one archive on a loopback port, slowly, and counts the downloads."""

    def __init__(self, payload: bytes, delay_s: float):
        self.payload, self.delay_s, self.gets = payload, delay_s, 0
        self.count_lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.count_lock:
                    server.gets += 1
                time.sleep(server.delay_s)  # long enough for every process to reach the download
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                self.wfile.write(server.payload)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_processes_sharing_a_data_dir_download_a_dataset_once(tmp_path):
    """Three processes (think: nodes on one NFS data dir) load CIFAR-10 at once: one download, three datasets."""
    write_cifar10(tmp_path / "src", per_batch=8, test=8)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    payload = buffer.getvalue()
    server = _ArchiveServer(payload, delay_s=2.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shared = tmp_path / "shared-data"
    # the real loader, pointed at this server instead of the CIFAR host (which this machine cannot reach)
    script = (
        "import dataclasses, sys\n"
        "import kdtune.data.builtin as data\n"
        "files = data._CIFAR['cifar10']\n"
        "source = dataclasses.replace(files.source, mirrors=(sys.argv[1],), files=((files.source.files[0][0], sys.argv[2]),))\n"
        "data._CIFAR['cifar10'] = dataclasses.replace(files, source=source)\n"
        "data._DATASETS['cifar10'] = dataclasses.replace(data._DATASETS['cifar10'], load=data._cifar_loader('cifar10'))\n"
        "dataset = data.load_dataset('cifar10', sys.argv[3])\n"
        "print(tuple(dataset.train_images.shape), tuple(dataset.test_images.shape))\n"
    )

    def load(data_dir: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, f"http://127.0.0.1:{server.server_port}/",
                                 hashlib.md5(payload).hexdigest(), str(data_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        alone = load(tmp_path / "alone")  # how many requests one download makes (torchvision may probe first)
        out, err = alone.communicate(timeout=300)
        assert alone.returncode == 0, err[-3000:]
        one_download = server.gets
        server.gets = 0
        processes = [load(shared) for _ in range(3)]
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        server.shutdown()
        server.server_close()
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert out.strip() == "(40, 3, 32, 32) (8, 3, 32, 32)"
    assert one_download >= 1 and server.gets == one_download  # three processes, one download
    assert sorted(p.name for p in shared.iterdir()) == [".cifar10-download.lock", "cifar-10-batches-py",
                                                        "cifar-10-python.tar.gz"]


def test_a_download_that_fails_leaves_no_lock_file_behind(tmp_path):
    from kdtune.data import load_dataset
    from kdtune.errors import DatasetError

    server = _ArchiveServer(b"not an archive", delay_s=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import dataclasses

    import kdtune.data.builtin as data

    files = data._CIFAR["cifar10"]
    source = dataclasses.replace(files.source, mirrors=(f"http://127.0.0.1:{server.server_port}/",))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(data._CIFAR, "cifar10", dataclasses.replace(files, source=source))
            patch.setitem(data._DATASETS, "cifar10", dataclasses.replace(data._DATASETS["cifar10"],
                                                                         load=data._cifar_loader("cifar10")))
            with pytest.raises(DatasetError, match="could not download"):
                load_dataset("cifar10", tmp_path / "fresh" / "data")
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "fresh").exists()


# ---- the README's one-machine cluster ------------------------------------------------------------

def one_machine_commands() -> list[str]:
    section = readme_section()
    block = code_blocks(section[section.index("### On one machine"):], "bash")[0]
    return commands(block)


def readme_command(prefix: str) -> str:
    found = [c for c in one_machine_commands() if c.startswith(prefix)]
    assert len(found) == 1, f"README's one-machine block should have one command starting {prefix!r}: {found}"
    return found[0]


class Deployment:
    """The README's one-machine commands, with this test's ports and folders in place of the README's."""

    def __init__(self, cluster: LocalCluster, mlflow_port: int):
        self.cluster = cluster
        self.mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        self.storage = cluster.root / "results"
        self.replacements = [
            ("127.0.0.1:6379", f"127.0.0.1:{cluster.gcs_port}"), ("--port 6379", f"--port {cluster.gcs_port}"),
            ("127.0.0.1:8265", f"127.0.0.1:{cluster.dashboard_port}"),
            ("--dashboard-port 8265", f"--dashboard-port {cluster.dashboard_port}"),
            ("127.0.0.1:5000", f"127.0.0.1:{mlflow_port}"), ("--port 5000", f"--port {mlflow_port}"),
            ("--dashboard-agent-listen-port 52366", f"--dashboard-agent-listen-port {free_port()}"),
            ("/tmp/kdtune-results", str(self.storage)), ("--store .kdtune", f"--store {cluster.root / 'mlflow'}"),
        ]

    def here(self, command: str) -> str:
        for old, new in self.replacements:
            command = command.replace(old, new)
        return command


def _start_mlflow(cluster: LocalCluster, deployment: Deployment) -> subprocess.Popen:
    """`kdtune mlflow serve ...` from the README, as a process of this cluster (teardown ends it)."""
    words = shlex.split(deployment.here(readme_command("kdtune mlflow serve")))
    log = open(cluster.root / "mlflow-serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "kdtune.cli", *words[1:]], env=cluster.env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True, cwd=cluster.root)
    return process


def _wait_for_mlflow(cluster: LocalCluster, deployment: Deployment, process: subprocess.Popen) -> None:
    from kdtune.tracking import _healthy

    deadline = time.monotonic() + 180
    while not _healthy(deployment.mlflow_uri):
        assert process.poll() is None, (cluster.root / "mlflow-serve.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "kdtune mlflow serve did not answer within 180s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment():
    """Head (2 CPUs, no GPU) + worker (2 CPUs, 2 logical GPUs) + MLflow, started by the README's commands."""
    cluster = LocalCluster()
    mlflow_process = None
    try:
        # `ray get-auth-token --generate` writes ~/.ray/auth_token: give it a home of its own here
        env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        generate = readme_command("ray get-auth-token")
        result = subprocess.run(ray_cli() + shlex.split(generate)[1:], capture_output=True, text=True, timeout=120,
                                env={**env, "HOME": str(cluster.root)})
        assert result.returncode == 0, result.stderr[-2000:]
        cluster.token = cluster.root / ".ray" / "auth_token"
        assert cluster.token.is_file()
        cluster.env["RAY_AUTH_TOKEN_PATH"] = str(cluster.token)
        export = readme_command("export ")
        key, value = export.split(" ", 1)[1].split("=", 1)
        cluster.env[key] = value

        started = time.monotonic()
        deployment = Deployment(cluster, free_port())
        mlflow_process = _start_mlflow(cluster, deployment)  # starts while the nodes do
        cluster.start("head", deployment.here(readme_command("MLFLOW_TRACKING_URI=")))
        print(f"\nhead up {time.monotonic() - started:.1f}s", end="; ")
        cluster.start("worker", deployment.here(readme_command("ray start --block --address")))
        print(f"worker up {time.monotonic() - started:.1f}s", end="; ")
        deployment.status = cluster.wait_for_nodes(2)
        print(f"ray status shows 2 nodes {time.monotonic() - started:.1f}s", end="; ")
        _wait_for_mlflow(cluster, deployment, mlflow_process)
        print(f"mlflow up {time.monotonic() - started:.1f}s")
        yield deployment
    finally:
        if mlflow_process is not None and mlflow_process.poll() is None:
            os.killpg(mlflow_process.pid, signal.SIGTERM)
            try:
                mlflow_process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(mlflow_process.pid, signal.SIGKILL)
        cluster.teardown()


# ---- what a study left in MLflow -----------------------------------------------------------------

def study_children(uri: str, output: str) -> tuple[object, list]:
    """The study's parent run (its id is printed by the script) and its child runs."""
    from kdtune.tracking import client_for

    match = re.findall(r"study run ([0-9a-f]{32})", output)
    assert match, output[-3000:]
    client = client_for(uri)
    parent = client.get_run(match[-1])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    return parent, runs


def students(runs) -> list:
    return [r for r in runs if r.data.tags.get("kdtune.role") == "student"]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# ---- on the cluster ------------------------------------------------------------------------------

@pytest.mark.cluster
@pytest.mark.skipif(not dashboard_available(), reason="`ray job submit` needs Ray's job server: pip install 'ray[default]'")
def test_study_submitted_as_a_ray_job_trains_on_both_nodes(deployment):
    cluster = deployment.cluster
    head, worker = cluster.nodes["head"].node_id(), cluster.nodes["worker"].node_id()
    assert "0.0/4.0 CPU" in deployment.status and "0.0/2.0 GPU" in deployment.status, deployment.status

    words = shlex.split(deployment.here(readme_command("ray job submit")))
    started = time.monotonic()
    result = cluster.ray(*words[1:], timeout=480)
    output = result.stdout + result.stderr
    print(f"ray job submit: {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-4000:]
    assert "Temperature sweep (seed 000 Table 3), digits" in output

    parent, runs = study_children(deployment.mlflow_uri, output)
    assert parent.info.status == "FINISHED"
    trained = students(runs)
    assert sorted(r.data.tags["kdtune.label"] for r in trained) == ["10", "2", "5", "baseline"]
    assert all(r.info.status == "FINISHED" for r in trained)
    nodes = {r.data.tags["kdtune.node_id"] for r in trained}
    assert nodes == {head, worker}, f"trials ran on {nodes}; head {head}, worker {worker}"
    assert all(r.data.tags["kdtune.device"] == "cpu" for r in trained)

    listed = cluster.ray(*shlex.split(deployment.here(readme_command("ray job list")))[1:])
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout, listed.stdout[-2000:] + listed.stderr[-2000:]


@pytest.mark.cluster
def test_half_gpu_trials_pack_four_at_a_time_on_two_logical_gpus(deployment):
    """`--gpus-per-trial 0.5` on a worker declaring 2 GPUs (none real): 4 trials at once, never 5, on the CPU."""
    cluster = deployment.cluster
    worker = cluster.nodes["worker"].node_id()
    words = shlex.split(deployment.here(readme_command("python studies/temperature_sweep.py --address")))
    started = time.monotonic()
    # Ray folds log lines that differ only in numbers ("GPU 0", "GPU 1") arriving together: keep them apart
    result = subprocess.run([sys.executable, *words[1:]], env={**cluster.env, "RAY_DEDUP_LOGS": "0"}, cwd=REPO,
                            capture_output=True,
                            text=True, timeout=480)
    output = result.stdout + result.stderr
    print(f"packing study: {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, output[-4000:]

    parent, runs = study_children(deployment.mlflow_uri, output)
    trained = students(runs)
    assert sorted(r.data.tags["kdtune.label"] for r in trained) == ["10", "2", "20", "5", "baseline"]
    assert {r.data.tags["kdtune.node_id"] for r in trained} == {worker}  # the only node with GPUs
    assert all(r.info.status == "FINISHED" and r.data.tags["kdtune.device"] == "cpu" for r in trained)
    intervals = sorted((r.info.start_time / 1000, r.info.end_time / 1000) for r in trained)
    print("trial runs (s from the first start):",
          [(round(a - intervals[0][0], 1), round(b - intervals[0][0], 1)) for a, b in intervals])
    assert max_overlap(intervals) == 4  # 2 GPUs / 0.5 per trial; the fifth waited for a free half GPU
    assert "Ray assigned GPU 0 to this trial but CUDA is not available on this node" in output
    assert "Ray assigned GPU 1 to this trial but CUDA is not available on this node" in output


@pytest.mark.cluster
def test_a_study_survives_losing_its_worker_node(deployment):
    """Kill the worker node (its whole process group) mid-study: the study finishes on the head, every trial
    with exactly one finished MLflow run and one result, the lost trials resumed from their checkpoints."""
    from kdtune.tracking import client_for

    cluster = deployment.cluster
    head_node, worker_node = cluster.nodes["head"], cluster.nodes["worker"]
    head, worker = head_node.node_id(), worker_node.node_id()
    # long enough that a trial caught at epoch 2 cannot finish in the seconds the killed node's orphaned trial
    # processes take to notice their raylet is gone (8 digits epochs did, 1.4 s after the kill, when each epoch
    # waited for its metrics to be stored; 28 did once epochs stopped waiting)
    epochs = 100
    storage = cluster.root / "node-loss"
    argv = [sys.executable, "studies/temperature_sweep.py", "--address", f"127.0.0.1:{cluster.gcs_port}",
            "--dataset", "digits", "--temperatures", "2", "5", "10", "--epochs", str(epochs), "--teacher-epochs", "10",
            "--tune", "none", "--fuse", "off",
            "--cpus-per-trial", "1", "--tracking-uri", deployment.mlflow_uri, "--storage", str(storage)]
    log_path = cluster.root / "node-loss-driver.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(argv, env=cluster.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    client = client_for(deployment.mlflow_uri)
    killed_runs = []
    try:
        # wait until a trial on the worker has checkpointed an epoch, then take the worker away
        deadline = time.monotonic() + 300
        while not killed_runs:
            assert driver.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial reached epoch 2 on the worker node"
            match = re.findall(r"study run ([0-9a-f]{32})", log_path.read_text())
            if match:
                parent = client.get_run(match[-1])
                runs = client.search_runs([parent.info.experiment_id], max_results=100, filter_string=(
                    f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`kdtune.node_id` = '{worker}' "
                    "and attributes.status = 'RUNNING'"))
                killed_runs = [r for r in runs if r.data.metrics.get("epoch", 0) >= 2]
            time.sleep(0.5)
        killed_at = time.monotonic() - started
        worker_node.kill()
        driver.wait(timeout=420)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log_path.read_text()
    print(f"node-loss study: worker killed at {killed_at:.1f}s, study done at {time.monotonic() - started:.1f}s")
    assert driver.returncode == 0, output[-5000:]
    assert "failed:" not in output

    parent, runs = study_children(deployment.mlflow_uri, output)
    trained = students(runs)
    keys = [r.data.tags["kdtune.trial_key"] for r in trained]
    assert len(keys) == 4 and len(set(keys)) == 4  # one run per trial: none lost, none doubled
    assert all(r.info.status == "FINISHED" and "test_acc" in r.data.metrics for r in trained)
    killed_keys = {r.data.tags["kdtune.trial_key"] for r in killed_runs}
    for run in trained:
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_acc")})
        assert steps == list(range(1, epochs + 1))
        if run.data.tags["kdtune.trial_key"] in killed_keys:
            assert run.data.tags["kdtune.node_id"] == head  # finished on the node that was left

    # Tune's own record: every trial finished once; the lost ones restarted from a checkpoint, not from scratch
    results = {}
    for result_file in storage.rglob("result.json"):  # <storage>/<study>-<time>/<phase>/<trial>/result.json
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        results[lines[-1]["trial_id"]] = lines
    assert len(results) == 4
    for trial_id, lines in results.items():
        last = lines[-1]
        assert last["epoch"] == epochs and "test_acc" in last
        if trial_id in killed_keys:
            # restored from a checkpoint: fewer reports since the restore than in all (a grid trial reports
            # with its checkpoints, so not every epoch)
            assert last["iterations_since_restore"] < last["training_iteration"]
