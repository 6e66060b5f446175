"""launch/: the Ray cluster config validates against Ray's own schema and its shell steps set
up token authentication (run here with a private HOME and a stand-in `ray` that records its
arguments and RAY_AUTH_MODE); the submission script builds the right command."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _config() -> dict:
    return yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())


def test_cluster_config_is_valid_for_ray_up():
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = _config()
    util.validate_config(util.prepare_config(cfg))
    assert cfg["provider"]["type"] == "local"
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert all(isinstance(c, str) for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token, copied
    assert "disabled" not in (LAUNCH / "ray-cluster.yaml").read_text()


def _fake_home(tmp_path: Path) -> tuple[Path, Path]:
    """A HOME whose ~/exitnas-venv/bin/ray records each call: its arguments and RAY_AUTH_MODE."""
    home = tmp_path / "home"
    venv = home / "exitnas-venv" / "bin"
    venv.mkdir(parents=True)
    log = tmp_path / "ray-calls"
    (venv / "ray").write_text(f'#!/bin/sh\necho "RAY_AUTH_MODE=${{RAY_AUTH_MODE:-unset}} '
                              f'umask=$(umask) $*" >> {log}\n')
    (venv / "ray").chmod(0o755)
    return home, log


def _sh(commands: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "RAY_HEAD_IP": "10.0.0.10"}
    return subprocess.run(["bash", "-c", "set -e\n" + "\n".join(commands)], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cluster_setup_fails_without_the_token_and_locks_it_down(tmp_path):
    token_steps = [c for c in _config()["setup_commands"] if "auth_token" in c or "RAY_AUTH" in c]
    home, _ = _fake_home(tmp_path)
    r = _sh(token_steps, home)  # file_mounts copied nothing: no token on the node
    assert r.returncode != 0 and "no ~/.ray/auth_token" in r.stdout
    (home / ".ray").mkdir(mode=0o755)
    (home / ".ray" / "auth_token").write_text("f" * 64)
    (home / ".ray" / "auth_token").chmod(0o644)  # as `ray get-auth-token --generate` leaves it
    for _ in range(2):  # idempotent: `ray up` runs the setup again on every update
        r = _sh(token_steps, home)
        assert r.returncode == 0, r.stderr
    assert (home / ".ray").stat().st_mode & 0o777 == 0o700
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert (home / ".bashrc").read_text().splitlines() == ["export RAY_AUTH_MODE=token"]


def test_every_ray_start_runs_with_token_auth(tmp_path):
    cfg = _config()
    home, log = _fake_home(tmp_path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        # from a user's umask 002 (group-writable files): Ray must start with group write off
        r = _sh(["umask 002"] + [c.replace("ulimit -n 65536; ", "") for c in cfg[key]], home)
        assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    starts = [c for c in calls if " start " in c + " "]
    assert len(starts) == 2 and starts[0].split()[3] == "--head", calls
    assert all(c.startswith("RAY_AUTH_MODE=token umask=0022 start ") for c in starts), starts
    assert "--address=10.0.0.10:6379" in starts[1]


def _submit(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "ray-args"
    (fake / "ray").write_text(f'#!/bin/sh\n{{ echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"; '
                              f'for a in "$@"; do printf "%s\\n" "$a"; done; }} > {log}\n')
    (fake / "ray").chmod(0o755)
    r = subprocess.run([str(LAUNCH / "submit_search.sh"), *args], capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", **env), timeout=30)
    return r, log.read_text() if log.is_file() else ""


def test_submit_script_runs_the_search_on_the_head(tmp_path):
    r, argv = _submit(tmp_path, "/shared/runs/my run", "--trials", "500", "--budget", "0.6",
                      EXITNAS_STORAGE="postgresql://u:p w@10.0.0.10/exitnas")
    assert r.returncode == 0, r.stderr
    lines = argv.splitlines()[1:]
    assert lines[0] == "exec" and lines[1].endswith("launch/ray-cluster.yaml")
    assert lines[2] == "--tmux"
    remote = lines[3]
    # the driver on the head uses the token (RAY_AUTH_MODE=token, the head's ~/.ray/auth_token)
    assert remote.startswith(
        "RAY_AUTH_MODE=token EXITNAS_STORAGE=postgresql://u:p\\ w@10.0.0.10/exitnas ")
    assert ("~/exitnas-venv/bin/exitnas search /shared/runs/my\\ run --backend ray --address auto "
            "--trials 500 --budget 0.6") in remote
    r, argv = _submit(tmp_path, "/shared/runs/x", MODE="job")
    assert argv.splitlines()[:5] == ["RAY_AUTH_MODE=token", "job", "submit", "--address",
                                     "http://127.0.0.1:8265"]  # the dashboard wants the token
    assert argv.splitlines()[-1].startswith("RAY_AUTH_MODE=token ")
    r, _ = _submit(tmp_path, "/shared/runs/x", MODE="other")
    assert r.returncode == 2 and "MODE must be exec or job" in r.stderr
    r, _ = _submit(tmp_path)
    assert r.returncode == 2 and "Usage" not in r.stderr and "ray exec" in r.stdout
