"""Thresholds fitted for a budget: feasible, never below the sweep's or the budgeted batch's
best point, optimal per exit (no single threshold change on the grid does better), on the arch
id's grid, and scored exactly as the scorer scores them."""
from __future__ import annotations

import numpy as np
import pytest

from exitnas import protocols as P
from exitnas.arch import Arch
from exitnas.evaluate import ArchStats
from exitnas.thresholds import DECIMALS, fit_thresholds


def make_stats(seed: int, k: int = 5, n: int = 600, entropy: bool = False) -> ArchStats:
    """Exits that get more accurate and more confident with depth; C_k grows with k."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    pred = np.empty((k, n), np.int64)
    conf = np.empty((k, n), np.float32)
    for j in range(k):
        right = rng.random(n) < 0.35 + 0.5 * j / (k - 1)
        pred[j] = np.where(right, labels, (labels + 1 + rng.integers(0, 9, n)) % 10)
        conf[j] = np.clip(np.where(right, rng.beta(5, 2, n), rng.beta(2, 3, n)), 0, 1)
    ent = (1 - conf) * 2.0 if entropy else np.zeros_like(conf)
    macs = tuple(int(v) for v in np.cumsum(rng.integers(5, 30, k)))
    return ArchStats(conf, ent.astype(np.float32), pred, labels, macs, macs[-1])


def sweep_best(stats: ArchStats, budget: float) -> float:
    return float(P.fit_sweep_budgets(P.threshold_sweep(stats), [budget])["val_accuracy"].iloc[0])


def budgeted_best(stats: ArchStats, budget: float) -> float:
    bb = P.fit_budgeted_batch(stats)
    ok = bb[bb["val_relative_macs"] <= budget]
    return float(ok["val_accuracy"].max()) if len(ok) else float("nan")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
def test_fit_is_feasible_and_never_below_either_start(seed, fraction):
    stats = make_stats(seed)
    budget = fraction * stats.backbone_cost
    fit = fit_thresholds(stats, budget=budget)
    assert fit.feasible and fit.expected_cost <= budget
    s = stats.score("max_softmax", fit.thresholds)
    assert (s.accuracy, s.expected_cost) == (fit.accuracy, fit.expected_cost)
    # the protocols' sweep uses unrounded thresholds: allow the 4-decimal grid's rounding
    for start in (sweep_best(stats, fraction), budgeted_best(stats, fraction)):
        if np.isfinite(start):
            assert fit.accuracy >= start - 2 / stats.num_samples, (fit, start)
    assert fit.accuracy > sweep_best(stats, fraction)  # per-exit fitting gains on these stats


@pytest.mark.parametrize("policy", ["max_softmax", "entropy"])
@pytest.mark.parametrize("seed", range(3))
def test_no_single_threshold_change_does_better(seed, policy):
    stats = make_stats(seed, k=4, n=300, entropy=True)
    lo, hi = (0.0, 1.0) if policy == "max_softmax" else (0.0, 2.0)
    budget = 0.5 * stats.backbone_cost
    fit = fit_thresholds(stats, budget=budget, policy=policy, value_range=(lo, hi))
    assert fit.feasible
    grid = np.round(np.arange(round(lo * 10**DECIMALS), round(hi * 10**DECIMALS) + 1)
                    / 10**DECIMALS, DECIMALS)
    values = stats.conf if policy == "max_softmax" else stats.entropy
    for k in range(stats.num_exits - 1):
        # outcomes change only where a sample's value crosses the threshold: try one grid
        # point on each side of every value, and the ends
        v = np.unique(values[k].astype(np.float64))
        idx = np.unique(np.clip(np.concatenate([np.searchsorted(grid, v) + d for d in (-1, 0, 1)]
                                               + [[0, len(grid) - 1]]), 0, len(grid) - 1))
        for t in grid[idx]:
            ts = list(fit.thresholds)
            ts[k] = float(t)
            s = stats.score(policy, ts)
            if s.expected_cost <= budget:
                assert s.accuracy <= fit.accuracy, (k, t, s.accuracy, fit.accuracy)


def test_thresholds_survive_the_arch_id():
    stats = make_stats(0, k=3)
    fit = fit_thresholds(stats, budget=0.5 * stats.backbone_cost)
    arch = Arch.from_id("d1.1~s0b0=linear,s0b1=linear~max_softmax=0.5,0.5")
    back = Arch.from_id(arch.with_thresholds(fit.thresholds).id)
    assert back.thresholds == fit.thresholds
    assert stats.score("max_softmax", back.thresholds).accuracy == fit.accuracy


def test_a_budget_below_the_first_exit_is_infeasible_and_cheapest():
    stats = make_stats(1)
    fit = fit_thresholds(stats, budget=stats.exit_costs[0] - 1)
    assert not fit.feasible
    assert fit.expected_cost == stats.exit_costs[0]  # everybody leaves at the first exit


def test_no_early_exit_scores_the_final_exit():
    stats = make_stats(2, k=2)
    one = ArchStats(stats.conf[1:], stats.entropy[1:], stats.pred[1:], stats.labels,
                    stats.exit_costs[1:], stats.backbone_cost)
    fit = fit_thresholds(one, budget=one.backbone_cost)
    assert fit.thresholds == () and fit.feasible
    assert fit.accuracy == one.exit_accuracy[0]
