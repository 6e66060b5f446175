"""search/_run.py: run_search on a tiny trained supernet: bad input fails before anything is
written, an in-process search gives a feasible front scored from the cache, reruns continue."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, tree_digest
from search_support import study_of, tiny_run, trained_tiny, trial_counts  # noqa: F401

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add contention here


def test_infeasible_budget_fails_before_the_search(tiny_run):
    before = tree_digest(tiny_run)
    r = run_cli("search", tiny_run, "--budget", "1000", env=ONE_THREAD)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "cheapest expected cost" in r.stderr and "91,680 MACs" in r.stderr
    r = run_cli("search", tiny_run, "--path-budget", "0.1", env=ONE_THREAD)
    assert r.returncode == 2 and "cheapest worst-case path" in r.stderr
    r = run_cli("search", tiny_run, "--budget", "lots", env=ONE_THREAD)
    assert r.returncode == 2 and "--budget 'lots'" in r.stderr
    assert tree_digest(tiny_run) == before


def test_missing_supernet_names_the_file_and_the_command(tmp_path, tiny_space):
    from exitnas.rundir import RunDir

    RunDir(tmp_path / "run").init(tiny_space)
    before = tree_digest(tmp_path / "run")
    r = run_cli("search", tmp_path / "run", env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "supernet/weights.safetensors" in r.stderr and "exitnas train-supernet" in r.stderr
    assert tree_digest(tmp_path / "run") == before



def test_inprocess_search_gives_a_feasible_front_scored_from_the_cache(tiny_run, monkeypatch):
    import torch

    from exitnas import evaluate
    from exitnas.arch import Arch
    from exitnas.cost import cost_table
    from exitnas.data import load_splits
    from exitnas.rundir import RunDir
    from exitnas.search import SearchOptions, run_search
    from exitnas.supernet import Supernet

    torch.set_num_threads(1)
    builds = []
    real_build = evaluate.build_cache
    monkeypatch.setattr(evaluate, "build_cache",
                        lambda net, depths, b: builds.append(depths) or real_build(net, depths, b))
    result = run_search(tiny_run, SearchOptions(trials=150, budget="0.8"), log=None)
    assert result.trials == 150 and len(result.front) >= 2
    study = study_of(tiny_run)
    assert study.metric_names == ["accuracy", "expected_macs"]
    trials = study.get_trials()
    depth_settings = {tuple(t.user_attrs["arch"]["depths"]) for t in trials}
    # every depth setting went through the network exactly once, for 150 trials
    assert sorted(builds) == sorted(depth_settings) and len(depth_settings) >= 2
    assert result.summary["cache"]["built"] == len(depth_settings)
    assert result.summary["cache"]["requests"] == 150

    space = RunDir(tiny_run).space()
    costs = cost_table(space)
    backbone = costs.backbone()
    budget = 0.8 * backbone
    for t in trials:
        ua = t.user_attrs
        assert set(ua) >= {"arch_id", "arch", "macs", "relative_cost", "path_macs",
                           "exit_accuracy", "feasible"}
        assert ua["arch_id"] == Arch.from_json(ua["arch"]).id
        assert ua["macs"] == t.values[1]
        assert ua["relative_cost"] == pytest.approx(t.values[1] / backbone)
        assert t.constraints["expected_macs"] == pytest.approx((t.values[1] - budget) / backbone)
        assert ua["feasible"] == (t.values[1] <= budget)

    # the front: feasible, non-dominated, and its values are what the cache scores
    net = Supernet(space).load(tiny_run / "supernet/weights.safetensors")
    splits = load_splits(space)
    front = result.front
    assert all(r["feasible"] and r["expected_macs"] <= budget for r in front)
    feasible = [t for t in trials if t.user_attrs["feasible"]]
    for r in front:
        assert not any(t.values[0] >= r["accuracy"] and t.values[1] <= r["expected_macs"]
                       and (t.values[0], t.values[1]) != (r["accuracy"], r["expected_macs"])
                       for t in feasible)
        arch = Arch.from_id(r["arch_id"])
        s = evaluate.score(evaluate.load_or_build_cache(RunDir(tiny_run), net, arch.depths, splits),
                           arch, costs)
        assert (s.accuracy, s.expected_cost) == (r["accuracy"], r["expected_macs"])
    assert sorted(builds) == sorted(depth_settings)  # the checks above read the disk cache

    folder = tiny_run / "search"
    for name in ("front.csv", "front.md", "front.png", "hypervolume.json", "trials.csv",
                 "summary.json", "study.log", "study.json"):
        assert (folder / name).is_file(), name
    hv = json.loads((folder / "hypervolume.json").read_text())
    assert hv["reference_point"] == {"accuracy": 0.0, "relative_cost": pytest.approx(0.8)}
    assert hv["hypervolume"] == pytest.approx(result.hypervolume) and hv["hypervolume"] > 0
    csv_lines = (folder / "front.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial,arch_id,accuracy,expected_macs,relative_cost")
    assert len(csv_lines) == len(front) + 1
    assert (folder / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_rerun_continues_to_n_trials_with_the_random_sampler(tiny_run):
    r = run_cli("search", tiny_run, "--trials", "40", "--sampler", "random", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "40 complete trials" in r.stdout
    r = run_cli("search", tiny_run, "--trials", "70", "--sampler", "random", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "70 complete trials (30 run now" in r.stdout
    counts = trial_counts(tiny_run)
    assert counts == {"complete": 70, "running": 0, "fail": 0, "numbers_unique": True,
                      "numbers_contiguous": True, "uids_unique": True}
    summary = json.loads((tiny_run / "search" / "summary.json").read_text())
    assert summary["cache"]["built"] == 0  # the second process read every depth from RUN/cache
    assert summary["session"] == 1
    r = run_cli("search", tiny_run, "--trials", "70", "--budget", "0.5", env=ONE_THREAD)
    assert r.returncode == 2 and "was run with another budget" in r.stderr
