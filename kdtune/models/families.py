"""Model families with size knobs, written as a reference: `FAMILY:knob=value,knob=value`.

    vgg:blocks=8x16x16,fc=32,width=0.5   one 3x3 conv per block (then a 2x2 max-pool), hidden FC widths, all
                                         multiplied by `width`; defaults: VGG-7 (64x128x256x512x512, fc 4096)
                                         links as VGG-7 (seed 000): k = block k, blocks+1 = the last hidden FC
    cnn:blocks=32x64,fc=56,width=1       seed 001's CNNs (defaults: the 2-block student), links as seed 001:
                                         k = block k (1..4), 5 = the last hidden FC
    mlp:hidden=800x800,width=1           seed 004's MLPs (defaults: the MNIST student), link k = hidden layer k
    wrn:depth=10,widen=4,dropout=0.3     seed 003's wide ResNets (defaults: the CIFAR student), links 1-3
    resnet:depth=8                       seed 002's CIFAR ResNets (6n+2 layers), links 1-6

A knob left out takes the family's default; the reference's text (its `spec`) lists only the knobs given, in
the family's order, so the same network always has the same text. Widths are rounded, at least 1. Numbered
links mean the same place in every member of a family, so a link set chosen for one member maps onto the
others; their channel counts differ, which the 1x1 adapters follow (built from the real feature shapes).

`expand_family("wrn", {"depth": [10, 16], "widen": [1, 2]})` lists the references of every combination: a
study searches a family as one categorical dimension over these references.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from kdtune.errors import ConfigError

MAX_FAMILY_MEMBERS = 64


def _widths(text: str) -> list[int]:
    parts = str(text).lower().split("x")
    values = [int(p) for p in parts]
    if not values or any(v < 1 for v in values):
        raise ValueError
    return values


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError
    return value


def _flag(text: str) -> int:
    if str(text) not in ("0", "1"):
        raise ValueError
    return int(text)


def _int(text: str) -> int:
    value = float(text)
    if not value.is_integer() or value < 1:
        raise ValueError
    return int(value)


@dataclass(frozen=True)
class Knob:
    parse: Callable[[str], Any]
    default: Any
    what: str  # what a value looks like, for messages


def _scaled(values: list[int], width: float) -> list[int]:
    return [max(1, round(v * width)) for v in values]


def _build_vgg() -> Callable:
    def build(knobs: dict, num_classes: int, input_shape) -> nn.Module:
        from kdtune.models.vgg import VGG

        stages = [[w] for w in _scaled(knobs["blocks"], knobs["width"])]
        return VGG(stages, _scaled(knobs["fc"], knobs["width"]), num_classes, tuple(input_shape),
                   batch_norm=bool(knobs["bn"]))

    return build


def _vgg_links(knobs: dict) -> dict[int, str]:
    from kdtune.models.vgg import vgg_link_points

    return vgg_link_points(len(knobs["blocks"]), len(knobs["fc"]))


def _cnn_links(knobs: dict) -> dict[int, str]:
    from kdtune.models.cnn import cnn_link_points

    return cnn_link_points(len(knobs["blocks"]), len(knobs["fc"]))


def _build_mlp(knobs, num_classes, input_shape):
    from kdtune.models.mlp import MLP

    return MLP(_scaled(knobs["hidden"], knobs["width"]), num_classes, tuple(input_shape), dropout=knobs["dropout"])


def _mlp_links(knobs):
    from kdtune.models.mlp import mlp_link_points

    return mlp_link_points(len(knobs["hidden"]))


def _check_wrn(knobs):
    if knobs["depth"] < 10 or (knobs["depth"] - 4) % 6:
        return f"depth={knobs['depth']}: a WRN has 6n+4 layers (10, 16, 22, 28, 40, ...)"
    return None


def _build_wrn(knobs, num_classes, input_shape):
    from kdtune.models.wrn import WideResNet

    return WideResNet(knobs["depth"], knobs["widen"], num_classes, tuple(input_shape), dropout=knobs["dropout"])


def _wrn_links(knobs):
    from kdtune.models.wrn import WRN_LINK_POINTS

    return dict(WRN_LINK_POINTS)


def _check_resnet(knobs):
    if knobs["depth"] < 8 or (knobs["depth"] - 2) % 6:
        return f"depth={knobs['depth']}: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 26, 32, ...)"
    return None


def _build_resnet(knobs, num_classes, input_shape):
    from kdtune.models.resnet import CifarResNet

    return CifarResNet(knobs["depth"], num_classes, tuple(input_shape))


def _resnet_links(knobs):
    from kdtune.models.resnet import RESNET_LINK_POINTS

    return dict(RESNET_LINK_POINTS)


@dataclass(frozen=True)
class Family:
    knobs: dict[str, Knob]
    build: Callable
    links: Callable
    check: Callable | None = None
    description: str = ""


WIDTHS = "widths joined by x, e.g. 8x16x16"
_WIDTH = Knob(_positive, 1.0, "a multiplier > 0, e.g. 0.5")
FAMILIES: dict[str, Family] = {
    "vgg": Family({"blocks": Knob(_widths, [64, 128, 256, 512, 512], WIDTHS), "fc": Knob(_widths, [4096], WIDTHS),
                   "width": _WIDTH, "bn": Knob(_flag, 0, "0 or 1")},
                  _build_vgg(), _vgg_links, description="VGG, one conv per block (VGG-7 by default)"),
    "cnn": Family({"blocks": Knob(_widths, [32, 64], WIDTHS), "fc": Knob(_widths, [56], WIDTHS), "width": _WIDTH,
                   "bn": Knob(_flag, 0, "0 or 1")},
                  _build_vgg(), _cnn_links, description="seed 001 CNN (2-block student by default)"),
    "mlp": Family({"hidden": Knob(_widths, [800, 800], WIDTHS), "width": _WIDTH,
                   "dropout": Knob(_fraction, 0.0, "a fraction in [0, 1)")},
                  _build_mlp, _mlp_links, description="seed 004 MLP (2x800 by default)"),
    "wrn": Family({"depth": Knob(_int, 10, "6n+4: 10, 16, 22, ..."), "widen": Knob(_int, 4, "a whole number >= 1"),
                   "dropout": Knob(_fraction, 0.3, "a fraction in [0, 1)")},
                  _build_wrn, _wrn_links, _check_wrn, description="seed 003 WRN-d-k (WRN-10-4 by default)"),
    "resnet": Family({"depth": Knob(_int, 8, "6n+2: 8, 14, 20, ...")}, _build_resnet, _resnet_links, _check_resnet,
                     description="seed 002 CIFAR ResNet (ResNet-8 by default)"),
}


def is_family_ref(text: str) -> bool:
    prefix, sep, rest = text.partition(":")
    return bool(sep) and prefix in FAMILIES and ("=" in rest or rest == "")


def _format(value) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_family(text: str) -> tuple[str, dict, str]:
    """(family, every knob's value, canonical text) of `FAMILY:knob=value,...`; a ConfigError names what is wrong."""
    name, _, rest = text.strip().partition(":")
    family = FAMILIES[name]
    given: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        knob, sep, value = part.partition("=")
        knob = knob.strip()
        if not sep or knob not in family.knobs:
            raise ConfigError(f"model {text!r}: {knob!r} is not a knob of family {name}; allowed: "
                              + ", ".join(f"{k} ({v.what})" for k, v in family.knobs.items()))
        if knob in given:
            raise ConfigError(f"model {text!r}: knob {knob!r} is given twice")
        try:
            given[knob] = family.knobs[knob].parse(value.strip())
        except (ValueError, TypeError):
            raise ConfigError(f"model {text!r}: {knob}={value.strip()!r} is not allowed; {knob} takes "
                              f"{family.knobs[knob].what}") from None
    values = {k: given.get(k, knob.default) for k, knob in family.knobs.items()}
    problem = family.check(values) if family.check else None
    if problem:
        raise ConfigError(f"model {text!r}: {problem}")
    canonical = f"{name}:" + ",".join(f"{k}={_format(given[k])}" for k in family.knobs if k in given)
    return name, values, canonical


def expand_family(name: str, choices: dict[str, list]) -> list[str]:
    """The references of every combination of the knobs' choices, e.g. {"depth": [10, 16], "widen": [1, 2]}."""
    if name not in FAMILIES:
        raise ConfigError(f"family {name!r}: unknown; allowed: {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    for knob, values in choices.items():
        if knob not in family.knobs:
            raise ConfigError(f"family {name}: {knob!r} is not a knob; allowed: " + ", ".join(
                f"{k} ({v.what})" for k, v in family.knobs.items()))
        if not values:
            raise ConfigError(f"family {name}: knob {knob} has no values")
    keys = list(choices)
    combos = list(itertools.product(*(choices[k] for k in keys)))
    if len(combos) > MAX_FAMILY_MEMBERS:
        raise ConfigError(f"family {name}: {len(combos)} combinations of knob values; at most "
                          f"{MAX_FAMILY_MEMBERS} (give fewer values per knob)")
    refs = []
    for combo in combos:
        text = f"{name}:" + ",".join(f"{k}={_format(v) if not isinstance(v, str) else v}" for k, v in zip(keys, combo))
        refs.append(parse_family(text)[2])
    return list(dict.fromkeys(refs))


def family_help() -> str:
    return "; ".join(f"{n}: {f.description}, knobs " + ", ".join(f.knobs) for n, f in FAMILIES.items())

