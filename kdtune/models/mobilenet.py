"""MobileNetV2 (Sandler et al., 2018) at width 0.5, as the CIFAR-100 KD benchmark uses it (Tian et al., CRD;
RepDistiller's `MobileNetV2` = `mobile_half`, from Jin et al.'s Route Constrained Optimization code).

A 3x3 stride-2 conv with 16 filters, seven groups of inverted residual blocks (MobileNetV2's table, widths
halved: t, c, n, s = 1,8,1,1  6,12,2,1  6,16,3,2  6,32,4,2  6,48,3,1  6,80,3,2  6,160,1,1), a 1x1 conv to
1280 (not halved below width 1, as in MobileNetV2), global average pooling and the classifier. An inverted
residual block is 1x1 expansion conv-BN-ReLU (kept at t = 1 too, as in that code), 3x3 depthwise conv-BN-ReLU,
1x1 projection conv-BN, plus the input where the stride is 1 and the width unchanged. ReLU, not ReLU6, as in
that code. 0.81M parameters for 100 classes (812,836).

Link points (the ends of the four resolution stages, RepDistiller's feature points), for a 32x32 input:
  1 = blocks.1 (12 x 16x16)   2 = blocks.2 (16 x 8x8)   3 = blocks.4 (48 x 4x4)   4 = blocks.6 (160 x 2x2)
  5 = `embedding`, the pooled (N, 1280) vector the classifier reads (what RKD / CRD relate).
An 8x8 input gives 4x4, 2x2, 1x1 and 1x1 at links 1-4; pooling is global, so it builds for any size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kdtune.models.resnet import GlobalAvgPool

# expansion t, output channels c (at width 1), blocks n, first block's stride s
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
HALF_WIDTH = 0.5
MOBILENET_LINK_POINTS = {1: "blocks.1", 2: "blocks.2", 3: "blocks.4", 4: "blocks.6", 5: "embedding"}


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            conv_bn_relu(in_channels, hidden, 1),
            conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: float = HALF_WIDTH):
        super().__init__()
        in_channels = int(STEM_CHANNELS * width)
        self.stem = conv_bn_relu(input_shape[0], in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for expansion, channels, count, stride in SETTINGS:
            out_channels = int(channels * width)
            layers = []
            for index in range(count):
                layers.append(InvertedResidual(in_channels, out_channels, stride if index == 0 else 1, expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        head_channels = int(HEAD_CHANNELS * width) if width > 1 else HEAD_CHANNELS
        self.head = conv_bn_relu(in_channels, head_channels, 1)
        self.pool = GlobalAvgPool()
        self.embedding = nn.Flatten(1)
        self.classifier = nn.Linear(head_channels, num_classes)
        for module in self.modules():  # the initialisation of RepDistiller's code
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.embedding(self.pool(self.head(x))))
