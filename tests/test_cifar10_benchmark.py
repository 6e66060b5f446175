"""The CIFAR-10 benchmark's own rules (benchmarks/cifar10_previous.py): SDN placement, the
val-selected operating points of pooled models, and the fidelity's distinct networks."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from exitnas.arch import Arch
from exitnas.cost import cost_table
from exitnas.space import load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cifar10_benchmark",
                                                  ROOT / "benchmarks" / "cifar10_previous.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def space():
    return load_space(ROOT / "benchmarks" / "cifar10_previous.yaml")


def test_sdn_exits_sit_at_the_blocks_closest_to_the_targets(bench, space):
    costs = cost_table(space)
    positions = bench.sdn_positions(space, costs)
    assert positions == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # independent check: cumulative backbone MACs per block, nearest block per target
    order = [(s, b) for s in range(3) for b in range(3)]
    cum = np.cumsum([costs.stem + costs.blocks[order[0]]]
                    + [costs.blocks[p] for p in order[1:]]) / costs.backbone()
    frac = dict(zip(order, cum.tolist()))
    assert frac[(2, 2)] == pytest.approx(1.0 - costs.final / costs.backbone())
    for target, pos in zip(bench.SDN_TARGETS, positions):
        nearest = min(order[:-1], key=lambda p: abs(frac[p] - target))
        assert pos == nearest


def test_sdn_arch_is_full_depth_with_six_sdn_pool_exits(bench, space):
    arch = bench.sdn_arch(space, cost_table(space))
    assert arch.validate(space) is arch
    assert arch.depths == (3, 3, 3)
    assert [e.head for e in arch.exits] == ["sdn_pool"] * 6


def test_sdn_positions_skip_a_block_an_earlier_target_took(bench, space):
    costs = cost_table(space)
    # 0.12 and 0.13 both sit closest to s0b0 (12.8 %): the second target gets the next nearest
    assert bench.sdn_positions(space, costs, (0.12, 0.13)) == [(0, 0), (0, 1)]


def test_at_budgets_selects_on_val_and_reports_test(bench):
    points = pd.DataFrame({
        "arch": ["a", "a", "b", "b"], "param": [0.1, 0.9, 0.1, 0.9],
        "val_accuracy": [0.50, 0.70, 0.60, 0.80],
        "val_relative_macs": [0.20, 0.45, 0.24, 0.90],
        "test_accuracy": [0.55, 0.65, 0.40, 0.85],
        "test_relative_macs": [0.21, 0.46, 0.26, 0.88]})
    t = bench.at_budgets(points).set_index("budget_fraction")
    assert t.loc[0.25, "arch"] == "b" and t.loc[0.25, "accuracy"] == 0.40  # best VAL, not test
    assert t.loc[0.5, "arch"] == "a" and t.loc[0.5, "accuracy"] == 0.65
    assert t.loc[1.0, "accuracy"] == 0.85
    none = bench.at_budgets(points.assign(val_relative_macs=[0.3, 0.6, 0.3, 0.9]))
    assert math.isnan(none.set_index("budget_fraction").loc[0.25, "accuracy"])


def test_distinct_networks_keep_the_cheapest_of_threshold_variants(bench):
    a1 = "d1.1.1~s0b0=linear~max_softmax=0.6"
    a2 = "d1.1.1~s0b0=linear~max_softmax=0.9"
    b = "d2.1.1~s0b0=conv~max_softmax=0.7"
    front = [{"arch_id": a2, "expected_macs": 9.0}, {"arch_id": b, "expected_macs": 12.0},
             {"arch_id": a1, "expected_macs": 8.0}]
    assert [r["arch_id"] for r in bench.distinct_networks(front)] == [a1, b]
    assert Arch.from_id(a1).exits == Arch.from_id(a2).exits


def test_fidelity_candidates_top_up_the_front_from_the_next_layer(bench):
    def row(trial, arch_id, acc, macs, feasible=True):
        return {"trial": trial, "arch_id": arch_id, "accuracy": acc, "expected_macs": macs,
                "relative_cost": macs / 100, "feasible": feasible}

    trials = [row(0, "d1.1.1~s0b0=linear~max_softmax=0.6", 0.50, 10.0),
              row(1, "d1.1.1~s0b0=linear~max_softmax=0.9", 0.52, 11.0),   # same network
              row(2, "d2.1.1~s0b0=conv~max_softmax=0.7", 0.60, 20.0),
              row(3, "d2.2.1~s1b0=conv~max_softmax=0.7", 0.55, 21.0),     # layer 2
              row(4, "d3.3.3~s1b0=conv~max_softmax=0.7", 0.90, 90.0, feasible=False)]
    got = bench.fidelity_candidates(trials, 3)
    assert [(r["trial"], r["layer"]) for r in got] == [(0, 1), (2, 1), (3, 2)]
    assert [r["trial"] for r in bench.fidelity_candidates(trials, 2)] == [0, 2]
