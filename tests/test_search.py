"""Search: genome, budgets, in-process NSGA-II on a tiny trained supernet, resume after kill -9,
concurrent processes on one journal file."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SPACES, run_cli, tree_digest
from search_support import TINY, copy_run, study_of, train_tiny_run, trial_counts

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add contention here


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("tiny-trained") / "run")


@pytest.fixture
def tiny_run(trained_tiny, tmp_path) -> Path:
    return copy_run(trained_tiny, tmp_path / "run")


# ---- genome ----------------------------------------------------------------------------------
@pytest.mark.parametrize("space_file", [TINY, SPACES / "quickstart.yaml", SPACES / "resnet_cifar.yaml",
                                        SPACES / "mobilenetv2_cifar.yaml"])
def test_genome_decodes_every_sample_to_a_valid_arch(space_file):
    import optuna

    from exitnas.search import Genome
    from exitnas.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(space_file)
    genome = Genome(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    names, counts = None, set()
    for _ in range(300):
        trial = study.ask()
        params = genome.suggest(trial)
        names = names or sorted(params)
        assert sorted(params) == names  # a fixed-size genome: every trial, every parameter
        arch = genome.decode(params)
        assert arch.validate(space) is arch
        active = space.positions(arch.depths)
        want = min(params.get("n_exits", genome.slots), len(active))
        assert len(arch.exits) == want <= space.exits.max_exits
        counts.add(len(arch.exits))
        study.tell(trial, 0.0)
    assert len(counts) >= 2  # the number of exits varies


@pytest.mark.parametrize("space_file", [TINY, SPACES / "quickstart.yaml", SPACES / "resnet_cifar.yaml"])
def test_genome_encode_decode_round_trip(space_file):
    from exitnas.arch import sample_arch
    from exitnas.search import Genome
    from exitnas.space import load_space

    space = load_space(space_file, {"search.thresholds": "evolved"})
    genome = Genome(space)
    rng = random.Random(0)
    for _ in range(200):
        arch = sample_arch(space, rng)
        assert genome.decode(genome.encode(arch)) == arch
    # fitted thresholds: the genome is the structure; thresholds decode to "nobody leaves"
    fitted = Genome(load_space(space_file))
    assert not any(k.startswith(("thr", "ent")) for k in fitted.encode(arch))
    p = space.policy
    for _ in range(200):
        arch = sample_arch(space, rng)
        back = fitted.decode(fitted.encode(arch))
        assert (back.depths, back.exits, back.policy) == (arch.depths, arch.exits, arch.policy)
        want = {"max_softmax": (p.threshold_range[1],) * len(arch.exits),
                "entropy": (p.entropy_range[0],) * len(arch.exits)}.get(arch.policy, arch.thresholds)
        assert back.thresholds == want


def test_genome_repairs_inactive_and_duplicate_slots(tiny_space):
    from exitnas.search import Genome

    genome = Genome(tiny_space.with_overrides({"search.thresholds": "evolved"}))
    # positions s0b0, s0b1, s1b0; 2 slots
    base = {"depth0": 1, "depth1": 2, "n_exits": 2, "exit0": "s0b1", "exit1": "s0b0",
            "head0": "conv", "head1": "linear", "thr0": 0.7, "thr1": 0.9, "ent0": 0.1,
            "ent1": 0.2, "policy": "max_softmax", "patience": 1}
    arch = genome.decode(base)  # s0b1 is beyond depth 1: moves to s0b0, taken -> next free s1b0
    assert arch.id == "d1.2~s0b0=conv,s1b0=linear~max_softmax=0.7,0.9"
    arch = genome.decode({**base, "depth1": 1})  # only s0b0 active: one exit
    assert arch.id == "d1.1~s0b0=conv~max_softmax=0.7"
    arch = genome.decode({**base, "depth0": 2, "policy": "patience", "patience": 2})
    assert arch.id == "d2.2~s0b0=linear,s0b1=conv~patience=2"


# ---- budgets ---------------------------------------------------------------------------------
def test_parse_macs_units_and_errors():
    from exitnas.errors import BudgetError
    from exitnas.search import parse_macs

    assert parse_macs("0.6", backbone=1000) == 600.0
    assert parse_macs("1", backbone=1000) == 1000.0
    assert parse_macs("20M", backbone=1000) == 20e6
    assert parse_macs("1.5G", backbone=1000) == 1.5e9
    assert parse_macs("2500", backbone=1000) == 2500.0
    assert parse_macs("3k", backbone=1000) == 3000.0
    for bad in ("0", "-1", "12X", "", "M"):
        with pytest.raises(BudgetError):
            parse_macs(bad, backbone=1000)


def test_cheapest_cost_is_the_cheapest_first_exit(tiny_space):
    from exitnas.arch import Arch, Exit
    from exitnas.cost import cost_table
    from exitnas.errors import BudgetError
    from exitnas.search import cheapest_costs, resolve_budget

    costs = cost_table(tiny_space)
    brute = min(costs.exit_costs(Arch(depths=d, exits=(Exit(s, b, h),)))[0]
                for d in tiny_space.depth_settings() for s, b in tiny_space.positions(d)
                for h in tiny_space.exits.heads)
    low_expected, low_path = cheapest_costs(tiny_space, costs)
    assert low_expected == brute
    cheapest_head = min(costs.heads[(0, 0, h)] for h in tiny_space.exits.heads)
    assert low_path == costs.backbone((1, 1)) + cheapest_head  # min_exits = 1
    assert resolve_budget(tiny_space, costs, budget=str(brute)).expected_macs == brute
    with pytest.raises(BudgetError, match=f"{brute:,}"):
        resolve_budget(tiny_space, costs, budget=str(brute - 1))
    b = resolve_budget(tiny_space, costs, budget="0.5", path_budget="0.95")
    assert (b.expected_macs, b.path_macs) == (0.5 * costs.backbone(), 0.95 * costs.backbone())


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


# ---- in-process search -----------------------------------------------------------------------
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
        assert (s.accuracy, s.expected_macs) == (r["accuracy"], r["expected_macs"])
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


def _spawn_search(run: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", **ONE_THREAD)
    return subprocess.Popen([sys.executable, "-m", "exitnas", "search", str(run), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_complete(run: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "search" / "study.json").is_file():
            n = trial_counts(run)["complete"]
            if n >= at_least:
                return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} trials after {timeout} s")


# Where a kill -9 of the in-process search can land. It never writes a RUNNING trial (a trial
# is committed whole, see exitnas/search/_inprocess.py), so what a kill can break is the commit:
# killed holding the commit lock (flock: the kernel frees it), or inside the journal write
# (Optuna's symlink lock file is left behind: the next process must break it), or while
# scoring (nothing held). Each kill below is aimed at one of them and proven to have landed
# there: the process is stopped (SIGSTOP), its locks are read from the file system and
# /proc/locks, and it is killed only when caught in the phase aimed at.
KILL_PHASES = ("scoring", "commit lock", "journal write lock")


def _phase(pid: int, journal: Path) -> str:
    if os.path.lexists(f"{journal}.lock"):  # JournalFileSymlinkLock, held only inside a write
        return "journal write lock"
    inode = os.stat(f"{journal}.exitnas-lock").st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()  # "1: FLOCK  ADVISORY  WRITE <pid> <maj>:<min>:<inode> 0 EOF"
        if f[1] == "FLOCK" and f[4] == str(pid) and int(f[5].rsplit(":", 1)[1]) == inode:
            return "commit lock"
    return "scoring"


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def _kill_in_phase(proc: subprocess.Popen, journal: Path, phase: str, timeout: float = 90) -> str:
    """SIGSTOP the search until it is caught in ``phase``, then SIGKILL it there."""
    rng = random.Random(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the search ended before it was caught in {phase!r}"
        os.kill(proc.pid, signal.SIGSTOP)
        while not _stopped(proc.pid):
            time.sleep(0.0002)
        if _phase(proc.pid, journal) == phase:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return phase
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(rng.uniform(0.001, 0.008))
    raise AssertionError(f"never caught the search in phase {phase!r} in {timeout} s")


def test_kill9_during_inprocess_search_then_rerun_gives_exactly_n(tiny_run):
    n = 1500  # no process finishes before it is caught (each is caught within ~1 s)
    journal = tiny_run / "search" / "study.log"
    landed = []
    for at_least, phase in zip((20, 200, 400), KILL_PHASES):
        proc = _spawn_search(tiny_run, "--trials", str(n))
        _wait_complete(tiny_run, at_least, proc)
        landed.append(_kill_in_phase(proc, journal, phase))
        # killed inside a journal write, it left Optuna's lock file: the next process must
        # break it (after the lock's 10 s grace period), not hang or write beside it
        assert os.path.lexists(f"{journal}.lock") == (phase == "journal write lock")
        counts = trial_counts(tiny_run)  # the journal replays: whole records only
        assert at_least <= counts["complete"] < n
        assert counts["numbers_unique"] and counts["numbers_contiguous"] and counts["uids_unique"]
    assert landed == list(KILL_PHASES)
    r = run_cli("search", tiny_run, "--trials", str(n), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(f"{journal}.lock")
    # exactly N, each committed once (running / fail are 0 by construction in-process: the
    # backend writes only finished trials; the counts that can go wrong are the others)
    assert trial_counts(tiny_run) == {"complete": n, "running": 0, "fail": 0,
                                      "numbers_unique": True, "numbers_contiguous": True,
                                      "uids_unique": True}


def test_three_concurrent_processes_on_one_journal_file_give_exactly_n(tiny_run):
    r = run_cli("search", tiny_run, "--trials", "5", env=ONE_THREAD)  # build the caches once
    assert r.returncode == 0, r.stderr
    procs = [_spawn_search(tiny_run, "--trials", "400") for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    ran = [int(out.split(" run now")[0].rsplit("(", 1)[1]) for out, _ in outs]
    assert sum(ran) == 395 and all(k > 0 for k in ran)  # all three shared the work
    assert trial_counts(tiny_run) == {"complete": 400, "running": 0, "fail": 0,
                                      "numbers_unique": True, "numbers_contiguous": True,
                                      "uids_unique": True}
    study = study_of(tiny_run)
    assert len(study.user_attrs["exitnas:sessions"]) == 4  # one owner tag per process


def test_stale_running_trials_of_dead_processes_are_failed(tmp_path):
    import optuna

    from exitnas.search._storage import (OWNER_KEY, SESSIONS_KEY, NullLock, fail_stale_trials,
                                         join_session, journal_backend, owner_tag)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(journal_backend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    dead = owner_tag().rsplit(":", 1)[0] + ":0"  # this host and pid, another start time
    study.set_user_attr(SESSIONS_KEY, [dead])
    assert join_session(study, NullLock()) == 1
    t_dead, t_none, t_mine, t_kept = (study.ask() for _ in range(4))
    storage.set_trial_system_attr(t_dead._trial_id, OWNER_KEY, dead)
    storage.set_trial_system_attr(t_mine._trial_id, OWNER_KEY, owner_tag())
    storage.set_trial_system_attr(t_kept._trial_id, OWNER_KEY, dead)
    # another live process joined: a trial without an owner might be its own
    study.set_user_attr(SESSIONS_KEY, study.user_attrs[SESSIONS_KEY] + [owner_tag(os.getppid())])
    assert fail_stale_trials(study, keep={t_kept.number}) == [t_dead.number]
    study.set_user_attr(SESSIONS_KEY, study.user_attrs[SESSIONS_KEY][:2])
    assert fail_stale_trials(study, keep={t_kept.number}) == [t_none.number]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "FAIL", "RUNNING", "RUNNING"]


def test_indexed_nsga2_samples_exactly_like_optunas_own():
    import optuna

    from exitnas.search import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def run(sampler, n=300):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        out = []
        for _ in range(n):
            t = study.ask()
            x, c = t.suggest_float("x", 0, 1), t.suggest_categorical("c", ["a", "b", "c"])
            k = t.suggest_int("k", 1, 4)
            t.set_constraint("budget", x - 0.8)
            study.tell(t, [x * k + (c == "b"), (x - 0.3) ** 2 + k])
            out.append((x, c, k))
        return out, study

    ours, study = run(make_sampler("nsga2", seed=3, population_size=10))
    stock, _ = run(optuna.samplers.NSGAIISampler(population_size=10, seed=3))
    assert type(study.sampler).__name__ == "IndexedNSGAIISampler"
    assert ours == stock
    assert max(t.system_attrs["NSGAIISampler:generation"] for t in study.trials) >= 20
