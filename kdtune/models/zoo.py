"""The model zoo: build a model from its name, the number of classes and the input shape.

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
from kdtune.models import cnn
from kdtune.models.mlp import MLP, mlp_link_points
from kdtune.models.mobilenet import MOBILENET_LINK_POINTS, MobileNetV2
from kdtune.models.resnet import RESNET_LINK_POINTS, RESNET_X4, X4_LINK_POINTS, CifarResNet, resnet_x4
from kdtune.models.shufflenet import SHUFFLENET_LINK_POINTS, ShuffleNetV2
from kdtune.models.wrn import CIFAR_KD_WRNS, KD_WRN_LINK_POINTS, WRN_LINK_POINTS, WideResNet


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


def _cnn(stages, hidden, batch_norm=False, what="") -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: VGG(stages, hidden, num_classes, shape, batch_norm=batch_norm),
        link_points=cnn.cnn_link_points(len(stages), len(hidden)),
        description=f"seed 001 {what}: conv {stages} FC {hidden}" + (" with BatchNorm" if batch_norm else ""),
    )


def _mlp(hidden, what, links=None) -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: MLP(hidden, num_classes, shape),
        link_points=links or mlp_link_points(len(hidden)),
        description=f"{what}: MLP with hidden ReLU layers {hidden} on the flattened input",
    )


def _resnet(depth) -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: CifarResNet(depth, num_classes, shape),
        link_points=dict(RESNET_LINK_POINTS),
        description=f"seed 002: CIFAR ResNet-{depth} (He et al.), links at section starts/ends for FSP",
    )


def _wrn(depth, widen, dropout, what) -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: WideResNet(depth, widen, num_classes, shape, dropout=dropout),
        link_points=dict(WRN_LINK_POINTS),
        description=f"seed 003 {what}: WRN-{depth}-{widen}" + (f" with dropout {dropout}" if dropout else ""),
    )


def _resnet_x4(depth) -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: resnet_x4(depth, num_classes, shape),
        link_points=dict(X4_LINK_POINTS),
        description=f"CIFAR-100 KD benchmark (CRD / RepDistiller): ResNet-{depth}x4, channels 32-64-128-256, "
                    "links 1-3 = section ends, 4 = embedding",
    )


def _kd_wrn(depth, widen) -> ModelSpec:
    return ModelSpec(
        build=lambda num_classes, shape: WideResNet(depth, widen, num_classes, shape, embedding=True),
        link_points=dict(KD_WRN_LINK_POINTS),
        description=f"CIFAR-100 KD benchmark (CRD / RepDistiller): WRN-{depth}-{widen}, links 1-3 = group outputs, "
                    "4 = embedding",
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
    # Seed 001 §3 (widths in kdtune/models/cnn.py): links 1-4 = conv blocks, 5 = last hidden dense layer.
    "cnn11": _cnn(cnn.TEACHER_STAGES, cnn.TEACHER_HIDDEN, what="teacher"),
    "cnn11_bn": _cnn(cnn.TEACHER_STAGES, cnn.TEACHER_HIDDEN, batch_norm=True, what="teacher"),
    "cnn2": _cnn(cnn.STUDENT2_STAGES, cnn.STUDENT2_HIDDEN, what="2-block student / teacher assistant"),
    "cnn1": _cnn(cnn.STUDENT1_STAGES, cnn.STUDENT1_HIDDEN, what="1-block student"),
    "dense_student": _mlp(cnn.DENSE_HIDDEN, "seed 001 dense student", {cnn.DENSE_LINK: f"hidden{len(cnn.DENSE_HIDDEN)}"}),
    # Seed 004 §4: link k = hidden layer k.
    "mlp_2x1200": _mlp([1200, 1200], "seed 004 MNIST teacher"),
    "mlp_2x800": _mlp([800, 800], "seed 004 MNIST student"),
    "mlp_3x1200": _mlp([1200, 1200, 1200], "seed 004 notMNIST teacher"),
    "mlp_3x800": _mlp([800, 800, 800], "seed 004 notMNIST student"),
    "mlp_2x4096": _mlp([4096, 4096], "seed 004 SVHN teacher (its sizes count svhn28 input)"),
    "mlp_2x3072": _mlp([3072, 3072], "seed 004 SVHN student (its sizes count svhn28 input)"),
    # Seed 002: links 1-6 = start/end of sections 1-3 (FSP pairs (1,2), (3,4), (5,6)).
    "resnet8": _resnet(8),
    "resnet26": _resnet(26),
    "resnet32": _resnet(32),
    # Seed 003: links 1-3 = group outputs; the students train with dropout 0.3 as in the paper.
    "wrn_40_10": _wrn(40, 10, 0.0, "teacher"),
    "wrn_22_4": _wrn(22, 4, 0.3, "ImageNet32 student"),
    "wrn_10_4": _wrn(10, 4, 0.3, "CIFAR student"),
    # the rule recipe's pair for samples that are not images (vectors, signals): kdtune/recipes.py
    "mlp_teacher": _mlp([512, 512], "rule-recipe teacher for non-image data"),
    "mlp_student": _mlp([64], "rule-recipe student for non-image data"),
    # between the two in size: the teacher assistant of a digits chain (seed 001 section 3.2)
    "digits_assistant": _vgg([[16], [32], [64]], [64]),
    # The CIFAR-100 KD benchmark's pairs (Tian et al., CRD, ICLR 2020; RepDistiller / mdistiller), under
    # RepDistiller's names (ShuffleV2 and MobileNetV2 lower-cased). Link 1..k = the end of each stage and the
    # last link = `embedding`, the pooled (N, D) vector the classifier reads (RKD / CRD features).
    **{name: _resnet_x4(depth) for name, depth in RESNET_X4.items()},
    **{name: _kd_wrn(depth, widen) for name, (depth, widen) in CIFAR_KD_WRNS.items()},
    "shufflenetv2": ModelSpec(
        build=lambda num_classes, shape: ShuffleNetV2(num_classes, shape),
        link_points=dict(SHUFFLENET_LINK_POINTS),
        description="CIFAR-100 KD benchmark (CRD / RepDistiller ShuffleV2): ShuffleNetV2 1x for 32x32, "
                    "links 1-3 = stage outputs, 4 = embedding",
    ),
    "mobilenetv2": ModelSpec(
        build=lambda num_classes, shape: MobileNetV2(num_classes, shape),
        link_points=dict(MOBILENET_LINK_POINTS),
        description="CIFAR-100 KD benchmark (CRD / RepDistiller MobileNetV2 = mobile_half): MobileNetV2 width 0.5, "
                    "links 1-4 = ends of the four resolution stages, 5 = embedding",
    ),
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


EMBEDDING_PATH = "@embedding"  # not a module: the (N, D) input of the model's last nn.Linear, its classifier


def classifier_path(model: nn.Module) -> str:
    """The module path of the model's last nn.Linear (whose input is the penultimate embedding RKD/CRD read)."""
    linear = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier, so it has no embedding to read "
                          "(methods rkd and crd read the input of the last linear layer)")
    return linear[-1]


class FeatureTap:
    """Captures the outputs of named modules on every forward pass (via forward hooks); EMBEDDING_PATH captures
    the input of the model's classifier, flattened to (N, D)."""

    def __init__(self, model: nn.Module, module_names: dict[int, str]):
        modules = dict(model.named_modules())
        self.features: dict[int, torch.Tensor] = {}
        self._handles = []
        for key, name in module_names.items():
            if name == EMBEDDING_PATH:
                classifier = modules[classifier_path(model)]
                self._handles.append(classifier.register_forward_pre_hook(self._input_hook(key)))
                continue
            if name not in modules:
                raise ConfigError(f"link point {key}: module {name!r} not found in {type(model).__name__}")
            self._handles.append(modules[name].register_forward_hook(self._hook(key)))

    def _hook(self, key: int):
        def store(_module, _inputs, output):
            self.features[key] = output

        return store

    def _input_hook(self, key):
        def store(_module, inputs):
            self.features[key] = inputs[0].flatten(1)

        return store

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
