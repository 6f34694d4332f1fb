"""Fused students vs one trial per setting: a 9-temperature sweep step, side by side in one run.

VGG-16 -> VGG-7 on CIFAR-shaped data (crop + flip, batch 128, teacher online, as a CIFAR sweep trains) and the
digits pair (batch 40, one thread, as a study trial runs). Unfused: each of the 9 students steps on its own,
running the teacher itself. Fused: one teacher forward per batch, the 9 students stepping on it
(kdtune/train/fusion.py). Both sides run the same Trainers on the same batches; the figure is images per second per
student, the ratio fused/unfused, median over rounds. That step has the teacher online on both pairs; the digits
sweep a study runs by default caches the teacher's logits instead, and `measure_epochs` times its whole epochs
both ways (section 5c): cached, fusing shares only the batch drawing.

    python -m benchmarks.fused            # or: python -m benchmarks --only fused
"""
from __future__ import annotations

import time

import torch

from benchmarks import loops
from benchmarks.common import Row, median
from kdtune.config import TrialConfig
from kdtune.train.fusion import _teacher_logits
from kdtune.models.refs import model_ref
from kdtune.train.parts import StudyParts
from kdtune.distill import trial_config

TEMPERATURES = (0.6, 1, 1.5, 2, 2.5, 3, 5, 10, 40)
PAIRS = {"vgg": ("vgg16", "vgg7", 128, "crop:4,flip"), "digits": ("digits_teacher", "digits_student", 40, "none")}


def _parts(pair: str, batches: int) -> tuple[StudyParts, list[TrialConfig]]:
    teacher, student, batch, augment = PAIRS[pair]
    dataset = loops.cifar_shaped(batch * batches) if pair == "vgg" else loops.digits_sized(batch * batches)
    torch.manual_seed(0)
    state = model_ref(teacher).build(10, dataset.input_shape).state_dict()
    configs = [trial_config({"dataset": dataset.name, "teacher": teacher, "student": student,
                                      "method": "kd", "temperature": float(t), "alpha": 0.5, "batch_size": batch,
                                      "epochs": 1, "augment": augment, "teacher_cache": "off", "val_fraction": 0.05})
               for t in TEMPERATURES]
    return StudyParts(dataset, model_ref(student), model_ref(teacher), state), configs


def _batches(trainer, steps: int):
    generator = trainer.batch_generator()
    return [batch for _, batch in zip(range(steps), trainer.train.batches(trainer.config.batch_size, generator))]


def _unfused(parts, configs, steps: int) -> float:
    """Seconds for every student to take `steps` steps alone, each running its own teacher."""
    trainers = [parts.trainer(c) for c in configs]
    spent = 0.0
    for trainer in trainers:
        trainer.begin_epoch()
        batches = _batches(trainer, steps)
        started = time.perf_counter()
        for images, labels, indices in batches:
            trainer.train_step(images, labels, indices)
        spent += time.perf_counter() - started
    return spent


def _fused(parts, configs, steps: int) -> float:
    """Seconds for the same steps fused: one teacher forward per batch, every student stepping on it."""
    trainers, teacher = parts.fused_trainers(configs)
    for trainer in trainers:
        trainer.begin_epoch()
    lead = trainers[0]
    batches = _batches(lead, steps)
    started = time.perf_counter()
    for images, labels, indices in batches:
        logits = _teacher_logits(teacher, images, lead)
        for trainer in trainers:
            trainer.train_step(images, labels, indices, logits)
    return time.perf_counter() - started


def measure(pair: str, rounds: int, steps: int, threads: int, log=print) -> dict:
    torch.set_num_threads(threads)
    parts, configs = _parts(pair, steps + 2)
    batch = configs[0].batch_size
    per_student = {"unfused": [], "fused": []}
    for round_ in range(rounds):
        unfused, fused = _unfused(parts, configs, steps), _fused(parts, configs, steps)
        for key, seconds in (("unfused", unfused), ("fused", fused)):
            per_student[key].append(batch * steps * len(configs) / seconds / len(configs))
        log(f"  [{pair}] round {round_ + 1}: unfused {unfused:.2f}s, fused {fused:.2f}s "
            f"({unfused / fused:.2f}x)")
    return {"pair": pair, "threads": threads, "steps": steps, "students": len(configs),
            "unfused": median(per_student["unfused"]), "fused": median(per_student["fused"])}


def rows(result: dict) -> list[Row]:
    section = "5. fused students (9-temperature sweep step, images/s per student)"
    name = {"vgg": "VGG-16 -> VGG-7, batch 128, crop+flip, teacher online",
            "digits": "digits pair, batch 40, 1 thread, teacher online (not a study's default: 5c)"}[result["pair"]]
    ratio = result["fused"] / result["unfused"]
    target = ">= 1.8" if result["pair"] == "vgg" else ""
    return [Row(section, f"{name}: unfused", result["unfused"], "img/s"),
            Row(section, f"{name}: fused", result["fused"], "img/s"),
            Row(section, f"{name}: fused / unfused", ratio, "x", target,
                (ratio >= 1.8) if result["pair"] == "vgg" else None)]


def measure_epochs(teacher_cache: str, rounds: int = 5, epochs: int = 3, log=print) -> dict:
    """The digits sweep as its trials train it: whole epochs (batches drawn, steps, evaluation) through the trial
    path (kdtune.train.fusion.fused_epochs, the 9 temperatures as one fused trial) against each setting's own epochs.
    teacher_cache "auto" is what a digits study does by default (logits-only methods, no augmentation: the teacher's
    logits are cached once, so fusing shares only the batch drawing); "off" runs the teacher online, where the
    fused trial runs it once per batch instead of 9 times. Trainer set-up is not timed; one thread, as a trial."""
    from kdtune.data import load_dataset
    from kdtune.train.teacher_logits import teacher_logits_for
    from kdtune.train.fusion import fused_epochs

    torch.set_num_threads(1)
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    state = model_ref("digits_teacher").build(10, dataset.input_shape).state_dict()
    configs = [trial_config({"method": "kd", "temperature": float(t), "alpha": 0.5, "epochs": epochs,
                             "teacher_cache": teacher_cache}) for t in TEMPERATURES]
    logits = None
    if teacher_cache != "off":
        teacher = model_ref("digits_teacher").build(10, dataset.input_shape)
        teacher.load_state_dict(state)
        logits = teacher_logits_for(teacher, dataset, configs[0].val_fraction)
    parts = StudyParts(dataset, model_ref("digits_student"), model_ref("digits_teacher"), state, logits)
    images = epochs * len(dataset.split(configs[0].val_fraction)[0]) * len(configs)

    def alone() -> tuple[float, float]:
        wall = cpu = 0.0
        for config in configs:
            trainer = parts.trainer(config)
            started, started_cpu = time.perf_counter(), time.process_time()
            for _ in trainer.epochs():
                pass
            wall, cpu = wall + time.perf_counter() - started, cpu + time.process_time() - started_cpu
        return wall, cpu

    def fused() -> tuple[float, float]:
        trainers, shared = parts.fused_trainers(configs)
        started, started_cpu = time.perf_counter(), time.process_time()
        for _ in fused_epochs(trainers, shared):
            pass
        return time.perf_counter() - started, time.process_time() - started_cpu

    ratios, cpu_ratios, throughput = [], [], {"unfused": [], "fused": []}
    for round_ in range(rounds):
        # alternate which side runs first, so a drift in the machine's load lands on both alike
        if round_ % 2:
            (fused_s, fused_cpu), (alone_s, alone_cpu) = fused(), alone()
        else:
            (alone_s, alone_cpu), (fused_s, fused_cpu) = alone(), fused()
        ratios.append(alone_s / fused_s)
        cpu_ratios.append(alone_cpu / fused_cpu)
        throughput["unfused"].append(images / alone_s / len(configs))
        throughput["fused"].append(images / fused_s / len(configs))
        log(f"  [digits epochs, teacher_cache={teacher_cache}] round {round_ + 1}: 9 alone {alone_s:.2f}s "
            f"({alone_cpu:.2f} CPU-s), fused {fused_s:.2f}s ({fused_cpu:.2f} CPU-s): {ratios[-1]:.2f}x "
            f"(CPU-time {cpu_ratios[-1]:.2f}x)")
    return {"teacher_cache": teacher_cache, "epochs": epochs, "cached": logits is not None,
            "unfused": median(throughput["unfused"]), "fused": median(throughput["fused"]),
            "ratio": median(ratios), "cpu_ratio": median(cpu_ratios)}


def epoch_rows(result: dict) -> list[Row]:
    section = "5c. the digits sweep's epochs fused (9 temperatures, whole epochs through the trial path, 1 thread)"
    name = ("teacher logits cached (teacher_cache=auto, the default)" if result["cached"]
            else "teacher online (teacher_cache=off)")
    return [Row(section, f"{name}: unfused", result["unfused"], "img/s"),
            Row(section, f"{name}: fused", result["fused"], "img/s"),
            Row(section, f"{name}: fused / unfused (median of the rounds' ratios)", result["ratio"], "x",
                note=f"CPU-time ratio {result['cpu_ratio']:.2f}x")]


def accuracy_twins(epochs: int = 15, lr: float = 0.03, log=print) -> dict:
    """The 9-temperature digits sweep trained fused (kdtune.train.fusion.fused_epochs, the trial path) and each
    setting alone, same seed, teacher online: each member's test accuracy both ways (the issue: "show both")."""
    from kdtune.data import load_dataset
    from kdtune.train.fusion import fused_epochs
    from kdtune.train.parts import trainer_for

    torch.set_num_threads(1)
    dataset = load_dataset("digits")
    teacher = trainer_for(trial_config({"student": "digits_teacher", "method": "none", "epochs": 12,
                                                 "lr": 0.05}), dataset)
    list(teacher.epochs())
    parts = StudyParts(dataset, model_ref("digits_student"), model_ref("digits_teacher"),
                       teacher.student.state_dict())
    configs = [trial_config({"method": "kd", "temperature": float(t), "alpha": 0.5, "epochs": epochs,
                                      "lr": lr, "teacher_cache": "off"}) for t in TEMPERATURES]
    trainers, shared = parts.fused_trainers(configs)
    fused = {}
    for results in fused_epochs(trainers, shared):
        fused.update({i: m["test_acc"] for i, m in results.items() if "test_acc" in m})
    alone = [list(parts.trainer(c).epochs())[-1]["test_acc"] for c in configs]
    log("  [accuracy] T: fused / unfused test accuracy: " + ", ".join(
        f"{t:g}: {fused[i]:.4f} / {alone[i]:.4f}" for i, t in enumerate(TEMPERATURES)))
    return {"temperatures": list(TEMPERATURES), "fused": [fused[i] for i in range(len(configs))], "alone": alone,
            "epochs": epochs, "lr": lr}


def accuracy_rows(result: dict) -> list[Row]:
    section = (f"5b. fused vs unfused accuracy (digits, 9 temperatures, {result['epochs']} epochs, "
               f"lr {result['lr']:g}, seed 0, teacher online)")
    diff = max(abs(a - b) for a, b in zip(result["fused"], result["alone"]))
    each = "; ".join(f"T={t:g} {f:.4f}/{a:.4f}" for t, f, a in
                     zip(result["temperatures"], result["fused"], result["alone"]))
    return [Row(section, "mean test accuracy over the 9 members: fused", sum(result["fused"]) / 9, ""),
            Row(section, "mean test accuracy over the 9 members: unfused", sum(result["alone"]) / 9, ""),
            Row(section, "largest |fused - unfused| over the members", diff, "", "0 (same computation)", diff == 0,
                note=each)]


def main() -> int:
    import argparse

    from benchmarks.common import threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="VGG steps per student per round")
    args = parser.parse_args()
    digits = measure("digits", args.rounds, 20, 1)
    vgg = measure("vgg", args.rounds, args.steps, threads())
    for result in (digits, vgg):
        for row in rows(result):
            print(f"{row.name}: {row.value_text()} {row.unit}")
    for cache in ("auto", "off"):
        for row in epoch_rows(measure_epochs(cache, args.rounds)):
            print(f"{row.name}: {row.value_text()} {row.unit}")
    print(f"fused/unfused: {vgg['fused'] / vgg['unfused']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
