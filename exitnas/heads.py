"""Exit-head designs, in a registry. Each head maps a feature map [N, C, H, W] to logits
[N, num_classes] and is built with keyword-only ``in_channels`` and ``num_classes``.

Add your own with ``@HEADS.register("name")``; the name can then be used in a search space.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Global average pool + Linear."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@HEADS.register("sdn_pool")
class SDNPoolHead(nn.Module):
    """SDN's mixed pooling: ``a * maxpool + (1 - a) * avgpool`` to 4x4, flatten, Linear, with a
    learnable mixing weight ``a = sigmoid(mix_logit)`` (0.5 at initialisation).

    ``a`` is kept in (0, 1) through the sigmoid: the unconstrained scalar of the SDN paper
    gathers gradient from every pooled element, left [0, 1] and blew the loss up to 1e5 at
    learning rate 0.1 in our CIFAR-10 retraining runs."""

    size = 4

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.mix_logit = nn.Parameter(torch.tensor(0.0))
        self.max_pool = nn.AdaptiveMaxPool2d(self.size)
        self.avg_pool = nn.AdaptiveAvgPool2d(self.size)
        self.fc = nn.Linear(in_channels * self.size * self.size, num_classes)

    @property
    def mix(self) -> torch.Tensor:
        return torch.sigmoid(self.mix_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.mix
        mixed = a * self.max_pool(x) + (1 - a) * self.avg_pool(x)
        return self.fc(torch.flatten(mixed, 1))


@HEADS.register("conv")
class ConvHead(nn.Module):
    """ZTW / MSDNet style: 3x3 conv-BN-ReLU (same width), global average pool, Linear."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@HEADS.register("mlp")
class MLPHead(nn.Module):
    """Global average pool + Linear(C, C)-ReLU-Linear(C, classes) (hidden width = C)."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True),
                                 nn.Linear(in_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(self.pool(x), 1))


def build_head(name: str, *, in_channels: int, num_classes: int,
               pre_channels: int | None = None) -> nn.Module:
    """Build head ``name``; ``pre_channels`` puts a 1x1 conv-BN-ReLU6 in front (MobileNetV2's
    last layer before its classifier)."""
    head = HEADS.get(name)(in_channels=pre_channels or in_channels, num_classes=num_classes)
    if pre_channels is None:
        return head
    pre = nn.Sequential(nn.Conv2d(in_channels, pre_channels, 1, bias=False),
                        nn.BatchNorm2d(pre_channels), nn.ReLU6(inplace=True))
    return nn.Sequential(pre, head)
