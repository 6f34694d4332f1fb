"""What a student costs to deploy: parameters and FLOPs (deterministic) and inference latency (measured).

    parameters(model)                      count of parameters
    flops(model, input_shape)              FLOPs of one forward pass on one sample, counted by
                                           torch.utils.flop_counter.FlopCounterMode (2 per multiply-add, the
                                           convolutions and matrix products; elementwise ops are not counted)
    latency(model, input_shape, device)    median forward time in ms: batch 1, and per image in a batch of
                                           `batch`, after `warmup` calls, over `repeats` timed calls each
    measure(refs, ...)                     all of it for every architecture, one model at a time, the repeats
                                           spread over 3 rounds through all the models

A study measures latency once per architecture in one process (a Ray task with a trial's resources, or the
driver), before any trial trains, so no other trial shares the device while it runs; the device and the
thread count are recorded with every number. Latency depends on the architecture, not on trained weights, so
one measurement serves every trial of that architecture.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

COST_KEYS = ("latency_ms_batch1", "latency_ms_per_image", "params", "flops")


@dataclass
class Costs:
    params: int
    flops: int
    latency_ms_batch1: float
    latency_ms_per_image: float
    device: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, input_shape) -> int:
    """FLOPs of one forward pass on one sample (eval mode), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_shape))
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def latency(model: nn.Module, input_shape, device: torch.device, batch: int = 256, warmup: int = 5,
            repeats: int = 21) -> tuple[float, float]:
    """(ms for one sample at batch 1, ms per sample in a batch of `batch`): medians of `repeats` timed forward
    passes after `warmup` untimed ones, in eval mode under inference_mode, synchronised on CUDA."""
    one = statistics.median(timings(model, input_shape, device, 1, warmup, repeats))
    per_image = statistics.median(timings(model, input_shape, device, batch, warmup, repeats)) / batch
    return one, per_image


def timings(model: nn.Module, input_shape, device: torch.device, size: int, warmup: int, repeats: int) -> list[float]:
    """ms of each of `repeats` timed forward passes of a batch of `size`, after `warmup` untimed ones."""
    model = model.to(device).eval()
    inputs = torch.randn(size, *input_shape, device=device)
    samples = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= warmup:
                samples.append((time.perf_counter() - started) * 1000)
    return samples


def device_name(device: torch.device) -> str:
    """e.g. 'cuda:0 (NVIDIA A10G)' or 'cpu (x86_64, 2 threads)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = cpu_model() or platform.machine() or "cpu"
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def measure(refs: dict, num_classes: int, input_shape, device: torch.device | None = None, threads: int = 1,
            batch: int = 256, warmup: int = 5, repeats: int = 21, rounds: int = 3) -> dict[str, dict]:
    """spec -> Costs (as a dict) for every reference in `refs` (spec -> ModelRef), one model at a time. The
    repeats are spread over `rounds` passes through all the models (each pass warms its model up again), so a
    burst of outside load on a shared machine lands on every architecture alike rather than on one."""
    from kdtune.engine import pick_device

    torch.set_num_threads(max(1, int(threads)))
    device = device or pick_device()
    shape = tuple(int(d) for d in input_shape)
    models, counts = {}, {}
    for spec, ref in refs.items():
        torch.manual_seed(0)
        models[spec] = ref.build(num_classes, shape)
        counts[spec] = (parameters(models[spec]), flops(models[spec], shape))
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    samples = {spec: ([], []) for spec in refs}
    for count in per_round:
        for spec, model in models.items():
            one, many = samples[spec]
            one += timings(model, shape, device, 1, warmup, count)
            many += [t / batch for t in timings(model, shape, device, batch, warmup, count)]
    name = device_name(device)
    return {spec: Costs(*counts[spec], statistics.median(samples[spec][0]), statistics.median(samples[spec][1]),
                        name, torch.get_num_threads()).as_dict() for spec in refs}


def measure_task(refs: dict, num_classes: int, input_shape, threads: int, device: str | None = None,
                 **timing) -> tuple[dict, float]:
    """The Ray task body: (costs table, seconds it took); `device`: None for the one Ray assigned (or the CPU);
    `timing`: batch, warmup, repeats."""
    started = time.perf_counter()
    table = measure(refs, num_classes, input_shape, device=torch.device(device) if device else None,
                    threads=threads, **timing)
    return table, time.perf_counter() - started
