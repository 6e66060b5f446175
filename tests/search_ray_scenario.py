"""Ray search scenarios, run by tests/test_search_ray.py INSIDE a loopback-only network
namespace that also has its own PID namespace:

    unshare --net --pid --fork --mount-proc sh -c 'ip link set lo up; exec python THIS ...'

Ray binds every interface of the machine; in the namespace the only one is ``lo``, so all its
traffic stays on 127.0.0.1. The PID namespace confines ``ray stop`` to the processes this
scenario started (in the host's PID namespace it would stop every Ray process on the machine)
and kills whatever is left when the scenario exits.

    python search_ray_scenario.py SCENARIO RUN_DIR OUT_JSON [TRIALS]

Scenarios: ``local`` (a search on a local Ray instance), ``cluster`` (a 2-node cluster with
token authentication, set up as launch/ray-cluster.yaml does: a token created once with ``ray
get-auth-token --generate`` in ``~/.ray/auth_token`` (a private HOME here), ``RAY_AUTH_MODE=token``
on both nodes; a node, a client and exitnas without the token or with a wrong one are refused,
then the search is submitted with ``--address``), ``kill-driver`` (kill -9 the search mid-run,
rerun: resumes with Tuner.restore), ``kill-worker`` (kill -9 a trial's worker process mid-trial:
Tune retries it), ``trust`` (RUN_DIR holds ``CASE/run`` folders with planted Ray experiments:
resume each, record the outcome and whether Ray started). Writes what happened to OUT_JSON.

Only the ``cluster`` scenario runs Ray with token authentication; the others run a private
local instance with ``RAY_AUTH_MODE=disabled`` (token mode would write ``~/.ray/auth_token``).
"""
from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float = 300) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return {"rc": r.returncode, "stdout": r.stdout[-1500:], "stderr": r.stderr[-3000:]}


CLIENT = ("import sys, ray\n"
          "try:\n"
          "    ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)\n"
          "    print('connected', len(ray.nodes()))\n"
          "except Exception as err:\n"
          "    print('refused', type(err).__name__, err)\n"
          "    sys.exit(3)\n")


def _cluster(run: str, trials: str) -> dict:
    """A 2-node cluster with token auth; refusals first, then the search with the token."""
    out: dict = {}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    home = Path(tempfile.mkdtemp(prefix="home-"))      # ~ of the cluster's user: the token
    stranger = Path(tempfile.mkdtemp(prefix="other-"))  # ~ of a user without it
    env = _env(EXITNAS_TRIAL_SLEEP_S="1.5", HOME=str(home))  # both nodes get busy
    del env["RAY_AUTH_MODE"]  # as a user's shell: exitnas turns token mode on for --address
    nodes = dict(env, RAY_AUTH_MODE="token")  # what launch/ray-cluster.yaml sets on every node
    try:
        gen = _run([RAY, "get-auth-token", "--generate"], env)
        token = home / ".ray" / "auth_token"
        token.chmod(0o600)
        out["token"] = {"rc": gen["rc"], "chars": len(token.read_text().strip())}
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        head = _run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                     *common], nodes)
        out["refused_nodes"] = [  # a node without the token cannot join
            _run([RAY, "start", f"--address={address}", *common], dict(nodes, HOME=str(stranger))),
            _run([RAY, "start", f"--address={address}", *common],
                 dict(nodes, RAY_AUTH_MODE="disabled"))]
        worker = _run([RAY, "start", f"--address={address}", *common], nodes)
        out["ray_start"] = [head["rc"], worker["rc"], head["stderr"], worker["stderr"]]
        out["refused_client"] = _run([PY, "-c", CLIENT, address],
                                     dict(env, RAY_AUTH_MODE="disabled"))
        out["refused_search"] = {
            "no_token": _search(run, "--trials", trials, "--workers", "2", "--address", address,
                                env=dict(env, HOME=str(stranger))),
            "wrong_token": _search(run, "--trials", trials, "--workers", "2", "--address",
                                   address, env=dict(env, HOME=str(stranger),
                                                     RAY_AUTH_TOKEN="0" * 64))}
        out["after_refusals"] = trial_counts(Path(run))
        out["search"] = _search(run, "--trials", trials, "--workers", "2", "--address", address,
                                env=env)
    finally:
        _ray_stop(nodes)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(stranger, ignore_errors=True)
    return out


def _trust(cases: Path, trials: str) -> dict:
    """Resume each planted ``CASE/run``; record the outcome, whether the planted pickle ran
    (its marker file) and how many Ray sessions started (folders in the private RAY_TMPDIR)."""
    out = {}
    for case in sorted(p for p in cases.iterdir() if (p / "run").is_dir()):
        r = _search(str(case / "run"), "--trials", trials, "--workers", "1", env=_env())
        r["marker"] = (case / "marker").exists()
        r["ray_sessions"] = len(_ray_sessions())
        _ray_stop(_env())
        out[case.name] = r
    return out


def _ray_sessions() -> list[str]:
    return sorted(p.name for p in (Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_2*"))


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
        result.update(_cluster(run, trials))
    elif scenario == "trust":
        result["cases"] = _trust(Path(run), trials)
        out.write_text(json.dumps(result))
        return
    elif scenario == "kill-driver":
        env = _env(EXITNAS_TRIAL_SLEEP_S="0.4")
        proc = _search(run, "--trials", trials, "--workers", "2", env=env, background=True)
        result["complete_at_kill"] = _wait_complete(Path(run), 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # where the kill landed: the RUNNING trials the dead driver left in the storage
        result["after_kill"] = trial_counts(Path(run))
        time.sleep(1)
        _ray_stop(env)  # the killed driver's local Ray instance (this namespace only)
        result["search"] = _search(run, "--trials", trials, "--workers", "2", env=env)
    elif scenario == "kill-worker":
        env = _env(EXITNAS_TRIAL_SLEEP_S="4")
        proc = _search(run, "--trials", trials, "--workers", "1", env=env, background=True)
        deadline, killed = time.monotonic() + 300, []
        while not killed and time.monotonic() < deadline:
            busy = _processes("ray::ImplicitFunc.train")  # a worker running a trial
            if busy:
                time.sleep(1.0)  # mid-trial: it sleeps 4 s before scoring
                # where the kill lands: a trial RUNNING in the storage, its worker busy
                result["running_at_kill"] = trial_counts(Path(run))["running"]
                result["busy_at_kill"] = [pid for pid in busy if Path(f"/proc/{pid}").exists()]
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
