"""What the search scores is what ships: searched sub-networks exported with the supernet's
own weights (BN re-estimated) and run by ``exitnas.runtime`` on val give exactly the study's
predictions, exits, accuracy and expected MACs; deploy picks are the best feasible fits."""
from __future__ import annotations

import numpy as np
import pytest

from exitnas.arch import Arch
from exitnas.cost import cost_table
from exitnas.data import load_splits
from exitnas.deploy import deploy_picks, pick_budgets
from exitnas.evaluate import decide, load_or_build_cache
from exitnas.rundir import RunDir
from exitnas.supernet import Supernet
from search_support import study_of, train_tiny_run

BUDGETS = [0.6, 0.75, 0.9]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from exitnas.search import SearchOptions, run_search

    path = train_tiny_run(tmp_path_factory.mktemp("deploy") / "run", steps=60)
    run = RunDir(path)
    space = run.space({"search.deploy_budgets": BUDGETS, "search.trials": 80})
    run.init(space)
    run_search(run.path, SearchOptions())
    return run, space


def _layers(rows: list[tuple]) -> list[tuple]:
    """Rows (arch_id, accuracy, macs, trial) by non-dominated layer (accuracy max, MACs min),
    one row per distinct arch id."""
    left, out = list({r[0]: r for r in sorted(rows, key=lambda r: -r[3])}.values()), []
    while left:
        front = [r for r in left if not any(o[1] >= r[1] and o[2] <= r[2] and (o[1], o[2]) != (r[1], r[2])
                                            for o in left)]
        out += sorted(front, key=lambda r: r[2])
        left = [r for r in left if r not in front]
    return out


def test_exports_of_the_front_give_exactly_the_studys_numbers(searched, tmp_path):
    from exitnas import runtime
    from exitnas.export import export_run

    run, space = searched
    trials = [t for t in study_of(run.path).trials if t.state.name == "COMPLETE"]
    rows = [(t.user_attrs["arch_id"], t.values[0], t.values[1], t.number) for t in trials
            if t.user_attrs["feasible"]]
    chosen = _layers(rows)[:10]
    assert len(chosen) == 10
    splits = load_splits(space)
    net = Supernet(space).load(run.path / "supernet" / "weights.safetensors")
    costs = cost_table(space)
    by_number = {t.number: t for t in trials}
    for arch_id, _, _, number in chosen:
        trial = by_number[number]
        arch = Arch.from_id(arch_id)
        out = export_run(run, arch, tmp_path / arch_id, onnx=False,
                         weights=run.path / "supernet" / "weights.safetensors").out
        pred = runtime.load(out).predict(runtime.load(out).preprocess(splits.val.images.numpy()))
        want_pred, want_exit = decide(load_or_build_cache(run, net, arch.depths, splits), arch)
        np.testing.assert_array_equal(pred.pred, want_pred.numpy())
        np.testing.assert_array_equal(pred.exit, want_exit.numpy())
        labels = splits.val.labels.numpy()
        macs = np.asarray(costs.exit_costs(arch), dtype=np.int64)[pred.exit]
        fit = trial.user_attrs["fits"][-1]  # the trial's arch carries this budget's thresholds
        assert float(np.mean(pred.pred == labels)) == pytest.approx(fit["accuracy"], abs=1e-12)
        assert int(macs.sum()) / len(labels) == pytest.approx(fit["expected_macs"], abs=1e-9)
        assert trial.values[1] == pytest.approx(fit["expected_macs"], abs=1e-9)


def test_deploy_picks_are_the_best_feasible_fit_per_budget(searched):
    run, space = searched
    picks = deploy_picks(run)
    trials = [t for t in study_of(run.path).trials if t.state.name == "COMPLETE"]
    backbone = cost_table(space).backbone()
    assert [p.budget_fraction for p in picks] == pytest.approx(BUDGETS)
    for i, p in enumerate(picks):
        best = max(t.user_attrs["fits"][i]["accuracy"] for t in trials
                   if t.user_attrs["fits"][i]["feasible"])
        assert p.val_accuracy == best and p.val_expected_cost <= p.budget
        assert p.budget == pytest.approx(BUDGETS[i] * backbone)
    # a budget nobody meets is one clear error
    from exitnas.errors import RunDirError

    with pytest.raises(RunDirError, match="no searched architecture meets"):
        pick_budgets(trials, (1.0,), backbone)
