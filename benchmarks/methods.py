"""Time per training step of every distillation method relative to KD, side by side in one run.

    python -m benchmarks.methods                       # digits pair, ~1 minute on 2 CPU cores
    python -m benchmarks.methods --pair cifar --steps 4   # resnet32x4 -> resnet8x4 on 32x32 inputs (slow on a CPU)

Every method trains the same student on the same batches with the teacher run online (teacher_cache=off), so the
ratio is the method's own cost (its loss, adapters, memory, discriminator); logits-only methods can skip the
teacher's forward with the cache in a study. Rounds interleave the methods; each round's time is divided by
KD's in the same round and the median over rounds is reported (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdtune.data import from_arrays, load_dataset
from kdtune.distill import trial_config
from kdtune.models import build_model
from kdtune.train.parts import trainer_for

METHODS = {
    "none": {}, "kd": {}, "kd+ls": {"method": "kd", "logit_standardize": True},
    "at": {"links": "1,2,3"}, "rkd": {}, "crd": {"nce_k": 4096}, "dkd": {}, "dist": {}, "ctkd": {},
}
PAIRS = {
    "digits": {"teacher": "digits_teacher", "student": "digits_student", "batch_size": 40},
    "cifar": {"teacher": "resnet32x4", "student": "resnet8x4", "batch_size": 64},
}


def _dataset(pair: str, steps: int, batch: int):
    if pair == "digits":
        return load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + 1) * 2
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 100, (n,), generator=g)
    return from_arrays(images.numpy(), labels.numpy(), images[:batch].numpy(), labels[:batch].numpy(),
                       name="cifar_shaped")


def measure(pair: str, rounds: int, steps: int | None) -> dict[str, float]:
    arch = PAIRS[pair]
    dataset = _dataset(pair, steps or 10, arch["batch_size"])
    torch.manual_seed(0)
    teacher = build_model(arch["teacher"], dataset.num_classes, dataset.input_shape).state_dict()
    trainers = {}
    for label, extra in METHODS.items():
        method = extra.get("method", label)
        config = trial_config({"method": method, **{k: v for k, v in extra.items() if k != "method"},
                               "teacher": arch["teacher"], "student": arch["student"], "dataset": dataset.name,
                               "batch_size": arch["batch_size"], "epochs": rounds + 1, "teacher_cache": "off",
                               "lr": 0.001})
        trainers[label] = trainer_for(config, dataset, teacher)
    ratios: dict[str, list[float]] = {label: [] for label in trainers}
    seconds: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(rounds):
        times = {}
        for label, trainer in trainers.items():
            trainer.begin_epoch()
            batches = trainer.train.batches(arch["batch_size"], trainer.batch_generator())
            batches = [b for _, b in zip(range(steps), batches)] if steps else list(batches)
            start = time.perf_counter()
            for images, labels, indices in batches:
                trainer.train_step(images, labels, indices)
            times[label] = (time.perf_counter() - start) / len(batches)
            trainer.end_epoch()
        for label, value in times.items():
            seconds[label].append(value)
            ratios[label].append(value / times["kd"])
    return {label: (statistics.median(seconds[label]), statistics.median(ratios[label])) for label in trainers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, help="steps per round (default: a whole epoch)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = measure(args.pair, args.rounds, args.steps)
    print(f"{args.pair} pair, {args.rounds} rounds, {args.threads} thread(s), teacher online; median per step")
    print(f"{'method':>8}  {'ms/step':>8}  {'x KD':>6}")
    for label, (per_step, ratio) in results.items():
        print(f"{label:>8}  {1000 * per_step:>8.2f}  {ratio:>6.2f}")


if __name__ == "__main__":
    main()
