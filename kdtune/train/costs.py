"""What a student costs to deploy: parameters and FLOPs (deterministic) and inference latency (measured).

    parameters(model)                      count of parameters
    flops(model, input_shape)              FLOPs of one forward pass on one sample, counted by
                                           torch.utils.flop_counter.FlopCounterMode (2 per multiply-add, the
                                           convolutions and matrix products; elementwise ops are not counted)
    latency(model, input_shape, device)    median forward time in ms: batch 1, and per image in a batch of
                                           `batch`, after `warmup` calls, over `repeats` timed calls each
    measure(refs, ...)                     all of it for every architecture, one model at a time, the repeats
                                           spread over 3 rounds through all the models
    onnxruntime_latency(model, shape)      the same two figures for the model exported to ONNX and run by
                                           onnxruntime (CPU execution provider, the same thread count):
                                           measure(..., runtime="onnxruntime"), --latency-runtime onnxruntime

A study measures latency once per architecture in one process (a Ray task with a trial's resources, or the
driver), before any trial trains, so no other trial shares the device while it runs; the device and the
thread count are recorded with every number. Latency depends on the architecture, not on trained weights, so
one measurement serves every trial of that architecture.

The runtime (torch: eager PyTorch under inference_mode; onnxruntime: the ONNX file `kdtune models export
--format onnx` writes, on the CPU) is recorded with the device: a latency is a fact about a model on a device
in a runtime, and a budget compares figures of one kind only. onnxruntime needs the extra `export`.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

COST_KEYS = ("latency_ms_batch1", "latency_ms_per_image", "params", "flops")
RUNTIMES = ("torch", "onnxruntime")


@dataclass
class Costs:
    params: int
    flops: int
    latency_ms_batch1: float
    latency_ms_per_image: float
    device: str
    threads: int
    runtime: str = "torch"

    def as_dict(self) -> dict:
        return asdict(self)


def latency_tags(costs: dict) -> dict[str, str]:
    """A Costs dict (as_dict) as the tags a registered version carries: the two latencies and what they were
    measured on (device, threads, runtime)."""
    return {"latency_ms_batch1": f"{costs['latency_ms_batch1']:.4f}",
            "latency_ms_per_image": f"{costs['latency_ms_per_image']:.5f}",
            "latency_device": str(costs["device"]), "latency_threads": str(costs["threads"]),
            "latency_runtime": str(costs.get("runtime", "torch"))}


def check_runtime(runtime: str) -> None:
    """A latency runtime kdtune can measure here, or one line saying what is allowed or what to install."""
    from kdtune.errors import ConfigError

    if runtime not in RUNTIMES:
        raise ConfigError(f"--latency-runtime {runtime!r}: allowed: {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        from kdtune.train.model_files import ExportError, require_extra

        try:
            require_extra("onnx")
        except ExportError as error:
            raise ConfigError(f"--latency-runtime onnxruntime needs {str(error).split(' needs ', 1)[1]}") from None


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


def onnx_session(model: nn.Module, input_shape, folder: str, threads: int | None = None):
    """`model` exported to ONNX (batch dimension dynamic, as `kdtune models export` writes it) in `folder`, and
    an onnxruntime CPU session over it with `threads` intra-op threads (default: torch's thread count)."""
    from pathlib import Path

    from kdtune.train.model_files import export_file
    from kdtune.train.model_files import onnx_session as session_for

    was_training = model.training
    model = model.cpu().eval()
    try:
        path = Path(folder) / f"model-{id(model)}.onnx"
        export_file(model, "onnx", torch.zeros(2, *input_shape), path, {})
    finally:
        model.train(was_training)
    return session_for(path, threads or torch.get_num_threads())


def onnxruntime_timings(session, input_shape, size: int, warmup: int, repeats: int) -> list[float]:
    """ms of each of `repeats` timed runs of an onnxruntime session on a batch of `size`, after `warmup`."""
    import numpy as np

    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (size, *input_shape)).astype(np.float32)}
    samples = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        session.run(None, feed)
        if index >= warmup:
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def onnxruntime_latency(model: nn.Module, input_shape, batch: int = 256, warmup: int = 5, repeats: int = 21,
                        threads: int | None = None) -> tuple[float, float]:
    """`latency()`'s two figures for `model` exported to ONNX and run by onnxruntime on the CPU."""
    import tempfile

    shape = tuple(int(d) for d in input_shape)
    with tempfile.TemporaryDirectory() as folder:
        session = onnx_session(model, shape, folder, threads)
        one = statistics.median(onnxruntime_timings(session, shape, 1, warmup, repeats))
        per_image = statistics.median(onnxruntime_timings(session, shape, batch, warmup, repeats)) / batch
    return one, per_image


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
            batch: int = 256, warmup: int = 5, repeats: int = 21, rounds: int = 3,
            runtime: str = "torch") -> dict[str, dict]:
    """spec -> Costs (as a dict) for every reference in `refs` (spec -> ModelRef), one model at a time. The
    repeats are spread over `rounds` passes through all the models (each pass warms its model up again), so a
    burst of outside load on a shared machine lands on every architecture alike rather than on one.

    runtime "onnxruntime": each model exported to ONNX once and timed in onnxruntime on the CPU with the same
    thread count, whatever `device` is (kdtune installs onnxruntime's CPU package); the CPU is recorded."""


    check_runtime(runtime)
    with torch_threads(threads):
        return _measure(refs, num_classes, input_shape, device, batch, warmup, repeats, rounds, runtime)


def _measure(refs, num_classes, input_shape, device, batch, warmup, repeats, rounds, runtime) -> dict[str, dict]:
    import tempfile

    from kdtune.train.devices import pick_device

    device = torch.device("cpu") if runtime == "onnxruntime" else (device or pick_device())
    shape = tuple(int(d) for d in input_shape)
    models, counts = {}, {}
    for spec, ref in refs.items():
        torch.manual_seed(0)
        models[spec] = ref.build(num_classes, shape)
        counts[spec] = (parameters(models[spec]), flops(models[spec], shape))
    with tempfile.TemporaryDirectory() as folder:
        if runtime == "onnxruntime":
            sessions = {spec: onnx_session(model, shape, folder) for spec, model in models.items()}
            time_it = lambda spec, size, count: onnxruntime_timings(sessions[spec], shape, size, warmup, count)  # noqa: E731
        else:
            time_it = lambda spec, size, count: timings(models[spec], shape, device, size, warmup, count)  # noqa: E731
        medians = interleaved_medians(time_it, list(refs), batch, repeats, rounds)
    name = device_name(device)
    return {spec: Costs(*counts[spec], *medians[spec], name, torch.get_num_threads(), runtime).as_dict()
            for spec in refs}


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set for a measurement and put back after it: timing a model must not change
    the calling process (a test run, a driver) for whatever runs next."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_medians(time_it, keys: list, batch: int, repeats: int, rounds: int = 3) -> dict:
    """key -> (median ms at batch 1, median ms per image at `batch`), `time_it(key, size, count)` giving the ms of
    `count` runs; the repeats are spread over `rounds` passes through all the keys (see `measure`)."""
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    samples = {key: ([], []) for key in keys}
    for count in per_round:
        for key in keys:
            one, many = samples[key]
            one += time_it(key, 1, count)
            many += [t / batch for t in time_it(key, batch, count)]
    return {key: (statistics.median(one), statistics.median(many)) for key, (one, many) in samples.items()}


def onnx_file_latencies(files: dict[str, bytes], input_shape, threads: int, batch: int = 256, warmup: int = 5,
                        repeats: int = 21, rounds: int = 3) -> tuple[dict, float]:
    """The Ray task body for ONNX files already made (e.g. int8 students, kdtune/pareto/int8.py): ({key: Costs-like
    dict of the two latencies, device, threads, runtime}, seconds it took), each file run by onnxruntime on the
    CPU with `threads` threads, the files interleaved as `measure` interleaves models."""
    from kdtune.train.model_files import onnx_session as session_for

    started = time.perf_counter()
    with torch_threads(threads):
        table = _time_files(files, input_shape, batch, warmup, repeats, rounds, session_for)
    return table, time.perf_counter() - started


def _time_files(files, input_shape, batch, warmup, repeats, rounds, session_for) -> dict:
    import tempfile
    from pathlib import Path

    shape = tuple(int(d) for d in input_shape)
    with tempfile.TemporaryDirectory() as folder:
        sessions = {}
        for index, (key, content) in enumerate(files.items()):
            path = Path(folder) / f"{index}.onnx"
            path.write_bytes(content)
            sessions[key] = session_for(path, torch.get_num_threads())
        medians = interleaved_medians(
            lambda key, size, count: onnxruntime_timings(sessions[key], shape, size, warmup, count),
            list(files), batch, repeats, rounds)
    name = device_name(torch.device("cpu"))
    return {key: {"latency_ms_batch1": one, "latency_ms_per_image": per_image, "device": name,
                  "threads": torch.get_num_threads(), "runtime": "onnxruntime"}
            for key, (one, per_image) in medians.items()}


def measure_task(refs: dict, num_classes: int, input_shape, threads: int, device: str | None = None,
                 **timing) -> tuple[dict, float]:
    """The Ray task body: (costs table, seconds it took); `device`: None for the one Ray assigned (or the CPU);
    `timing`: batch, warmup, repeats, runtime."""
    started = time.perf_counter()
    table = measure(refs, num_classes, input_shape, device=torch.device(device) if device else None,
                    threads=threads, **timing)
    return table, time.perf_counter() - started
