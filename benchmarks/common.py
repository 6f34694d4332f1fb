"""Shared helpers: the machine, a matmul peak, step clocks, FLOP counting, memory."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import torch


def threads() -> int:
    return int(os.environ.get("KDTUNE_BENCH_THREADS", os.cpu_count() or 1))


def cpu_name() -> str:
    from kdtune.train.costs import cpu_model

    return cpu_model() or platform.processor() or "unknown CPU"


def native_bf16() -> dict[str, bool]:
    """What this CPU offers for bf16 matmuls (AMX tiles, AVX512-BF16); False where torch cannot say."""
    cpu = getattr(torch, "cpu", None)
    probe = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731
    return {"amx": probe("_is_amx_tile_supported"), "avx512_bf16": probe("_is_avx512_bf16_supported")}


def machine() -> dict:
    load = os.getloadavg()
    info = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads_used": threads(),
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{f"cpu_{k}": v for k, v in native_bf16().items()},
        "cuda": torch.cuda.is_available(),
        "load_1_5_15": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def matmul_gflops(dtype=torch.float32, n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of one n x n x n matmul: the machine's practical peak, measured now."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up (oneDNN / BLAS kernel selection)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


class StepClock:
    """Timestamps every optimizer.step(); throughput from the 2nd to the last step (steady state).

    Wrapping the optimizer works the same for kdtune's engine, a plain loop and torchdistill, and leaves out
    each one's first step (lazy initialisation, DataLoader worker start) from all three alike.

    Also counts CPU seconds (this process, plus its reaped children: DataLoader workers), which other users of a
    shared machine disturb far less than wall time: `cpu_per_step()`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._children_at_start = 0.0
        self.children_cpu = 0.0
        original = optimizer.step

        def step(*args, **kwargs):
            result = original(*args, **kwargs)
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            return result

        optimizer.step = step

    def reset(self) -> None:
        """Call at the start of an epoch."""
        self.times.clear()
        self.cpu.clear()
        self._children_at_start = _children_cpu()

    def stop(self) -> None:
        """Call at the end of an epoch (after DataLoader workers have exited)."""
        self.children_cpu = _children_cpu() - self._children_at_start

    def seconds_per_step(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def cpu_per_step(self) -> float:
        """CPU seconds per step: this process from the 2nd to the last step, plus workers' share per step."""
        if len(self.cpu) < 2:
            return float("nan")
        return (self.cpu[-1] - self.cpu[0]) / (len(self.cpu) - 1) + self.children_cpu / len(self.cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def step_flops(step) -> int:
    """FLOPs of one call of `step` (forward + backward), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a live process, from /proc (MiB)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass
class Row:
    """One reported number: what, the value, the target (if any) and whether it is met."""

    section: str
    name: str
    value: float
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    samples: list = field(default_factory=list)

    def value_text(self) -> str:
        if self.value != self.value:
            return "n/a"
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "%":
            return f"{100 * self.value:.0f}%"
        if self.unit in ("s", "ms"):
            return f"{self.value:.2f} {self.unit}"
        if abs(self.value) >= 100:
            return f"{self.value:.0f} {self.unit}".strip()
        return f"{self.value:.3g} {self.unit}".strip()


def check(value: float, minimum: float | None = None, maximum: float | None = None) -> bool | None:
    if value != value:
        return None
    if minimum is not None and value < minimum:
        return False
    if maximum is not None and value > maximum:
        return False
    return True


def table(rows) -> str:
    out = ["| benchmark | measure | value | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        value = r.value_text() + (f" ({r.note})" if r.note else "")
        out.append(f"| {r.section} | {r.name} | {value} | {r.target} | {met} |")
    return "\n".join(out)
