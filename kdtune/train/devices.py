"""The device a trial trains on, and the layout and precision choices that depend on it.

    pick_device(prefer)            the device Ray assigned to this trial or task, else CUDA when available
    use_channels_last(device, p)   NHWC activations and weights: on every CPU and on GPUs under bf16
    cpu_has_native_bf16()          whether this CPU runs bf16 matmuls natively (AMX, AVX512-BF16)
"""
from __future__ import annotations

import sys

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """The device Ray assigned: inside a Ray trial/task, CUDA only if Ray gave it GPUs (it restricts
    CUDA_VISIBLE_DEVICES to them, so the first is cuda:0), else the CPU; outside Ray, CUDA when available.

    A trial given GPUs on a node without CUDA (e.g. `ray start --num-gpus=2` declared on a CPU-only machine)
    trains on the CPU and logs a warning saying so.
    """
    if prefer:
        return torch.device(prefer)

    gpu_ids = assigned_gpu_ids()
    if gpu_ids is None:  # not inside a Ray task or actor
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not gpu_ids:  # Ray gave this trial no GPU: leave any GPU on the node to the trials that got one
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    import logging
    import os

    logging.getLogger("kdtune").warning(
        "kdtune: Ray assigned GPU %s to this trial but CUDA is not available on this node "
        "(CUDA_VISIBLE_DEVICES=%s); training on the CPU",
        ",".join(gpu_ids), os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    return torch.device("cpu")


def use_channels_last(device: torch.device, precision: str) -> bool:
    """NHWC activations and weights: on GPUs under bf16 (tensor cores) and on every CPU (oneDNN's native layout).

    Measured on a 2-core AVX-512 CPU (benchmarks/RESULTS.md, the channels_last ablation): the fp32 VGG-7 training
    step runs ~1.15x faster with 2 threads (52% instead of 46% of the fp32 matmul peak), the KD step with the
    VGG-16 teacher ~1.12x; results are the same up to float rounding (tests/test_performance_paths.py).
    """
    return device.type == "cpu" or precision == "bf16"


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: without them oneDNN emulates bf16 matmuls, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, probe, lambda: False)())
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def assigned_gpu_ids() -> list[str] | None:
    """The accelerator IDs Ray assigned to this task/actor ([] for a CPU-only trial); None outside a Ray worker.

    A fractional request (0.25 GPU) still gets one ID: the GPU it shares. Ray also sets CUDA_VISIBLE_DEVICES to
    these IDs, so inside the trial the first assigned GPU is `cuda:0`.
    """
    ray = sys.modules.get("ray")  # a trial has imported ray already; plain scripts and tests need not
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        if global_worker.mode != WORKER_MODE:  # the driver has no assignment of its own
            return None
        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # an older or newer Ray without these internals: fall back to plain CUDA detection
        return None
