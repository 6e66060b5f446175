"""Ray search scenarios, run by tests/test_search_ray.py INSIDE a loopback-only network
namespace that also has its own PID namespace:

    unshare --net --pid --fork --mount-proc sh -c 'ip link set lo up; exec python THIS ...'

Ray binds every interface of the machine; in the namespace the only one is ``lo``, so all its
traffic stays on 127.0.0.1. The PID namespace confines ``ray stop`` to the processes this
scenario started (in the host's PID namespace it would stop every Ray process on the machine)
and kills whatever is left when the scenario exits.

    python search_ray_scenario.py SCENARIO RUN_DIR OUT_JSON [TRIALS]

Scenarios: ``local`` (a search on a local Ray instance), ``cluster`` (a 2-node cluster via
``ray start --head`` / ``ray start --address``, the search submitted with ``--address``),
``kill-driver`` (kill -9 the search mid-run, rerun: resumes with Tuner.restore), ``kill-worker``
(kill -9 a trial's worker process mid-trial: Tune retries it). Writes what happened to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_support import trial_counts  # noqa: E402

PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
                RAY_AUTH_MODE="disabled", **extra)


def _search(run: str, *args: str, env: dict, background: bool = False):
    cmd = [PY, "-m", "exitnas", "search", run, "--backend", "ray", *args]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr[-3000:]}


def _ray_stop(env: dict) -> None:
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def _wait_complete(run: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = trial_counts(run)["complete"]
        except Exception:  # the study does not exist yet
            n = 0
        if n >= at_least:
            return n
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {at_least} complete trials after {timeout} s")


def _processes(prefix: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if cmd.startswith(prefix):
                out.append(int(p.name))
    return out


def main() -> None:
    scenario, run, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    trials = sys.argv[4] if len(sys.argv) > 4 else "12"
    result: dict = {"scenario": scenario}
    if scenario == "local":
        result["search"] = _search(run, "--trials", trials, "--workers", "2", env=_env())
    elif scenario == "cluster":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = _env(EXITNAS_TRIAL_SLEEP_S="1.5")  # both nodes get busy
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               *common], capture_output=True, text=True, env=env, timeout=300)
        worker = subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                                capture_output=True, text=True, env=env, timeout=300)
        result["ray_start"] = [head.returncode, worker.returncode, head.stderr[-1500:],
                               worker.stderr[-1500:]]
        result["search"] = _search(run, "--trials", trials, "--workers", "2", "--address",
                                   f"127.0.0.1:{port}", env=env)
        _ray_stop(env)
    elif scenario == "kill-driver":
        env = _env(EXITNAS_TRIAL_SLEEP_S="0.4")
        proc = _search(run, "--trials", trials, "--workers", "2", env=env, background=True)
        result["complete_at_kill"] = _wait_complete(Path(run), 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(1)
        _ray_stop(env)  # the killed driver's local Ray instance (this namespace only)
        result["after_kill"] = trial_counts(Path(run))
        result["search"] = _search(run, "--trials", trials, "--workers", "2", env=env)
    elif scenario == "kill-worker":
        env = _env(EXITNAS_TRIAL_SLEEP_S="4")
        proc = _search(run, "--trials", trials, "--workers", "1", env=env, background=True)
        deadline, killed = time.monotonic() + 300, []
        while not killed and time.monotonic() < deadline:
            busy = _processes("ray::ImplicitFunc.train")  # a worker running a trial
            if busy:
                time.sleep(1.0)  # mid-trial: it sleeps 4 s before scoring
                for pid in busy:
                    os.kill(pid, signal.SIGKILL)
                killed = busy
            time.sleep(0.2)
        result["killed_workers"] = len(killed)
        stdout, stderr = proc.communicate(timeout=900)
        result["search"] = {"rc": proc.returncode, "stdout": stdout, "stderr": stderr[-3000:]}
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    result["counts"] = trial_counts(Path(run))
    summary = Path(run) / "search" / "summary.json"
    result["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
