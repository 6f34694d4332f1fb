"""Process-wide settings changed for the length of a block, then the caller's given back.

kdtune runs inside users' scripts (`run_study`, the report): it may quiet a library's chatter while it works
(Optuna's "A new study created" line for each sampled space) or point a library at its own server, never leave
the user's settings changed.
"""
from __future__ import annotations

import contextlib
import logging
import os


@contextlib.contextmanager
def logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def environment_restored(keys):
    """The variables `keys` as they were before the block (set, changed or removed inside it)."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
