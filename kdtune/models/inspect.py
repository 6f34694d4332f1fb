"""Look inside a model: every submodule's output shape, and module paths checked with nearest-name hints.

`kdtune models links MODEL_REF --dataset D` prints `format_module_table(module_shapes(model, sample))`, so a
user can pick the module paths to link for feature-based distillation in any model, not only the built-ins.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from kdtune.errors import ConfigError

Row = tuple[str, str, "tuple | None"]


def module_shapes(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str, tuple | None]]:
    """(module path, class name, output shape without the batch dim) for every named submodule.

    One forward pass of `sample` (a batch) in eval mode without gradients; the shape is None where a module's
    output is not a tensor or the module did not run. The model's training mode is restored and the hooks removed.
    """
    modules = [(path, module) for path, module in model.named_modules() if path]
    shapes: dict[str, tuple | None] = {}
    handles = []

    def hook(path):
        def store(_module, _inputs, output):
            shapes[path] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

        return store

    was_training = model.training
    try:
        for path, module in modules:
            handles.append(module.register_forward_hook(hook(path)))
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(path, type(module).__name__, shapes.get(path)) for path, module in modules]


def _format_shape(shape: tuple | None) -> str:
    if shape is None:
        return "-"
    return "x".join(str(d) for d in shape) if shape else "scalar"


def format_module_table(rows) -> str:
    """An aligned text table: module path, type, output shape (C x H x W; '-' when not a tensor)."""
    table = [("module", "type", "output shape")]
    table += [(path, kind, _format_shape(shape)) for path, kind, shape in rows]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    lines = [f"{path:<{widths[0]}}  {kind:<{widths[1]}}  {shape}".rstrip() for path, kind, shape in table]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * len('output shape')}")
    return "\n".join(lines)


def check_module_path(
    model: nn.Module, path: str, role: str, ref: str | None = None, dataset: str | None = None
) -> nn.Module:
    """The submodule at `path`, or a ConfigError naming the nearest module paths and how to list them all."""
    from kdtune.models.zoo import EMBEDDING_PATH, classifier_path

    modules = dict(model.named_modules())
    if path == EMBEDDING_PATH:
        return modules[classifier_path(model)]
    if path and path in modules:
        return modules[path]
    paths = [p for p in modules if p]
    nearest = difflib.get_close_matches(path, paths, n=5) or paths[:5]
    raise ConfigError(
        f"{role} module path {path!r} not found in {type(model).__name__}; "
        f"nearest: {', '.join(nearest) or 'none (the model has no submodules)'}; "
        f"list them with: kdtune models links {ref or '<ref>'} --dataset {dataset or 'D'}"
    )
