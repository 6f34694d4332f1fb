"""VGG-style networks with named link points.

One class serves every VGG-shaped model in kdtune: a list of conv stages (each stage = 3x3 convs of the given
widths, then a 2x2 max-pool) and a list of hidden fully connected widths. Seed 000 Table 1:
  VGG-16: [64,64] [128,128] [256,256,256] [512,512,512] [512,512], FC-4096 FC-4096 FC-10
  VGG-7:  [64]    [128]     [256]         [512]         [512],      FC-4096 FC-10
Link k (k = 1..stages) is the output of stage k's last conv (after ReLU, before the pool);
the last link is the output of the last hidden FC layer (after ReLU): links 1-6 of Table 1.
"""
from __future__ import annotations

import torch
from torch import nn


class VGG(nn.Module):
    def __init__(
        self,
        stages: list[list[int]],
        hidden: list[int],
        num_classes: int,
        input_shape: tuple[int, int, int],
        batch_norm: bool = False,
    ):
        super().__init__()
        in_channels, height, width = input_shape
        self.stage_names = []
        for index, widths in enumerate(stages, start=1):
            layers: list[nn.Module] = []
            for out_channels in widths:
                layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(nn.ReLU(inplace=True))
                in_channels = out_channels
            self.add_module(f"block{index}", nn.Sequential(*layers))
            self.add_module(f"pool{index}", nn.MaxPool2d(2))
            self.stage_names.append(f"block{index}")
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"input {input_shape} is too small for {len(stages)} pooling stages")
        features = in_channels * height * width
        self.fc_names = []
        for index, out_features in enumerate(hidden, start=1):
            self.add_module(f"fc{index}", nn.Sequential(nn.Linear(features, out_features), nn.ReLU(inplace=True)))
            self.fc_names.append(f"fc{index}")
            features = out_features
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, name in enumerate(self.stage_names, start=1):
            x = getattr(self, f"pool{index}")(getattr(self, name)(x))
        x = torch.flatten(x, 1)
        for name in self.fc_names:
            x = getattr(self, name)(x)
        return self.classifier(x)


def vgg_link_points(num_stages: int, num_hidden: int) -> dict[int, str]:
    points = {k: f"block{k}" for k in range(1, num_stages + 1)}
    if num_hidden:
        points[num_stages + 1] = f"fc{num_hidden}"
    return points


VGG16_STAGES = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
VGG7_STAGES = [[64], [128], [256], [512], [512]]
