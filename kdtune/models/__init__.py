"""Model registry: build a model from its name, the number of classes and the input shape.

Each registered model declares its link points: link number -> module name whose output is the linked
feature. Features are captured with forward hooks (`FeatureTap`), so any nn.Module, a torchvision one
included, can be linked by naming its modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kdtune.errors import ConfigError
from kdtune.models.vgg import VGG, VGG7_STAGES, VGG16_STAGES, vgg_link_points


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int, tuple[int, int, int]], nn.Module]
    link_points: dict[int, str]
    description: str


def _vgg(stages, hidden, batch_norm=False) -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: VGG(stages, hidden, num_classes, shape, batch_norm=batch_norm),
        link_points=vgg_link_points(len(stages), len(hidden)),
        description=f"VGG {stages} FC {hidden}" + (" with BatchNorm" if batch_norm else ""),
    )


_MODELS: dict[str, ModelSpec] = {
    # Seed 000 Table 1, sized for 32x32 inputs (five pools leave 1x1x512 before the FC layers).
    "vgg16": _vgg(VGG16_STAGES, [4096, 4096]),
    "vgg7": _vgg(VGG7_STAGES, [4096]),
    "vgg16_bn": _vgg(VGG16_STAGES, [4096, 4096], batch_norm=True),
    "vgg7_bn": _vgg(VGG7_STAGES, [4096], batch_norm=True),
    # A pair sized for 8x8 digits with the same link structure (3 conv stages + 1 hidden FC = links 1-4).
    "digits_teacher": _vgg([[32, 32], [64, 64], [128]], [256]),
    "digits_student": _vgg([[8], [16], [16]], [32]),
    # between the two in size: the teacher assistant of a digits chain (seed 001 section 3.2)
    "digits_assistant": _vgg([[16], [32], [64]], [64]),
}


def register_model(name: str, spec: ModelSpec) -> None:
    _MODELS[name] = spec


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ConfigError(f"model={name!r}: unknown; allowed: {', '.join(model_names())}")
    return _MODELS[name]


def build_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return model_spec(name).build(num_classes, tuple(input_shape))


def check_links(teacher: str, student: str, links: tuple[int, ...]) -> None:
    """Every link must exist in both models."""
    teacher_points = model_spec(teacher).link_points
    student_points = model_spec(student).link_points
    common = sorted(set(teacher_points) & set(student_points))
    for link in links:
        if link not in common:
            raise ConfigError(
                f"links={','.join(map(str, links))}: link {link} is not a link point of both {teacher} and {student}; "
                f"allowed: {', '.join(map(str, common)) or 'none'}"
            )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FeatureTap:
    """Captures the outputs of named modules on every forward pass (via forward hooks)."""

    def __init__(self, model: nn.Module, module_names: dict[int, str]):
        modules = dict(model.named_modules())
        self.features: dict[int, torch.Tensor] = {}
        self._handles = []
        for key, name in module_names.items():
            if name not in modules:
                raise ConfigError(f"link point {key}: module {name!r} not found in {type(model).__name__}")
            self._handles.append(modules[name].register_forward_hook(self._hook(key)))

    def _hook(self, key: int):
        def store(_module, _inputs, output):
            self.features[key] = output

        return store

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
