"""An ensemble teacher as one module: its members' logits stacked, (members, N, C); each trial's method forms
its soft targets from them (kdtune/distill/losses.py ensemble_logits; the study side is kdtune/ensemble.py)."""
from __future__ import annotations

import torch
from torch import nn

from kdtune.errors import ConfigError


class EnsembleTeacher(nn.Module):
    """Members of one architecture (or any); forward returns their logits stacked: (members, N, C)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ConfigError(f"an ensemble teacher needs 2 or more members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members])
