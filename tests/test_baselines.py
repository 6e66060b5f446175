"""SDN's placement (exitnas.baselines) on the CIFAR-10 benchmark's ResNet-20 space: the blocks
nearest 15..90 % of the backbone's MACs, checked against cumulative costs computed here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exitnas.baselines import SDN_TARGETS, sdn_arch, sdn_positions
from exitnas.cost import cost_table
from exitnas.space import load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def space():
    return load_space(ROOT / "benchmarks" / "cifar10.yaml")


def test_sdn_exits_sit_at_the_blocks_closest_to_the_targets(space):
    costs = cost_table(space)
    positions = sdn_positions(space, costs)
    assert positions == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # independent check: cumulative backbone MACs per block, nearest block per target
    order = [(s, b) for s in range(3) for b in range(3)]
    cum = np.cumsum([costs.stem + costs.blocks[order[0]]]
                    + [costs.blocks[p] for p in order[1:]]) / costs.backbone()
    frac = dict(zip(order, cum.tolist()))
    assert frac[(2, 2)] == pytest.approx(1.0 - costs.final / costs.backbone())
    for target, pos in zip(SDN_TARGETS, positions):
        assert pos == min(order[:-1], key=lambda p: abs(frac[p] - target))


def test_sdn_arch_is_full_depth_with_six_sdn_pool_exits(space):
    arch = sdn_arch(space, cost_table(space))
    assert arch.validate(space) is arch
    assert arch.depths == (3, 3, 3)
    assert [e.head for e in arch.exits] == ["sdn_pool"] * 6


def test_sdn_positions_skip_a_block_an_earlier_target_took(space):
    # 0.12 and 0.13 both sit closest to s0b0 (12.8 %): the second target gets the next nearest
    assert sdn_positions(space, cost_table(space), (0.12, 0.13)) == [(0, 0), (0, 1)]
