"""Exit thresholds fitted on val for a budget, not evolved.

    fit = fit_thresholds(val_stats, budget=0.5 * val_stats.backbone_cost)
    arch = arch.with_thresholds(fit.thresholds)      # scores exactly fit.accuracy on val

For one architecture (its per-exit statistics on val, :class:`~exitnas.evaluate.ArchStats`)
and an expected-cost budget in the statistics' cost unit (MACs, ms...), find per-exit thresholds
with the highest val accuracy whose expected cost stays within the budget. A policy is fitted when it says so
(``Policy.fitted``; its numpy rule, an :class:`~exitnas.exit_rules.Threshold`, names the value
array and the direction: ``max_softmax`` ``conf >= t``, ``entropy`` ``entropy <= t``). Two
starts, each the best feasible point of its family: the shared threshold of the sweep (100
values over the policy's range) and, for a policy with ``budgeted_batch`` (``max_softmax``),
MSDNet's budgeted-batch thresholds (p = i/20). From each, coordinate descent:
for one exit at a time, with the others fixed, every threshold on the grid is scored exactly
(one sort of the samples that reach the exit, then prefix sums of what changes when a sample
leaves there instead of where it would go next), and the best feasible one is kept. A step
never lowers accuracy and never leaves the budget, so the result is never below either start.

The statistics are whatever ``stats`` holds: after ``policy.calibration`` (fine-tuning divides
each exit's logits by its temperature first, :mod:`exitnas.calibration`) they are calibrated,
and the thresholds fitted here are for those.

Thresholds live on the arch id's grid (4 decimals, :class:`~exitnas.arch.Arch` rounds to it)
and are compared in float32 as the scorer, the model and the runtime compare them; the returned
accuracy and cost are the scorer's own numbers for the returned thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import exit_rules
from .evaluate import ArchStats
from .policy import POLICIES

DECIMALS = 4  # the arch id's threshold grid
SWEEP_POINTS = 100
BUDGETED_BATCH_P = tuple(i / 20 for i in range(1, 40))


@dataclass(frozen=True)
class Fit:
    """Fitted thresholds and what they score on the statistics they were fitted on."""

    thresholds: tuple[float, ...]
    accuracy: float
    expected_cost: float  # in the statistics' unit
    feasible: bool        # expected cost <= the budget
    start: str          # the start that led to the result: "sweep", "budgeted_batch" or
                        # "none" (no early exit)


@dataclass(frozen=True)
class _Rule:
    """A policy's threshold rule ``leave at k when value >= t`` (``below`` False) or
    ``value <= t`` (``below`` True) over its value array, thresholds on a grid within
    ``lo..hi``; compared by the rule itself, as the scorer compares."""

    threshold: exit_rules.Threshold
    values: np.ndarray   # [K, N] float32, final exit last (its row is never compared)
    grid: np.ndarray     # float32, ascending

    @property
    def below(self) -> bool:
        return self.threshold.below

    def hits(self, k: int, t: float) -> np.ndarray:
        return self.threshold.passes(self.values[k], np.float32(t))


def _grid(lo: float, hi: float) -> np.ndarray:
    scale = 10 ** DECIMALS
    steps = np.arange(math.ceil(lo * scale - 1e-9), math.floor(hi * scale + 1e-9) + 1)
    return np.round(steps / scale, DECIMALS).astype(np.float32)


def _on_grid(t: float, rule: _Rule) -> float:
    """The grid threshold nearest ``t`` (inf -> the end that lets nobody leave)."""
    g = rule.grid
    if not math.isfinite(t):
        return float(g[0] if rule.below else g[-1])
    first = round(float(g[0]) * 10 ** DECIMALS)
    i = min(max(round(t * 10 ** DECIMALS) - first, 0), len(g) - 1)
    return float(g[i])


class _Problem:
    """Exact per-sample outcomes of one arch: correctness and cost of every exit."""

    def __init__(self, stats: ArchStats, rule: _Rule, budget: float) -> None:
        self.rule = rule
        self.k = stats.num_exits
        self.n = stats.num_samples
        self.correct = (stats.pred == stats.labels[None, :])
        self.integer = stats.unit.integer
        self.costs = np.asarray(stats.exit_costs, dtype=np.int64 if self.integer else np.float64)
        # feasible <=> total / n <= budget, the scorer's expected-cost test
        self.budget = float(budget)

    def exit_index(self, ts: Sequence[float]) -> np.ndarray:
        idx = np.full(self.n, self.k - 1, dtype=np.intp)
        alive = np.ones(self.n, dtype=bool)
        for j, t in enumerate(ts):
            leave = alive & self.rule.hits(j, t)
            idx[leave] = j
            alive &= ~leave
        return idx

    def outcome(self, idx: np.ndarray) -> tuple[int, float]:
        """(correct count, total cost) of exits ``idx``."""
        hits = int(np.count_nonzero(self.correct[idx, np.arange(self.n)]))
        total = self.costs[idx].sum()
        return hits, int(total) if self.integer else float(total)

    def feasible(self, total: float) -> bool:
        return total / self.n <= self.budget

    def improve_exit(self, ts: list[float], k: int) -> bool:
        """Best grid threshold for exit ``k`` with the others fixed; True if it changed."""
        idx = self.exit_index(ts)
        reach = idx >= k
        # where each sample goes when it does not leave at k: the next exit that takes it
        nxt = np.full(self.n, self.k - 1, dtype=np.intp)
        for j in range(self.k - 2, k, -1):
            nxt = np.where(self.rule.hits(j, ts[j]), j, nxt)
        r = np.flatnonzero(reach)
        v = self.rule.values[k, r]
        order = np.argsort(v if self.rule.below else -v, kind="stable")
        v, r = v[order], r[order]
        d_hit = self.correct[k, r].astype(np.int64) - self.correct[nxt[r], r]
        d_cost = self.costs[k] - self.costs[nxt[r]]
        base_hits, base_cost = self.outcome(np.where(reach, nxt, idx))
        grid = self.rule.grid
        # how many reaching samples leave at k for each grid threshold
        if self.rule.below:
            m = np.searchsorted(v, grid, side="right")
        else:
            m = np.searchsorted(-v, -grid, side="right")
        hits = base_hits + np.concatenate([[0], np.cumsum(d_hit)])[m]
        cost = base_cost + np.concatenate([[0], np.cumsum(d_cost)])[m]
        ok = cost / self.n <= self.budget
        if not ok.any():
            return False
        cand = np.flatnonzero(ok)
        best = cand[np.lexsort((cost[cand], -hits[cand]))[0]]
        cur = int(np.flatnonzero(grid == np.float32(ts[k]))[0])
        if (hits[best], -cost[best]) <= (hits[cur], -cost[cur]):  # cur is feasible
            return False
        ts[k] = float(grid[best])
        return True


def _starts(stats: ArchStats, rule: _Rule, budgeted_batch: bool, lo: float, hi: float):
    k = stats.num_exits - 1
    for t in np.linspace(lo, hi, SWEEP_POINTS):
        yield "sweep", [_on_grid(float(t), rule)] * k
    if budgeted_batch:
        from .protocols import budgeted_batch_thresholds

        for p in BUDGETED_BATCH_P:
            ts = budgeted_batch_thresholds(rule.values, p)
            yield "budgeted_batch", [_on_grid(t, rule) for t in ts]


def fit_thresholds(stats: ArchStats, *, budget: float, policy: str = "max_softmax",
                   value_range: tuple[float, float] = (0.0, 1.0), rounds: int = 8) -> Fit:
    """Thresholds of ``policy`` (a fitted one: ``max_softmax``, ``entropy``...) for ``stats``
    with the best accuracy at expected cost <= ``budget`` (``stats.unit``; module docs). ``value_range``
    bounds the thresholds (the policy's key of the space, e.g. ``policy.threshold_range``).
    When no point fits the budget, the cheapest start is returned with ``feasible`` False."""
    return fit_budgets(stats, budgets=(budget,), policy=policy,
                       value_range=value_range, rounds=rounds)[0]


def fit_budgets(stats: ArchStats, *, budgets: Sequence[float], policy: str = "max_softmax",
                value_range: tuple[float, float] = (0.0, 1.0), rounds: int = 8) -> tuple[Fit, ...]:
    """:func:`fit_thresholds` for several budgets at once (the starts are scored once)."""
    pol = POLICIES.get(policy)
    if not pol.fitted:
        fitted = [n for n in POLICIES.in_order() if POLICIES.get(n).fitted]
        raise ValueError(f"thresholds of policy {policy!r} are not fitted ({', '.join(fitted)})")
    lo, hi = value_range
    rule = _Rule(threshold=pol.rule, values=getattr(stats, pol.rule.stat), grid=_grid(lo, hi))
    probs = [_Problem(stats, rule, b) for b in budgets]
    if stats.num_exits == 1:
        return tuple(_result(stats, policy, [], "none", p) for p in probs)
    scored = []
    for name, ts in _starts(stats, rule, pol.budgeted_batch, lo, hi):
        hits, total = probs[0].outcome(probs[0].exit_index(ts))
        scored.append((name, ts, hits, total))
    cheapest = min(scored, key=lambda r: r[3])
    return tuple(_fit_one(stats, policy, prob, scored, cheapest, rounds) for prob in probs)


def _fit_one(stats, policy, prob: _Problem, scored, cheapest, rounds: int) -> Fit:
    best: dict[str, tuple] = {}
    for name, ts, hits, total in scored:
        if prob.feasible(total) and (name not in best or (hits, -total) > best[name][1:]):
            best[name] = (ts, hits, -total)
    if not best:
        return _result(stats, policy, cheapest[1], cheapest[0], prob)
    results = []
    for name, (ts, _, _) in best.items():
        ts = list(ts)
        for _ in range(rounds):
            changed = False
            for j in range(stats.num_exits - 1):
                changed |= prob.improve_exit(ts, j)
            if not changed:
                break
        hits, total = prob.outcome(prob.exit_index(ts))
        results.append(((hits, -total), name, ts))
    (_, name, ts) = max(results, key=lambda r: r[0])
    return _result(stats, policy, ts, name, prob)


def _result(stats: ArchStats, policy: str, ts: list[float], name: str, prob: _Problem) -> Fit:
    ts = tuple(round(float(t), DECIMALS) for t in ts)
    s = stats.score(policy, ts)
    return Fit(ts, s.accuracy, s.expected_cost, s.expected_cost <= prob.budget, name)


__all__ = ["Fit", "fit_thresholds", "fit_budgets", "DECIMALS"]
