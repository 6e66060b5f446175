"""Helpers for the search tests: a tiny trained supernet in a run directory, study counts,
shared fixtures, and running a Ray scenario inside a loopback-only network namespace."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).resolve().parent / "data" / "tiny.yaml"


def train_tiny_run(run_path: Path, *, steps: int = 40, seed: int = 0) -> Path:
    """RunDir(run_path).init(tiny space) + a supernet trained for ``steps`` quick SGD steps on
    the synthetic data (sandwich of max / min / random depths, every exit's CE) and saved to
    RUN/supernet/weights.safetensors."""
    import torch
    import torch.nn.functional as F

    from exitnas.data import batches, load_splits
    from exitnas.rundir import RunDir
    from exitnas.space import load_space
    from exitnas.supernet import Supernet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    torch.manual_seed(seed)
    rng = random.Random(seed)
    space = load_space(TINY)
    run = RunDir(run_path)
    run.init(space)
    splits = load_splits(space)
    net = Supernet(space).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    done, epoch = 0, 0
    while done < steps:
        for x, y in batches(splits.train, batch_size=32, mean=splits.mean, std=splits.std,
                            shuffle=True, seed=epoch, drop_last=True):
            opt.zero_grad()
            for depths in (space.max_depths, space.min_depths,
                           tuple(rng.choice(st.depths) for st in space.backbone.stages)):
                logits = net.forward_exits(x, depths)
                (sum(F.cross_entropy(z, y) for z in logits) / len(logits)).backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    net.eval().save(run / "supernet/weights.safetensors")
    torch.set_num_threads(threads)
    return run_path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def study_of(run_path: Path, storage: str | None = None):
    """The run's Optuna study (as recorded in RUN/search/study.json)."""
    import optuna

    from exitnas.rundir import RunDir
    from exitnas.search._storage import resolve_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = json.loads((run_path / "search" / "study.json").read_text())["study_name"]
    spec, name = resolve_study(RunDir(run_path), storage=storage, study_name=name,
                               default_name=name)
    return optuna.load_study(study_name=name, storage=spec.open())


def trial_counts(run_path: Path, storage: str | None = None) -> dict:
    """COMPLETE / RUNNING / FAIL counts, and whether trial numbers and committed trial uids
    are unique."""
    from optuna.trial import TrialState

    trials = study_of(run_path, storage).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    uids = [t.system_attrs.get("exitnas:uid") for t in complete if "exitnas:uid" in t.system_attrs]
    return {"complete": len(complete),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "fail": sum(t.state == TrialState.FAIL for t in trials),
            "numbers_unique": len(numbers) == len(set(numbers)) == len(trials),
            "numbers_contiguous": sorted(numbers) == list(range(len(trials))),
            "uids_unique": len(uids) == len(set(uids))}


# ---- fixtures shared by the search test modules (import them into a module to use them) ------
@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("tiny-trained") / "run")


@pytest.fixture
def tiny_run(trained_tiny, tmp_path) -> Path:
    return copy_run(trained_tiny, tmp_path / "run")


# ---- Ray, always inside a loopback-only network namespace ------------------------------------
RAY_SCENARIO = Path(__file__).resolve().parent / "search_ray_scenario.py"


def namespaces_work() -> bool:
    """Root, unshare and ip: what keeping Ray inside a loopback-only namespace needs."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                        "ip link set lo up"], capture_output=True, timeout=30)
    return r.returncode == 0


def scenario(name: str, run: Path, trials: int, timeout: float = 900, check: bool = True,
             script: Path = RAY_SCENARIO) -> dict:
    """Run ``script`` (tests/search_ray_scenario.py) NAME in a loopback-only network namespace
    with its own PID namespace; returns what it wrote."""
    out = run.parent / f"{name}.json"
    # a short private RAY_TMPDIR: Ray's socket paths must stay under 107 characters, and no
    # session directory is shared with other Ray users of this machine
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp)
    try:
        r = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
             'ip link set lo up && exec "$0" "$@"', sys.executable, str(script), name,
             str(run), str(out), str(trials)], capture_output=True, text=True, env=env,
            timeout=timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0 and out.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    if check:
        assert result["search"]["rc"] == 0, result["search"]["stderr"]
    return result


# ---- reading a module's source ---------------------------------------------------------------
SEARCH = ROOT / "exitnas" / "search"


def search_modules() -> list[str]:
    """The module names of exitnas.search (``__init__`` included), sorted."""
    return sorted(p.stem for p in SEARCH.glob("*.py"))
