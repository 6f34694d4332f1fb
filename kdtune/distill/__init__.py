"""Distillation methods by name. Each module adds one method; the engine treats them all alike."""
from __future__ import annotations

from kdtune.distill.adversarial import ConditionalAdversarial
from kdtune.distill.adversarial_pretrained import PretrainedDiscriminator
from kdtune.distill.base import Method, NoDistillation, Outputs, Stage
from kdtune.distill.fsp import FlowOfSolution
from kdtune.distill.hints import Hints
from kdtune.distill.kd import KnowledgeDistillation
from kdtune.distill.links import MultiLayerLinks
from kdtune.errors import ConfigError

_METHODS: dict[str, type[Method]] = {m.name: m for m in (
    NoDistillation, KnowledgeDistillation, MultiLayerLinks, Hints, FlowOfSolution, ConditionalAdversarial,
    PretrainedDiscriminator,
)}


def register_method(cls: type[Method]) -> None:
    _METHODS[cls.name] = cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ConfigError(f"method={name!r}: unknown; allowed: {', '.join(method_names())}")
    return _METHODS[name]


__all__ = ["Method", "Outputs", "Stage", "method_class", "method_names", "register_method"]
