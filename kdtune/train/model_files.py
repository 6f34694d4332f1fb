"""A model as a file a runtime serves: written by torch.onnx (dynamo exporter) or torch.export, the batch
dimension dynamic, and run back by that runtime (onnxruntime's CPU session, torch.export.load). The training
layer's part of exporting: costs (latency in onnxruntime) and int8 quantisation use it; `kdtune models export`
(kdtune/export.py) adds the registry and the check against the registered model."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from kdtune.errors import KdtuneError

if TYPE_CHECKING:
    import numpy as np
    import torch

ONNX_OPSET = 18
EXTRA_MODULES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "pt2": ()}


class ExportError(KdtuneError):
    """An export that cannot be done as asked, or a file that does not match the registered model."""


def require_extra(fmt: str) -> None:
    """The optional packages a format needs, or one line naming the extra that installs them."""
    missing = []
    for module in EXTRA_MODULES[fmt]:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}, not installed: "
                          "pip install 'kdtune[export]'")


def export_file(model: torch.nn.Module, fmt: str, sample: torch.Tensor, path: Path, meta: dict) -> None:
    """Write `model` as `fmt` to `path`, batch dimension dynamic."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "exporting a model in training mode": an exported graph is eval already
        if fmt == "onnx":
            program = torch.onnx.export(model, (sample,), dynamo=True, dynamic_shapes=({0: batch},),
                                        input_names=["images"], output_names=["logits"], opset_version=ONNX_OPSET,
                                        verbose=False)
            program.model.metadata_props.update({k: str(v) for k, v in meta.items()})
            program.save(str(path), external_data=False)
        else:
            program = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path), extra_files={"kdtune.json": json.dumps(meta)})


def run_file(fmt: str, path: Path, samples: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """The exported file's outputs on `samples`, run by the runtime that will serve it."""
    import torch

    if fmt == "onnx":
        session = onnx_session(path, threads)
        return session.run(None, {session.get_inputs()[0].name: samples.numpy()})[0]
    program = torch.export.load(str(path))
    with torch.no_grad():
        return program.module()(samples).numpy()


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session over an ONNX file, all graph optimisations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
