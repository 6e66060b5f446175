"""Multi-process training under torchrun (gloo on CPU, DistributedDataParallel): 2 processes
train and resume after kill -9; 1 process gives exactly the result of a plain run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli
from exitnas.io import load_checkpoint, load_weights
from exitnas.train import read_metrics

ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.9,0.9"
# gloo on the loopback interface only; one thread per process on the shared cores
ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _torchrun(n: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", "-m", "exitnas", *map(str, args)]


def torchrun(n: int, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(n, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **ENV))


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (the workers outlive a killed launcher, so
    killing the launcher alone would leave them training)."""
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    t0 = time.time()
    while any(os.path.exists(f"/proc/{p}") and "Z" not in _state(p) for p in victims[1:]):
        assert time.time() - t0 < 30, "torchrun workers did not die"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _same_weights(a, b) -> bool:
    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _losses(path) -> list[float]:
    return [float(r["train_loss"]) for r in read_metrics(path)]


def test_two_processes_train_the_supernet_and_resume_after_kill_9(tmp_path, tiny_space_file):
    args = [tiny_space_file, "--set", "supernet.epochs=4", "--set", "data.synthetic_size=1024"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = torchrun(2, "train-supernet", *args, "--run-dir", a)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("supernet weights:") == 1  # rank 0 alone reports and writes
    losses = _losses(a / "supernet" / "metrics.csv")
    assert len(losses) == 4 and losses[-1] < losses[0]

    proc = subprocess.Popen(_torchrun(2, "train-supernet", *args, "--run-dir", b), cwd=ROOT,
                            env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = b / "supernet" / "metrics.csv"
    try:
        t0 = time.time()
        while not (metrics.is_file() and len(read_metrics(metrics)) >= 1):
            assert proc.poll() is None and time.time() - t0 < 300, "no checkpoint before the end"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        kill_tree(proc)
    killed_at = load_checkpoint(b / "supernet" / "checkpoint.pt")["epoch"]
    assert killed_at in range(1, 4)
    assert not (b / "supernet" / "weights.safetensors").exists()
    r = torchrun(2, "train-supernet", *args, "--run-dir", b)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming supernet training from" in r.stdout and f"(epoch {killed_at}/4)" in r.stdout
    assert _same_weights(a / "supernet" / "weights.safetensors",
                         b / "supernet" / "weights.safetensors")
    assert _losses(metrics) == losses


def test_one_process_under_torchrun_equals_a_plain_run(tmp_path, tiny_space_file):
    args = ["train-supernet", tiny_space_file, "--set", "supernet.epochs=2"]
    r = run_cli(*args, "--run-dir", tmp_path / "plain", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    r = torchrun(1, *args, "--run-dir", tmp_path / "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _same_weights(tmp_path / "plain" / "supernet" / "weights.safetensors",
                         tmp_path / "ddp" / "supernet" / "weights.safetensors")


@pytest.mark.slow
def test_one_process_under_torchrun_retrains_like_a_plain_run(tmp_path, tiny_space_file):
    """Mixed: both phases, a fresh DDP wrapper per phase."""
    for sub in ("plain", "ddp"):
        r = run_cli("train-supernet", tiny_space_file, "--run-dir", tmp_path / sub,
                    "--set", "supernet.epochs=1", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
    retrain = ["retrain", "--arch", ARCH, "--regime", "mixed", "--epochs", "2"]
    r = run_cli(retrain[0], tmp_path / "plain", *retrain[1:], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    r = torchrun(1, retrain[0], tmp_path / "ddp", *retrain[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    sub = f"retrain/{ARCH}/mixed/model.safetensors"
    assert _same_weights(tmp_path / "plain" / sub, tmp_path / "ddp" / sub)


@pytest.mark.slow
def test_two_processes_retrain_every_phase(tmp_path, tiny_space_file):
    run = tmp_path / "run"
    r = run_cli("train-supernet", tiny_space_file, "--run-dir", run, "--set", "supernet.epochs=1")
    assert r.returncode == 0, r.stderr
    for regime in ("disjoint", "mixed"):
        r = torchrun(2, "retrain", run, "--arch", ARCH, "--regime", regime, "--epochs", "4",
                     "--set", "data.synthetic_size=1024")
        assert r.returncode == 0, r.stderr[-3000:]
        rows = read_metrics(run / "retrain" / ARCH / regime / "metrics.csv")
        later = 3 if regime == "disjoint" else 2
        assert [int(x["phase"]) for x in rows] == [1, 1, later, later]
        phase1 = [float(x["train_loss"]) for x in rows[:2]]
        assert phase1[1] < phase1[0]
        assert (run / "retrain" / ARCH / regime / "model.safetensors").is_file()
