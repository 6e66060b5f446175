"""Ray Tune search on a tiny trained supernet. Every test runs its Ray processes inside a
loopback-only network namespace (with its own PID namespace), with RAY_AUTH_MODE=disabled:
see tests/search_ray_scenario.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from search_support import copy_run, study_of, train_tiny_run

SCENARIO = Path(__file__).resolve().parent / "search_ray_scenario.py"


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                        "ip link set lo up"], capture_output=True, timeout=30)
    return r.returncode == 0


pytestmark = [
    pytest.mark.skipif(not _namespaces_work(), reason="needs root and unshare to keep Ray "
                       "inside a loopback-only network namespace"),
]
pytest.importorskip("ray.tune")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("ray-tiny") / "run", steps=10)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return copy_run(trained, tmp_path / "run")


def scenario(name: str, run: Path, trials: int, timeout: float = 900) -> dict:
    out = run.parent / f"{name}.json"
    # a short private RAY_TMPDIR: Ray's socket paths must stay under 107 characters, and no
    # session directory is shared with other Ray users of this machine
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp)
    try:
        r = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
             'ip link set lo up && exec "$0" "$@"', sys.executable, str(SCENARIO), name, str(run),
             str(out), str(trials)], capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0 and out.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["search"]["rc"] == 0, result["search"]["stderr"]
    return result


def _exact(result: dict, n: int) -> None:
    assert result["counts"]["complete"] == n
    assert result["counts"]["running"] == 0
    assert result["counts"]["numbers_unique"] and result["counts"]["numbers_contiguous"]


def test_ray_tune_search_gives_a_feasible_front_with_caches_built_once(run):
    result = scenario("local", run, 12)
    _exact(result, 12)
    s = result["summary"]
    assert s["backend"] == "ray" and s["ray_nodes"] == 1
    trials = study_of(run).get_trials()
    assert study_of(run).metric_names == ["accuracy", "expected_macs"]
    depth_settings = {tuple(t.user_attrs["arch"]["depths"]) for t in trials}
    # the cache actor ran each depth setting through the network once; workers fetched each
    # at most once per process
    assert s["cache"]["built"] + s["cache"]["loaded"] == len(depth_settings)
    assert s["cache"]["requests"] == len(depth_settings)
    assert s["cache"]["trial_starts"] == 12
    for t in trials:
        assert {"arch_id", "feasible", "macs", "relative_cost", "worker"} <= set(t.user_attrs)
        assert t.user_attrs["feasible"] == all(v <= 0 for v in t.constraints.values())
    front = (run / "search" / "front.csv").read_text().splitlines()
    assert len(front) >= 2 and s["front_size"] == len(front) - 1
    assert all(t.user_attrs["feasible"] for t in trials
               if t.number in {int(line.split(",")[0]) for line in front[1:]})


@pytest.mark.slow
def test_ray_search_across_a_two_node_cluster(run):
    result = scenario("cluster", run, 16)
    assert result["ray_start"][:2] == [0, 0], result["ray_start"]
    _exact(result, 16)
    assert result["summary"]["ray_nodes"] == 2
    workers = [t.user_attrs["worker"] for t in study_of(run).get_trials()]
    assert len({w.split("/")[0] for w in workers}) == 2, workers  # both nodes ran trials


@pytest.mark.slow
def test_killed_ray_driver_resumes_with_tuner_restore(run):
    result = scenario("kill-driver", run, 16)
    assert 4 <= result["after_kill"]["complete"] < 16
    assert result["summary"]["ray_restored"] is True
    assert "resuming Ray Tune experiment" in result["search"]["stderr"]
    _exact(result, 16)


@pytest.mark.slow
def test_killed_ray_worker_is_retried_and_the_search_completes(run):
    result = scenario("kill-worker", run, 4)
    assert result["killed_workers"] >= 1
    assert result["summary"]["cache"]["retried_trials"] >= 1
    _exact(result, 4)
    assert result["counts"]["fail"] == 0  # the retried trial finished its own Optuna trial
