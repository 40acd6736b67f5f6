"""CIFAR-style ResNets (3x3 stem, no max-pool), usable on any image size through global pooling."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False), _bn(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), _bn(width),
        )
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.residual = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), _bn(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), _bn(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False), _bn(out),
        )
        self.shortcut = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))


class ResNet(nn.Sequential):
    """ResNet-18 (basic blocks 2-2-2-2) or ResNet-50 (bottlenecks 3-4-6-3) body."""

    PLANS: ClassVar[dict] = {"resnet18": (_Basic, (2, 2, 2, 2)), "resnet50": (_Bottleneck, (3, 4, 6, 3))}

    def __init__(self, name: str, channels: int) -> None:
        block, depths = self.PLANS[name]
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _bn(64), nn.ReLU(inplace=True)]
        cin = 64
        for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(cin, width, stride))
                cin = width * block.expansion
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = cin
