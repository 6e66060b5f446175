"""``exitnas run`` end to end on a tiny config, killed once in the middle, then completed by
the same command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TEST_DATA, run_cli

TRIALS = 12
SETS = ["--set", f"search.trials={TRIALS}", "--set", "supernet.epochs=2", "--set",
        "search.deploy_budgets=[0.6, 0.9]"]


def _study(run_dir):
    """The run's one Optuna study, read from its journal file."""
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "search" / "study.log")))
    names = optuna.study.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def _complete(study) -> dict[int, tuple]:
    """Complete trials: number -> (params, values)."""
    return {t.number: (t.params, tuple(t.values)) for t in study.trials
            if t.state.name == "COMPLETE"}


def _journal_complete(log: Path) -> int:
    """COMPLETE trials in a journal file, counted cheaply while the run writes it (every
    in-process trial is one ``add_trial`` record: op_code 4 = create trial, state 1 = complete).
    Only the trigger for the kill; what the kill hit is then read with Optuna."""
    n = 0
    for line in log.read_bytes().splitlines():
        try:
            op = json.loads(line)
        except ValueError:  # a line being written
            continue
        n += op.get("op_code") == 4 and op.get("state") == 1
    return n


def test_run_killed_during_the_search_then_resumed(tmp_path):
    """kill -9 lands in the search: the supernet is finished, the study holds some but not all
    of the trials, nothing after the search exists. The same command then completes the run,
    reusing the supernet and keeping every trial finished before the kill."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "exitnas", "run", str(TEST_DATA / "tiny.yaml"),
           "--run-dir", str(run_dir), *SETS]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log = run_dir / "search" / "study.log"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and _journal_complete(log) >= 1:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # where the kill landed: after the supernet, inside the search
    metrics = (run_dir / "supernet" / "metrics.csv").read_text().splitlines()
    assert (run_dir / "supernet" / "weights.safetensors").is_file() and len(metrics) == 1 + 2
    at_kill = _complete(_study(run_dir))
    assert 0 < len(at_kill) < TRIALS, len(at_kill)
    for later in ("search/summary.json", "selected.json", "retrain", "export", "report"):
        assert not (run_dir / later).exists(), later
    supernet_before = (run_dir / "supernet" / "weights.safetensors").read_bytes()

    done = run_cli("run", TEST_DATA / "tiny.yaml", "--run-dir", run_dir, *SETS)
    assert done.returncode == 0, done.stderr[-2000:]
    # the finished supernet was reused, not retrained; the trials done before the kill kept
    assert (run_dir / "supernet" / "weights.safetensors").read_bytes() == supernet_before
    after = _complete(_study(run_dir))
    assert len(after) == TRIALS
    assert all(after[k] == v for k, v in at_kill.items())
    picks = json.loads((run_dir / "selected.json").read_text())["picks"]
    assert [round(p["budget_fraction"], 6) for p in picks] == [0.6, 0.9]
    for pick in picks:  # exported with the supernet's own weights: what the search scored
        manifest = json.loads((run_dir / "export" / pick["arch_id"] / "arch.json").read_text())
        assert manifest["arch"]["id"] == pick["arch_id"]
        assert manifest["source"]["weights"] == "supernet"
        assert pick["val_expected_macs"] <= pick["budget_macs"]
    assert not (run_dir / "retrain").exists()
    assert (run_dir / "report" / "report.md").is_file()
    assert "exitnas dashboard" in done.stdout

    # a third run has nothing left to do and changes no finished artifact
    again = run_cli("run", TEST_DATA / "tiny.yaml", "--run-dir", run_dir, *SETS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done before" in again.stdout
    assert _complete(_study(run_dir)) == after
    assert json.loads((run_dir / "selected.json").read_text())["picks"] == picks


def test_run_refuses_a_run_dir_of_another_space(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    before = (run_dir / "config.yaml").read_bytes()
    proc = run_cli("run", TEST_DATA / "tiny.yaml", "--run-dir", run_dir)
    assert proc.returncode == 2
    assert "belongs to space 'quickstart'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (run_dir / "config.yaml").read_bytes() == before
