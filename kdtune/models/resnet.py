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
These models have no module whose output is the pooled (N, D) feature: `pool` gives (N, 64, 1, 1), and the
classifier's input (a forward pre-hook on `classifier`) is the (N, 64) vector.

The 'x4' ResNets of the CIFAR-100 KD benchmark (Tian et al., CRD, ICLR 2020; RepDistiller), `resnet8x4` and
`resnet32x4`, are the same 6n+2 design four times as wide: a 32-filter stem, then sections of 64, 128 and
256 filters (16, 32, 64 above); where a block changes width or stride its shortcut is a 1x1 conv with
BatchNorm (option B), the first block of section 1 included (32 -> 64). 1.23M and 7.43M parameters for 100
classes (RESNET_X4 below). Their links are the section ends, 1-3, and link 4 = `embedding`, the pooled
(N, 256) vector the classifier reads (what RKD / CRD relate); X4_LINK_POINTS.
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
    def __init__(self, in_channels: int, out_channels: int, stride: int, projection: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)  # its own module: the section-start link hooks it
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        changes = stride != 1 or in_channels != out_channels
        if not changes:
            self.shortcut = nn.Identity()
        elif projection:  # option B: 1x1 conv + BN
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = PadShortcut(out_channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet by default; `stem`, `widths` and `projection=True` give the 'x4' variants, and
    `embedding=True` adds the `embedding` module (nn.Flatten after the pool) whose output the classifier reads."""

    def __init__(self, depth: int, num_classes: int, input_shape: tuple[int, int, int], *,
                 widths: tuple[int, int, int] = WIDTHS, stem: int | None = None, projection: bool = False,
                 embedding: bool = False):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has 6n+2 layers (8, 14, 20, 26, 32, ...)")
        if len(widths) != 3:
            raise ValueError(f"widths={widths}: a CIFAR ResNet has three sections")
        blocks = (depth - 2) // 6
        stem = widths[0] if stem is None else stem
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        in_channels = stem
        for section, width in enumerate(widths, start=1):
            stride = 1 if section == 1 else 2
            layers = [BasicBlock(in_channels if i == 0 else width, width, stride if i == 0 else 1, projection)
                      for i in range(blocks)]
            self.add_module(f"layer{section}", nn.Sequential(*layers))
            in_channels = width
        self.pool = GlobalAvgPool()
        self.embedding = nn.Flatten(1) if embedding else None  # None: no module, as seed 002's models always had
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # He et al.'s init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        x = torch.flatten(x, 1) if self.embedding is None else self.embedding(x)
        return self.classifier(x)


RESNET_LINK_POINTS = {1: "stem", 2: "layer1", 3: "layer2.0.relu1", 4: "layer2", 5: "layer3.0.relu1", 6: "layer3"}

# RepDistiller's resnet8x4 / resnet32x4: name -> depth; channels [32, 64, 128, 256] = stem, then sections 1-3
RESNET_X4 = {"resnet8x4": 8, "resnet32x4": 32}
X4_STEM, X4_WIDTHS = 32, (64, 128, 256)
X4_LINK_POINTS = {1: "layer1", 2: "layer2", 3: "layer3", 4: "embedding"}


def resnet_x4(depth: int, num_classes: int, input_shape: tuple[int, int, int]) -> CifarResNet:
    return CifarResNet(depth, num_classes, input_shape, widths=X4_WIDTHS, stem=X4_STEM, projection=True, embedding=True)
