"""search/_objective.py: constraints (the path budget is a second one, by name and as the list
optuna-dashboard reads); searching structures with fitted thresholds: on a fixed supernet whose
space holds SDN's placement, a default search finds on val at least SDN's swept accuracy at
25 % and 50 % of the backbone's MACs; each trial's thresholds score, from the cache, what the
trial recorded."""
from __future__ import annotations

import pytest

from conftest import SPACES
from exitnas import protocols as P
from exitnas.baselines import sdn_arch, sdn_positions
from exitnas.cost import cost_table
from exitnas.data import load_splits
from exitnas.evaluate import ArchStats, load_or_build_cache, score
from exitnas.rundir import RunDir
from exitnas.space import load_space
from exitnas.supernet import Supernet
from exitnas.train import train_supernet
from search_support import study_of, tiny_run, trained_tiny  # noqa: F401

BUDGETS = (0.25, 0.5)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from exitnas.search import SearchOptions, run_search

    space = load_space(SPACES / "quickstart.yaml", {
        "exits.max_exits": 6, "supernet.init": "scratch", "supernet.epochs": 4, "search.budget_fraction": 0.5,
        "search.deploy_budgets": list(BUDGETS)})
    run = RunDir(tmp_path_factory.mktemp("fitted") / "run")
    train_supernet(run, space, log=None)
    result = run_search(run.path, SearchOptions())
    return run, space, result


def _study_trials(run):
    from search_support import study_of
    from optuna.trial import TrialState

    return [t for t in study_of(run.path).get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


@pytest.mark.slow
def test_default_search_finds_at_least_sdn_at_25_and_50_percent(searched):
    run, space, _ = searched
    costs = cost_table(space)
    sdn = sdn_arch(space, costs)
    assert len(sdn.exits) == 6 and len(sdn_positions(space, costs)) == 6
    net = Supernet(space).load(run.path / "supernet" / "weights.safetensors")
    cache = load_or_build_cache(run, net, sdn.depths, load_splits(space))
    sweep = P.fit_sweep_budgets(P.threshold_sweep(ArchStats.from_cache(cache, sdn, costs)), BUDGETS)
    trials = _study_trials(run)
    assert len(trials) == space.search.trials
    for i, b in enumerate(BUDGETS):
        sdn_val = float(sweep["val_accuracy"].iloc[i])
        found = max(f["accuracy"] for t in trials for f in [t.user_attrs["fits"][i]] if f["feasible"])
        assert found >= sdn_val, (b, found, sdn_val)


@pytest.mark.slow
def test_every_trials_fitted_thresholds_score_what_it_recorded(searched):
    from exitnas.arch import Arch

    run, space, _ = searched
    costs = cost_table(space)
    net = Supernet(space).load(run.path / "supernet" / "weights.safetensors")
    splits = load_splits(space)
    for t in _study_trials(run)[:40]:
        arch = Arch.from_id(t.user_attrs["arch_id"])
        cache = load_or_build_cache(run, net, arch.depths, splits)
        fits = t.user_attrs["fits"]
        assert [f["fraction"] for f in fits] == pytest.approx(list(BUDGETS))
        for f in fits:
            s = score(cache, arch.with_thresholds(tuple(f["thresholds"])), costs)
            assert (s.accuracy, s.expected_cost) == (f["accuracy"], f["expected_macs"])
            assert f["feasible"] == (s.expected_cost <= f["budget_macs"])
        assert tuple(fits[-1]["thresholds"]) == arch.thresholds
        want = sum(f["accuracy"] if f["feasible"] else 0.0 for f in fits) / len(fits)
        assert t.values[0] == pytest.approx(want, abs=1e-12)


def test_path_budget_is_a_second_constraint(tiny_run):
    from exitnas.search import SearchOptions, run_search

    result = run_search(tiny_run, SearchOptions(trials=60, budget="0.9", path_budget="0.75"),
                        log=None)
    study = study_of(tiny_run)
    backbone = study.user_attrs["exitnas"]["budget"]["backbone_macs"]
    trials = study.get_trials()
    for t in trials:  # by name, and as the list optuna-dashboard reads (Optuna: "0", "1")
        named = [t.constraints["expected_macs"], t.constraints["path_macs"]]
        assert set(t.constraints) == {"expected_macs", "path_macs", "0", "1"}
        assert t.system_attrs["constraints"] == named == [t.constraints["0"], t.constraints["1"]]
    over = [t for t in trials if t.user_attrs["path_macs"] > 0.75 * backbone]
    assert over and not any(t.user_attrs["feasible"] for t in over)
    assert all(r["path_macs"] <= 0.75 * backbone for r in result.front)
