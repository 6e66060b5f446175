"""``exitnas run`` end to end on a tiny config, killed once in the middle, then completed by
the same command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


from conftest import ROOT, TEST_DATA, run_cli

SETS = ["--set", "search.trials=12", "--set", "supernet.epochs=2", "--set", "retrain.epochs=2",
        "--set", "search.retrain_top=2"]


def _complete_trials(run_dir) -> int:
    import optuna

    info = json.loads((run_dir / "search" / "summary.json").read_text())
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "search" / "study.log")))
    study = optuna.load_study(study_name=info["study"], storage=storage)
    return sum(t.state.name == "COMPLETE" for t in study.trials)


def test_run_killed_then_resumed(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "exitnas", "run", str(TEST_DATA / "tiny.yaml"),
           "--run-dir", str(run_dir), *SETS]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    # kill -9 once the supernet is trained and the search has started writing its study
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "supernet" / "weights.safetensors").is_file() and \
                (run_dir / "search" / "study.log").is_file():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "selected.json").exists()
    supernet_before = (run_dir / "supernet" / "weights.safetensors").read_bytes()

    done = run_cli("run", TEST_DATA / "tiny.yaml", "--run-dir", run_dir, *SETS)
    assert done.returncode == 0, done.stderr[-2000:]
    # the finished supernet was reused, not retrained
    assert (run_dir / "supernet" / "weights.safetensors").read_bytes() == supernet_before
    assert _complete_trials(run_dir) == 12
    selected = json.loads((run_dir / "selected.json").read_text())["archs"]
    assert len(selected) in (1, 2)
    for arch_id in selected:
        assert (run_dir / "retrain" / arch_id / "mixed" / "model.safetensors").is_file()
        manifest = json.loads((run_dir / "export" / arch_id / "arch.json").read_text())
        assert manifest["arch"]["id"] == arch_id
    assert (run_dir / "report" / "report.md").is_file()
    assert "exitnas dashboard" in done.stdout

    # a third run has nothing left to do and changes no finished artifact
    again = run_cli("run", TEST_DATA / "tiny.yaml", "--run-dir", run_dir, *SETS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done before" in again.stdout
    assert _complete_trials(run_dir) == 12


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
