"""The teacher's logits on every training sample, once per study: the teacher-logit cache trials read instead of
running the teacher (TrialConfig.teacher_cache)."""
from __future__ import annotations

import torch
from torch import nn

from kdtune.data import Dataset, batch_source
from kdtune.train.devices import pick_device


@torch.no_grad()
def teacher_logits_for(teacher: nn.Module, dataset: Dataset, val_fraction: float,
                       device: torch.device | None = None, batch_size: int = 512) -> torch.Tensor:
    """Teacher logits for every training sample, on un-augmented inputs, row i = sample index i: (N, C), or
    (members, N, C) for an ensemble teacher (kdtune/ensemble.py), whose members' logits are kept apart because
    the soft target they make depends on each trial's temperature (distill/losses.py, ensemble_logits)."""
    device = device or pick_device()
    train_idx, _ = dataset.split(val_fraction)
    mean, std = dataset.channel_stats(train_idx)
    teacher.eval().to(device)
    every = batch_source(dataset, torch.arange(len(dataset.train_labels)), mean, std, device)
    logits = None
    for images, _, indices in every.batches(batch_size):
        out = teacher(images).float().cpu()
        if logits is None:
            logits = torch.empty(*out.shape[:-2], len(every), dataset.num_classes)
        logits[..., indices.cpu(), :] = out
    return logits
