"""The GPU check of issue 13 (item 4): what one GPU gives a distillation study, in at most 8 minutes.

    python -m benchmarks --gpu                 # on a CUDA machine: the check, at most ~8 minutes
    python -m benchmarks --gpu --write         # and add/replace its section in benchmarks/RESULTS.md
    python -m benchmarks --gpu --smoke         # every section at tiny sizes (CPU or GPU; proves the code paths)
    python -m benchmarks.gpu ...               # the same

Sections (each bounded in time, printed as it finishes, so a run cut short still leaves figures):

G1  KD step images/s, teacher online, crop+flip, batch 128: VGG-16 -> VGG-7 and WRN-40-10 -> WRN-10-4, each in
    fp32 and bf16 autocast, channels_last and NCHW, cuDNN benchmark mode on and off (the engine's defaults on
    CUDA: fp32 NCHW and bf16 channels_last, benchmark mode on). Configurations are interleaved round by round;
    warm-up steps excluded (the first steps are where benchmark mode autotunes), torch.cuda.synchronize()
    around each timed run of steps, median over rounds. The benchmark-off configurations run in a fresh process
    of their own (cuDNN caches one algorithm per convolution shape whatever the mode, so one process cannot
    measure both). Batches are drawn (and augmented, on the device) before the clock: the step alone is timed.
    The lines under the table say which of the three (bf16, channels_last, benchmark mode) helped.
G2  fused vs unfused trials at K = 1, 4, 8 (VGG-16 -> VGG-7, bf16 on CUDA): unfused = each of the K students
    steps alone and runs its own teacher; fused = one teacher forward per batch, the K students stepping on its
    logits one after the other (kdtune/train/fusion.py); batched = the K students stepped as one vmap computation
    (kdtune/train/batched.py, built here by hand). The figure is images/s per student (= all students' images/s / K);
    trials/h = 3600 * K * that / images per trial, a trial being the CIFAR recipe's 25 epochs of 47,500 images.
    For K >= 2 also the trial's own path: one epoch through fused_epochs with batched='on' vs 'off' (train and
    evaluate, batches drawn in the epoch), so the wiring's overheads (stack build, hand-back) are in the figure.
G3  four fractional trials on one GPU vs one fused trial of four: four OS processes (multiprocessing, spawned
    on CUDA), each one trial (its own student and teacher), released together by a barrier after warm-up.
    That is what Ray Tune does with gpus_per_trial=0.25: four worker processes on the device, which the CUDA
    driver time-slices (no MPS, no isolation; Ray only sets CUDA_VISIBLE_DEVICES), without Ray's scheduling
    around it. Figure: images/s per student over the window from the barrier to the last process's end.
G4  peak GPU memory per trial, torch.cuda.max_memory_allocated (reserved in the note; the CUDA context, a few
    hundred MiB per process, is in neither): one trial alone per pair, a fused trial of K (/ K), a batched
    trial of K (/ K), and each fractional process of G3.
G5  the vmap-batched step vs the sequential fused step on the digits pair (batch 40), K = 4 and 8.
G6  one short seed-000 temperature sweep through kdtune's own run_study (a local Ray, the embedded MLflow
    server): CIFAR-shaped random images from kdtune.data.from_arrays, VGG-16 teacher (an nn.Module, random
    weights: nothing to train), VGG-7 students, baseline + 3 temperatures, 2 epochs, gpus_per_trial=0.25 (all
    four at once). Figures: wall time, the sum of the trials' training time, and their ratio. It runs in its own
    process, so the budget can stop it.

Random weights and random images: speed and memory only, nothing is learnt. `--smoke` keeps every code path at
sizes a 2-core CPU runs in about a minute, with the VGG pair stood in by the digits VGG pair and the WRN pair by
WRN-10-4 -> WRN-10-4 (CIFAR-shaped inputs); its figures prove the code, not the machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import Row, median, table
from kdtune.distill import trial_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
NOTES_MARK = "<!-- notes: everything below this line is kept when --write rewrites the file -->"
NO_CUDA = ("no CUDA device found (torch.cuda.is_available() is False; torch {torch}, built for CUDA {cuda}): "
           "run the CPU smoke version with `python -m benchmarks --gpu --smoke`")
TEMPERATURES = (0.6, 1, 1.5, 2, 2.5, 3, 5, 10, 40)  # seed 000 Table 3
IMAGES_PER_TRIAL = 25 * 47_500  # the CIFAR recipe: 25 epochs of the training split (50,000 less 5% validation)

SECTIONS = {
    "G1": "G1. KD step images/s",
    "G2": "G2. fused vs unfused trials",
    "G3": "G3. four fractional trials vs one fused trial of four",
    "G4": "G4. GPU memory per trial",
    "G5": "G5. vmap-batched vs sequential fused step",
    "G6": "G6. temperature sweep (run_study)",
}


@dataclass
class Plan:
    """Sizes and time caps of one run (`plan_for`: the GPU check, or the smoke run)."""
    smoke: bool
    device: torch.device
    budget_s: float
    pairs: dict  # label -> (teacher, student, batch)
    warmup: int
    steps: int
    rounds: int
    fused_pair: str
    ks: tuple = (1, 4, 8)
    fused_steps: int = 20
    fractional_steps: int = 50
    digits_steps: int = 30
    sweep: dict = field(default_factory=dict)
    caps: dict = field(default_factory=dict)  # section -> seconds

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        """G2-G4's precision: bf16 on CUDA (tensor cores); fp32 on a CPU (bf16 there is emulated on many)."""
        return "bf16" if self.cuda else "fp32"


def plan_for(smoke: bool, device: torch.device, budget_s: float | None = None) -> Plan:
    """The run's sizes; a `budget_s` other than the default scales every section's cap with it (the work done is
    fixed by the sizes: a larger budget only lets a slow machine finish it)."""
    plan = _plan(smoke, device)
    if budget_s:
        plan.caps = {key: cap * budget_s / plan.budget_s for key, cap in plan.caps.items()}
        plan.budget_s = budget_s
    return plan


def _plan(smoke: bool, device: torch.device) -> Plan:
    if not smoke:
        return Plan(
            smoke=False, device=device, budget_s=465.0,  # with start-up (imports, CUDA), under 8 minutes
            pairs={"VGG-16 -> VGG-7": ("vgg16", "vgg7", 128), "WRN-40-10 -> WRN-10-4": ("wrn_40_10", "wrn_10_4", 128)},
            warmup=5, steps=20, rounds=5, fused_pair="VGG-16 -> VGG-7", fused_steps=20, fractional_steps=60,
            digits_steps=50,
            sweep={"n_train": 20_000, "n_test": 2_000, "baseline": True, "temperatures": [2, 5, 10], "epochs": 2,
                   "batch_size": 128,
                   "teacher": "vgg16", "student": "vgg7", "precision": "bf16", "gpus_per_trial": 0.25,
                   "cpus_per_trial": max(1, min(2, (os.cpu_count() or 4) // 4))},
            caps={"G1": 165, "G2": 75, "G3": 55, "G4": 25, "G5": 15, "G6": 130})
    stand_in = "digits VGG pair, smoke stand-in"
    return Plan(
        smoke=True, device=device, budget_s=170.0,
        pairs={f"VGG-16 -> VGG-7 ({stand_in})": ("digits_teacher", "digits_student", 8),
               "WRN-40-10 -> WRN-10-4 (WRN-10-4 -> WRN-10-4, smoke stand-in)": ("wrn_10_4", "wrn_10_4", 4)},
        warmup=1, steps=2, rounds=1, fused_pair=f"VGG-16 -> VGG-7 ({stand_in})", fused_steps=2,
        fractional_steps=3, digits_steps=10,
        sweep={"n_train": 320, "n_test": 64, "baseline": False, "temperatures": [2, 5], "epochs": 1, "batch_size": 32,
               "teacher": "digits_teacher", "student": "digits_student", "precision": "fp32",
               "gpus_per_trial": 0.25 if device.type == "cuda" else 0.0, "cpus_per_trial": 1},
        caps={"G1": 40, "G2": 25, "G3": 40, "G4": 15, "G5": 15, "G6": 90})


# ---- clocks, devices, memory --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n: int, device: torch.device) -> float:
    """Seconds per call of `step` over `n` calls, with the device synchronised before and after."""
    sync(device)
    started = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - started) / n


@contextmanager
def peak_memory(device: torch.device, into: dict):
    """into['allocated'], into['reserved']: peak MiB allocated/reserved by torch while the block runs, above
    what was allocated before it (NaN off CUDA)."""
    gc.collect()
    if device.type != "cuda":
        yield
        into.update(allocated=float("nan"), reserved=float("nan"))
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    base_reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    torch.cuda.synchronize(device)
    into.update(allocated=(torch.cuda.max_memory_allocated(device) - base) / 2**20,
                reserved=(torch.cuda.max_memory_reserved(device) - base_reserved) / 2**20)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float):
        self.started = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def deadline(self, cap: float) -> float:
        """The monotonic time a section with cap `cap` must end by: its cap, or what the run has left."""
        return time.monotonic() + max(0.0, min(cap, self.left()))


def _processes():
    """The multiprocessing context for this check's child processes.

    With CUDA: spawn. A process that has touched CUDA cannot fork, and even a forkserver that only imports
    torch may have initialised the driver (torch.cuda.is_available() does, unless PYTORCH_NVML_BASED_CUDA_CHECK
    is set), which leaves forked children without CUDA; a spawned child starts clean (its imports, a few seconds
    on a GPU machine's many cores, come before the clocks). Without CUDA (the smoke run on a CPU): forkserver, its
    server preloaded with torch and kdtune, so that 2 cores do not import them once per child (~3 CPU-seconds
    each, torch._dynamo included: torch.optim imports it at the first optimiser). The children run the same
    functions either way."""
    import multiprocessing as mp

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "kdtune.train.trainer", "kdtune.train.parts",
                                    "kdtune.train.fusion", "kdtune.train.batched", "benchmarks.loops",
                                    "benchmarks.gpu"])
    return context


# ---- trainers ----------------------------------------------------------------------------------------------

def _dataset(batch: int, batches: int):
    from benchmarks import loops

    return loops.cifar_shaped(batch * batches)


def _teacher_state(teacher: str, dataset) -> dict:
    from kdtune.models.refs import model_ref

    torch.manual_seed(0)
    return model_ref(teacher).build(dataset.num_classes, dataset.input_shape).state_dict()


def _config(dataset, teacher: str, student: str, batch: int, precision: str, temperature: float = 4.0):

    return trial_config({"dataset": dataset.name, "teacher": teacher, "student": student, "method": "kd",
                                  "temperature": float(temperature), "alpha": 0.5, "batch_size": batch,
                                  "epochs": 1, "augment": "crop:4,flip", "teacher_cache": "off",
                                  "val_fraction": 0.05, "precision": precision})


def _parts(dataset, teacher: str, student: str, state: dict):
    from kdtune.models.refs import model_ref
    from kdtune.train.parts import StudyParts

    return StudyParts(dataset, model_ref(student), model_ref(teacher), state)


def _set_layout(trainer, channels_last: bool) -> None:
    """Override the engine's layout choice (an ablation): NHWC or NCHW activations and weights."""
    trainer.channels_last = channels_last
    form = torch.channels_last if channels_last else torch.contiguous_format
    for model in (trainer.student, trainer.teacher):
        if model is not None:
            model.to(memory_format=form)


def _draw(trainer, n: int) -> list:
    """`n` batches of the trainer's epoch (normalised and augmented on the device), drawn before any clock."""
    generator = trainer.batch_generator()
    return [b for _, b in zip(range(n), trainer.train.batches(trainer.config.batch_size, generator))]


def _fused_stepper(members: list, shared, batches: list):
    """One fused step per call over pre-drawn batches in turn: one teacher forward, every member on its logits."""
    from kdtune.train.fusion import _teacher_logits

    cycle = {"i": 0}

    def step():
        images, labels, indices = batches[cycle["i"] % len(batches)]
        cycle["i"] += 1
        logits = _teacher_logits(shared, images, members[0])
        for trainer in members:
            trainer.train_step(images, labels, indices, logits)

    return step


class Stepper:
    """One trainer stepping over a few pre-drawn batches in turn (the step alone: no batch drawing timed)."""
    def __init__(self, trainer, batches: list):
        self.trainer, self.batches, self.i = trainer, batches, 0

    def __call__(self) -> None:
        images, labels, indices = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.trainer.train_step(images, labels, indices)


# ---- G1: the KD step ---------------------------------------------------------------------------------------

# name -> (precision, channels_last, cudnn.benchmark)
STEP_CONFIGS = {
    "fp32 NCHW (engine default, fp32)": ("fp32", False, True),
    "fp32 channels_last": ("fp32", True, True),
    "bf16 channels_last (engine default, bf16)": ("bf16", True, True),
    "bf16 NCHW": ("bf16", False, True),
    "bf16 channels_last, cudnn.benchmark off": ("bf16", True, False),
    "fp32 NCHW, cudnn.benchmark off": ("fp32", False, False),
}
STEP_RATIOS = (  # (what, faster, slower)
    ("bf16 / fp32 (engine defaults)", "bf16 channels_last (engine default, bf16)", "fp32 NCHW (engine default, fp32)"),
    ("channels_last / NCHW, bf16", "bf16 channels_last (engine default, bf16)", "bf16 NCHW"),
    ("channels_last / NCHW, fp32", "fp32 channels_last", "fp32 NCHW (engine default, fp32)"),
    ("cudnn.benchmark on / off, bf16 channels_last", "bf16 channels_last (engine default, bf16)",
     "bf16 channels_last, cudnn.benchmark off"),
    ("cudnn.benchmark on / off, fp32 NCHW", "fp32 NCHW (engine default, fp32)", "fp32 NCHW, cudnn.benchmark off"),
)


BENCHMARK_ON = [name for name, (_, _, benchmark) in STEP_CONFIGS.items() if benchmark]
BENCHMARK_OFF = [name for name, (_, _, benchmark) in STEP_CONFIGS.items() if not benchmark]


def kd_steps(plan: Plan, label: str, names: list[str], deadline: float, log=print) -> dict:
    """Seconds per KD step of the STEP_CONFIGS `names` for one pair, rounds interleaved until `deadline`.

    cudnn.benchmark is the process's setting, the same for all `names`: cuDNN's algorithm cache is keyed by the
    convolution's shapes, dtype and layout but not by benchmark mode, so in one process whichever mode meets a
    convolution first decides its algorithm for the other too. The benchmark-off configurations therefore run
    in a process of their own (`kd_steps_benchmark_off`)."""
    teacher, student, batch = plan.pairs[label]
    dataset = _dataset(batch, 4)
    state = _teacher_state(teacher, dataset)
    parts = _parts(dataset, teacher, student, state)
    steppers = {}
    mode = torch.backends.cudnn.benchmark
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name in names:
            precision, channels_last, _ = STEP_CONFIGS[name]
            if time.monotonic() > deadline:
                log(f"  {label}: {name}: not built (section time is up)")
                continue
            trainer = parts.trainer(_config(dataset, teacher, student, batch, precision), plan.device)
            torch.backends.cudnn.benchmark = mode  # the Trainer turns it on for CUDA trials (kdtune/train/backends.py)
            _set_layout(trainer, channels_last)
            trainer.begin_epoch()
            steppers[name] = Stepper(trainer, _draw(trainer, 3))
            time_steps(steppers[name], plan.warmup, plan.device)  # warm-up: autotuning, allocator, first touches
        for round_ in range(plan.rounds):
            if round_ and time.monotonic() > deadline:
                break
            for name, stepper in steppers.items():
                times[name].append(time_steps(stepper, plan.steps, plan.device))
            log(f"  {label} round {round_ + 1}: " + ", ".join(
                f"{n.split(' (')[0]} {batch / times[n][-1]:.0f}" for n in steppers) + " img/s")
    finally:
        for stepper in steppers.values():
            stepper.trainer.close()
        torch.backends.cudnn.benchmark = mode
        steppers.clear()
        release(plan.device)
    return {"label": label, "batch": batch, "times": times, "steps": plan.steps}


def _kd_steps_child(plan: Plan, deadline: float, queue) -> None:
    try:
        warnings.filterwarnings("ignore", message="precision='bf16' on a CPU", category=RuntimeWarning)
        if not plan.cuda:
            torch.set_num_threads(1 if plan.smoke else common.threads())
        torch.backends.cudnn.benchmark = False  # before this process's first convolution
        out = []
        for i, label in enumerate(plan.pairs):
            share = (deadline - time.monotonic()) / (len(plan.pairs) - i)
            out.append(kd_steps(plan, label, BENCHMARK_OFF, time.monotonic() + share, log=lambda line: None))
        queue.put({"results": out})
    except BaseException as error:  # noqa: BLE001 -- reported by the parent
        queue.put({"error": f"{type(error).__name__}: {error}"})


def kd_steps_benchmark_off(plan: Plan, deadline: float) -> list[dict]:
    """The BENCHMARK_OFF configurations of every pair, in a fresh process (`_processes`): a fresh cuDNN cache."""
    import queue as queue_module

    context = _processes()
    queue = context.Queue()
    # the child stops starting new work at its deadline; this process waits a little longer for its report
    child_deadline = deadline - min(10.0, 0.2 * max(0.0, deadline - time.monotonic()))
    process = context.Process(target=_kd_steps_child, args=(plan, child_deadline, queue), daemon=True)
    process.start()
    try:
        report = queue.get(timeout=max(1.0, deadline - time.monotonic()))
    except queue_module.Empty:
        raise TimeoutError("the cudnn.benchmark-off process did not report before the section's time was up") from None
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()  # our own child, by its handle
            process.join(timeout=5)
    if "error" in report:
        raise RuntimeError(f"the cudnn.benchmark-off process failed: {report['error']}")
    return report["results"]


def _per_round_ratio(times, fast, slow) -> float:
    """Median over rounds of t[slow] / t[fast]; configurations measured in different processes (benchmark mode)
    have no common rounds: the ratio of their medians."""
    if fast in BENCHMARK_OFF or slow in BENCHMARK_OFF:
        f, s = times.get(fast, []), times.get(slow, [])
        return median(s) / median(f) if f and s else float("nan")
    pairs = list(zip(times.get(fast, []), times.get(slow, [])))
    return median([s / f for f, s in pairs]) if pairs else float("nan")


def kd_step_rows(result: dict, cuda: bool) -> list[Row]:
    section = f"{SECTIONS['G1']} ({result['label']}, batch {result['batch']}, teacher online, crop+flip)"
    times, batch = result["times"], result["batch"]
    rows = []
    for name in STEP_CONFIGS:
        ts = times.get(name, [])
        note = (f"median of {len(ts)} rounds x {result['steps']} steps" if ts
                else result.get("off_error", "not measured") if name in BENCHMARK_OFF else "not measured")
        if ts and name in BENCHMARK_OFF:
            note += ", own process"
        rows.append(Row(section, name, batch / median(ts) if ts else float("nan"), "img/s", note=note))
    for what, fast, slow in STEP_RATIOS:
        note = "" if cuda or "cudnn" not in what else "no cuDNN on a CPU: noise"
        rows.append(Row(section, what, _per_round_ratio(times, fast, slow), "x", note=note))
    return rows


def which_helped(results: list[dict]) -> str:
    """One line per ablation: helped (> 5% faster), hurt (> 5% slower) or no difference, for each pair."""
    lines = []
    for what, fast, slow in STEP_RATIOS:
        parts = []
        for result in results:
            ratio = _per_round_ratio(result["times"], fast, slow)
            verdict = ("n/a" if ratio != ratio else "helped" if ratio > 1.05 else "hurt" if ratio < 0.95
                       else "no difference")
            parts.append(f"{result['label'].split(' (')[0]}: {ratio:.2f}x, {verdict}")
        lines.append(f"{what}: " + "; ".join(parts))
    return "\n".join(lines)


# ---- G2: fused vs unfused at K = 1, 4, 8 -------------------------------------------------------------------

def fused_vs_unfused(plan: Plan, deadline: float, log=print) -> list[dict]:
    teacher, student, batch = plan.pairs[plan.fused_pair]
    dataset = _dataset(batch, 4)
    state = _teacher_state(teacher, dataset)
    parts = _parts(dataset, teacher, student, state)
    out, alone, batches = [], [], None
    for k in plan.ks:
        if time.monotonic() > deadline:
            log(f"  K={k}: skipped (section time is up)")
            out.append({"k": k, "skipped": True})
            continue
        configs = [_config(dataset, teacher, student, batch, plan.precision, t) for t in TEMPERATURES[:k]]
        result = {"k": k, "unfused": [], "fused": [], "batched": [], "batched_error": None}
        # unfused: K trainers, each running its own teacher (built once, the first K of them at each K)
        while len(alone) < k:
            trainer = parts.trainer(configs[len(alone)], plan.device)
            trainer.begin_epoch()
            alone.append(trainer)
        if batches is None:
            batches = _draw(alone[0], 3)
        unfused = [Stepper(t, batches) for t in alone[:k]]
        # fused: one teacher forward per batch, the K students one after the other on its logits
        members, shared = parts.fused_trainers(configs, plan.device)
        for trainer in members:
            trainer.begin_epoch()
        lead = members[0]
        fused_step = _fused_stepper(members, shared, batches)

        batched_step = None
        try:
            batched_step = _batched_step(parts, configs, shared, lead, batches, plan)
        except Exception as error:  # noqa: BLE001 -- a model vmap cannot batch: reported, the rest goes on
            result["batched_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        try:
            for step in filter(None, [*unfused, fused_step, batched_step]):
                time_steps(step, plan.warmup, plan.device)
            for round_ in range(plan.rounds):
                if round_ and time.monotonic() > deadline:
                    break
                result["unfused"].append(sum(time_steps(s, plan.fused_steps, plan.device) for s in unfused))
                result["fused"].append(time_steps(fused_step, plan.fused_steps, plan.device))
                if batched_step is not None:
                    result["batched"].append(time_steps(batched_step, plan.fused_steps, plan.device))
        finally:
            for trainer in members:
                trainer.close()
            del members, shared, lead, unfused, batched_step
            release(plan.device)
        per = lambda key: batch / median(result[key]) if result[key] else float("nan")  # noqa: E731
        result.update(batch=batch, per_student={key: per(key) for key in ("unfused", "fused", "batched")})
        log(f"  K={k}: images/s per student: unfused {result['per_student']['unfused']:.0f}, fused "
            f"{result['per_student']['fused']:.0f}, batched "
            + (f"{result['per_student']['batched']:.0f}" if not result["batched_error"] else result["batched_error"]))
        if k >= 2 and time.monotonic() < deadline:
            result["wired"] = wired_epochs(parts, configs, plan)
            wired = result["wired"]
            log(f"  K={k}: fused_epochs, one epoch (train + evaluate), images/s per student: batched=on "
                f"{wired['on']:.0f}, batched=off {wired['off']:.0f}" + (f" ({wired['note']})" if wired["note"] else ""))
        out.append(result)
    for trainer in alone:
        trainer.close()
    del alone
    release(plan.device)
    return out


def wired_epochs(parts, configs, plan) -> dict:
    """The trial's own path (kdtune/train/fusion.py fused_epochs, as kdtune/trial.py runs it): one epoch of K fresh
    members with batched='on' and with batched='off', each timed on its second run (the first warms up cuDNN's
    autotuning and the allocator). Images/s per student over the epoch's training images; the epoch includes
    what the step timings leave out (drawing and augmenting batches, the batched stack's build and hand-back,
    the validation pass). `note`: why batched='on' stepped sequentially, if it did."""
    import logging

    from kdtune.train.fusion import fused_epochs

    notes: list[str] = []

    class Notes(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    def epoch(batched: str) -> float:
        members, shared = parts.fused_trainers([c.replace(batched=batched) for c in configs], plan.device)
        try:
            sync(plan.device)
            started = time.perf_counter()
            for _ in fused_epochs(members, shared):
                pass
            sync(plan.device)
            return len(members[0].train) / (time.perf_counter() - started)
        finally:
            for trainer in members:
                trainer.close()
            release(plan.device)

    handler = Notes(logging.WARNING)
    logger = logging.getLogger("kdtune")
    logger.addHandler(handler)
    try:
        rates = {mode: [epoch(mode) for _ in range(2)][-1] for mode in ("on", "off")}
    finally:
        logger.removeHandler(handler)
    note = next((line for line in notes if "not batched" in line), "")
    return {**rates, "note": note[:200]}


def _batched_step(parts, configs, teacher, lead, batches, plan):
    """A step of K fresh students as one vmap computation (kdtune/train/batched.py), on the fused trial's batches."""
    from kdtune.train.batched import BatchedStudents, MemberLoss
    from kdtune.train.fusion import _teacher_logits

    students = []
    for config in configs:
        torch.manual_seed(config.seed)
        students.append(parts.student.build(parts.dataset.num_classes, parts.dataset.input_shape))
    batched = BatchedStudents(students, [MemberLoss.from_config(c) for c in configs], plan.device,
                              precision=configs[0].precision, channels_last=lead.channels_last)
    cycle = {"i": 0}

    def step():
        images, labels, _ = batches[cycle["i"] % len(batches)]
        cycle["i"] += 1
        batched.step(images, labels, _teacher_logits(teacher, images, lead))

    step()  # a model vmap refuses fails here, before any clock
    return step


def fused_rows(results: list[dict], plan: Plan) -> list[Row]:
    section = (f"{SECTIONS['G2']} ({plan.fused_pair}, {plan.precision}, batch "
               f"{plan.pairs[plan.fused_pair][2]}): images/s per student; trials/h = 3600 x K x that / "
               f"{IMAGES_PER_TRIAL:,} images per trial (25 CIFAR epochs)")
    rows = []
    for r in results:
        k = r["k"]
        if r.get("skipped"):
            rows.append(Row(section, f"K={k}", float("nan"), note="skipped: section time was up"))
            continue
        for key, what in (("unfused", "unfused (each student alone, its own teacher)"),
                          ("fused", "fused (one teacher forward, students in turn)"),
                          ("batched", "batched (vmap, kdtune/train/batched.py)")):
            value = r["per_student"][key]
            note = (r["batched_error"] if key == "batched" and r["batched_error"]
                    else f"{3600 * k * value / IMAGES_PER_TRIAL:.2f} trials/h" if value == value else "")
            rows.append(Row(section, f"K={k} {what}", value, "img/s", note=note))
        rows.append(Row(section, f"K={k} fused / unfused", _ratio(r, "fused", "unfused"), "x"))
        rows.append(Row(section, f"K={k} batched / fused", _ratio(r, "batched", "fused"), "x"))
        if "wired" in r:  # the trial's path: fused_epochs with TrialConfig.batched
            wired, note = r["wired"], "one epoch (train + evaluate), second run"
            rows.append(Row(section, f"K={k} fused_epochs batched=on", wired["on"], "img/s",
                            note=wired["note"] or note))
            rows.append(Row(section, f"K={k} fused_epochs batched=off", wired["off"], "img/s", note=note))
            rows.append(Row(section, f"K={k} fused_epochs batched=on / off", wired["on"] / wired["off"], "x"))
    return rows


def _ratio(result, fast, slow) -> float:
    pairs = list(zip(result[fast], result[slow]))
    return median([s / f for f, s in pairs]) if pairs else float("nan")


# ---- G3: four fractional trials vs one fused trial of four -------------------------------------------------

def _fractional_child(job: dict, barrier, queue) -> None:
    """One fractional trial in its own process: build, warm up, wait for the others, time `steps` steps."""
    try:
        warnings.simplefilter("ignore", RuntimeWarning)
        device = torch.device(job["device"])
        if device.type == "cpu":
            torch.set_num_threads(job["threads"])
        dataset = _dataset(job["batch"], 4)
        parts = _parts(dataset, job["teacher"], job["student"], _teacher_state(job["teacher"], dataset))
        memory: dict = {}
        with peak_memory(device, memory):
            trainer = parts.trainer(_config(dataset, job["teacher"], job["student"], job["batch"], job["precision"],
                                            job["temperature"]), device)
            trainer.begin_epoch()
            stepper = Stepper(trainer, _draw(trainer, 3))
            time_steps(stepper, job["warmup"], device)
            barrier.wait(timeout=job["timeout"])
            started = time.monotonic()
            time_steps(stepper, job["steps"], device)
            ended = time.monotonic()
        trainer.close()
        queue.put({"index": job["index"], "started": started, "ended": ended, **memory})
    except BaseException as error:  # noqa: BLE001 -- reported to the parent, which reports the section failed
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        queue.put({"index": job["index"], "error": f"{type(error).__name__}: {error}"})


def fractional(plan: Plan, deadline: float, log=print) -> dict:
    import queue as queue_module


    teacher, student, batch = plan.pairs[plan.fused_pair]
    context = _processes()
    barrier, queue = context.Barrier(4), context.Queue()
    timeout = max(10.0, deadline - time.monotonic())
    jobs = [{"index": i, "device": str(plan.device), "threads": 1, "teacher": teacher, "student": student,
             "batch": batch, "precision": plan.precision, "temperature": TEMPERATURES[i], "warmup": plan.warmup,
             "steps": plan.fractional_steps, "timeout": timeout} for i in range(4)]
    processes = [context.Process(target=_fractional_child, args=(job, barrier, queue), daemon=True) for job in jobs]
    for process in processes:
        process.start()
    reports = []
    try:
        while len(reports) < 4:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError(f"{len(reports)} of 4 fractional trials reported before the section's time was up")
            try:
                reports.append(queue.get(timeout=wait))
            except queue_module.Empty:
                continue
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()  # our own child, by its handle
                process.join(timeout=5)
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"fractional trial failed: {errors[0]}")
    window = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    four_processes = batch * plan.fractional_steps / window  # each student took `steps` steps in the window
    log(f"  4 processes: {four_processes:.0f} images/s per student over {window:.2f} s")

    # the same four students as one fused trial, in this process
    dataset = _dataset(batch, 4)
    parts = _parts(dataset, teacher, student, _teacher_state(teacher, dataset))
    configs = [_config(dataset, teacher, student, batch, plan.precision, t) for t in TEMPERATURES[:4]]
    memory: dict = {}
    with peak_memory(plan.device, memory):
        members, shared = parts.fused_trainers(configs, plan.device)
        for trainer in members:
            trainer.begin_epoch()
        batches = _draw(members[0], 3)
        fused_step = _fused_stepper(members, shared, batches)

        time_steps(fused_step, plan.warmup, plan.device)
        fused_seconds = time_steps(fused_step, plan.fractional_steps, plan.device)
    for trainer in members:
        trainer.close()
    del members, shared
    release(plan.device)
    fused = batch / fused_seconds
    log(f"  1 fused trial of 4: {fused:.0f} images/s per student")
    return {"four_processes": four_processes, "fused": fused, "window_s": window, "batch": batch,
            "processes": sorted(reports, key=lambda r: r["index"]), "fused_memory": memory}


def fractional_rows(result: dict, plan: Plan) -> list[Row]:
    section = (f"{SECTIONS['G3']} ({plan.fused_pair}, {plan.precision}, batch {result['batch']}, "
               f"{plan.fractional_steps} steps each): images/s per student")
    return [
        Row(section, "4 processes on one device (as Ray gpus_per_trial=0.25)", result["four_processes"], "img/s",
            note=f"window {result['window_s']:.2f} s from the barrier to the last end"),
        Row(section, "1 fused trial of 4 (one process, one teacher forward)", result["fused"], "img/s"),
        Row(section, "fused trial of 4 / 4 fractional trials", result["fused"] / result["four_processes"], "x"),
    ]


# ---- G4: memory --------------------------------------------------------------------------------------------

def memory_per_trial(plan: Plan, deadline: float, log=print) -> list[tuple[str, dict, int]]:
    """(what, {'allocated', 'reserved'} MiB, members): one trial alone per pair, fused and batched trials of K."""
    from kdtune.train.fusion import _teacher_logits

    out = []
    steps = max(2, plan.warmup)
    for label, (teacher, student, batch) in plan.pairs.items():
        if time.monotonic() > deadline:
            break
        dataset = _dataset(batch, 4)
        parts = _parts(dataset, teacher, student, _teacher_state(teacher, dataset))
        memory: dict = {}
        with peak_memory(plan.device, memory):
            trainer = parts.trainer(_config(dataset, teacher, student, batch, plan.precision), plan.device)
            trainer.begin_epoch()
            time_steps(Stepper(trainer, _draw(trainer, 2)), steps, plan.device)
        trainer.close()
        del trainer
        release(plan.device)
        out.append((f"{label}: one trial alone", memory, 1))
        log(f"  {label}: one trial alone: {memory['allocated']:.0f} MiB allocated at peak")
    teacher, student, batch = plan.pairs[plan.fused_pair]
    dataset = _dataset(batch, 4)
    parts = _parts(dataset, teacher, student, _teacher_state(teacher, dataset))
    for k in [k for k in plan.ks if k > 1]:
        if time.monotonic() > deadline:
            break
        configs = [_config(dataset, teacher, student, batch, plan.precision, t) for t in TEMPERATURES[:k]]
        memory = {}
        with peak_memory(plan.device, memory):
            members, shared = parts.fused_trainers(configs, plan.device)
            for trainer in members:
                trainer.begin_epoch()
            batches = _draw(members[0], 2)
            for images, labels, indices in batches * steps:
                logits = _teacher_logits(shared, images, members[0])
                for trainer in members:
                    trainer.train_step(images, labels, indices, logits)
            sync(plan.device)
        lead = members[0]
        for trainer in members:
            trainer.close()
        out.append((f"{plan.fused_pair}: fused trial of {k}, per member", memory, k))
        memory = {}
        try:
            with peak_memory(plan.device, memory):
                step = _batched_step(parts, configs, shared, lead, batches, plan)
                for _ in range(steps):
                    step()
            out.append((f"{plan.fused_pair}: batched (vmap) trial of {k}, per member", memory, k))
        except Exception as error:  # noqa: BLE001
            log(f"  batched K={k}: {type(error).__name__}: {error}")
        del members, shared, lead, batches
        release(plan.device)
    return out


def memory_rows(results: list[tuple[str, dict, int]], fractional_result: dict | None, plan: Plan) -> list[Row]:
    section = f"{SECTIONS['G4']} (torch.cuda.max_memory_allocated, {plan.precision}; MiB per trial)"
    rows = []
    cpu_note = "" if plan.cuda else "CUDA only: not measured on a CPU"
    for what, memory, members in results:
        rows.append(Row(section, what, memory["allocated"] / members, "MiB",
                        note=cpu_note or f"reserved {memory['reserved'] / members:.0f} MiB"))
    if fractional_result:
        for report in fractional_result["processes"]:
            rows.append(Row(section, f"{plan.fused_pair}: fractional trial {report['index'] + 1} of 4 (own process)",
                            report.get("allocated", float("nan")), "MiB",
                            note=cpu_note or f"reserved {report.get('reserved', float('nan')):.0f} MiB, "
                                             "plus its own CUDA context"))
        memory = fractional_result["fused_memory"]
        rows.append(Row(section, f"{plan.fused_pair}: G3's fused trial of 4, per member", memory["allocated"] / 4,
                        "MiB", note=cpu_note or f"reserved {memory['reserved'] / 4:.0f} MiB"))
    if not rows:
        rows.append(Row(section, "not measured", float("nan"), note="section time was up"))
    return rows


# ---- G5: vmap-batched vs sequential fused step, digits pair -------------------------------------------------

def batched_vs_sequential(plan: Plan, deadline: float, log=print) -> list[dict]:
    from benchmarks import loops
    from kdtune.models.refs import model_ref
    from kdtune.train.parts import StudyParts

    threads = torch.get_num_threads()
    if not plan.cuda:
        torch.set_num_threads(1)  # as a study trial runs on a CPU (1 CPU each)
    try:
        dataset = loops.digits_sized(40 * 4)
        torch.manual_seed(0)
        state = model_ref("digits_teacher").build(10, dataset.input_shape).state_dict()
        parts = StudyParts(dataset, model_ref("digits_student"), model_ref("digits_teacher"), state)
        out = []
        for k in (4, 8):
            if time.monotonic() > deadline:
                break
            configs = [trial_config({"dataset": dataset.name, "teacher": "digits_teacher",
                                              "student": "digits_student", "method": "kd", "temperature": float(t),
                                              "alpha": 0.5, "batch_size": 40, "epochs": 1, "augment": "none",
                                              "teacher_cache": "off", "val_fraction": 0.05})
                       for t in TEMPERATURES[:k]]
            members, shared = parts.fused_trainers(configs, plan.device)
            for trainer in members:
                trainer.begin_epoch()
            batches = _draw(members[0], 3)
            sequential = _fused_stepper(members, shared, batches)

            batched = _batched_step(parts, configs, shared, members[0], batches, plan)
            seq, bat = [], []
            for step in (sequential, batched):
                time_steps(step, plan.warmup, plan.device)
            for round_ in range(max(plan.rounds, 3)):
                if round_ and time.monotonic() > deadline:
                    break
                seq.append(time_steps(sequential, plan.digits_steps, plan.device))
                bat.append(time_steps(batched, plan.digits_steps, plan.device))
            for trainer in members:
                trainer.close()
            result = {"k": k, "sequential": 40 / median(seq), "batched": 40 / median(bat),
                      "ratio": median([s / b for s, b in zip(seq, bat)])}
            log(f"  digits K={k}: sequential fused {result['sequential']:.0f}, batched {result['batched']:.0f} "
                f"images/s per student ({result['ratio']:.2f}x)")
            out.append(result)
        return out
    finally:
        torch.set_num_threads(threads)


def batched_rows(results: list[dict], plan: Plan) -> list[Row]:
    where = "1 thread" if not plan.cuda else "GPU"
    section = f"{SECTIONS['G5']} (digits pair, batch 40, fp32, {where}): images/s per student"
    rows = []
    for r in results:
        rows.append(Row(section, f"K={r['k']} sequential fused step (Trainer.train_step x K)", r["sequential"],
                        "img/s"))
        rows.append(Row(section, f"K={r['k']} batched step (vmap)", r["batched"], "img/s"))
        rows.append(Row(section, f"K={r['k']} batched / sequential", r["ratio"], "x"))
    if not rows:
        rows.append(Row(section, "not measured", float("nan"), note="section time was up"))
    return rows


# ---- G6: a short temperature sweep through run_study --------------------------------------------------------

def sweep(plan: Plan, deadline: float, log=print) -> dict:
    """run_study in a child process (python -m benchmarks.gpu --sweep-child), killed at the deadline."""
    workdir = tempfile.mkdtemp(prefix="kdtune-gpu-sweep-")
    out = os.path.join(workdir, "sweep.json")
    job = {**plan.sweep, "workdir": workdir, "out": out}
    timeout = max(5.0, deadline - time.monotonic())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--sweep-child", json.dumps(job)],
                              cwd=HERE.parent, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not os.path.exists(out):
            tail = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
            raise RuntimeError(f"the sweep exited {done.returncode}: {tail}")
        with open(out) as handle:
            result = json.load(handle)
        result["process_s"] = time.monotonic() - started
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the sweep did not finish within its {timeout:.0f} s") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"  {result['finished']}/{result['trials']} trials, wall {result['wall_time_s']:.1f} s, sum of training "
        f"{result['training_time_s']:.1f} s")
    return result


def _sweep_child(job: dict) -> int:
    """The sweep itself (in its own process): seed 000's Table 3 shape, on CIFAR-shaped random images."""
    import numpy as np

    import kdtune
    from kdtune.data import from_arrays
    from kdtune.models.refs import model_ref

    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (job["n_train"], 3, 32, 32), dtype=np.uint8)
    x_test = rng.integers(0, 256, (job["n_test"], 3, 32, 32), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 10, job["n_train"]), rng.integers(0, 10, job["n_test"])
    y_train[:10], y_test[:10] = np.arange(10), np.arange(10)  # every class in both splits
    dataset = from_arrays(x_train, y_train, x_test, y_test, name="cifar_shaped")
    torch.manual_seed(0)
    teacher = model_ref(job["teacher"]).build(10, (3, 32, 32))  # random weights: a python-object teacher, not trained
    variants = [{"label": "baseline", "method": "none"}] if job["baseline"] else []
    variants += [{"label": f"{t:g}", "method": "kd", "temperature": float(t), "alpha": 0.5}
                 for t in job["temperatures"]]
    workdir = Path(job["workdir"])
    spec = kdtune.StudySpec(
        name="gpu_check_temperature_sweep", dataset=dataset, teacher=teacher, student=job["student"],
        variants=variants, label_header="T", title="GPU check: seed 000 temperature sweep (CIFAR-shaped)",
        overrides={"epochs": job["epochs"], "batch_size": job["batch_size"], "augment": "crop:4,flip",
                   "precision": job["precision"], "lr": 0.01},
        gpus_per_trial=job["gpus_per_trial"], cpus_per_trial=job["cpus_per_trial"],
        store_dir=str(workdir / "store"), storage=str(workdir / "ray_results"))
    import logging

    import ray

    started = time.perf_counter()
    # Ray started here (run_study uses a running Ray as it is): this machine's CPUs and, on CUDA, its GPUs
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        result = kdtune.run_study(spec, echo=lambda *a, **k: None)
    finally:
        ray.shutdown()
    payload = {"wall_time_s": result.wall_time_s, "training_time_s": result.training_time_s,
               "driver_s": time.perf_counter() - started, "trials": len(result.trials),
               "finished": sum(t.finished for t in result.trials),
               "per_trial": [{"label": t.label, "status": t.status,
                              "training_time_s": t.metrics.get("training_time_s", float("nan"))}
                             for t in result.trials]}
    with open(job["out"], "w") as handle:
        json.dump(payload, handle)
    return 0


def sweep_rows(result: dict, plan: Plan) -> list[Row]:
    s = plan.sweep
    section = (f"{SECTIONS['G6']} ({s['teacher']} -> {s['student']}, {s['n_train']} CIFAR-shaped train images, "
               f"{'baseline + ' if s['baseline'] else ''}T in {s['temperatures']}, {s['epochs']} epoch(s), "
               f"batch {s['batch_size']}, "
               f"{s['precision']}, gpus_per_trial {s['gpus_per_trial']})")
    wall, training = result["wall_time_s"], result["training_time_s"]
    return [
        Row(section, "wall time (run_study: MLflow server, trials, table)", wall, "s",
            note=f"{result['process_s']:.1f} s with the process's imports and Ray's start"),
        Row(section, "sum of the trials' training time", training, "s",
            note=", ".join(f"{t['label']} {t['training_time_s']:.1f} s" for t in result["per_trial"])),
        Row(section, "sum of training / wall (trials training at once, less overhead)", training / wall, "x"),
        Row(section, "trials finished", result["finished"], note=f"of {result['trials']}"),
    ]


# ---- the run -----------------------------------------------------------------------------------------------

def environment(plan: Plan) -> dict:
    info = common.machine()
    info["device"] = str(plan.device)
    if plan.cuda:
        props = torch.cuda.get_device_properties(plan.device)
        info.update(gpu=torch.cuda.get_device_name(plan.device), gpu_memory_gib=f"{props.total_memory / 2**30:.0f}",
                    gpu_capability=f"{props.major}.{props.minor}", cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    tf32=f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")
    return info


def render(info: dict, command: str, rows, texts: dict, plan: Plan) -> str:
    what = info.get("gpu", f"no GPU: {info['cpu']}, {info['cores']} cores")
    lines = [
        f"## GPU check{' (smoke run: tiny sizes, stand-in models)' if plan.smoke else ''}: {what}",
        "",
        f"- command: `{command}` (from the repository root); {info['date']}; git {info.get('git', '?')}; "
        f"run took {info['duration_s']} s of a {plan.budget_s:.0f} s budget",
        f"- device: {what}" + (f", {info['gpu_memory_gib']} GiB, compute capability {info['gpu_capability']}; "
                               f"CUDA runtime {info['cuda_runtime']}, cuDNN {info['cudnn']}; TF32: {info['tf32']}"
                               if plan.cuda else "") + f"; torch {info['torch']}",
        f"- host: {info['cpu']}, {info['cores']} cores; load average before: {info['load_1_5_15']}",
        "- random weights and CIFAR-shaped random images: speed and memory, nothing is learnt "
        "(benchmarks/gpu.py says how each figure is taken)",
        "",
        table(rows),
    ]
    for title, text in texts.items():
        lines += ["", f"**{title}**", "", "```", text, "```"]
    return "\n".join(lines)


def write_results(report: str, gpu_name: str) -> Path:
    """Put the report below the notes marker of RESULTS.md: replace this GPU's earlier section, else append."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if NOTES_MARK not in text:
        text = text.rstrip("\n") + "\n\n" + NOTES_MARK + "\n"
    begin, end = f"<!-- gpu-check: {gpu_name} -->", f"<!-- /gpu-check: {gpu_name} -->"
    block = f"{begin}\n{report}\n{end}"
    head, notes = text.split(NOTES_MARK, 1)
    if begin in notes and end in notes:
        before, rest = notes.split(begin, 1)
        notes = before + block + rest.split(end, 1)[1]
    else:
        notes = notes.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(head + NOTES_MARK + notes)
    return RESULTS


def run(smoke: bool = False, write: bool = False, budget_s: float | None = None, only: str | None = None,
        log=print) -> int:
    if not torch.cuda.is_available() and not smoke:
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="precision='bf16' on a CPU", category=RuntimeWarning)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_for(smoke, device, budget_s)
    if not plan.cuda:
        # the smoke run: 1 thread (a study trial's 1 CPU); on a shared machine, OpenMP threads waiting on busy
        # cores made a 15 ms digits step take ~1 s with 2 threads
        torch.set_num_threads(1 if plan.smoke else common.threads())
    wanted = {s.strip().upper() for s in (only or ",".join(SECTIONS)).split(",") if s.strip()}
    budget = Budget(plan.budget_s)
    info = environment(plan)
    command = "python -m benchmarks --gpu" + (" --smoke" if smoke else "") + (" --write" if write else "") + (
        f" --budget {budget_s:g}" if budget_s else "") + (f" --gpu-only {only}" if only else "")
    log(f"kdtune GPU check: {command}")
    for key, value in info.items():
        log(f"  {key}: {value}")
    rows, texts, state = [], {}, {}
    benchmark_before = torch.backends.cudnn.benchmark
    # what kdtune's CUDA trials run with (kdtune/train/backends.py, configure_backends), on before this process's first
    # convolution: cuDNN caches the algorithm the first mode picks (see kd_steps)
    torch.backends.cudnn.benchmark = True

    def section(key: str, body) -> None:
        if key not in wanted:
            return
        cap = plan.caps[key]
        if budget.left() < min(cap, 10):
            rows.append(Row(SECTIONS[key], "skipped", float("nan"), note="the run's time budget was spent"))
            log(f"\n[{key}] skipped: {budget.left():.0f} s left of the budget")
            return
        log(f"\n[{key}] {SECTIONS[key]} (at most {min(cap, budget.left()):.0f} s)")
        started = time.monotonic()
        try:
            new = body(budget.deadline(cap))
        except Exception as error:  # noqa: BLE001 -- one section failing leaves the others' figures
            log(traceback.format_exc()[-3000:])
            new = [Row(SECTIONS[key], "FAILED", float("nan"), note=f"{type(error).__name__}: {str(error)[:300]}")]
        rows.extend(new)
        for row in new:
            log(f"  | {row.name}: {row.value_text()}" + (f" ({row.note})" if row.note else ""))
        log(f"  [{key}] took {time.monotonic() - started:.1f} s")

    def g1(deadline):
        results = []
        on_deadline = time.monotonic() + 0.7 * (deadline - time.monotonic())  # the rest: benchmark mode off
        for i, label in enumerate(plan.pairs):  # each pair an equal share of what the section has left
            share = (on_deadline - time.monotonic()) / (len(plan.pairs) - i)
            results.append(kd_steps(plan, label, BENCHMARK_ON, time.monotonic() + share, log))
        try:
            for result, off in zip(results, kd_steps_benchmark_off(plan, deadline)):
                result["times"].update(off["times"])
                log(f"  {result['label']} (own process, cudnn.benchmark off): " + ", ".join(
                    f"{n} {result['batch'] / median(t):.0f}" for n, t in off["times"].items() if t) + " img/s")
        except Exception as error:  # noqa: BLE001 -- the benchmark-on figures stand; the off rows say why not
            log(f"  cudnn.benchmark off: {type(error).__name__}: {error}")
            for result in results:
                result["off_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        texts["G1: which helped (ratio of images/s, median over rounds; > 1.05x helped, < 0.95x hurt)"] = (
            which_helped(results) + ("" if plan.cuda else "\n(a CPU: cudnn.benchmark does nothing here)"))
        return [row for result in results for row in kd_step_rows(result, plan.cuda)]

    def g3(deadline):
        state["fractional"] = fractional(plan, deadline, log)
        return fractional_rows(state["fractional"], plan)

    section("G1", g1)
    section("G2", lambda deadline: fused_rows(fused_vs_unfused(plan, deadline, log), plan))
    section("G3", g3)
    section("G4", lambda deadline: memory_rows(memory_per_trial(plan, deadline, log), state.get("fractional"), plan))
    section("G5", lambda deadline: batched_rows(batched_vs_sequential(plan, deadline, log), plan))
    section("G6", lambda deadline: sweep_rows(sweep(plan, deadline, log), plan))

    torch.backends.cudnn.benchmark = benchmark_before
    info["duration_s"] = f"{time.monotonic() - budget.started:.0f}"
    report = render(info, command, rows, texts, plan)
    log("\n" + report)
    if write:
        if plan.cuda and not plan.smoke:
            log(f"wrote {write_results(report, info['gpu'])}")
        else:
            log("not written to benchmarks/RESULTS.md: only a full run on CUDA is recorded")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="--gpu: every section at tiny sizes (runs on a CPU)")
    parser.add_argument("--budget", type=float, default=None,
                        help="--gpu: seconds for the whole check, every section's cap scaled with it "
                             "(default 465; smoke 170)")
    parser.add_argument("--gpu-only", default=None, help="--gpu: sections to run, e.g. G1,G2 (default: all)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--write", action="store_true", help="record a CUDA run in benchmarks/RESULTS.md")
    parser.add_argument("--sweep-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_child:
        return _sweep_child(json.loads(args.sweep_child))
    return run(smoke=args.smoke, write=args.write, budget_s=args.budget, only=args.gpu_only)


if __name__ == "__main__":
    sys.exit(main())
