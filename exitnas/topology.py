"""The backbone interface: what a family builds, and the one walk over it.

A family (``FAMILIES`` registry, one file each: :mod:`exitnas.blocks` for the families built
from the space file's stage list, :mod:`exitnas.tv_family` for torchvision's models) turns the
``backbone`` section into a :class:`Topology`: the stem, the stages as lists of blocks, which
blocks may be skipped, the output width after every block, and the final head (features ->
logits). This is timm's ``feature_info`` idea: everything else in exitnas (the supernet's
forward, extraction into a standalone model, the cost table, export) walks the same
:func:`walk` over it and never looks inside a family.

Elastic depth: a stage of depth d runs its first d blocks. Only blocks with an identity
shortcut may be left out, and a stage's first block always runs, so every allowed depth d of a
stage must keep all of its non-skippable blocks (:meth:`Structure.check_depths`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

from torch import nn

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .space import BackboneConfig, Space

Position = tuple[int, int]


@dataclass(frozen=True)
class Structure:
    """The shape of a backbone without its weights: per stage, per block, whether the block
    may be skipped and its output width (channels)."""

    skippable: tuple[tuple[bool, ...], ...]
    widths: tuple[tuple[int, ...], ...]

    @property
    def blocks(self) -> tuple[int, ...]:
        """Blocks per stage at full depth."""
        return tuple(len(s) for s in self.skippable)

    def min_depth(self, stage: int) -> int:
        """The fewest blocks stage ``stage`` can run: up to its last non-skippable block."""
        keep = [b for b, skip in enumerate(self.skippable[stage]) if not skip or b == 0]
        return max(keep) + 1

    def check_depths(self, stage_depths: Sequence[Sequence[int]], *, path: str) -> None:
        """Raise a ConfigError (at ``path``) unless ``stage_depths`` gives every stage a
        strictly increasing list of depths its blocks allow."""
        if len(stage_depths) != len(self.blocks):
            raise ConfigError(f"{len(stage_depths)} stages given, the backbone has "
                              f"{len(self.blocks)}", path=path)
        for s, depths in enumerate(stage_depths):
            where = f"{path}[{s}]"
            if not depths:
                raise ConfigError("must not be empty", path=where)
            if list(depths) != sorted(set(depths)):
                raise ConfigError(f"must be strictly increasing, got {list(depths)}", path=where)
            lo, hi = self.min_depth(s), self.blocks[s]
            for d in depths:
                if not lo <= d <= hi:
                    raise ConfigError(
                        f"depth {d} is outside {lo}..{hi} (stage {s} has {hi} blocks"
                        + (f"; blocks before {lo} have no identity shortcut" if lo > 1 else "")
                        + ")", path=where)


@dataclass
class Topology:
    """A built backbone. ``sources`` maps supernet module paths (``stem.conv1``,
    ``stages.0.1``, ``final.classifier``) to the module paths of the model the weights were
    made for (torchvision's ``conv1``, ``layer1.1``, ``fc``); empty when the names are
    exitnas's own."""

    stem: nn.Module
    stages: list[list[nn.Module]]
    structure: Structure
    final: nn.Module
    sources: tuple[tuple[str, str], ...] = ()


class Family(Protocol):
    """A backbone family plugin: checks its part of the ``backbone`` section, describes the
    network it builds, and builds it."""

    #: the cost table counts a BatchNorm after a convolution as folded into it (0 MACs), as
    #: the family's reference figures do (:mod:`exitnas.cost`)
    batchnorm_folded: bool

    def check(self, cfg: "BackboneConfig") -> None:
        """Raise ConfigError (with the field path) for a section this family cannot build."""

    def structure(self, cfg: "BackboneConfig", input_channels: int) -> Structure:
        """The network's stages and blocks without building weights."""

    def stage_depths(self, cfg: "BackboneConfig") -> tuple[tuple[int, ...], ...]:
        """Allowed depths per stage."""

    def build(self, space: "Space") -> Topology:
        """The backbone of ``space`` with freshly initialised weights."""

    def weights_meta(self, cfg: "BackboneConfig") -> dict:
        """What is known about ``backbone.weights``: ``mean`` / ``std`` (the normalisation they
        were trained with; the default of data.mean / std), ``categories`` (class names),
        ``source``; empty when nothing is."""

    def weights_file(self, cfg: "BackboneConfig") -> Path | None:
        """The local file for a ``backbone.weights`` value this family resolves itself (a
        download, a cache), or None: the value is a path."""


FAMILIES: Registry[Family] = Registry("family")


def walk(stages: Sequence[Sequence[nn.Module]], depths: Sequence[int]
         ) -> Iterator[tuple[Position, nn.Module]]:
    """The blocks that run at ``depths``, in network order, with their (stage, block)
    position: the first ``depths[s]`` blocks of every stage ``s``."""
    for s, stage in enumerate(stages):
        for b in range(depths[s]):
            yield (s, b), stage[b]


__all__ = ["FAMILIES", "Family", "Structure", "Topology", "walk", "Position"]
