"""What kdtune needs to know when it runs on a Ray cluster rather than in one process.

- `assigned_gpu_ids()`: the GPUs Ray gave the current task or actor (a trial), or None outside one. The engine's
  `pick_device` follows it, so a trial trains where Ray placed it and never on a GPU given to another trial.
- `staging_lock(folder, name)`: an inter-process lock on a file inside `folder`, for one-time staging work
  (a dataset download) that several processes, or several nodes sharing one NFS/EFS data dir, may start at once.
  `filelock` uses flock(); Linux NFS clients (v4, EFS) turn that into POSIX locks the server enforces, so the
  lock holds across nodes too. Whoever gets the lock second finds the work done and skips it.

The cluster itself (cloud and on-premises launcher configs, submitting a study, node loss) is described in
README.md, section "On a cluster", and in cluster.yaml.
"""
from __future__ import annotations

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
