"""ShuffleNetV2 (Ma et al., 2018) as the CIFAR-100 KD benchmark uses it (Tian et al., CRD; RepDistiller's
`ShuffleV2`, net_size 1): the ImageNet design fitted to 32x32 inputs.

A 1x1 conv with 24 filters (no stride, no max-pool), three stages of 116, 232 and 464 channels, a 1x1 conv
to 1024, global average pooling and the classifier. Each stage is a down-sampling unit (stride 2; both
branches keep half the output channels) followed by 3, 7 and 3 basic units (RepDistiller's layout: the
down-sampling unit comes on top of these, so stage 1 has 4 units). A basic unit splits the channels in two,
sends one half through 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU, concatenates the halves
and shuffles the channels (two groups). 1.36M parameters for 100 classes (1,355,528; often quoted as 1.35M).

Link points, for a 32x32 input: 1-3 = stage outputs, after the last shuffle (116 x 16x16, 232 x 8x8,
464 x 4x4); 4 = `embedding`, the pooled (N, 1024) vector the classifier reads (what RKD / CRD relate).
An 8x8 input leaves 1x1 after stage 3; pooling is global, so any size of at least 1x1 there works.
"""
from __future__ import annotations

import torch
from torch import nn

from kdtune.models.resnet import GlobalAvgPool

STAGE_CHANNELS = (116, 232, 464)
STAGE_UNITS = (3, 7, 3)  # basic units after each stage's down-sampling unit
STEM_CHANNELS, HEAD_CHANNELS = 24, 1024
SHUFFLENET_LINK_POINTS = {1: "layer1", 2: "layer2", 3: "layer3", 4: "embedding"}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, depthwise: bool = False,
            relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                  groups=in_channels if depthwise else 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicUnit(nn.Module):
    """Stride 1: half the channels pass unchanged, the other half goes through the branch."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, depthwise=True, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, rest = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(rest)], 1))


class DownUnit(nn.Module):
    """Stride 2: both branches read the whole input and give half the output channels each."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, stride=2, depthwise=True, relu=False),
            conv_bn(in_channels, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, half, 1),
            conv_bn(half, half, 3, stride=2, depthwise=True, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 stage_channels: tuple[int, ...] = STAGE_CHANNELS, stage_units: tuple[int, ...] = STAGE_UNITS,
                 head_channels: int = HEAD_CHANNELS):
        super().__init__()
        self.stem = conv_bn(input_shape[0], STEM_CHANNELS, 1)
        in_channels = STEM_CHANNELS
        self.stage_names = []
        for stage, (channels, units) in enumerate(zip(stage_channels, stage_units), start=1):
            layers = [DownUnit(in_channels, channels)] + [BasicUnit(channels) for _ in range(units)]
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
            self.stage_names.append(f"layer{stage}")
            in_channels = channels
        self.head = conv_bn(in_channels, head_channels, 1)
        self.pool = GlobalAvgPool()
        self.embedding = nn.Flatten(1)
        self.classifier = nn.Linear(head_channels, num_classes)  # PyTorch's default init, as RepDistiller's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.classifier(self.embedding(self.pool(self.head(x))))
