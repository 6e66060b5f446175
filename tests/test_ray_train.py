"""exitnas.ray_train: supernet training and fine-tuning on Ray Train workers (``--backend ray``).

The Ray tests share one run of tests/train_ray_scenario.py: a loopback-only 2-node cluster (one
CPU per node, token authentication as launch/ray-cluster.yaml sets it up) inside a network and
PID namespace, where the tiny supernet is trained by 2 torchrun processes, by 2 Ray Train
workers, and by 2 Ray Train workers one of which is SIGKILLed mid-run. The tests below the
cluster's start no Ray.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from exitnas.io import load_weights, save_checkpoint
from exitnas.train import read_metrics
from search_support import namespaces_work, scenario

SCENARIO = Path(__file__).resolve().parent / "train_ray_scenario.py"
EPOCHS = 4
ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.9,0.9"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> tuple[dict, Path]:
    if not namespaces_work():
        pytest.skip("needs root and unshare to keep Ray inside a loopback-only network "
                    "namespace")
    pytest.importorskip("ray.train.torch")
    work = tmp_path_factory.mktemp("ray-train") / "work"
    result = scenario("cluster", work, EPOCHS, timeout=1800, check=False, script=SCENARIO)
    assert result["ray_start"][:3] == [0, 0, 0], result["ray_start"]
    return result, work


def _ok(r: dict) -> None:
    assert r["rc"] == 0, r["stdout"][-1500:] + r["stderr"][-3000:]


def _same(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _losses(run: Path) -> list[str]:
    return [r["train_loss"] for r in read_metrics(run / "supernet" / "metrics.csv")]


SUPERNET = Path("supernet") / "weights.safetensors"


@pytest.mark.slow
def test_two_ray_train_workers_train_the_supernet_as_two_torchrun_processes(cluster):
    result, work = cluster
    _ok(result["torchrun"])
    _ok(result["ray"])
    assert result["ray"]["stdout"].count("supernet weights:") == 1  # rank 0's text, once
    # bit for bit: the same shards, the same DDP averaging over gloo, one thread per process
    # (with one worker the per-step batch and BatchNorm statistics would differ)
    assert _same(work / "torchrun" / SUPERNET, work / "ray" / SUPERNET)
    assert _losses(work / "ray") == _losses(work / "torchrun")
    assert len(_losses(work / "ray")) == EPOCHS
    # Ray Train's own state sits beside exitnas's checkpoint; no Ray checkpoint is kept
    assert (work / "ray" / "supernet" / "ray").is_dir()
    assert not list((work / "ray" / "supernet" / "ray").rglob("checkpoint_*"))


@pytest.mark.slow
def test_a_killed_ray_train_worker_is_restarted_and_resumes_from_the_last_checkpoint(cluster):
    result, work = cluster
    k = result["killed"]
    assert "before_kill" in k, k  # a worker was found and killed while the run was going
    before, after = k["before_kill"], k["after_kill"]
    # where the kill landed: after the first checkpoint, no epoch finished between the last
    # look and the worker's death, the run not done: inside epoch `at` + 1
    at = after["epoch"]
    assert before["epoch"] >= 1  # killed after the first checkpoint was written
    assert before["epoch"] == at  # no epoch ended between the last look and the death
    assert len(after["rows"]) == at < EPOCHS  # epoch at + 1 had begun and not ended
    assert not after["weights"]
    assert k["victim"] in k["workers_at_kill"] and len(k["workers_at_kill"]) == 2
    _ok(k["run"])
    assert k["workers_after_kill"], "no new Ray Train worker started after the kill"
    out = k["run"]["stdout"] + k["run"]["stderr"]
    resumed = [line for line in out.splitlines() if "resuming supernet training from" in line]
    assert resumed and f"(epoch {at}/{EPOCHS})" in resumed[-1], out[-3000:]
    final = read_metrics(work / "killed" / "supernet" / "metrics.csv")
    # the rows written before the kill are kept as they were (their seconds too): the
    # restarted group continued from the checkpoint, it did not train those epochs again
    rows = after["rows"]
    assert rows and final[:len(rows)] == rows and len(final) == EPOCHS
    assert _same(work / "killed" / SUPERNET, work / "ray" / SUPERNET)  # as uninterrupted
    assert _losses(work / "killed") == _losses(work / "ray")


@pytest.mark.slow
def test_ray_train_without_the_clusters_token_is_refused_before_anything_is_written(cluster):
    result, work = cluster
    r = result["refused"]
    assert r["rc"] == 2 and "Traceback" not in r["stderr"], r
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith("exitnas: error: --address 127.0.0.1:") and "has no token" in last
    assert not r["wrote"] and not (work / "refused").exists()


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_devices_is_refused(cluster):
    result, work = cluster
    r = result["too_many_workers"]
    assert r["rc"] == 2, r
    last = r["stderr"].strip().splitlines()[-1]
    assert last == ("exitnas: error: --workers: 3 workers, one per device, but the Ray cluster "
                    "has 2 CPUs"), last
    assert not r["wrote"]


@pytest.mark.slow
def test_a_users_error_on_the_workers_is_one_line_and_not_retried(cluster):
    result, work = cluster
    r = result["nothing_to_resume"]
    assert r["rc"] == 2, r
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith("exitnas: error: ") and "nothing to resume" in last, last
    assert str(work / "resume" / "supernet" / "checkpoint.pt") in last
    # the first group (2 workers) raised it, the next one stopped at once: 4 worker processes
    # at most, where max_failures=3 retries would start 8 (a lower bound of what ran: polled)
    assert r["workers_seen"] >= 2, r["workers_seen"]  # the first group was watched running
    assert r["workers_seen"] <= 4, r["workers_seen"]  # and at most one more group started
    assert not (work / "resume" / "config.yaml").exists()
    assert not (work / "resume" / "supernet" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_finetune_on_ray_train_equals_finetune_under_torchrun(cluster):
    result, work = cluster
    _ok(result["finetune_torchrun"])
    _ok(result["finetune_ray"])
    assert result["finetune_ray"]["stdout"].count("fine-tuned (mixed, 2 epochs)") == 1
    sub = Path("finetune") / ARCH.rsplit("=", 1)[0] / "mixed"
    assert _same(work / "torchrun" / sub / "model.safetensors",
                 work / "ray" / sub / "model.safetensors")
    fitted = [json.loads((work / run / sub / "arch.json").read_text())["arch"]
              for run in ("torchrun", "ray")]
    assert fitted[0] == fitted[1]


# ---- without Ray ------------------------------------------------------------------------------
def test_restart_holds_until_the_run_writes_a_checkpoint(tmp_path):
    from exitnas.ray_train import RayStep, _stamp, restarts

    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, {"epoch": 3})  # an old run's checkpoint

    def step(restart: bool) -> RayStep:
        return RayStep(name="supernet", train=print, describe=str, checkpoint=str(ckpt),
                       stamp=_stamp(ckpt), resume=False, restart=restart, cwd=str(tmp_path))

    fresh, plain = step(True), step(False)
    assert restarts(fresh) and not restarts(plain)  # a group restarted before any new epoch
    save_checkpoint(ckpt, {"epoch": 1})  # the restarted run's first epoch
    assert not restarts(fresh)  # a group restarted now continues from it
    gone = dataclasses.replace(fresh, checkpoint=str(tmp_path / "none.pt"), stamp=None)
    assert restarts(gone)


def test_workers_are_one_per_device_gpus_first():
    from exitnas.errors import ConfigError
    from exitnas.ray_train import _check_devices

    assert _check_devices({"CPU": 2.0}, 2) is False
    assert _check_devices({"CPU": 16.0, "GPU": 4.0}, 4) is True
    with pytest.raises(ConfigError, match="3 workers, one per device, but the Ray cluster has "
                                          "2 CPUs"):
        _check_devices({"CPU": 2.0}, 3)
    with pytest.raises(ConfigError, match="has 1 GPUs"):  # CPUs do not stand in for GPUs
        _check_devices({"CPU": 64.0, "GPU": 1.0}, 2)


def _refused(r, needle: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitnas: error: ") and needle in lines[0]


@pytest.mark.parametrize("flags, needle", [
    (["--address", "127.0.0.1:6379"], "--address: only used with --backend ray"),
    (["--workers", "2"], "--workers: only used with --backend ray"),
    (["--backend", "ray", "--workers", "0"], "--workers: 0 is not >= 1"),
])
def test_ray_train_flags_are_checked_before_anything_runs(tmp_path, tiny_space_file, flags,
                                                          needle):
    run = tmp_path / "run"
    r = run_cli("train-supernet", tiny_space_file, "--run-dir", run, *flags)
    _refused(r, needle)
    assert not run.exists()


def test_ray_train_refuses_to_run_under_torchrun(tmp_path, tiny_space_file):
    run = tmp_path / "run"
    r = run_cli("train-backbone", tiny_space_file, "--run-dir", run, "--backend", "ray",
                env={"WORLD_SIZE": "2", "RANK": "0"})
    _refused(r, "run it without torchrun")
    assert not run.exists()


def test_ray_is_imported_only_when_a_step_runs_on_it():
    code = ("import sys, exitnas.ray_train, exitnas.cli\n"
            "exitnas.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
