"""Evaluation protocols on small hand-worked arrays (values computed by hand in comments)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from exitnas.evaluate import ArchStats
from exitnas.protocols import (BUDGETED_BATCH_P, SWEEP_THRESHOLDS, anytime, auc, auc_table,
                               budget_accuracy, budgeted_batch, budgeted_batch_thresholds,
                               fit_budgeted_batch, fit_sweep_budgets, oracle, policy_score,
                               threshold_sweep)

F = np.float32
COSTS = (10, 30, 100)  # C_k of exit 0, exit 1, final; the plain backbone costs 100


def stats(conf, pred, labels) -> ArchStats:
    conf = np.array(conf, np.float32)
    return ArchStats(conf, np.zeros_like(conf), np.array(pred), np.array(labels), COSTS, 100)


# 7 val samples, 2 early exits + final. Exit 0 has a 4-way tie at 0.6.
VAL = stats(conf=[[0.95, 0.8, 0.6, 0.6, 0.6, 0.6, 0.2],
                  [0.99, 0.9, 0.9, 0.9, 0.8, 0.7, 0.35],
                  [1.0] * 7],
            pred=[[0, 1, 0, 3, 0, 0, 0],    # right: samples 0, 1, 3, 4
                  [0, 1, 2, 0, 0, 1, 2],    # right: 0, 1, 2, 4, 5, 6
                  [0, 1, 2, 3, 0, 1, 0]],   # right: all but 6
            labels=[0, 1, 2, 3, 0, 1, 2])
TEST = stats(conf=[[0.6, 0.59, 0.9, 0.1],
                   [0.1, 0.9, 0.35, 0.3],
                   [1.0] * 4],
             pred=[[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]],
             labels=[0, 0, 0, 0])


def test_budgeted_batch_hand_worked():
    """n = 7, K = 3.
    p = 0.5: q = (4, 2, 1)/7 -> m0 = 4: the 4th most confident at exit 0 is 0.6, shared by
      four samples, so 6 leave (ties all leave); 1 left but m1 = 2 > 1: T1 = its 0.35.
      Val: exit 0 right for 0, 1, 3, 4 (not 2, 5); sample 6 right at exit 1 -> 5/7.
      Test (T = 0.6, 0.35): s0 0.6 >= 0.6 exit 0 right; s1 exit 1 right; s2 exit 0 right;
      s3 final wrong -> 3/4, MACs (10 + 30 + 10 + 100)/4.
    p = 1: q = 1/3 each -> m = 2: T0 = 0.8 (samples 0, 1 leave); among 2..6 at exit 1 the 2nd
      most confident is 0.9 -> T1 = 0.9 (2, 3 leave); 4, 5, 6 final.
      Val: 0, 1 right; 2 right, 3 wrong; 4, 5 right, 6 wrong -> 5/7.
      Test (0.8, 0.9): s0 final wrong, s1 exit 1 right, s2 exit 0 right, s3 final wrong -> 2/4.
    p = 0.05: q0 = 0.9501 -> m0 = 6: 6th largest at exit 0 = 0.6 -> 6 leave; q1 = 0.0475 ->
      m1 = floor(0.33) = 0 -> T1 = inf, sample 6 goes to the final exit (wrong) -> 4/7.
      Test (0.6, inf): s0, s2 exit 0 right; s1 final right; s3 final wrong -> 3/4."""
    df = budgeted_batch(VAL, TEST, ps=(0.5, 1.0, 0.05))
    assert df["thresholds"].tolist() == [(float(F(0.6)), float(F(0.35))),
                                         (float(F(0.8)), float(F(0.9))),
                                         (float(F(0.6)), math.inf)]
    assert df["val_accuracy"].tolist() == [5 / 7, 5 / 7, 4 / 7]
    assert df["val_expected_macs"].tolist() == [(6 * 10 + 30) / 7, (2 * 10 + 2 * 30 + 3 * 100) / 7,
                                                (6 * 10 + 100) / 7]
    assert df["test_accuracy"].tolist() == [3 / 4, 2 / 4, 3 / 4]
    assert df["test_expected_macs"].tolist() == [150 / 4, 240 / 4, 220 / 4]
    assert df["test_relative_macs"].tolist() == [150 / 400, 240 / 400, 220 / 400]


def test_budgeted_batch_fits_on_val_only():
    """Thresholds depend on val confidences only: other test data, or other val labels and
    predictions, leave them unchanged; test labels change only the test accuracy."""
    base = budgeted_batch(VAL, TEST)
    assert len(base) == 39 and BUDGETED_BATCH_P[0] == 0.05 and BUDGETED_BATCH_P[-1] == 1.95
    rng = np.random.default_rng(0)
    other_test = stats(rng.random((3, 50)), rng.integers(0, 4, (3, 50)), rng.integers(0, 4, 50))
    flipped = stats(TEST.conf, TEST.pred, [1, 1, 1, 1])
    relabelled_val = stats(VAL.conf, VAL.pred[::-1], [3, 2, 1, 0, 3, 2, 1])
    for df in (budgeted_batch(VAL, other_test), budgeted_batch(VAL, flipped),
               budgeted_batch(relabelled_val, TEST)):
        assert df["thresholds"].tolist() == base["thresholds"].tolist()
    assert budgeted_batch(VAL, flipped)["test_accuracy"].tolist() != base["test_accuracy"].tolist()
    assert fit_budgeted_batch(VAL)["thresholds"].tolist() == base["thresholds"].tolist()


def test_budgeted_batch_exit_shares_follow_q_without_ties():
    """With distinct confidences, exactly floor(n q_k) samples leave at each early exit."""
    rng = np.random.default_rng(1)
    conf = rng.permuted(np.tile(np.linspace(0.01, 0.99, 1000, dtype=np.float32), (4, 1)), axis=1)
    for p in (0.3, 1.0, 1.7):
        t = budgeted_batch_thresholds(conf, p)
        q = p ** np.arange(1, 5)
        q /= q.sum()
        left = np.ones(1000, bool)
        for k in range(3):
            leave = left & (conf[k] >= t[k])
            assert leave.sum() == math.floor(1000 * q[k] + 1e-9)
            left &= ~leave


def test_anytime_and_oracle_by_hand():
    df = anytime(VAL)
    assert df["name"].tolist() == ["exit0", "exit1", "final"]
    assert df["macs"].tolist() == [10, 30, 100]
    assert df["relative_macs"].tolist() == [0.1, 0.3, 1.0]
    assert df["accuracy"].tolist() == [4 / 7, 6 / 7, 6 / 7]
    # oracle: first right exit = 0, 0, 1, 0, 0, 1, 1 -> all right, MACs (4*10 + 3*30)/7
    o = oracle(VAL).iloc[0]
    assert o["accuracy"] == 1.0
    assert o["expected_macs"] == 130 / 7
    assert o["exit_fractions"] == (4 / 7, 3 / 7, 0.0)
    # a sample wrong everywhere pays the final exit and counts as wrong
    o = oracle(stats(TEST.conf, TEST.pred, [0, 0, 0, 2])).iloc[0]  # first right: 0, 1, 0, none
    assert o["accuracy"] == 3 / 4 and o["expected_macs"] == (10 + 30 + 10 + 100) / 4


def test_threshold_sweep_and_budgets_by_hand():
    """t = 0: all leave at exit 0 (4/7, cost 0.1). t = 0.5: samples 0-5 at exit 0, 6 final
    (4/7, 160/700). t = 0.7: 0, 1 at exit 0; 2-5 at exit 1 (0.7 >= 0.7 in float32); 6 final
    -> right 0, 1, 2, 4, 5 = 5/7, cost 240/700. t = 1: all final, 6/7, cost 1."""
    sweep = threshold_sweep(VAL, (0.0, 0.5, 0.7, 1.0))
    assert sweep["accuracy"].tolist() == [4 / 7, 4 / 7, 5 / 7, 6 / 7]
    assert sweep["expected_macs"].tolist() == [10.0, 160 / 7, 240 / 7, 100.0]
    fitted = fit_sweep_budgets(sweep, (0.05, 0.25, 0.5, 1.0))
    # 0.05: nothing fits; 0.25: t=0 and t=0.5 tie at 4/7 -> the cheaper t=0; 0.5: t=0.7; 1: t=1
    assert np.isnan(fitted["threshold"].iloc[0]) and np.isnan(fitted["val_accuracy"].iloc[0])
    assert fitted["threshold"].tolist()[1:] == [0.0, 0.7, 1.0]
    assert fitted["val_accuracy"].tolist()[1:] == [4 / 7, 5 / 7, 6 / 7]
    # applied unchanged to test: t=0 all exit 0 -> right 0, 2, 3 = 3/4; t=0.7 -> s2 exit 0
    # right, s1 exit 1 right, s0, s3 final wrong -> 2/4; t=1 all final -> 2/4
    full = budget_accuracy(VAL, TEST, (0.05, 0.25, 0.5, 1.0), thresholds=(0.0, 0.5, 0.7, 1.0))
    assert full["test_accuracy"].tolist()[1:] == [3 / 4, 2 / 4, 2 / 4]
    assert full["test_expected_macs"].tolist()[1:] == [10.0, (10 + 30 + 200) / 4, 100.0]
    # the default sweep: 100 thresholds in [0, 1], the same at every exit
    assert len(SWEEP_THRESHOLDS) == 100 and SWEEP_THRESHOLDS[0] == 0.0 and SWEEP_THRESHOLDS[-1] == 1.0
    default = threshold_sweep(VAL)
    assert len(default) == 100 and default["accuracy"].iloc[0] == 4 / 7
    assert default["accuracy"].iloc[-1] == 6 / 7  # only conf >= 1.0 would leave early


def test_auc_by_hand():
    """Points (cost, acc): (0.1, .5) (0.3, .6) (0.35, .55: dominated) (0.4, .8) (1.2: over 1).
    A = 0 on [0, .1), .5 on [.1, .3), .6 on [.3, .4), .8 on [.4, 1] -> .1 + .06 + .48."""
    costs = [0.1, 0.4, 0.3, 0.35, 1.2]
    acc = [0.5, 0.8, 0.6, 0.55, 0.95]
    assert auc(costs, acc) == pytest.approx(0.64, abs=1e-12)
    # selected by acc (val), reported with other values (test): .2*.4 + .1*.5 + .6*.7
    assert auc(costs, acc, [0.4, 0.7, 0.5, 0.0, 1.0]) == pytest.approx(0.55, abs=1e-12)
    assert auc([0.0], [1.0]) == 1.0
    assert auc([], []) == 0.0
    assert auc([0.5, float("nan")], [0.9, 1.0]) == pytest.approx(0.45)


def test_auc_table_and_policy_score():
    df = auc_table(VAL, TEST)
    assert df["protocol"].tolist() == ["anytime", "threshold_sweep", "budgeted_batch"]
    # anytime on val: exit 0 (.1, 4/7), exit 1 (.3, 6/7), final (1.0, 6/7: tie, dearer);
    # reported on test: exit 0 = 3/4, exit 1 = 3/4
    assert df["val_auc"].iloc[0] == pytest.approx(0.2 * 4 / 7 + 0.7 * 6 / 7)
    assert df["auc"].iloc[0] == pytest.approx(0.2 * 3 / 4 + 0.7 * 3 / 4)
    assert ((df["auc"] >= 0) & (df["auc"] <= 1)).all()
    row = policy_score(VAL, "max_softmax", (0.7, 0.7)).iloc[0]
    assert row["accuracy"] == 5 / 7 and row["relative_macs"] == 240 / 700
    assert row["params"] == "0.7,0.7" and row["exit_fractions"] == (2 / 7, 4 / 7, 1 / 7)
