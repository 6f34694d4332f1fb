"""A library's logger at another level for the length of a block, then the caller's level back.

kdtune runs inside users' scripts (`run_study`, the report): it may quiet a library's chatter while it works
(Optuna's "A new study created" line for each sampled space), never change the level the user set.
"""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(previous)
