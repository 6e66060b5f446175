"""Backbone building blocks and families, in registries.

A block is an ``nn.Module`` built with keyword-only ``in_channels``, ``channels``, ``stride``
and ``expand_ratio``, plus the stage settings of :data:`BLOCK_OPTIONS` it names in its
``stage_options`` (a stage that sets another is refused); its ``out_channels(channels)`` class
method gives its output width. The ``resnet`` and ``mobilenetv2`` families
(:class:`StagedFamily`) build a backbone from the space file's stage list out of these blocks
(``ghost_bottleneck``: :mod:`exitnas.ghost`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from .errors import ConfigError
from .registry import Registry
from .topology import FAMILIES, Structure, Topology

BLOCKS: Registry[type[nn.Module]] = Registry("block")
BLOCK_OPTIONS = ("kernel", "se")  # StageConfig fields only the blocks naming them take


def _stage_options(st) -> dict:
    """The :data:`BLOCK_OPTIONS` stage ``st`` sets (unset: the block's defaults)."""
    return {k: getattr(st, k) for k in BLOCK_OPTIONS if getattr(st, k) is not None}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


@BLOCKS.register("basic")
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs; 1x1 conv-BN shortcut when the shape changes."""

    @staticmethod
    def out_channels(channels: int) -> int:
        return channels

    def __init__(self, *, in_channels: int, channels: int, stride: int, expand_ratio: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 3, stride)
        self.conv2, self.bn2 = conv_bn(channels, channels, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


@BLOCKS.register("bottleneck")
class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand to 4x ``channels``."""

    expansion = 4

    @staticmethod
    def out_channels(channels: int) -> int:
        return channels * Bottleneck.expansion

    def __init__(self, *, in_channels: int, channels: int, stride: int, expand_ratio: int = 1):
        super().__init__()
        out = self.out_channels(channels)
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 1)
        self.conv2, self.bn2 = conv_bn(channels, channels, 3, stride)
        self.conv3, self.bn3 = conv_bn(channels, out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@BLOCKS.register("inverted_residual")
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection;
    identity shortcut when stride is 1 and the width is unchanged."""

    @staticmethod
    def out_channels(channels: int) -> int:
        return channels

    def __init__(self, *, in_channels: int, channels: int, stride: int, expand_ratio: int = 6):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*conv_bn(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, channels, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def _resnet_stem(kind: str, cin: int, cout: int) -> nn.Module:
    if kind == "imagenet":
        return nn.Sequential(*conv_bn(cin, cout, 7, 2), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*conv_bn(cin, cout, 3), nn.ReLU(inplace=True))


def _mobilenet_stem(kind: str, cin: int, cout: int) -> nn.Module:
    return nn.Sequential(*conv_bn(cin, cout, 3, 2 if kind == "imagenet" else 1),
                         nn.ReLU6(inplace=True))


@dataclass(frozen=True)
class StagedFamily:
    """A family built from the space file's ``backbone.stages`` list: a stem (``stem``,
    ``stem_channels``), then per stage ``max(depths)`` blocks of ``backbone.block`` (the first
    with the stage's stride; the others keep the width, so they have identity shortcuts and
    may be skipped), then ``final_head`` (after a 1x1 conv to ``final_channels`` when set)."""

    blocks: tuple[str, ...]
    stem: Callable[[str, int, int], nn.Module]
    batchnorm_folded: ClassVar[bool] = False  # BatchNorm counted as fvcore does (exitnas.cost)

    def check(self, cfg) -> None:
        for name in ("block", "stages"):
            if getattr(cfg, name) is None:
                raise ConfigError(f"is required by family {cfg.family!r}", path=name)
        for name in ("model", "stage_depths"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"belongs to family 'torchvision', not {cfg.family!r} (this "
                                  "family's depths are stages[*].depths)", path=name)
        if cfg.block not in self.blocks:
            raise ConfigError(f"block {cfg.block!r} does not belong to family {cfg.family!r} "
                              f"(allowed: {', '.join(self.blocks)})", path="block")
        takes = getattr(BLOCKS.get(cfg.block), "stage_options", ())
        for i, st in enumerate(cfg.stages):
            for name in _stage_options(st):
                if name not in takes:
                    raise ConfigError(f"block {cfg.block!r} has no {name!r} setting",
                                      path=f"stages[{i}].{name}")

    def stage_depths(self, cfg) -> tuple[tuple[int, ...], ...]:
        return tuple(st.depths for st in cfg.stages)

    def weights_file(self, cfg) -> None:
        return None  # backbone.weights is a path

    def weights_meta(self, cfg) -> dict:
        return {}  # a safetensors file of exitnas's own names says nothing more

    def structure(self, cfg, input_channels: int) -> Structure:
        width = BLOCKS.get(cfg.block).out_channels
        return Structure(
            skippable=tuple(tuple(b > 0 for b in range(max(st.depths))) for st in cfg.stages),
            widths=tuple((width(st.channels),) * max(st.depths) for st in cfg.stages))

    def build(self, space) -> Topology:
        from .heads import build_head

        bb = space.backbone
        block_cls = BLOCKS.get(bb.block)
        stem = self.stem(bb.stem, space.input.channels, bb.stem_channels)
        stages, cin = [], bb.stem_channels
        for st in bb.stages:
            stage = []
            for b in range(max(st.depths)):
                stage.append(block_cls(in_channels=cin, channels=st.channels,
                                       stride=st.stride if b == 0 else 1,
                                       expand_ratio=st.expand_ratio, **_stage_options(st)))
                cin = block_cls.out_channels(st.channels)
            stages.append(stage)
        final = build_head(bb.final_head, in_channels=cin, num_classes=space.num_classes,
                           pre_channels=bb.final_channels)
        return Topology(stem=stem, stages=stages, final=final,
                        structure=self.structure(bb, space.input.channels))


FAMILIES.register("resnet")(StagedFamily(blocks=("basic", "bottleneck"), stem=_resnet_stem))
FAMILIES.register("mobilenetv2")(StagedFamily(blocks=("inverted_residual", "ghost_bottleneck"),
                                              stem=_mobilenet_stem))

from . import ghost as _ghost  # noqa: E402,F401 (registers "ghost_bottleneck")
