"""optuna-dashboard on the run's journal file: started by `exitnas dashboard` on 127.0.0.1,
read over HTTP and rendered in headless Chromium, stopped by its PID."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from search_support import train_tiny_run

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                out.append(addr)
    return out


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _chromium(url: str, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=20000",
         "--window-size=1280,900", *mode, url],
        capture_output=True, text=True, timeout=180)


@pytest.fixture
def searched_run(tmp_path) -> Path:
    run = train_tiny_run(tmp_path / "run", steps=10)
    r = run_cli("search", run, "--trials", "60", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return run


def test_dashboard_serves_the_study_on_loopback_and_chromium_renders_it(searched_run, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exitnas", "dashboard", str(searched_run),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.5)
        names = json.loads((searched_run / "search" / "study.json").read_text())
        assert [s["study_name"] for s in studies] == [names["study_name"]] == ["exitnas-tiny-run"]
        sid = studies[0]["study_id"]
        detail = _get(f"{base}/api/studies/{sid}")
        assert detail["objective_names"] == ["accuracy", "expected_macs"]
        assert len(detail["trials"]) == 60
        attrs = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
        assert {"arch_id", "feasible", "macs", "relative_cost", "exit_accuracy"} <= set(attrs)
        # it listens on loopback only
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, and nothing on tcp6

        if not Path(CHROMIUM).is_file():
            pytest.skip(f"{CHROMIUM} not installed (Debian package chromium)")
        home = _chromium(f"{base}/dashboard/", tmp_path, "--dump-dom")
        assert home.returncode == 0, home.stderr[-2000:]
        assert "exitnas-tiny-run" in home.stdout
        page = _chromium(f"{base}/dashboard/studies/{sid}", tmp_path, "--dump-dom")
        assert "exitnas-tiny-run" in page.stdout and "expected_macs" in page.stdout
        shot = tmp_path / "study.png"
        _chromium(f"{base}/dashboard/studies/{sid}", tmp_path, f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        proc.send_signal(signal.SIGTERM)  # stopped by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/api/studies", timeout=5)


def test_dashboard_without_a_search_is_one_line_error(tmp_path, tiny_space):
    from exitnas.rundir import RunDir

    RunDir(tmp_path / "run").init(tiny_space)
    r = run_cli("dashboard", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "exitnas search" in r.stderr
