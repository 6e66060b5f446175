"""search/_storage.py: who owns a RUNNING trial (stale ones of dead processes are failed), the
opened storage's count of other processes' journal writes, and a real PostgreSQL server (Debian's
package, started by the test as user postgres on 127.0.0.1 and a free port, in a temporary
directory) holding one study that three concurrent `exitnas search` processes fill: exactly N
complete trials, none lost or duplicated."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from search_support import study_of, train_tiny_run, trial_counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server not installed (Debian package postgresql)")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' user to run the server as")
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("starting a PostgreSQL server here needs root and runuser")
    pytest.importorskip("psycopg2")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="exitnas-pg-", dir="/tmp"))
    os.chown(root, pw.pw_uid, pw.pw_gid)
    port = _free_port()

    def as_postgres(*cmd):
        return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)],
                              capture_output=True, text=True, timeout=120)

    try:
        r = as_postgres(bindir / "initdb", "-D", root / "data", "-A", "trust", "-U", "postgres",
                        "--no-sync")
        assert r.returncode == 0, r.stderr
        r = as_postgres(bindir / "pg_ctl", "-D", root / "data", "-l", root / "log", "-w", "-o",
                        f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start")
        assert r.returncode == 0, r.stderr + (root / "log").read_text()
        r = as_postgres(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "exitnas")
        assert r.returncode == 0, r.stderr
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/exitnas"
    finally:
        as_postgres(bindir / "pg_ctl", "-D", root / "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_three_concurrent_searches_fill_one_postgres_study_exactly(postgres_url, tmp_path):
    run = train_tiny_run(tmp_path / "run", steps=10)
    n = 90
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "exitnas", "search", str(run), "--trials",
                               str(n), "--storage", postgres_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    ran = [int(out.split(" run now")[0].rsplit("(", 1)[1]) for out, _ in outs]
    assert sum(ran) == n
    assert trial_counts(run, postgres_url) == {
        "complete": n, "running": 0, "fail": 0, "numbers_unique": True,
        "numbers_contiguous": True, "uids_unique": True}
    assert "postgresql+psycopg2://postgres@127.0.0.1" in (run / "search" / "study.json").read_text()
    # each depth setting went through the network once, across the three processes
    built = [int(out.split(" built")[0].rsplit(" ", 1)[1]) for out, _ in outs]
    depth_settings = {tuple(t.user_attrs["arch"]["depths"])
                      for t in study_of(run, postgres_url).get_trials(deepcopy=False)}
    assert sum(built) == len(depth_settings) == len(list((run / "cache").glob("val-d*")))


def test_stale_running_trials_of_dead_processes_are_failed(tmp_path):
    import optuna

    from exitnas.search._storage import (OWNER_KEY, SESSIONS_KEY, NullLock, fail_stale_trials,
                                         join_session, journal_backend, owner_tag)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(journal_backend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    dead = owner_tag().rsplit(":", 1)[0] + ":0"  # this host and pid, another start time
    study.set_user_attr(SESSIONS_KEY, [dead])
    assert join_session(study, NullLock()) == 1
    t_dead, t_none, t_mine, t_kept = (study.ask() for _ in range(4))
    storage.set_trial_system_attr(t_dead._trial_id, OWNER_KEY, dead)
    storage.set_trial_system_attr(t_mine._trial_id, OWNER_KEY, owner_tag())
    storage.set_trial_system_attr(t_kept._trial_id, OWNER_KEY, dead)
    # another live process joined: a trial without an owner might be its own
    study.set_user_attr(SESSIONS_KEY, study.user_attrs[SESSIONS_KEY] + [owner_tag(os.getppid())])
    assert fail_stale_trials(study, keep={t_kept.number}) == [t_dead.number]
    study.set_user_attr(SESSIONS_KEY, study.user_attrs[SESSIONS_KEY][:2])
    assert fail_stale_trials(study, keep={t_kept.number}) == [t_none.number]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "FAIL", "RUNNING", "RUNNING"]


def test_opened_storage_counts_only_other_processes_journal_writes(tmp_path):
    """Two connections to one journal file stand for two processes: each sees the other's
    appends and not its own (what lets the in-process backend skip re-reading the study)."""
    import optuna

    from exitnas.search import StorageSpec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = StorageSpec(journal=str(tmp_path / "study.log"))
    a, b = spec.connect(), spec.connect()
    seen_by_a, seen_by_b = a.others_wrote(), b.others_wrote()
    study = optuna.create_study(storage=a.optuna, study_name="s", directions=["maximize"])
    study.tell(study.ask(), 1.0)
    a.sync()
    size = (tmp_path / "study.log").stat().st_size
    assert size > 0
    assert seen_by_a() == 0 and seen_by_b() == size
    other = optuna.load_study(storage=b.optuna, study_name="s")
    other.tell(other.ask(), 2.0)
    grown = (tmp_path / "study.log").stat().st_size
    assert seen_by_a() == grown - size and seen_by_b() == size
    db = StorageSpec(url=f"sqlite:///{tmp_path / 'x.db'}").connect()
    assert db.journal is None and db.others_wrote() is None
    db.sync()  # nothing to fsync: a database commits each write itself
