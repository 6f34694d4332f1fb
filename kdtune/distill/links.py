"""Seed 000's multi-layer transfer: KD plus beta * sum of MSE over linked intermediate layers.

The soft term is kd's (alpha * S * KL, S = T^2 under soft_scale="T2", 1 under "none", seed 000's own form).

Where a linked pair differs in width, a 1x1 convolution (or a linear map for FC links) adapts the student
feature to the teacher's width before the MSE; where widths match (VGG-7 vs VGG-16) no adapter is added.
Linked maps whose height and width differ are refused (link_spatial='refuse', the default, naming both
shapes), or the student's map is bilinearly resized to the teacher's before the adapter
(link_spatial='interpolate'): an explicit choice, because resizing changes what the student is asked to match.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from kdtune.config import TrialConfig
from kdtune.distill.kd import BETA, LINKS, KnowledgeDistillation
from kdtune.distill.losses import feature_mse
from kdtune.distill.base import READS_FEATURES, READS_LOGITS, Outputs
from kdtune.errors import ConfigError


def adapter_key(link: str) -> str:
    """A link as a ModuleDict key (which may not contain '.')."""
    return re.sub(r"[^0-9A-Za-z_]", "_", link)


class Resize(nn.Module):
    """Resize of a feature map to the teacher's height and width (bilinear) or a signal to its length (linear),
    for link_spatial='interpolate'."""

    def __init__(self, size: tuple[int, ...]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        mode = "bilinear" if len(self.size) == 2 else "linear"
        return nn.functional.interpolate(feature, size=self.size, mode=mode, align_corners=False)


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, link: str, always: bool = False,
                 spatial: str = "refuse") -> nn.Module:
    """Identity when shapes match (unless `always`); a 1x1 conv (maps) or linear layer (vectors) otherwise."""
    student, teacher = tuple(student_shape[1:]), tuple(teacher_shape[1:])
    if student == teacher and not always:
        return nn.Identity()
    if len(student) == len(teacher) and len(student) in (2, 3):  # C x H x W maps, or C x L signals
        conv = nn.Conv2d if len(student) == 3 else nn.Conv1d
        widths = conv(student[0], teacher[0], kernel_size=1) if student[0] != teacher[0] or always else None
        if student[1:] == teacher[1:]:
            return widths
        if spatial == "interpolate":
            return nn.Sequential(Resize(teacher[1:]), *([widths] if widths is not None else []))
        what, thing = ("height/width", "map") if len(student) == 3 else ("length", "signal")
        raise ConfigError(
            f"link {link}: student feature {student} and teacher feature {teacher} differ in {what}; "
            f"set link_spatial=interpolate to resize the student's {thing}, or link layers of equal {what}")
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    raise ConfigError(
        f"link {link}: student feature {student} and teacher feature {teacher} cannot be joined by an adapter "
        "(a 1x1 convolution joins two C x H x W or two C x L maps, a linear layer two vectors); link layers of the "
        "same kind")


class MultiLayerLinks(KnowledgeDistillation):
    """Seed 000's multi-layer transfer: KD + beta * sum of MSE over linked layers (1x1 adapters where widths differ)."""

    name = "links"
    reads = frozenset({READS_LOGITS, READS_FEATURES})
    params = KnowledgeDistillation.params + (BETA, LINKS)
    paper = "seed 000: multi-layer knowledge transfer (VGG-16 -> VGG-7, CIFAR-10)"

    @classmethod
    def check_config(cls, config: TrialConfig) -> None:
        super().check_config(config)
        if not config.links:
            raise ConfigError("links='': method 'links' needs at least one link, e.g. links='2,3,4,5'")

    def link_keys(self) -> tuple[str, ...]:
        return self.config.links

    def setup(self, student_shapes, teacher_shapes, num_classes=None) -> None:
        self.adapters = nn.ModuleDict({
            adapter_key(k): make_adapter(student_shapes[k], teacher_shapes[k], k, spatial=self.config.link_spatial)
            for k in self.config.links})

    def losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        terms = super().losses(out)
        if not self.term_on("intermediate"):
            return terms
        total = sum(
            feature_mse(self.adapters[adapter_key(k)](out.student_features[k]), out.teacher_features[k])
            for k in self.config.links
        )
        terms["intermediate"] = self.config.beta * total
        return terms
