"""Methods by name: the built-in ones, and a user's own as `package.module:Class`.

    method_class("dkd")                          # a built-in
    method_class("mylab.methods:LogitMSE")       # a subclass of kdtune.distill.Method, imported once
    trial_config({"method": "dkd", "beta": 8})   # a validated TrialConfig (kdtune/config.py)
    StudyBase({...}).trial({"method": "dkd"})     # the same, on top of a study's shared values

A user's method is imported in the driver, where the study is resolved and every trial config checked; trials
import it again by the same reference from the user's code the study ships to every node (Ray's runtime_env,
as for a user's own models: kdtune/models/refs.py, shippable_path).
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from kdtune.config import TrialConfig
from kdtune.distill.base import Method
from kdtune.errors import ConfigError

_BUILTIN: dict[str, type[Method]] = {}
_IMPORTED: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a built-in method (kdtune/distill/__init__.py does, for each one it ships)."""
    _BUILTIN[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """The built-in methods' names."""
    return sorted(_BUILTIN)


def is_reference(text: str) -> bool:
    return ":" in str(text)


def method_class(ref: str) -> type[Method]:
    """A built-in method by name, or a user's Method subclass by `package.module:Class`."""
    ref = str(ref).strip()
    if ref in _BUILTIN:
        return _BUILTIN[ref]
    if not is_reference(ref):
        raise ConfigError(f"method={ref!r}: unknown; allowed: {', '.join(method_names())}, or your own "
                          "method as package.module:Class (a subclass of kdtune.distill.Method)")
    if ref not in _IMPORTED:
        _IMPORTED[ref] = _import_method(ref)
    return _IMPORTED[ref]


def _import_method(ref: str) -> type[Method]:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"method={ref!r}: cannot import {module_name!r} ({error}); put its package on "
                          "PYTHONPATH (or install it)") from None
    cls = getattr(module, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise ConfigError(f"method={ref!r}: {module_name} has no Method subclass named {attr!r}")
    if cls.name in _BUILTIN or cls.name == Method.name:
        raise ConfigError(f"method={ref!r}: its name {cls.name!r} is a built-in method's; give the class a "
                          "name of its own (class attribute `name`)")
    for param in cls.params:
        if param.name in TrialConfig.field_names():
            raise ConfigError(f"method={ref!r}: parameter {param.name!r} is a shared trial field; give it "
                              "another name")
    return cls


def user_module(ref: str) -> str | None:
    """The top-level package of a user's method (for Ray to ship to every node), None for a built-in."""
    return str(ref).partition(":")[0].split(".")[0] if is_reference(ref) else None


def trial_config(flat: dict[str, Any], base: dict[str, Any] | None = None) -> TrialConfig:
    """A validated TrialConfig from a flat dict on top of a study's `base` (kdtune/config.py, from_flat)."""
    method = (flat.get("method") or (base or {}).get("method") or TrialConfig.method)
    return TrialConfig.from_flat({**flat, "method": method}, method_class(method), base=base)


class StudyBase(Mapping):
    """A study's shared trial values (dataset, pair, recipe, `--set` overrides), read-only.

    Not one TrialConfig: a base holds values for several methods' parameters (`--set temperature=4` reaches the
    KD trials, not the baseline, and DKD keeps its own default when unset), while a TrialConfig holds one method's
    parameters filled in with its defaults. So the base stays a mapping of the values given, and `shared` is its
    typed, validated view (student, val_fraction, epochs...) built once; `trial(flat)` makes a trial's config."""

    __slots__ = ("_values", "_shared")

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_shared", None)

    def __setattr__(self, name, value):
        raise AttributeError("a StudyBase is read-only: use replace(...)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StudyBase({self._values!r})"

    def __reduce__(self):  # shipped to every trial by Ray
        return (StudyBase, (self._values,))

    @property
    def shared(self) -> TrialConfig:
        """The base's own trial config (its method, or the default one): the typed fields every trial shares."""
        if self._shared is None:
            object.__setattr__(self, "_shared", self.trial({}))
        return self._shared

    def trial(self, flat: Mapping[str, Any]) -> TrialConfig:
        """A trial's validated config: `flat` (a variant, a Tune config) on top of this base."""
        return trial_config(dict(flat), self._values)

    def replace(self, **changes: Any) -> "StudyBase":
        return StudyBase({**self._values, **changes})
