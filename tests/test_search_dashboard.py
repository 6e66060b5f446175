"""optuna-dashboard on the run's journal file: started by `exitnas dashboard` on 127.0.0.1,
read over HTTP and rendered in headless Chromium, stopped by its PID.

The search runs under a 50 % budget so that some trials are infeasible: the dashboard must show
them as infeasible (its API's ``constraints`` lists, the grey points of its Pareto plot).
Without Chromium the rendering half skips on a developer machine and fails under ``CI=true``."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_cli
from search_support import study_of, train_tiny_run


def budget_macs(study) -> float:
    return study.user_attrs["exitnas"]["budget"]["expected_macs"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INFEASIBLE_GREY = "rgb(204, 204, 204)"  # the marker colour of the dashboard's infeasible trials


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


def _require_chromium() -> None:
    if Path(CHROMIUM).is_file():
        return
    why = f"{CHROMIUM} not installed (Debian package chromium)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true: the dashboard's rendering must be checked, but {why}")
    pytest.skip(why)


class _Tree(HTMLParser):
    """A minimal element tree of a dumped DOM: {"tag", "attrs", "kids"} dicts."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr", "path", "rect", "stop", "line", "circle", "use", "ellipse"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root = {"tag": "", "attrs": {}, "kids": []}
        self._open = [self.root]
        self.feed(html)

    def handle_starttag(self, tag, attrs) -> None:
        node = {"tag": tag, "attrs": dict(attrs), "kids": []}
        self._open[-1]["kids"].append(node)
        if tag not in self.VOID:
            self._open.append(node)

    def handle_endtag(self, tag) -> None:
        for i in range(len(self._open) - 1, 0, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def find(self, pred, node=None):
        node = self.root if node is None else node
        if pred(node):
            yield node
        for kid in node["kids"]:
            yield from self.find(pred, kid)


def _pareto_points(dom: str) -> list[str]:
    """The fill colour of every point the dashboard's Pareto-front plot drew."""
    tree = _Tree(dom)
    plot = next(tree.find(lambda n: n["attrs"].get("id") == "graph-pareto-front"), None)
    assert plot is not None, "no Pareto-front plot on the study page"
    points = tree.find(lambda n: n["tag"] == "path" and n["attrs"].get("class") == "point", plot)
    return [m.group(1) for p in points
            for m in [re.search(r"fill: (rgb\([^)]*\))", p["attrs"].get("style", ""))] if m]


@pytest.fixture
def searched_run(tmp_path) -> Path:
    run = train_tiny_run(tmp_path / "run", steps=10)
    r = run_cli("search", run, "--trials", "60", "--budget", "0.5", env={"OMP_NUM_THREADS": "1"})
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
        # feasibility as the dashboard reads it: its trial entries' constraint lists
        study = study_of(searched_run)
        by_number = {t.number: t for t in study.get_trials()}
        infeasible = 0
        for entry in detail["trials"]:
            t = by_number[entry["number"]]
            assert entry["constraints"] == [pytest.approx(t.constraints["expected_macs"])]
            shown_feasible = all(c <= 0 for c in entry["constraints"])
            assert shown_feasible == t.user_attrs["feasible"] == (t.values[1] <= budget_macs(study))
            infeasible += not shown_feasible
        assert 0 < infeasible < 60  # the 50 % budget leaves trials on both sides
        # Optuna's own feasible front is unchanged by the list: best_trials = exitnas' front
        with (searched_run / "search" / "front.csv").open() as fh:
            front = {tuple(by_number[int(r["trial"])].values) for r in csv.DictReader(fh)}
        assert all(t.user_attrs["feasible"] for t in study.best_trials)
        assert {tuple(t.values) for t in study.best_trials} == front
        # it listens on loopback only
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, and nothing on tcp6

        _require_chromium()
        home = _chromium(f"{base}/dashboard/", tmp_path, "--dump-dom")
        assert home.returncode == 0, home.stderr[-2000:]
        assert "exitnas-tiny-run" in home.stdout
        page = _chromium(f"{base}/dashboard/studies/{sid}", tmp_path, "--dump-dom")
        assert "exitnas-tiny-run" in page.stdout and "expected_macs" in page.stdout
        # the rendered Pareto plot: every infeasible trial is a grey point, every feasible one
        # a coloured point (before the fix all 60 were drawn as feasible)
        fills = _pareto_points(page.stdout)
        assert len(fills) == 60, fills
        assert fills.count(INFEASIBLE_GREY) == infeasible
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
