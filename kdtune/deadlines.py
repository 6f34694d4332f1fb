"""A call that must answer in time: a server that does not answer (a wrong endpoint, a database behind a
firewall, an object store) is reported as one line instead of hanging the study. Core: no framework."""
from __future__ import annotations

import threading


def with_deadline(fn, timeout_s: float, timeout_error: Exception):
    """fn()'s value, or its exception, or `timeout_error` when it has not answered within `timeout_s`: a
    server that does not answer (a wrong endpoint, a database behind a firewall) is reported in time."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise timeout_error
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
