"""Hand-placed early exits to compare a search against.

    arch = sdn_arch(space, cost_table(space))   # SDN: 6 sdn_pool exits at full depth

SDN (Kaya et al., "Shallow-Deep Networks", 2019) places its internal classifiers after the
blocks nearest 15 / 30 / 45 / 60 / 75 / 90 % of the backbone's cost, all with its mixed-pooling
head (``sdn_pool``), on the full-depth network.
"""
from __future__ import annotations

from .arch import Arch, Exit
from .cost import CostTable
from .space import Position, Space

SDN_TARGETS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)  # of the plain backbone's MACs


def sdn_positions(space: Space, costs: CostTable,
                  targets: tuple[float, ...] = SDN_TARGETS) -> list[Position]:
    """For each target fraction (in order) the candidate block whose cumulative backbone MACs
    (stem + every block up to and including it, at full depth) over the plain backbone's MACs
    is closest to it; ties go to the earlier block; a block taken by an earlier target is
    skipped, and targets beyond the free candidates are dropped. The final block is never a
    candidate (the final exit sits there). SDN places by MACs: a ``costs`` table in another
    unit is replaced by the space's fvcore MACs."""
    from .cost import mac_table
    from .units import MACS

    if costs.unit is not MACS:
        costs = mac_table(space)
    total = costs.backbone()
    cum, frac = costs.stem, {}
    for s, d in enumerate(space.max_depths):
        for b in range(d):
            cum += costs.blocks[(s, b)]
            frac[(s, b)] = cum / total
    candidates = space.positions()
    chosen: list[Position] = []
    for t in targets:
        free = [p for p in candidates if p not in chosen]
        if not free:
            break
        chosen.append(min(free, key=lambda p: (abs(frac[p] - t), candidates.index(p))))
    return sorted(chosen)


def sdn_arch(space: Space, costs: CostTable, *, head: str = "sdn_pool") -> Arch:
    """Full depth, SDN's exits with ``head``; thresholds 1.0 (fit them for a budget with
    :func:`exitnas.thresholds.fit_thresholds`)."""
    exits = tuple(Exit(s, b, head) for s, b in sdn_positions(space, costs))
    return Arch(depths=space.max_depths, exits=exits, policy="max_softmax",
                thresholds=(1.0,) * len(exits))


__all__ = ["SDN_TARGETS", "sdn_positions", "sdn_arch"]
