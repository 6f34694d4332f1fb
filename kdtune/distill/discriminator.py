"""The discriminator both adversarial methods train on logits, and its own optimiser.

Seed 003 §3: a multi-layer perceptron with three layers, dropout 0.3. Its output size is the method's:
C + 2 for seed 003 (labels, then real/fake), 1 for seed 004 (the logit of 'comes from the student').
"""
from __future__ import annotations

import torch
from torch import nn

from kdtune.config import Param, TrialConfig

DROPOUT = 0.3  # seed 003 §3, for the discriminator


class LogitDiscriminator(nn.Module):
    def __init__(self, num_classes: int, hidden: int, outputs: int, dropout: float = DROPOUT):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, outputs),
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits)


def discriminator_optimizer(discriminator: nn.Module, config: TrialConfig) -> torch.optim.Optimizer:
    """SGD like the student's (seed 003 trains both with SGD), at disc_lr (default: the student's lr)."""
    lr = config.lr if config.disc_lr is None else config.disc_lr
    return torch.optim.SGD(discriminator.parameters(), lr=lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


ADV_WEIGHT = Param("adv_weight", 1.0, low=0.0, search=(0.01, 10.0), log=True, short="adv",
                   help="seed 003: weight of L_GAN; seed 004: beta of -beta * L_class")
DISC_LR = Param("disc_lr", None, low=0.0, low_open=True, optional=True, search=(1e-4, 1e-1), log=True,
                help="the discriminator's SGD learning rate (default: the student's lr)")
DISC_HIDDEN = Param("disc_hidden", 128, kind="int", low=1, help="width of the discriminator's two hidden layers")
