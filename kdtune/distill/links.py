"""Seed 000's multi-layer transfer: KD plus beta * sum of MSE over linked intermediate layers.

Where a linked pair differs in width, a 1x1 convolution (or a linear map for FC links) adapts the student
feature to the teacher's width before the MSE; where widths match (VGG-7 vs VGG-16) no adapter is added.
"""
from __future__ import annotations

import torch
from torch import nn

from kdtune.config import TrialConfig
from kdtune.distill.kd import KnowledgeDistillation
from kdtune.distill.losses import feature_mse
from kdtune.distill.base import Outputs
from kdtune.errors import ConfigError


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, link: int, always: bool = False) -> nn.Module:
    """Identity when shapes match (unless `always`); a 1x1 conv (maps) or linear layer (vectors) otherwise."""
    if student_shape[1:] == teacher_shape[1:] and not always:
        return nn.Identity()
    if len(student_shape) == 4 and len(teacher_shape) == 4 and student_shape[2:] == teacher_shape[2:]:
        return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
    if len(student_shape) == 2 and len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    raise ConfigError(
        f"link {link}: student feature {tuple(student_shape[1:])} and teacher feature "
        f"{tuple(teacher_shape[1:])} differ in spatial size; only widths can be adapted"
    )


class MultiLayerLinks(KnowledgeDistillation):
    name = "links"
    uses_fields = frozenset({"links"})

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        super().check_config(config)
        if not config.links:
            raise ConfigError("links='': method 'links' needs at least one link, e.g. links='2,3,4,5'")
        if config.beta <= 0:
            raise ConfigError(f"beta={config.beta}: method 'links' needs beta > 0 (the intermediate weight)")

    def link_numbers(self) -> tuple[int, ...]:
        return self.config.links

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        self.adapters = nn.ModuleDict(
            {str(k): make_adapter(student_shapes[k], teacher_shapes[k], k) for k in self.config.links}
        )

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = super().losses(out)
        if not self.term_on("intermediate"):
            return terms
        total = sum(
            feature_mse(self.adapters[str(k)](out.student_features[k]), out.teacher_features[k])
            for k in self.config.links
        )
        terms["intermediate"] = self.config.beta * total
        return terms
