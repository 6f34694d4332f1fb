"""Fused students: grid trials that share their batches train together, with the teacher run once per batch.

A temperature sweep runs the same teacher on the same batches once per temperature. Trials whose configs agree
on everything that decides the batches and the stages (seed, batch size, epochs, augmentation, validation
split, precision, the teacher cache) and whose methods need only the teacher's logits can share them: each
batch is drawn and augmented once, the teacher runs once, and each member takes its own optimiser step.

Each member trains exactly what its unfused twin trains: the batch order and augmentation come from the shared
per-epoch generator (a function of seed and epoch, the same for every member), the teacher's logits are the
same computation, and each member keeps its own stream of the global random generator (dropout), swapped in
around its step. A member whose loss diverges fails alone; the others go on.

`group_variants` decides the groups (a study option: off, a size, or automatic); kdtune/trial.py runs a group
as one Ray trial with one MLflow child run, checkpoint entry and table row per member.
"""
from __future__ import annotations

from typing import Iterator

import torch

from kdtune.config import TrialConfig
from kdtune.errors import ConfigError, TrainingDiverged

# what decides the batches, the stages and the teacher's inputs: members of a group agree on all of it
SHARED_FIELDS = ("seed", "batch_size", "epochs", "augment", "val_fraction", "precision", "teacher_cache",
                 "deterministic", "stage1_epochs", "dataset", "teacher", "student")
AUTO_GROUP = 8  # 'auto': up to this many members per trial


def group_size(value, trials: int, slots: int) -> int:
    """The largest group for `fuse`: 'auto' fuses only as far as it keeps every trial slot of the cluster busy
    (ceil(trials / slots), at most AUTO_GROUP), so a study on a large cluster still spreads over its nodes."""
    if value == "auto":
        return max(1, min(AUTO_GROUP, -(-trials // max(1, slots))))
    return parse_fuse(value)


def parse_fuse(value) -> int:
    """--fuse off | auto | N -> the largest group (1: no fusion; auto: up to AUTO_GROUP, see group_size)."""
    if value in (None, "off", 0, "0", 1, "1"):
        return 1
    if value == "auto":
        return AUTO_GROUP
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f"fuse={value!r}: expected off, auto or a group size >= 1")
    return size


def fusable(config: TrialConfig) -> bool:
    """Single-stage methods that read only the teacher's logits (no features): their step needs nothing from
    the teacher but its logits on the shared batch."""
    from kdtune import distill

    method = distill.method_class(config.method)(config)
    return len(method.stages()) == 1 and not method.needs_teacher_features


def group_variants(variants: list[dict], base: dict, size: int) -> list[list[dict]]:
    """Variants in groups of at most `size` that may train together (in order; the rest alone)."""
    if size <= 1:
        return [[v] for v in variants]
    groups: dict[tuple, list[list[dict]]] = {}
    order: list[tuple] = []
    for variant in variants:
        config = TrialConfig.from_flat({**base, **{k: v for k, v in variant.items() if k not in ("label", "point")}})
        key = ("alone", len(order)) if not fusable(config) else tuple(
            str(getattr(config, name)) for name in SHARED_FIELDS if name != "seed")
        if key not in groups:
            groups[key] = [[]]
            order.append(key)
        if len(groups[key][-1]) >= size:
            groups[key].append([])
        groups[key][-1].append(variant)
    return [group for key in order for group in groups[key]]


def fused_epochs(trainers: list, teacher: torch.nn.Module | None = None) -> Iterator[dict]:
    """Step every live trainer on the same batches; yield {index: metrics or TrainingDiverged} per epoch.

    `teacher` (shared by the members, which were built with it) runs once per batch for the members that use
    it online; members with cached logits look theirs up themselves."""
    live = [i for i, t in enumerate(trainers) if not t.done]
    lead = trainers[live[0]] if live else None
    while live:
        streams = {}
        for i in live:
            trainers[i].begin_epoch()
            streams[i] = _rng_state(trainers[i].device)
        # one teacher forward for the members that read its logits alone; the rest run (or look up) their own
        shared = [i for i in live if trainers[i].takes_shared_logits] if teacher is not None else []
        if len(shared) < 2:
            shared = []
        for images, labels, indices in lead.train.batches(lead.config.batch_size, lead.batch_generator()):
            logits = _teacher_logits(teacher, images, lead) if shared else None
            for i in live:
                _set_rng_state(trainers[i].device, streams[i])
                trainers[i].train_step(images, labels, indices, logits if i in shared else None)
                streams[i] = _rng_state(trainers[i].device)
        results = {}
        for i in live:
            try:
                results[i] = trainers[i].end_epoch()
            except TrainingDiverged as error:
                results[i] = error
        live = [i for i in live if not isinstance(results[i], TrainingDiverged) and not trainers[i].done]
        if live:
            lead = trainers[live[0]]
        yield results


def _teacher_logits(teacher, images, lead) -> torch.Tensor:
    if lead.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), lead._autocast():
        logits = teacher(images)
    return logits.clone()  # inference tensors cannot enter autograd


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
