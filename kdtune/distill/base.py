"""What every distillation method shares: the weighted hard term, the stage list, the parameter hook.

A method is an nn.Module (so its extra trainable parts, such as 1x1 adapters, are saved and optimised with
the student). Given one batch's outputs it returns a dict of named loss terms, each already multiplied by its
weight; the engine sums them and logs each term per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdtune.config import TrialConfig
from kdtune.distill.losses import hard_loss
from kdtune.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """A span of epochs with some loss terms on. Two-stage methods (hints, FSP) return two."""

    name: str
    epochs: int
    terms: frozenset[str] | None = None  # None: every term the method has


@dataclass
class Outputs:
    """One batch as the method sees it."""

    labels: torch.Tensor
    indices: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[int, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    name = "none"
    needs_teacher = False
    links_allowed = False

    def __init__(self, config: TrialConfig):
        super().__init__()
        self.config = config

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        if config.links and not cls.links_allowed:
            raise ConfigError(
                f"links={','.join(map(str, config.links))}: method {cls.name!r} uses no links; "
                "use method='links' (or leave links empty)"
            )

    @property
    def needs_teacher_features(self) -> bool:
        """Methods that read teacher features cannot use cached teacher logits."""
        return bool(self.link_numbers())

    def link_numbers(self) -> tuple[int, ...]:
        return ()

    def setup(self, student_shapes: dict[int, torch.Size], teacher_shapes: dict[int, torch.Size]) -> None:
        """Create extra modules once the feature shapes are known (called before the optimiser is built)."""

    def stages(self) -> list[Stage]:
        return [Stage("main", self.config.epochs)]

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {"hard": self.hard_weight * hard_loss(out.student_logits, out.labels)}

    @property
    def hard_weight(self) -> float:
        return 1.0


class NoDistillation(Method):
    """The baseline student: hard labels only, weight 1."""

    name = "none"
