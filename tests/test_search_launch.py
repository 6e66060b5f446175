"""launch/: the Ray cluster config validates against Ray's own schema; the submission script
builds the right command (a stand-in `ray` on PATH records it)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def test_cluster_config_is_valid_for_ray_up():
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    util.validate_config(util.prepare_config(cfg))
    assert cfg["provider"]["type"] == "local"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE" not in head
    assert all(isinstance(c, str) for c in cfg["setup_commands"])


def _submit(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "ray-args"
    (fake / "ray").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {log}\n')
    (fake / "ray").chmod(0o755)
    r = subprocess.run([str(LAUNCH / "submit_search.sh"), *args], capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", **env), timeout=30)
    return r, log.read_text() if log.is_file() else ""


def test_submit_script_runs_the_search_on_the_head(tmp_path):
    r, argv = _submit(tmp_path, "/shared/runs/my run", "--trials", "500", "--budget", "0.6",
                      EXITNAS_STORAGE="postgresql://u:p w@10.0.0.10/exitnas")
    assert r.returncode == 0, r.stderr
    lines = argv.splitlines()
    assert lines[0] == "exec" and lines[1].endswith("launch/ray-cluster.yaml") and lines[2] == "--tmux"
    remote = lines[3]
    assert remote.startswith("EXITNAS_STORAGE=postgresql://u:p\\ w@10.0.0.10/exitnas ")
    assert ("~/exitnas-venv/bin/exitnas search /shared/runs/my\\ run --backend ray --address auto "
            "--trials 500 --budget 0.6") in remote
    r, argv = _submit(tmp_path, "/shared/runs/x", MODE="job")
    assert argv.splitlines()[:4] == ["job", "submit", "--address", "http://127.0.0.1:8265"]
    r, _ = _submit(tmp_path, "/shared/runs/x", MODE="other")
    assert r.returncode == 2 and "MODE must be exec or job" in r.stderr
    r, _ = _submit(tmp_path)
    assert r.returncode == 2 and "Usage" not in r.stderr and "ray exec" in r.stdout
