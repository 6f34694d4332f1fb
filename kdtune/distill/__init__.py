"""Distillation methods. Each module adds one method; the engine treats them all alike. A user's own method is
a subclass of `Method` named as `package.module:Class` (kdtune/distill/registry.py)."""
from __future__ import annotations

from kdtune.distill.adversarial import ConditionalAdversarial
from kdtune.distill.at import AttentionTransfer
from kdtune.distill.crd import ContrastiveRD
from kdtune.distill.ctkd import CurriculumTemperatureKD
from kdtune.distill.dist import DISTMethod
from kdtune.distill.dkd import DecoupledKD
from kdtune.distill.rkd import RelationalKD
from kdtune.distill.adversarial_pretrained import PretrainedDiscriminator
from kdtune.distill.base import Method, NoDistillation, Outputs, Stage
from kdtune.distill.fsp import FlowOfSolution
from kdtune.distill.hints import Hints
from kdtune.distill.kd import KnowledgeDistillation
from kdtune.distill.links import MultiLayerLinks
from kdtune.distill.registry import (method_class, method_names, register_method, user_module,
                                     trial_config)

for _method in (NoDistillation, KnowledgeDistillation, MultiLayerLinks, Hints, FlowOfSolution,
                ConditionalAdversarial, PretrainedDiscriminator, AttentionTransfer, RelationalKD, ContrastiveRD,
                DecoupledKD, DISTMethod, CurriculumTemperatureKD):
    register_method(_method)

__all__ = ["Method", "Outputs", "Stage", "method_class", "method_names", "register_method",
           "trial_config", "user_module"]
