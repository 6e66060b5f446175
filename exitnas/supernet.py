"""The weight-sharing supernet: every candidate depth and every candidate exit head.

    net = Supernet(space)
    logits = net.forward_exits(x, depths=(3, 2, 4))          # all candidate exits + final
    model = net.extract(arch, calib=calibration_batches(space, splits))  # standalone model
    with net.calibrated(depths, calibration_batches(space, splits)):
        ...                                                  # eval mode, BN of ``depths``

Elastic depth: a stage of depth d runs its first d blocks (the first, downsampling block
always runs); :meth:`Supernet.walk` is the one walk over them. Exit heads are keyed ``s<stage>b<block>=<head>``; the final head is shared by
every depth setting.

BatchNorm statistics belong to a depth setting (OFA): whatever evaluates or extracts one
re-estimates them first from :func:`calibration_batches` (always the same train batches), and
the supernet's own statistics are left as they were, so a result never depends on which depth
setting something else looked at before.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .arch import Arch, Exit
from .heads import build_head
from .model import MultiExitModel
from .space import Space
from .topology import walk

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def calibration_batches(space: Space, splits, *, device: torch.device | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (images, labels) batches every BatchNorm re-estimation uses: the first
    ``supernet.bn_calib_batches`` train batches of ``data.batch_size`` images, shuffled with
    ``supernet.seed``, not augmented (the evaluation view); on ``device`` when given. A fresh
    iterator per call, the same batches every time."""
    from .data import batches

    train = batches(splits.train, batch_size=space.data.batch_size, mean=splits.mean,
                    std=splits.std, shuffle=True, seed=space.supernet.seed)
    for _, (x, y) in zip(range(space.supernet.bn_calib_batches), train):
        yield (x if device is None else x.to(device)), y


class Supernet(nn.Module):
    """Stem, stages and final head from the space's backbone family
    (:class:`~exitnas.topology.Topology`), plus every candidate exit head. With
    ``pretrained`` (default) and ``backbone.weights`` set, the backbone starts from those
    weights (:func:`~exitnas.backbone.load_backbone`); else from fresh initial weights."""

    def __init__(self, space: Space, *, pretrained: bool = True) -> None:
        super().__init__()
        self.space = space
        topo = space.family.build(space)
        self.stem = topo.stem
        self.stages = nn.ModuleList(nn.ModuleList(stage) for stage in topo.stages)
        self.structure, self.sources = topo.structure, topo.sources
        self.heads = nn.ModuleDict({
            e.key: build_head(e.head, in_channels=self.structure.widths[e.stage][e.block],
                              num_classes=space.num_classes, max_hidden=space.exits.head_width)
            for e in self.candidate_exits(space.max_depths)})
        self.final = topo.final
        if pretrained and space.backbone.weights is not None:
            from .backbone import load_backbone, weights_path

            load_backbone(self, weights_path(space))

    def walk(self, depths: Sequence[int]) -> Iterator[tuple[tuple[int, int], nn.Module]]:
        """The blocks that run at ``depths`` with their positions (:func:`topology.walk`)."""
        return walk(self.stages, depths)

    def candidate_exits(self, depths: Sequence[int]) -> list[Exit]:
        """Every (position, head) pair active at ``depths``, sorted (network order, then head
        name): the order ``forward_exits`` returns them in."""
        return sorted(Exit(s, b, h) for s, b in self.space.positions(tuple(depths))
                      for h in self.space.exits.heads)

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
        for pos, block in self.walk(depths):
            x = block(x)
            for e in by_pos.get(pos, ()):
                out.append(self.heads[e.key](x))
        out.append(self.final(x))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_exits(x)

    @torch.no_grad()
    def recalibrate_bn(self, depths: Sequence[int], batches) -> None:
        """Re-estimate BatchNorm statistics for ``depths`` (OFA): reset the running stats of
        every BN layer, then average them (momentum None = cumulative) over ``batches`` of
        (images, labels) in train mode with every candidate head active. Leaves eval mode."""
        bns = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        self.train()
        seen = 0
        for x, _ in batches:
            self.forward_exits(x, depths)
            seen += 1
        for m, mom in zip(bns, saved):
            m.momentum = mom
        self.eval()
        if seen == 0:
            raise ValueError("recalibrate_bn got no batches")

    @contextmanager
    def calibrated(self, depths: Sequence[int], batches) -> Iterator["Supernet"]:
        """Inside the block: eval mode with BN statistics re-estimated for ``depths`` on
        ``batches`` (see :meth:`recalibrate_bn`, :func:`calibration_batches`). On leaving, every
        BN buffer and the train/eval mode are restored: nothing outside sees them."""
        state = self.state_dict()
        saved = {k: v.clone() for k, v in state.items() if k.rsplit(".", 1)[-1] in _BN_STATS}
        was = self.training
        try:
            self.recalibrate_bn(depths, batches)
            yield self
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].copy_(v)
            self.train(was)

    def save(self, path) -> None:
        """Weights as safetensors, tagged with the space's fingerprint."""
        from .io import save_weights

        save_weights(path, self.state_dict(), {"space": self.space.name,
                                               "fingerprint": self.space.fingerprint})

    def load(self, path) -> "Supernet":
        """Load weights saved by :meth:`save`; refuses other spaces and non-safetensors."""
        from .errors import CheckpointError
        from .io import load_weights

        state = load_weights(path)
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit space {self.space.name!r} "
                                  f"({str(err).splitlines()[0]})") from None
        return self

    def extract(self, arch: Arch, *, calib=None) -> MultiExitModel:
        """A standalone model holding copies of only ``arch``'s blocks and heads, in the
        supernet's train/eval mode. With ``calib`` (batches, normally
        :func:`calibration_batches`) its BN statistics are re-estimated for ``arch.depths``
        first, as the evaluation cache's are: the model the search scored. Without, the
        supernet's current statistics are copied (a fresh model, a fine-tuning start)."""
        arch.validate(self.space)
        if calib is None:
            return self._copy(arch).train(self.training)
        was = self.training
        with self.calibrated(arch.depths, calib):
            return self._copy(arch).train(was)

    def _copy(self, arch: Arch) -> MultiExitModel:
        cuts = [e.position for e in arch.exits]
        segments: list[nn.Module] = []
        current: list[nn.Module] = [copy.deepcopy(self.stem)]
        for pos, block in self.walk(arch.depths):
            current.append(copy.deepcopy(block))
            if pos in cuts:
                segments.append(nn.Sequential(*current))
                current = []
        segments.append(nn.Sequential(*current))
        heads = [copy.deepcopy(self.heads[e.key]) for e in arch.exits] + [copy.deepcopy(self.final)]
        names = [e.key for e in arch.exits] + ["final"]
        return MultiExitModel(segments=segments, heads=heads, policy=arch.policy,
                              thresholds=arch.thresholds, exit_names=names)


def build_model(space: Space, arch: Arch, *, seed: int | None = None) -> MultiExitModel:
    """A freshly initialised standalone model for ``arch`` (for training from scratch)."""
    if seed is not None:
        torch.manual_seed(seed)
    return Supernet(space, pretrained=False).extract(arch)


def load_model(space: Space, arch: Arch, path, state: dict | None = None) -> MultiExitModel:
    """The standalone model of ``arch`` with the weights of ``path`` (a MultiExitModel
    safetensors; ``state``: its state dict, already read), in eval mode. The global RNG is
    left as it was; weights that do not fit the arch raise one-line CheckpointError."""
    from .errors import CheckpointError
    from .io import load_weights

    state = load_weights(path) if state is None else state  # refuses pickles
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: keep the RNG
        model = build_model(space, arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit arch {arch.id} "
                              f"({str(err).splitlines()[0]})") from None
    return model.eval()
