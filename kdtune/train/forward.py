"""Forwards outside a plain `model(images)`: a partial forward that stops once the linked features are caught
(`run_until`), and the shared teacher forward of fused students (`TeacherPass`, `teacher_pass`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kdtune import models

if TYPE_CHECKING:
    from kdtune.train.trainer import Trainer


class TeacherPass:
    """One teacher forward on a batch, run once for several fused students (kdtune/train/fusion.py): its logits (None
    when it stopped at the last module the students' stages need) and each student's linked features, which that
    student's own FeatureTap on the shared teacher caught during the forward. Features several students link to
    are copied out of inference mode once, not once per student."""

    def __init__(self, logits: torch.Tensor | None):
        self.logits = logits
        self._copies: dict[int, torch.Tensor] = {}

    def features(self, tap: models.FeatureTap) -> dict[int, torch.Tensor]:
        out = {}
        for key, value in tap.features.items():
            if id(value) not in self._copies:  # inference tensors cannot enter autograd: a plain copy
                self._copies[id(value)] = value.clone()
            out[key] = self._copies[id(value)]
        return out


def teacher_pass(teacher: nn.Module, images: torch.Tensor, lead: "Trainer", stop_at: list[nn.Module]) -> TeacherPass:
    """The shared teacher forward of a fused step, as `lead` (any member: they share precision and layout) runs it."""
    if lead.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), lead._autocast():
        logits = run_until(teacher, images, stop_at)
    return TeacherPass(None if logits is None else logits.clone())


class _StopForward(Exception):
    """Raised by a forward hook once every feature a partial forward needs is captured (caught in run_until)."""


def run_until(model: nn.Module, images: torch.Tensor, stop_at: list[nn.Module]) -> torch.Tensor | None:
    """model(images), or, with modules in `stop_at`, its forward up to the moment each of them has run once:
    returns None then (no logits). The FeatureTap hooks on those modules were registered first, so they have
    stored their features when the stop hook, registered here, runs."""
    if not stop_at:
        return model(images)
    waiting = set(range(len(stop_at)))

    def hook(index):
        def stop(_module, _inputs, _output):
            waiting.discard(index)
            if not waiting:
                raise _StopForward
        return stop

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(stop_at)]
    try:
        return model(images)  # reached only if some module of stop_at did not run: the whole forward ran
    except _StopForward:
        return None
    finally:
        for handle in handles:
            handle.remove()
