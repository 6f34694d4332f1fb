"""Multi-layer perceptrons: any input shape is flattened, then hidden ReLU layers, then the classifier.

Link k is the output of hidden layer k (after ReLU, before dropout), so MLPs with the same number of hidden
layers share their link numbers. Seed 004 §4 counts weights only: 2x1200 on MNIST's 784 inputs is
784*1200 + 1200*1200 + 1200*10 = 2,392,800; biases add one per unit.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden: list[int], num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        features = math.prod(input_shape)
        self.hidden_names = []
        for index, width in enumerate(hidden, start=1):
            self.add_module(f"hidden{index}", nn.Sequential(nn.Linear(features, width), nn.ReLU(inplace=True)))
            self.hidden_names.append(f"hidden{index}")
            features = width
        # Kept apart from hiddenK so a link sees the feature itself, not a randomly zeroed copy.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for name in self.hidden_names:
            x = self.dropout(getattr(self, name)(x))
        return self.classifier(x)


def mlp_link_points(num_hidden: int) -> dict[int, str]:
    return {k: f"hidden{k}" for k in range(1, num_hidden + 1)}
