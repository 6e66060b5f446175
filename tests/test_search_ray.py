"""search/_ray.py: Ray Tune search on a tiny trained supernet. Every test runs its Ray processes
inside a loopback-only network namespace (with its own PID namespace): see
tests/search_ray_scenario.py. The 2-node cluster runs with token authentication as
launch/ray-cluster.yaml sets it up; the local instances run with RAY_AUTH_MODE=disabled."""
from __future__ import annotations

from pathlib import Path

import pytest

from search_support import copy_run, namespaces_work, scenario, study_of, train_tiny_run

pytestmark = [
    pytest.mark.skipif(not namespaces_work(), reason="needs root and unshare to keep Ray "
                       "inside a loopback-only network namespace"),
]
pytest.importorskip("ray.tune")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("ray-tiny") / "run", steps=10)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return copy_run(trained, tmp_path / "run")


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


def _refusal(r: dict, *needles: str) -> None:
    """exit 2, and exitnas' own line (after whatever Ray's C++ core logged) says why."""
    assert r["rc"] == 2, r
    assert "Traceback" not in r["stderr"]
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith("exitnas: error: --address 127.0.0.1:"), last
    for needle in needles:
        assert needle in last, last


@pytest.mark.slow
def test_two_node_cluster_with_token_auth_refuses_strangers_and_runs_the_search(run):
    result = scenario("cluster", run, 16)
    assert result["token"]["rc"] == 0 and result["token"]["chars"] >= 32  # created once
    assert result["ray_start"][:2] == [0, 0], result["ray_start"]
    # a node without the token (none on disk; or auth mode off) cannot join the cluster
    no_token, no_auth = result["refused_nodes"]
    assert no_token["rc"] != 0 and "no authentication token was found" in no_token["stderr"]
    assert no_auth["rc"] != 0
    assert "Authentication token is missing or incorrect" in no_auth["stderr"]
    # a client without the token is refused by the cluster
    client = result["refused_client"]
    assert client["rc"] == 3 and client["stdout"].startswith("refused ConnectionError"), client
    assert "Authentication token is missing or incorrect" in client["stderr"]
    # exitnas without a token, and with a wrong one: one line, exit 2, nothing searched
    _refusal(result["refused_search"]["no_token"], "has no token", "RAY_AUTH_TOKEN")
    _refusal(result["refused_search"]["wrong_token"], "cannot connect", "token")
    assert result["after_refusals"]["complete"] == 0
    # with the token (RAY_AUTH_MODE unset in its environment: exitnas turns token mode on)
    _exact(result, 16)
    assert result["summary"]["ray_nodes"] == 2  # the refused nodes never joined
    workers = [t.user_attrs["worker"] for t in study_of(run).get_trials()]
    assert len({w.split("/")[0] for w in workers}) == 2, workers  # both nodes ran trials


@pytest.mark.slow
def test_killed_ray_driver_resumes_with_tuner_restore(run):
    result = scenario("kill-driver", run, 16)
    after = result["after_kill"]
    assert 4 <= after["complete"] < 16
    assert after["running"] >= 1  # the kill landed while trials were RUNNING in the storage
    assert result["summary"]["ray_restored"] is True
    assert "resuming Ray Tune experiment" in result["search"]["stderr"]
    _exact(result, 16)  # ... and the rerun finished or failed every one of them


@pytest.mark.slow
def test_killed_ray_worker_is_retried_and_the_search_completes(run):
    result = scenario("kill-worker", run, 4)
    assert result["killed_workers"] >= 1
    # the kill landed mid-trial: the worker was still running it, its trial RUNNING
    assert result["busy_at_kill"] and result["running_at_kill"] >= 1
    assert result["summary"]["cache"]["retried_trials"] >= 1
    _exact(result, 4)
    assert result["counts"]["fail"] == 0  # the retried trial finished its own Optuna trial
