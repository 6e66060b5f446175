"""Ray Train scenario, run by tests/test_ray_train.py INSIDE a loopback-only network namespace
with its own PID namespace (why: see search_ray_scenario.py, whose helpers it uses):

    python train_ray_scenario.py cluster WORK OUT_JSON EPOCHS

``cluster``: a 2-node cluster (one CPU each, so one Ray Train worker per node) with token
authentication, set up as launch/ray-cluster.yaml does and as the search's cluster scenario
starts it. In WORK it then runs, on the tiny space with ``data.synthetic_size=1024``:

- ``refused/``: ``exitnas train-supernet --backend ray --address`` without the token;
- ``many/``: ``--workers 3`` on the cluster's 2 CPUs;
- ``resume/``: the same with the token and ``--resume`` where there is nothing to resume (a
  user's error, raised on every worker); the worker processes seen meanwhile are counted;
- ``torchrun/``: the supernet trained by 2 torchrun processes (gloo on lo), then fine-tuned;
- ``ray/``: the same with ``--backend ray --workers 2`` on the cluster;
- ``killed/``: the same Ray Train run, one worker SIGKILLed (found by pid among the
  ``ray::RayTrainWorker`` processes) once the run has written a checkpoint; what the run
  directory held just before and just after the kill is recorded, and which worker processes
  ran after it.

Every command's rc, stdout and stderr tail go to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_ray_scenario import PY, RAY, _env, _free_port, _processes, _ray_stop, _run  # noqa: E402
from search_support import TINY  # noqa: E402

ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.9,0.9"
WORKER = "ray::RayTrainWorker"


def _exitnas(*args: str) -> list[str]:
    return [PY, "-m", "exitnas", *map(str, args)]


def _torchrun(*args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "exitnas", *map(str, args)]


def _state(run: Path) -> dict:
    """What the supernet step has left in ``run``: checkpoint epoch, metrics rows, weights."""
    from exitnas.io import load_checkpoint
    from exitnas.train import read_metrics

    out = run / "supernet"
    ckpt = out / "checkpoint.pt"
    return {"epoch": load_checkpoint(ckpt)["epoch"] if ckpt.is_file() else 0,
            "rows": read_metrics(out / "metrics.csv") if (out / "metrics.csv").is_file() else [],
            "weights": (out / "weights.safetensors").is_file()}


def _kill_a_worker(cmd: list[str], run: Path, env: dict) -> dict:
    """Start ``cmd``; once ``run`` holds a checkpoint, SIGKILL one Ray Train worker by pid;
    follow the worker processes until the command ends."""
    out: dict = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 600
    metrics = run / "supernet" / "metrics.csv"
    while not metrics.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    before = sorted(_processes(WORKER))
    if before and proc.poll() is None:
        out["before_kill"] = _state(run)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        while not _gone(victim):
            time.sleep(0.01)
        out["after_kill"] = _state(run)
        out["victim"], out["workers_at_kill"] = victim, before
    seen, out["run"] = _follow(proc, deadline)
    out["workers_after_kill"] = sorted(seen - set(before))
    return out


def _follow(proc: subprocess.Popen, deadline: float) -> tuple[set[int], dict]:
    """The Ray Train worker pids seen (every 50 ms) until ``proc`` ends; its rc and output."""
    seen: set[int] = set()
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(_processes(WORKER))
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=60)
    return seen, {"rc": proc.returncode, "stdout": stdout[-3000:], "stderr": stderr[-6000:]}


def _user_error(cmd: list[str], env: dict) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    seen, out = _follow(proc, time.monotonic() + 600)
    return {**out, "workers_seen": len(seen)}


def _gone(pid: int) -> bool:
    """Dead: no longer in /proc, or a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _cluster(work: Path, epochs: str) -> dict:
    out: dict = {}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    home = Path(tempfile.mkdtemp(prefix="home-"))      # ~ of the cluster's user: the token
    stranger = Path(tempfile.mkdtemp(prefix="other-"))  # ~ of a user without it
    env = _env(HOME=str(home), GLOO_SOCKET_IFNAME="lo")
    del env["RAY_AUTH_MODE"]  # as a user's shell: exitnas turns token mode on for --address
    nodes = dict(env, RAY_AUTH_MODE="token")  # what launch/ray-cluster.yaml sets on every node
    train = ["train-supernet", TINY, "--set", f"supernet.epochs={epochs}", "--set",
             "data.synthetic_size=1024"]
    on_ray = ["--backend", "ray", "--address", address, "--workers", "2"]
    finetune = ["--arch", ARCH, "--regime", "mixed", "--epochs", "2"]
    try:
        gen = _run([RAY, "get-auth-token", "--generate"], env)
        (home / ".ray" / "auth_token").chmod(0o600)
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        head = _run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                     *common], nodes)
        worker = _run([RAY, "start", f"--address={address}", *common], nodes)
        out["ray_start"] = [gen["rc"], head["rc"], worker["rc"], head["stderr"], worker["stderr"]]
        out["refused"] = _run(_exitnas(*train, "--run-dir", work / "refused", *on_ray),
                              dict(env, HOME=str(stranger)))
        out["refused"]["wrote"] = (work / "refused").exists()
        out["too_many_workers"] = _run(_exitnas(*train, "--run-dir", work / "many", "--backend",
                                                "ray", "--address", address, "--workers", "3"),
                                       env)
        out["too_many_workers"]["wrote"] = (work / "many").exists()
        out["nothing_to_resume"] = _user_error(
            _exitnas(*train, "--run-dir", work / "resume", "--resume", *on_ray), env)
        out["torchrun"] = _run(_torchrun(*train, "--run-dir", work / "torchrun"), env, 600)
        out["ray"] = _run(_exitnas(*train, "--run-dir", work / "ray", *on_ray), env, 600)
        out["killed"] = _kill_a_worker(_exitnas(*train, "--run-dir", work / "killed", *on_ray),
                                       work / "killed", env)
        out["finetune_torchrun"] = _run(_torchrun("finetune", work / "torchrun", *finetune),
                                        env, 600)
        out["finetune_ray"] = _run(_exitnas("finetune", work / "ray", *finetune, *on_ray), env,
                                   600)
    finally:
        _ray_stop(nodes)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(stranger, ignore_errors=True)
    return out


def main() -> None:
    scenario, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if scenario != "cluster":
        raise SystemExit(f"unknown scenario {scenario}")
    work.mkdir(parents=True, exist_ok=True)
    result = {"scenario": scenario, **_cluster(work, sys.argv[4] if len(sys.argv) > 4 else "4")}
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
