"""Evaluation protocols for ONE fixed architecture, from cached per-exit statistics.

Every protocol takes :class:`~exitnas.evaluate.ArchStats` (from a supernet cache with
``ArchStats.from_cache`` or from a standalone model with ``ArchStats.from_model``; both are
scored by the same code) and returns a pandas DataFrame. Costs are in the statistics' unit
(``ArchStats.unit``: fvcore MACs by default) and their columns name it: ``expected_macs``,
``relative_macs`` (the expected cost / the plain backbone's), ``expected_ms``... Protocols that
fit something take the val statistics to fit on and the test statistics to report on, and never
look at test to fit::

    val = ArchStats.from_model(model, batches(splits.val, ...), costs=cost_table(space), arch=a)
    anytime(test)                      # accuracy and C_k of every exit
    budget_accuracy(val, test)         # threshold sweep: best val point under 25/50/75/100 %
    budgeted_batch(val, test)          # MSDNet's budgeted batch, p = i/20
    auc_table(val, test)               # area under accuracy vs relative cost on [0, 1]
    oracle(test)                       # a sample leaves at the first exit that is right
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from .evaluate import ArchStats, Score

BUDGETS = (0.25, 0.5, 0.75, 1.0)
SWEEP_THRESHOLDS = tuple(np.linspace(0.0, 1.0, 100).tolist())
BUDGETED_BATCH_P = tuple(i / 20 for i in range(1, 40))


def _row(stats: ArchStats, s: Score, prefix: str = "") -> dict:
    n = stats.unit.name
    return {f"{prefix}accuracy": s.accuracy, f"{prefix}{n('expected')}": s.expected_cost,
            f"{prefix}{n('relative')}": s.expected_cost / stats.backbone_cost}


def relative_column(df: pd.DataFrame, prefix: str = "") -> str:
    """The name of ``df``'s relative-cost column (``relative_macs``, ``val_relative_ms``...)."""
    names = [c for c in df.columns if c.startswith(f"{prefix}relative_")]
    if len(names) != 1:
        raise ValueError(f"expected one {prefix}relative_<unit> column, got {names}")
    return names[0]


def policy_score(stats: ArchStats, policy: str, params: Sequence[float]) -> pd.DataFrame:
    """One row: accuracy, expected and relative cost, and ``exit_fractions`` (the share
    leaving at each exit, final last)."""
    s = stats.score(policy, params)
    return pd.DataFrame([{"policy": policy, "params": ",".join(f"{p:g}" for p in params),
                          **_row(stats, s), "exit_fractions": s.exit_fractions}])


# ---- anytime ---------------------------------------------------------------------------------
def anytime(stats: ArchStats) -> pd.DataFrame:
    """Every exit on every sample: its accuracy and its C_k (the backbone up to exit k plus
    every head on the way, exit k's included)."""
    u = stats.unit
    return pd.DataFrame({"exit": range(stats.num_exits), "name": stats.names,
                         u.key: stats.exit_costs,
                         u.name("relative"): [c / stats.backbone_cost for c in stats.exit_costs],
                         "accuracy": stats.exit_accuracy})


# ---- threshold sweep -------------------------------------------------------------------------
def threshold_sweep(stats: ArchStats, thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> pd.DataFrame:
    """max_softmax with the same threshold at every early exit, for each threshold (default:
    100 evenly spaced in [0, 1]). Threshold 0 sends every sample out at the first exit; a
    sample leaves at exit k when its max softmax >= the threshold (float32 comparison)."""
    k = stats.num_exits - 1
    rows = [{"threshold": float(t), **_row(stats, stats.score("max_softmax", (t,) * k))}
            for t in thresholds]
    n = stats.unit.name
    return pd.DataFrame(rows, columns=["threshold", "accuracy", n("expected"), n("relative")])


def _select(costs: np.ndarray, accs: np.ndarray, budget: float) -> int | None:
    """Index of the most accurate point with cost <= budget; ties: the cheaper, then the
    earlier one. None when no point fits."""
    fit = np.flatnonzero(costs <= budget)
    if fit.size == 0:
        return None
    order = np.lexsort((fit, costs[fit], -accs[fit]))
    return int(fit[order[0]])


def fit_sweep_budgets(val_sweep: pd.DataFrame, budgets: Sequence[float] = BUDGETS) -> pd.DataFrame:
    """For each budget (fraction of the backbone's cost), the threshold of the sweep point on
    VAL with the best accuracy whose expected relative cost <= the budget (NaN if none)."""
    column = relative_column(val_sweep)
    costs = val_sweep[column].to_numpy(float)
    accs = val_sweep["accuracy"].to_numpy(float)
    out = []
    for b in budgets:
        i = _select(costs, accs, b)
        out.append({"budget": b, "threshold": np.nan if i is None else val_sweep["threshold"].iloc[i],
                    "val_accuracy": np.nan if i is None else accs[i],
                    f"val_{column}": np.nan if i is None else costs[i]})
    return pd.DataFrame(out)


def apply_sweep_budgets(fitted: pd.DataFrame, test: ArchStats) -> pd.DataFrame:
    """Add test accuracy and costs of each fitted threshold, applied unchanged to ``test``."""
    k, n = test.num_exits - 1, test.unit.name
    extra = []
    for t in fitted["threshold"]:
        if np.isnan(t):
            extra.append({"test_accuracy": np.nan, f"test_{n('expected')}": np.nan,
                          f"test_{n('relative')}": np.nan})
        else:
            extra.append(_row(test, test.score("max_softmax", (float(t),) * k), "test_"))
    return pd.concat([fitted.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def budget_accuracy(val: ArchStats, test: ArchStats, budgets: Sequence[float] = BUDGETS,
                    thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> pd.DataFrame:
    """Threshold-sweep protocol: thresholds selected on ``val``, accuracy reported on ``test``."""
    return apply_sweep_budgets(fit_sweep_budgets(threshold_sweep(val, thresholds), budgets), test)


# ---- budgeted batch (MSDNet) -----------------------------------------------------------------
def budgeted_batch_thresholds(conf: np.ndarray, p: float) -> tuple[float, ...]:
    """MSDNet's thresholds for one p from VAL confidences ``conf`` [K, N] (final exit last).

    q_k = p^k / sum_j p^j over the K exits. Walking the early exits in order, m = floor(n q_k)
    (n = all val samples; computed with a 1e-9 tolerance so float rounding of n q_k never
    drops a whole sample) and T_k is the m-th largest confidence among the samples that have not
    exited yet. Then every not-yet-exited sample with confidence >= T_k exits at k — with ties
    at T_k, more than m may leave (the rule the threshold will apply on test anyway).
    m = 0, or no sample left: T_k = +inf (nobody exits at k). m > samples left (only after
    ties): T_k = the smallest confidence left (all of them exit). The final exit takes the
    rest."""
    k_all, n = conf.shape
    q = p ** np.arange(1, k_all + 1, dtype=np.float64)
    q /= q.sum()
    left = np.ones(n, dtype=bool)
    out = []
    for k in range(k_all - 1):
        m = int(math.floor(n * q[k] + 1e-9))
        c = conf[k][left]
        if m == 0 or c.size == 0:
            out.append(math.inf)
            continue
        m = min(m, c.size)
        t = np.partition(c, c.size - m)[c.size - m]  # m-th largest
        out.append(float(t))
        left &= ~(conf[k] >= t)
    return tuple(out)


def fit_budgeted_batch(val: ArchStats, ps: Sequence[float] = BUDGETED_BATCH_P) -> pd.DataFrame:
    """Budgeted-batch thresholds fitted on VAL (confidences only), one row per p, with the val
    accuracy and cost they give."""
    rows = []
    for p in ps:
        t = budgeted_batch_thresholds(val.conf, p)
        rows.append({"p": p, "thresholds": t, **_row(val, val.score("max_softmax", t), "val_")})
    return pd.DataFrame(rows)


def apply_budgeted_batch(fitted: pd.DataFrame, test: ArchStats) -> pd.DataFrame:
    """Apply each row's thresholds unchanged to ``test``."""
    extra = [_row(test, test.score("max_softmax", t), "test_") for t in fitted["thresholds"]]
    return pd.concat([fitted.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def budgeted_batch(val: ArchStats, test: ArchStats,
                   ps: Sequence[float] = BUDGETED_BATCH_P) -> pd.DataFrame:
    """MSDNet's budgeted batch: p = i/20, i = 1..39; thresholds from val, accuracy on test."""
    return apply_budgeted_batch(fit_budgeted_batch(val, ps), test)


# ---- AUC -------------------------------------------------------------------------------------
def auc(select_costs: Sequence[float], select_accuracy: Sequence[float],
        report_accuracy: Sequence[float] | None = None) -> float:
    """Area under accuracy vs relative cost on [0, 1], as a budget curve.

    A(b) for a budget b is the accuracy of the point chosen for b: the most accurate point
    (by ``select_accuracy``, ties: cheaper) whose cost <= b — the sweep's budget rule — and the
    curve reports ``report_accuracy`` of that point (default: ``select_accuracy``; pass val
    values to select and test values to report). Closed at the ends: A(b) = 0 below the
    cheapest point (no operating point fits), A stays at its last value up to b = 1, points
    costing more than 1 never count. A is a step function, integrated exactly; the result is in
    [0, 1] (1 = perfect accuracy at zero cost)."""
    costs = np.asarray(select_costs, float)
    sel = np.asarray(select_accuracy, float)
    rep = sel if report_accuracy is None else np.asarray(report_accuracy, float)
    ok = np.isfinite(costs) & np.isfinite(sel) & (costs <= 1.0)
    costs, sel, rep = costs[ok], sel[ok], rep[ok]
    edges = np.unique(costs)  # A changes only where a new point becomes affordable
    area = 0.0
    for lo, hi in zip(edges, np.append(edges[1:], 1.0)):
        i = _select(costs, sel, lo)
        area += (hi - lo) * rep[i]
    return float(area)


def auc_table(val: ArchStats, test: ArchStats) -> pd.DataFrame:
    """AUC per protocol, operating points selected on val and reported on test: the anytime
    exits, the threshold sweep and the budgeted batch."""
    rows = []
    rel = val.unit.name("relative")
    va, ta = anytime(val), anytime(test)
    rows.append(("anytime", va[rel], va["accuracy"], ta["accuracy"]))
    vs, ts = threshold_sweep(val), threshold_sweep(test)
    rows.append(("threshold_sweep", vs[rel], vs["accuracy"], ts["accuracy"]))
    bb = budgeted_batch(val, test)
    rows.append(("budgeted_batch", bb[f"val_{rel}"], bb["val_accuracy"], bb["test_accuracy"]))
    return pd.DataFrame([{"protocol": name, "auc": auc(c, s, r), "val_auc": auc(c, s)}
                         for name, c, s, r in rows])


# ---- oracle ----------------------------------------------------------------------------------
def oracle_index(stats: ArchStats) -> np.ndarray:
    """First exit whose prediction is right, per sample; the final exit when none is."""
    right = stats.pred == stats.labels[None, :]
    return np.where(right.any(axis=0), right.argmax(axis=0), stats.num_exits - 1)


def oracle(stats: ArchStats) -> pd.DataFrame:
    """Upper bound: a sample leaves at the first exit that is right (one never right pays the
    final exit and counts as wrong). One row, with ``exit_fractions`` (final last)."""
    s = stats.score_index(oracle_index(stats))
    return pd.DataFrame([{**_row(stats, s), "exit_fractions": s.exit_fractions}])


__all__ = ["BUDGETS", "SWEEP_THRESHOLDS", "BUDGETED_BATCH_P", "anytime", "threshold_sweep",
           "fit_sweep_budgets", "apply_sweep_budgets", "budget_accuracy",
           "budgeted_batch_thresholds", "fit_budgeted_batch", "apply_budgeted_batch",
           "budgeted_batch", "auc", "auc_table", "oracle_index", "oracle", "policy_score"]
