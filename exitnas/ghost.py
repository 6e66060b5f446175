"""GhostNet's Ghost bottleneck (Han et al., "GhostNet: More Features from Cheap Operations",
CVPR 2020), a block of the ``mobilenetv2`` family.

A Ghost module makes ``out`` feature maps from ``m = ceil(out / ratio)`` intrinsic ones (a 1x1
convolution) and ``m * (ratio - 1)`` cheap ones (a d x d depthwise convolution of the intrinsic
maps), concatenated and cut to ``out``. ratio 2, d 3, as the paper's networks use. On an H x W
map with ``c`` input channels it costs ``H*W*m*c + H*W*m*(ratio-1)*d*d`` MACs in its two
convolutions (the paper's ``n/s * h'w' * c * k*k + (s-1) * n/s * h'w' * d*d`` with k = 1, n/s
rounded up: every cheap map is computed, also one cut off for an odd ``out``), plus its two
BatchNorms as fvcore counts them (:mod:`exitnas.cost`).

The bottleneck: a Ghost module expands to ``in_channels * expand_ratio`` channels (ReLU), then,
at stride 2, a ``kernel`` x ``kernel`` depthwise convolution + BN (no activation), optionally
squeeze-excitation (GhostNet's: reduce to ``se`` x the width rounded to a multiple of 4, ReLU,
expand, hard sigmoid), and a Ghost module projects to ``channels`` (no ReLU); the shortcut
adds the input itself at stride 1 and unchanged width (such a block may be skipped by elastic
depth), else a depthwise ``kernel`` x ``kernel`` convolution (the stride) + BN + 1x1
convolution + BN.

In a space file (``backbone.block: ghost_bottleneck``) each stage sets ``expand_ratio`` as for
the inverted residual, and optionally ``kernel`` (3; GhostNet uses 3 and 5) and ``se`` (the
squeeze ratio; GhostNet 0.25; unset: none). Every op is one fvcore or exitnas already counts
(concatenation and slicing count 0; the gate is ``hardsigmoid``).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from .blocks import BLOCKS, conv_bn


def make_divisible(value: float, divisor: int = 4) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``, and not
    more than 10 % below ``value``): GhostNet's (and MobileNet's) channel rounding."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class GhostModule(nn.Module):
    """``out_channels`` maps: ``primary`` (1x1 conv-BN[-ReLU]) gives ceil(out / ratio),
    ``cheap`` (depthwise ``cheap_kernel`` conv-BN[-ReLU] of those) the rest."""

    def __init__(self, *, in_channels: int, out_channels: int, relu: bool, ratio: int = 2,
                 cheap_kernel: int = 3) -> None:
        super().__init__()
        self.out_channels = out_channels
        m = math.ceil(out_channels / ratio)
        self.primary = nn.Sequential(*conv_bn(in_channels, m, 1),
                                     *([nn.ReLU(inplace=True)] if relu else []))
        self.cheap = nn.Sequential(*conv_bn(m, m * (ratio - 1), cheap_kernel, groups=m),
                                   *([nn.ReLU(inplace=True)] if relu else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)[:, :self.out_channels]


class SqueezeExcite(nn.Module):
    """GhostNet's squeeze-excitation: global average pool, 1x1 conv to
    ``make_divisible(channels * ratio)``, ReLU, 1x1 conv back, hard sigmoid, channel scaling."""

    def __init__(self, *, channels: int, ratio: float) -> None:
        super().__init__()
        reduced = make_divisible(channels * ratio)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()  # relu6(x + 3) / 6, the reference's hard_sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


@BLOCKS.register("ghost_bottleneck")
class GhostBottleneck(nn.Module):
    """Ghost bottleneck (module docs): Ghost expand (ReLU) -> [stride 2: depthwise conv-BN] ->
    [SE] -> Ghost project (linear) + shortcut; ``has_identity`` when the shortcut is the input."""

    #: StageConfig fields this block takes besides ``expand_ratio`` (exitnas.blocks)
    stage_options: ClassVar[tuple[str, ...]] = ("kernel", "se")

    @staticmethod
    def out_channels(channels: int) -> int:
        return channels

    def __init__(self, *, in_channels: int, channels: int, stride: int, expand_ratio: int = 6,
                 kernel: int = 3, se: float | None = None) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.ghost1 = GhostModule(in_channels=in_channels, out_channels=hidden, relu=True)
        self.dw = nn.Sequential(*conv_bn(hidden, hidden, kernel, stride, groups=hidden)) \
            if stride > 1 else None
        self.se = SqueezeExcite(channels=hidden, ratio=se) if se else None
        self.ghost2 = GhostModule(in_channels=hidden, out_channels=channels, relu=False)
        self.has_identity = stride == 1 and in_channels == channels
        self.shortcut = nn.Identity() if self.has_identity else nn.Sequential(
            *conv_bn(in_channels, in_channels, kernel, stride, groups=in_channels),
            *conv_bn(in_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.dw is not None:
            out = self.dw(out)
        if self.se is not None:
            out = self.se(out)
        return self.ghost2(out) + self.shortcut(x)


__all__ = ["GhostBottleneck", "GhostModule", "SqueezeExcite", "make_divisible"]
