"""Model references: resolve what the user named ONCE, in the driver, into a picklable object.

A `ModelRef` travels to Ray trials (pickle and cloudpickle) and builds the network there without looking a
name up again. The forms (`model_ref`):

  digits_student              a built-in model of kdtune's registry (keeps its numbered link points)
  torchvision:resnet18        a torchvision classification model, fitted to the dataset (head, input channels)
  timm:resnet18               timm.create_model(NAME, num_classes=..., in_chans=...)  (pip install 'kdtune[timm]')
  mypkg.models:tiny           a factory tiny(num_classes, input_shape) -> nn.Module, imported lazily
  an nn.Module instance       given in Python: every build is a deep copy (its weights come along)
  a callable                  given in Python: called like a factory, stored by value (cloudpickle)
"""
from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import os
import re
import sysconfig
from typing import Any, Callable

import torch
from torch import nn

from kdtune.errors import ConfigError
from kdtune.models.zoo import _MODELS, model_names, model_spec
from kdtune.models import pretrained as _pretrained
from kdtune.models.pretrained import one_line

MODEL_FORMS_HELP = (
    "a built-in model (kdtune models list), torchvision:NAME (a torchvision classification model), "
    "timm:NAME (needs pip install 'kdtune[timm]') or package.module:factory "
    "(a function (num_classes, input_shape) -> nn.Module)"
)
_OTHER_FORMS = "torchvision:NAME, timm:NAME, package.module:factory, or an nn.Module / factory given in Python"
_BUILTINS = dict(_MODELS)  # the registry as shipped: these names resolve the same in every process
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_IMAGE_SIZE_HINT = "pass --image-size (e.g. --image-size 224) for models that need larger images, or choose another model"


def _safe_name(text: str) -> str:
    """A name for an MLflow registered model: only [A-Za-z0-9_.-]."""
    return _SAFE.sub("-", text).strip("-") or "model"


def _shape(input_shape) -> tuple[int, ...]:
    return tuple(int(d) for d in input_shape)


class ModelRef:
    """A resolved model reference. Subclasses store only what pickles; `build` never looks a name up."""

    spec: str = ""
    name: str = ""
    link_points: dict[int, str]
    user_module: str | None = None

    def __init__(self, spec: str):
        self.spec = spec
        self.name = _safe_name(spec)
        self.link_points = {}
        self.user_module = None

    def build(self, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        """A fresh, randomly initialised network for the dataset."""
        raise NotImplementedError

    def build_pretrained(self, num_classes: int, input_shape: tuple[int, ...], *, role: str = "teacher") -> nn.Module:
        """Library weights with a new (random) head for num_classes."""
        raise ConfigError(
            f"{role} {self.spec}: has no library weights; pretrained weights exist for built-in "
            f"{', '.join(_pretrained.PRETRAINED_BUILTINS)}, torchvision:NAME and timm:NAME"
        )

    def resolve(self) -> Any:
        """Import what the ref names (factory refs); a ConfigError when that fails. Others: nothing to do."""
        return None

    def check(self, num_classes: int, input_shape: tuple[int, ...], *, role: str = "model") -> None:
        """Build once and forward a zero batch of 2 in eval mode: the output must be (2, num_classes)."""
        what = f"{role} {self.spec}"
        shape = _shape(input_shape)
        try:
            self.resolve()
            model = self.build(num_classes, shape)
        except ConfigError as exc:
            generic = f"model {self.spec}:"
            if role != "model" and str(exc).startswith(generic):  # say which model: teacher / student
                raise ConfigError(what + str(exc)[len(generic) - 1:]) from exc
            raise
        except Exception as exc:
            raise ConfigError(
                f"{what}: building it for {num_classes} classes and input shape {shape} failed ({one_line(exc)})"
            ) from exc
        model.eval()
        try:
            with torch.no_grad():
                output = model(torch.zeros(2, *shape))
        except Exception as exc:
            raise ConfigError(
                f"{what}: a forward pass of a zero batch of shape {(2, *shape)} failed ({one_line(exc)}); "
                f"the model does not take input shape {shape}: {_IMAGE_SIZE_HINT}"
            ) from exc
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"{what}: its forward pass returns {type(output).__name__}, not a tensor of logits (2, {num_classes}); "
                f"return the logits alone in eval mode"
            )
        if tuple(output.shape) != (2, num_classes):
            raise ConfigError(
                f"{what}: output shape {tuple(output.shape)} for input shape {(2, *shape)}, expected (2, {num_classes}); "
                f"the model must end in one logit per class (num_classes={num_classes})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def _key(self):
        return (type(self), self.spec)

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelRef) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class BuiltinRef(ModelRef):
    """A model of kdtune's registry, with its numbered link points."""

    def __init__(self, model: str):
        spec = model_spec(model)
        super().__init__(model)
        self.model = model
        self.link_points = dict(spec.link_points)
        # a model registered at run time (register_model) is not in a Ray worker's registry: carry its builder
        self._build = None if _BUILTINS.get(model) is spec else spec.build

    def build(self, num_classes, input_shape):
        if self._build is not None:
            return self._build(num_classes, _shape(input_shape))
        return _BUILTINS[self.model].build(num_classes, _shape(input_shape))

    def build_pretrained(self, num_classes, input_shape, *, role="teacher"):
        return _pretrained.builtin_pretrained(self.model, num_classes, _shape(input_shape), f"{role} {self.spec}")


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_other_kind(name: str) -> str | None:
    import torchvision.models as tvm

    for kind, module in (("detection", "detection"), ("segmentation", "segmentation"), ("video", "video"),
                         ("optical flow", "optical_flow"), ("quantized", "quantization")):
        if name in tvm.list_models(module=getattr(tvm, module)):
            return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} model (torchvision.models.{module})"
    return None


class TorchvisionRef(ModelRef):
    """torchvision:NAME, a classification model of torchvision.models, fitted to the dataset."""

    def __init__(self, model: str):
        names = _torchvision_names()
        if model not in names:
            other = _torchvision_other_kind(model)
            close = difflib.get_close_matches(model, names, n=5)
            why = (f"is {other}; kdtune takes the (float) classification models of torchvision.models" if other
                   else "is not a torchvision classification model")
            hint = f"close matches: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(names)[:6])}, ..."
            raise ConfigError(
                f"model torchvision:{model}: {why}; {hint} (all: torchvision.models.list_models(module=torchvision.models))"
            )
        super().__init__(f"torchvision:{model}")
        self.model = model

    def build(self, num_classes, input_shape):
        import torchvision

        channels = _shape(input_shape)[0]
        model = torchvision.models.get_model(
            self.model, weights=None, num_classes=num_classes, **_pretrained.torchvision_kwargs(self.model, channels))
        _pretrained.adapt_input_channels(model, channels, pretrained=False)
        return model

    def build_pretrained(self, num_classes, input_shape, *, role="teacher"):
        return _pretrained.torchvision_pretrained(self.model, num_classes, _shape(input_shape), f"{role} {self.spec}")


class TimmRef(ModelRef):
    """timm:NAME, built by timm.create_model for the dataset's classes and input channels."""

    def __init__(self, model: str):
        spec = f"timm:{model}"
        timm = _pretrained.import_timm(spec)
        is_model = getattr(timm, "is_model", None)
        if is_model is not None and not is_model(model):
            names = timm.list_models()
            close = difflib.get_close_matches(model, names, n=5)
            raise ConfigError(
                f"model {spec}: not a timm model; "
                + (f"close matches: {', '.join(close)}" if close else "list them with timm.list_models()")
            )
        super().__init__(spec)
        self.model = model

    def build(self, num_classes, input_shape):
        timm = _pretrained.import_timm(self.spec)
        return timm.create_model(self.model, pretrained=False, num_classes=num_classes, in_chans=_shape(input_shape)[0])

    def build_pretrained(self, num_classes, input_shape, *, role="teacher"):
        return _pretrained.timm_pretrained(self.model, num_classes, _shape(input_shape), f"{role} {self.spec}")


def _not_a_module(spec: str, made: Any) -> ConfigError:
    return ConfigError(
        f"model {spec}: the factory returned {type(made).__name__}, not an nn.Module; "
        f"it must return the network: factory(num_classes, input_shape) -> nn.Module"
    )


class FactoryRef(ModelRef):
    """package.module:factory: factory(num_classes, input_shape) -> nn.Module, imported when building."""

    def __init__(self, module: str, attribute: str):
        super().__init__(f"{module}:{attribute}")
        self.module = module
        self.attribute = attribute
        self.user_module = module.split(".")[0]

    def resolve(self) -> Callable[..., nn.Module]:
        try:
            found: Any = importlib.import_module(self.module)
        except Exception as exc:
            raise ConfigError(
                f"model {self.spec}: cannot import module {self.module!r} ({one_line(exc)}); check the name and that "
                f"it is importable here (pip install -e your package, or add its folder to PYTHONPATH)"
            ) from exc
        owner = self.module
        for part in self.attribute.split("."):
            if not hasattr(found, part):
                public = [n for n in dir(found) if not n.startswith("_")]
                close = difflib.get_close_matches(part, public, n=5, cutoff=0.5)
                callables = [n for n in public if callable(getattr(found, n, None))][:10]
                hint = (f"close names: {', '.join(close)}" if close
                        else f"its callables: {', '.join(callables)}" if callables else "it defines no callables")
                raise ConfigError(f"model {self.spec}: {owner!r} has no attribute {part!r}; {hint}")
            found = getattr(found, part)
            owner = f"{owner}.{part}"
        if not callable(found):
            raise ConfigError(
                f"model {self.spec}: {self.attribute!r} is a {type(found).__name__}, not callable; it must be a function "
                f"(num_classes, input_shape) -> nn.Module"
            )
        return found

    def build(self, num_classes, input_shape):
        made = self.resolve()(num_classes, _shape(input_shape))
        if not isinstance(made, nn.Module):
            raise _not_a_module(self.spec, made)
        return made


class ModuleRef(ModelRef):
    """An nn.Module instance given in Python: every build is a deep copy (weights included)."""

    def __init__(self, module: nn.Module):
        super().__init__(f"python:{type(module).__name__}")
        self.module = module

    def build(self, num_classes, input_shape):
        return copy.deepcopy(self.module)

    def _key(self):
        return (type(self), id(self.module))


class CallableRef(ModelRef):
    """A factory given in Python, stored by value: fn(num_classes, input_shape) -> nn.Module."""

    def __init__(self, factory: Callable[..., nn.Module]):
        label = getattr(factory, "__name__", None) or type(factory).__name__
        super().__init__(f"python:{label}")
        self.factory = factory

    def build(self, num_classes, input_shape):
        made = self.factory(num_classes, _shape(input_shape))
        if not isinstance(made, nn.Module):
            raise _not_a_module(self.spec, made)
        return made

    def _key(self):
        return (type(self), id(self.factory))


class FamilyRef(ModelRef):
    """FAMILY:knob=value,... (kdtune/models/families.py): a network of a family with its size knobs set."""

    def __init__(self, text: str):
        from kdtune.models.families import FAMILIES, parse_family

        family, knobs, canonical = parse_family(text)
        super().__init__(canonical)
        self.family, self.knobs = family, knobs
        self.link_points = dict(FAMILIES[family].links(knobs))

    def build(self, num_classes, input_shape):
        from kdtune.models.families import FAMILIES

        return FAMILIES[self.family].build(self.knobs, num_classes, _shape(input_shape))


def model_ref(value) -> ModelRef:
    """Resolve a model reference: str | ModelRef | nn.Module instance | callable(num_classes, input_shape)."""
    if isinstance(value, ModelRef):
        return value
    if isinstance(value, nn.Module):
        return ModuleRef(value)
    if isinstance(value, str):
        text = value.strip()
        if ":" not in text:
            if text in _MODELS:
                return BuiltinRef(text)
            close = difflib.get_close_matches(text, model_names(), n=3)
            raise ConfigError(
                f"model {text!r}: unknown"
                + (f" (close: {', '.join(close)})" if close else "")
                + f"; built-in models: {', '.join(model_names())}; other forms: {_OTHER_FORMS}"
            )
        prefix, _, rest = text.partition(":")
        from kdtune.models.families import is_family_ref

        if is_family_ref(text):
            return FamilyRef(text)
        if prefix == "torchvision":
            return TorchvisionRef(rest)
        if prefix == "timm":
            return TimmRef(rest)
        if prefix == "python":
            raise ConfigError(
                f"model {text!r}: python:NAME stands for an object given in Python; pass the nn.Module or factory "
                f"itself, or name it as package.module:factory"
            )
        if not _DOTTED.fullmatch(prefix) or not _DOTTED.fullmatch(rest):
            raise ConfigError(f"model {text!r}: not a model reference; use {MODEL_FORMS_HELP}")
        return FactoryRef(prefix, rest)
    if callable(value):
        return CallableRef(value)
    raise ConfigError(f"model {value!r}: a {type(value).__name__} is not a model reference; use {MODEL_FORMS_HELP}")


def _library_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return [os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths]


def shippable_path(ref) -> str | None:
    """Where the top-level package/module of a package.module:factory ref lives, when Ray should ship it.

    Returns the package folder (or module file) unless it is installed (site-packages / dist-packages) or part
    of the standard library: then every worker has it already and the answer is None. Other refs: None.
    """
    if isinstance(ref, str):
        ref = model_ref(ref)
    return shippable_module(getattr(ref, "user_module", None))


def shippable_module(top: str | None) -> str | None:
    """The folder (or file) of the user's top-level package/module `top` for Ray to ship to every node; None
    when it is installed or part of the standard library (every worker has it) or not found."""
    if not top:
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        path = list(spec.submodule_search_locations)[0]
    elif spec.origin and os.path.isfile(spec.origin):
        path = spec.origin
    else:
        return None  # built-in or frozen
    real = os.path.realpath(path)
    parts = set(real.split(os.sep))
    if "site-packages" in parts or "dist-packages" in parts:
        return None
    if any(real == d or real.startswith(d + os.sep) for d in _library_dirs()):
        return None
    return os.path.abspath(path)
