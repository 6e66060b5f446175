"""search/_front.py: the 2-D hypervolume equals Optuna's, the feasible Pareto front."""
from __future__ import annotations

import pytest


def test_hypervolume_matches_optunas():
    import numpy as np

    from exitnas.search import hypervolume_2d, pareto_front

    hv_mod = pytest.importorskip("optuna._hypervolume")
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = [(float(a), float(c)) for a, c in rng.uniform(0, 1, size=(30, 2))]
        ref = (0.0, 1.0)
        want = hv_mod.compute_hypervolume(np.array([(1 - a, c) for a, c in pts]),
                                          np.array([1.0, 1.0]))
        assert hypervolume_2d(pts, ref) == pytest.approx(want)
    rows = [{"trial": i, "accuracy": a, "expected_macs": c, "feasible": True}
            for i, (a, c) in enumerate([(0.5, 10), (0.6, 10), (0.6, 20), (0.9, 30), (0.8, 40)])]
    assert [r["trial"] for r in pareto_front(rows)] == [1, 3]
