"""`staging_lock(folder, name)`: an inter-process lock on a file inside `folder`, for one-time staging work
(a dataset download) that several processes, or several nodes sharing one NFS/EFS data dir, may start at once.
`filelock` uses flock(); Linux NFS clients (v4, EFS) turn that into POSIX locks the server enforces, so the
lock holds across nodes too. Whoever gets the lock second finds the work done and skips it.
Core: no framework (filelock only).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_TIMEOUT_S = 6 * 3600.0  # a CIFAR download over a slow link; a lock held longer than this is a hung process


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
