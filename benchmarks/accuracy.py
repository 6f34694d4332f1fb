"""bf16 vs fp32 on digits: final test accuracy over seeds (does mixed precision train as well?) and time.

Each trial runs on one thread, as a study trial does (cpus_per_trial=1).

The teacher is trained once with the digits recipe; each student is a full recipe trial (15 epochs) with the
teacher run online, so the bf16 run exercises the whole mixed-precision path (teacher and student forward
under autocast, the loss in fp32).
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import Row
from kdtune import recipes
from kdtune.data import load_dataset
from kdtune.train.parts import trainer_for
from kdtune.distill import trial_config


def _one_thread(function):
    """Run as a study trial runs (cpus_per_trial=1): one thread."""
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)
    return wrapper


@_one_thread
def train_teacher(log=print) -> dict:
    recipe = recipes.recipe_for("digits")
    config = trial_config({"dataset": "digits", "student": recipe["teacher"], "teacher": recipe["teacher"],
                                    "method": "none", **recipe["teacher_recipe"]})
    trainer = trainer_for(config, load_dataset("digits"))
    started = time.perf_counter()
    for metrics in trainer.epochs():
        pass
    trainer.close()
    log(f"  digits teacher: test accuracy {metrics['test_acc']:.4f} ({time.perf_counter() - started:.1f}s)")
    return trainer.student.state_dict()


@_one_thread
def run(teacher_state: dict, seeds: int = 3, log=print) -> tuple[list[Row], dict]:
    dataset = load_dataset("digits")
    recipe = recipes.recipe_for("digits")
    results = {"fp32": [], "bf16": []}
    times = {"fp32": [], "bf16": []}
    for seed in range(seeds):
        for precision in ("fp32", "bf16"):
            config = trial_config({"dataset": "digits", "teacher": recipe["teacher"],
                                            "student": recipe["student"], **recipe["student_recipe"],
                                            "method": "kd", "temperature": 4.0, "alpha": 0.5, "seed": seed,
                                            "precision": precision, "teacher_cache": "off"})
            trainer = trainer_for(config, dataset, teacher_state)
            for metrics in trainer.epochs():
                pass
            trainer.close()
            results[precision].append(metrics["test_acc"])
            times[precision].append(metrics["training_time_s"])
            log(f"  digits KD T=4 seed {seed} {precision}: test {metrics['test_acc']:.4f} "
                f"({metrics['training_time_s']:.1f}s)")
    mean = {p: statistics.fmean(v) for p, v in results.items()}
    std = {p: statistics.stdev(v) if len(v) > 1 else 0.0 for p, v in results.items()}
    diff = mean["bf16"] - mean["fp32"]
    # noise of the difference of two means (2 sigma), floored at one test sample
    noise = max(2 * ((std["fp32"] ** 2 + std["bf16"] ** 2) / seeds) ** 0.5, 1 / len(dataset.test_labels))
    section = f"1b. bf16 vs fp32 on digits (KD T=4, recipe, {seeds} seeds, teacher online)"
    rows = [
        Row(section, "fp32 test accuracy", mean["fp32"], "", note=f"± {std['fp32']:.4f}"),
        Row(section, "bf16 test accuracy", mean["bf16"], "", note=f"± {std['bf16']:.4f}"),
        Row(section, "bf16 - fp32 (noise = 2 sigma of the difference)", diff, "", f"|diff| <= {noise:.4f}",
            abs(diff) <= noise),
        Row(section, "bf16 / fp32 trial training time", statistics.fmean(times["bf16"]) / statistics.fmean(times["fp32"]),
            "x", "", note="below 1 = bf16 faster"),
    ]
    return rows, {"accuracy": results, "training_time_s": times}
