"""Process-wide torch settings a Trainer changes: deterministic algorithms, cudnn's flags, CUBLAS_WORKSPACE_CONFIG.

    configure_backends(config, device)   apply a Trainer's request (kdtune/config.py, deterministic); returns the
                                         function that withdraws it (Trainer.close)
    trial_settings(threads)              a context: what a trial changes process-wide, put back when it ends
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch

from kdtune.config import TrialConfig

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


class _Request:
    """What one open Trainer asks of the backends; held by its restore function only, so a Trainer dropped
    without close() stops asking once it is garbage-collected."""

    __slots__ = ("deterministic", "device_type", "__weakref__")

    def __init__(self, deterministic: bool, device_type: str):
        self.deterministic, self.device_type = deterministic, device_type


# The Trainers open in this process (their requests), and the process's own settings from before the first of them
# opened: fused members open and close one at a time.
_OPEN_TRAINERS: "weakref.WeakKeyDictionary[_Request, bool]" = weakref.WeakKeyDictionary()
_PROCESS_BACKENDS: tuple = ()


def _backends() -> tuple:
    cudnn = torch.backends.cudnn
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn.deterministic, cudnn.benchmark)


def _set_backends(state: tuple) -> None:
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]


def _apply_backends() -> None:
    """The settings the open trainers ask for, on top of the process's own: deterministic while any of them is."""
    own = _PROCESS_BACKENDS
    asked = list(_OPEN_TRAINERS)
    if any(request.deterministic for request in asked):
        os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")
        _set_backends((True, False, True, False))
        return
    _set_backends(own)
    if any(request.device_type == "cuda" for request in asked) and not (own[0] or own[2]):
        torch.backends.cudnn.benchmark = True


def configure_backends(config: TrialConfig, device: torch.device):
    """Set the trial's determinism / cudnn choices (kdtune/config.py, deterministic); return what undoes them
    (Trainer.close), so a reused Ray actor's next trial starts from the process's own settings.

    deterministic=True: torch.use_deterministic_algorithms(True, warn_only=False), cudnn.deterministic=True,
    cudnn.benchmark=False, and CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset (deterministic cuBLAS needs it; it
    takes effect if the process has not used cuBLAS yet, so set it yourself for scripts that have).
    deterministic=False on CUDA: cudnn.benchmark=True (fixed-shape CNN training: the fastest algorithms),
    unless deterministic algorithms are already on in this process.

    Several trainers may be open at once (fused members, kdtune/train/fusion.py), and they close in any order (a hints
    member trains on alone after the others): the settings follow every open trainer's request (deterministic
    while any of them asks for it), and the process's own settings, read when the first of them opened, come back
    when the last one closes. A trial also restores them whatever happens (`trial_settings`).
    """
    global _PROCESS_BACKENDS
    if not _OPEN_TRAINERS:
        _PROCESS_BACKENDS = _backends()
    request = _Request(bool(config.deterministic), device.type)
    _OPEN_TRAINERS[request] = True
    _apply_backends()

    def restore() -> None:
        if _OPEN_TRAINERS.pop(request, None) is None:
            return  # closed already, or its trial's end put the process back (trial_settings)
        if _OPEN_TRAINERS:
            _apply_backends()
        else:
            _set_backends(_PROCESS_BACKENDS)

    return restore


@contextmanager
def trial_settings(threads: int):
    """The process-wide settings a trial (or a teacher task) changes, put back when it ends, also when it fails:
    torch's thread count (set to `threads` here), deterministic algorithms and cudnn's flags (each Trainer's
    configure_backends), CUBLAS_WORKSPACE_CONFIG. Ray reuses a trial's process for the next trial
    (reuse_actors): without this, a trial whose Trainers were never closed (a member that diverged, an error)
    would hand its deterministic kernels to the next one."""
    open_before = set(_OPEN_TRAINERS)
    backends, workspace, own_threads = _backends(), os.environ.get(CUBLAS_WORKSPACE), torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        for request in set(_OPEN_TRAINERS) - open_before:  # this trial's trainers: none of them asks anything now
            _OPEN_TRAINERS.pop(request, None)
        _set_backends(backends)
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)
        else:
            os.environ[CUBLAS_WORKSPACE] = workspace
        torch.set_num_threads(own_threads)
