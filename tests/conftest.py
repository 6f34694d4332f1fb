"""Shared fixtures: real parts, started once per test session (Ray and MLflow are slow to start)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kdtune.distill import trial_config

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from kdtune.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for the tests of one module that run studies in-process (a script starts its own)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow server over SQLite on a loopback port, as kdtune embeds it."""
    from kdtune.tracking import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trained_digits_teacher(digits):
    """A digits teacher trained once with the engine (a few seconds)."""
    from kdtune.train.parts import trainer_for

    config = trial_config(dict(student="digits_teacher", method="none", epochs=12, lr=0.05))
    trainer = trainer_for(config, digits)
    for metrics in trainer.epochs():
        pass
    trainer.close()
    return trainer.student.state_dict(), metrics


def write_cifar10(root: Path, per_batch: int = 16, test: int = 24, seed: int = 0) -> Path:
    """Write CIFAR-10 in its official python format (pickled dicts, 3072 uint8 per row), with learnable labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 64, (n, 3, 32, 32)).astype(np.uint8)
        images[np.arange(n), labels % 3, :, :] += (labels * 19).astype(np.uint8)[:, None, None]  # class signal
        return {b"batch_label": b"synthetic", b"labels": labels.tolist(), b"data": images.reshape(n, 3072),
                b"filenames": [f"{i}.png".encode() for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test), f)
    return root


def run_script(script: str, *args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "studies" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
