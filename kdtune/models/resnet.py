"""CIFAR ResNets of He et al. (2016, §4.2): 6n+2 layers, as seed 002 uses them (ResNet-8, -26, -32).

A 3x3 conv with 16 filters, then three sections of n basic blocks (two 3x3 convs each) with 16, 32 and 64
filters on 32x32, 16x16 and 8x8 maps, global average pooling and the classifier. The first block of
sections 2 and 3 halves the map with stride 2; its shortcut subsamples and zero-pads the channels
(option A, parameter-free), so ResNet-32 has 0.46M parameters and ResNet-8 0.078M as in the paper.

Link points (FSP, seed 002: a matrix between the start and the end of each section, same spatial size):
  link 1 = section 1 start: the first conv's output (16 x 32x32)     link 2 = section 1 end (16 x 32x32)
  link 3 = section 2 start: first block's first conv, after the stride (32 x 16x16)
                                                                     link 4 = section 2 end (32 x 16x16)
  link 5 = section 3 start (64 x 8x8)                                link 6 = section 3 end (64 x 8x8)
Every depth has all six points with the same shapes, so any pair of depths can be linked; FSP_PAIRS lists
the (start, end) pairs. The section input itself is not used at sections 2 and 3: it has twice the size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FSP_PAIRS = ((1, 2), (3, 4), (5, 6))
WIDTHS = (16, 32, 64)


class GlobalAvgPool(nn.Module):
    """Mean over height and width (N, C, 1, 1): AdaptiveAvgPool2d(1)'s result, but its CUDA backward is
    deterministic, so `deterministic=true` trials can run these models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class PadShortcut(nn.Module):
    """Option A: take every other pixel and append zero channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)  # its own module: the section-start link hooks it
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = PadShortcut(out_channels - in_channels) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, input_shape: tuple[int, int, int]):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 26, 32, ...)")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], WIDTHS[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(WIDTHS[0]), nn.ReLU(inplace=True))
        in_channels = WIDTHS[0]
        for section, width in enumerate(WIDTHS, start=1):
            stride = 1 if section == 1 else 2
            layers = [BasicBlock(in_channels if i == 0 else width, width, stride if i == 0 else 1) for i in range(blocks)]
            self.add_module(f"layer{section}", nn.Sequential(*layers))
            in_channels = width
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # He et al.'s init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


RESNET_LINK_POINTS = {1: "stem", 2: "layer1", 3: "layer2.0.relu1", 4: "layer2", 5: "layer3.0.relu1", 6: "layer3"}
