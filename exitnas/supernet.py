"""The weight-sharing supernet: every candidate depth and every candidate exit head.

    net = Supernet(space)
    logits = net.forward_exits(x, depths=(3, 2, 4))          # all candidate exits + final
    model = net.extract(arch)                                # standalone MultiExitModel

Elastic depth: a stage of depth d runs its first d blocks (the first, downsampling block
always runs). Exit heads are keyed ``s<stage>b<block>=<head>``; the final head is shared by
every depth setting.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .arch import Arch, Exit
from .blocks import BLOCKS, FAMILIES
from .heads import build_head
from .model import MultiExitModel
from .space import Space


class Supernet(nn.Module):
    def __init__(self, space: Space) -> None:
        super().__init__()
        self.space = space
        bb = space.backbone
        block_cls = BLOCKS.get(bb.block)
        self.stem = FAMILIES.get(bb.family).stem(bb.stem, space.input.channels, bb.stem_channels)
        self.stages = nn.ModuleList()
        self.widths: list[int] = []
        cin = bb.stem_channels
        for st in bb.stages:
            stage = nn.ModuleList()
            for b in range(max(st.depths)):
                stage.append(block_cls(in_channels=cin, channels=st.channels,
                                       stride=st.stride if b == 0 else 1,
                                       expand_ratio=st.expand_ratio))
                cin = block_cls.out_channels(st.channels)
            self.stages.append(stage)
            self.widths.append(cin)
        self.heads = nn.ModuleDict({
            e.key: build_head(e.head, in_channels=self.widths[e.stage],
                              num_classes=space.num_classes)
            for e in self.candidate_exits(space.max_depths)})
        self.final = build_head(bb.final_head, in_channels=cin, num_classes=space.num_classes,
                                pre_channels=bb.final_channels)

    def candidate_exits(self, depths: Sequence[int]) -> list[Exit]:
        """Every (position, head) pair active at ``depths``, in network order."""
        return [Exit(s, b, h) for s, b in self.space.positions(tuple(depths))
                for h in self.space.exits.heads]

    def forward_exits(self, x: torch.Tensor, depths: Sequence[int] | None = None,
                      exits: Sequence[Exit] | None = None) -> list[torch.Tensor]:
        """Logits of ``exits`` (default: every candidate active at ``depths``), in that order
        (sorted by position), then the final exit's."""
        depths = tuple(self.space.max_depths if depths is None else depths)
        exits = self.candidate_exits(depths) if exits is None else sorted(exits)
        by_pos: dict[tuple[int, int], list[Exit]] = {}
        for e in exits:
            by_pos.setdefault(e.position, []).append(e)
        out = []
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            for b in range(depths[s]):
                x = stage[b](x)
                for e in by_pos.get((s, b), ()):
                    out.append(self.heads[e.key](x))
        out.append(self.final(x))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_exits(x)

    def extract(self, arch: Arch) -> MultiExitModel:
        """A standalone model holding copies of only ``arch``'s blocks and heads."""
        arch.validate(self.space)
        cuts = [e.position for e in arch.exits]
        segments: list[nn.Module] = []
        current: list[nn.Module] = [copy.deepcopy(self.stem)]
        for s, stage in enumerate(self.stages):
            for b in range(arch.depths[s]):
                current.append(copy.deepcopy(stage[b]))
                if (s, b) in cuts:
                    segments.append(nn.Sequential(*current))
                    current = []
        segments.append(nn.Sequential(*current))
        heads = [copy.deepcopy(self.heads[e.key]) for e in arch.exits] + [copy.deepcopy(self.final)]
        names = [e.key for e in arch.exits] + ["final"]
        model = MultiExitModel(segments=segments, heads=heads, policy=arch.policy,
                               thresholds=arch.thresholds, exit_names=names)
        return model.train(self.training)


def build_model(space: Space, arch: Arch, *, seed: int | None = None) -> MultiExitModel:
    """A freshly initialised standalone model for ``arch`` (for training from scratch)."""
    if seed is not None:
        torch.manual_seed(seed)
    return Supernet(space).extract(arch)
