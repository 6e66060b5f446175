"""search/_inprocess.py: the in-process backend after kill -9 (aimed at each phase of a commit),
and three concurrent processes on one journal file: exactly N trials."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli
from search_support import study_of, tiny_run, trained_tiny, trial_counts  # noqa: F401

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add contention here


def _spawn_search(run: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", **ONE_THREAD)
    return subprocess.Popen([sys.executable, "-m", "exitnas", "search", str(run), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_complete(run: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "search" / "study.json").is_file():
            n = trial_counts(run)["complete"]
            if n >= at_least:
                return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} trials after {timeout} s")


# Where a kill -9 of the in-process search can land. It never writes a RUNNING trial (a trial
# is committed whole, see exitnas/search/_inprocess.py), so what a kill can break is the commit:
# killed holding the commit lock (flock: the kernel frees it), or inside the journal write
# (Optuna's symlink lock file is left behind: the next process must break it), or while
# scoring (nothing held). Each kill below is aimed at one of them and proven to have landed
# there: the process is stopped (SIGSTOP), its locks are read from the file system and
# /proc/locks, and it is killed only when caught in the phase aimed at.
KILL_PHASES = ("scoring", "commit lock", "journal write lock")


def _phase(pid: int, journal: Path) -> str:
    if os.path.lexists(f"{journal}.lock"):  # JournalFileSymlinkLock, held only inside a write
        return "journal write lock"
    inode = os.stat(f"{journal}.exitnas-lock").st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()  # "1: FLOCK  ADVISORY  WRITE <pid> <maj>:<min>:<inode> 0 EOF"
        if f[1] == "FLOCK" and f[4] == str(pid) and int(f[5].rsplit(":", 1)[1]) == inode:
            return "commit lock"
    return "scoring"


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def _kill_in_phase(proc: subprocess.Popen, journal: Path, phase: str, timeout: float = 90) -> str:
    """SIGSTOP the search until it is caught in ``phase``, then SIGKILL it there."""
    rng = random.Random(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the search ended before it was caught in {phase!r}"
        os.kill(proc.pid, signal.SIGSTOP)
        while not _stopped(proc.pid):
            time.sleep(0.0002)
        if _phase(proc.pid, journal) == phase:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return phase
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(rng.uniform(0.001, 0.008))
    raise AssertionError(f"never caught the search in phase {phase!r} in {timeout} s")


def test_kill9_during_inprocess_search_then_rerun_gives_exactly_n(tiny_run):
    n = 1500  # no process finishes before it is caught (each is caught within ~1 s)
    journal = tiny_run / "search" / "study.log"
    landed = []
    for at_least, phase in zip((20, 200, 400), KILL_PHASES):
        proc = _spawn_search(tiny_run, "--trials", str(n))
        _wait_complete(tiny_run, at_least, proc)
        landed.append(_kill_in_phase(proc, journal, phase))
        # killed inside a journal write, it left Optuna's lock file: the next process must
        # break it (after the lock's 10 s grace period), not hang or write beside it
        assert os.path.lexists(f"{journal}.lock") == (phase == "journal write lock")
        counts = trial_counts(tiny_run)  # the journal replays: whole records only
        assert at_least <= counts["complete"] < n
        assert counts["numbers_unique"] and counts["numbers_contiguous"] and counts["uids_unique"]
    assert landed == list(KILL_PHASES)
    r = run_cli("search", tiny_run, "--trials", str(n), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(f"{journal}.lock")
    # exactly N, each committed once (running / fail are 0 by construction in-process: the
    # backend writes only finished trials; the counts that can go wrong are the others)
    assert trial_counts(tiny_run) == {"complete": n, "running": 0, "fail": 0,
                                      "numbers_unique": True, "numbers_contiguous": True,
                                      "uids_unique": True}


def test_three_concurrent_processes_on_one_journal_file_give_exactly_n(tiny_run):
    r = run_cli("search", tiny_run, "--trials", "5", env=ONE_THREAD)  # build the caches once
    assert r.returncode == 0, r.stderr
    procs = [_spawn_search(tiny_run, "--trials", "400") for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    ran = [int(out.split(" run now")[0].rsplit("(", 1)[1]) for out, _ in outs]
    assert sum(ran) == 395 and all(k > 0 for k in ran)  # all three shared the work
    assert trial_counts(tiny_run) == {"complete": 400, "running": 0, "fail": 0,
                                      "numbers_unique": True, "numbers_contiguous": True,
                                      "uids_unique": True}
    study = study_of(tiny_run)
    assert len(study.user_attrs["exitnas:sessions"]) == 4  # one owner tag per process
