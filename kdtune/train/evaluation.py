"""A model's accuracy and mean cross-entropy on a split (Trainer.evaluate: validation every epoch, test at the end)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kdtune.data import DeviceData


@torch.no_grad()
def evaluate(model: nn.Module, split: DeviceData, batch_size: int, device: torch.device,
             autocast: Callable) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model`, put in eval mode, on a split, in batches of `batch_size`, each
    forward under `autocast()` (the trial's precision); one device sync at the end."""
    model.eval()
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    for images, labels, _ in split.batches(batch_size):
        with autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    return float(correct) / len(split), float(loss_sum) / len(split)
