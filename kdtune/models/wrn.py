"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, 2016), as seed 003 uses them.

d = 6n+4: a 3x3 conv with 16 filters, three groups of n pre-activation basic blocks (BN-ReLU-conv3x3,
[dropout], BN-ReLU-conv3x3) with 16k, 32k and 64k filters on 32x32, 16x16 and 8x8 maps, then BN-ReLU,
global average pooling and the classifier. Where a block changes the width or the stride, its shortcut is a
1x1 conv, as in the authors' code; convs have no bias. Parameter counts for CIFAR-10 (10 classes):
WRN-40-10 55.6M, WRN-22-4 4.3M, WRN-10-4 1.2M. Seed 003 trains its students with dropout 0.3.

Links 1, 2, 3 are the outputs of groups 1-3 (16k x 32x32, 32k x 16x16, 64k x 8x8 for a 32x32 input), so
every WRN pair shares them; channel counts differ between widths (an adapter's job). Seed 003's WRNs have no
module whose output is the pooled (N, D) feature (`pool` gives (N, 64k, 1, 1)); it is the classifier's input.

The CIFAR-100 KD benchmark's WRNs (Tian et al., CRD; RepDistiller's wrn_40_2, wrn_16_2, wrn_40_1) are this
same network without dropout (RepDistiller's WideResNet: same blocks, same projecting shortcuts on the
pre-activated input, final BN-ReLU): 2.26M, 0.70M and 0.57M parameters for 100 classes (CIFAR_KD_WRNS).
They are built with `embedding=True`: an nn.Flatten named `embedding` after the pool, whose (N, 64k) output
is the classifier's input, is their link 4 (KD_WRN_LINK_POINTS).
"""
from __future__ import annotations

import torch
from torch import nn

from kdtune.models.resnet import GlobalAvgPool


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if changes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(pre)))))
        # A projecting shortcut reads the pre-activated input, as in the authors' code.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, input_shape: tuple[int, int, int],
                 dropout: float = 0.0, embedding: bool = False):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth}: a WRN has 6n+4 layers (10, 16, 22, 28, 40, ...)")
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)
        in_channels = 16
        for group, width in enumerate((16 * widen, 32 * widen, 64 * widen), start=1):
            stride = 1 if group == 1 else 2
            layers = [WideBlock(in_channels if i == 0 else width, width, stride if i == 0 else 1, dropout)
                      for i in range(blocks)]
            self.add_module(f"group{group}", nn.Sequential(*layers))
            in_channels = width
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = GlobalAvgPool()
        self.embedding = nn.Flatten(1) if embedding else None  # None: no module, as seed 003's WRNs always had
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        x = self.pool(torch.relu(self.bn(x)))
        x = torch.flatten(x, 1) if self.embedding is None else self.embedding(x)
        return self.classifier(x)


WRN_LINK_POINTS = {1: "group1", 2: "group2", 3: "group3"}

# RepDistiller's names -> (depth, widen); dropout 0 as in its training scripts
CIFAR_KD_WRNS = {"wrn_40_2": (40, 2), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1)}
KD_WRN_LINK_POINTS = {**WRN_LINK_POINTS, 4: "embedding"}
