"""Where the study lives, the locks that keep "exactly N trials" exact, and who owns a trial.

Default: an Optuna journal file, ``RUN/search/study.log`` (``JournalStorage`` +
``JournalFileBackend``). Measured here, 200 NSGA-II trials cost ~0.6 s in a journal file and
~7.6 s in SQLite (~38 ms a trial), and the search must sustain >= 100 trials/s; a journal file
is plain appended JSON lines, survives kill -9 (a torn last line is ignored on replay), works on
NFS, and optuna-dashboard opens it by path. ``--storage`` takes any SQLAlchemy URL
(``sqlite:///x.db``, ``postgresql://user@host/db``: use PostgreSQL for many processes or
machines) or the path of another journal file.

The run directory records which storage and study it uses in ``RUN/search/study.json``
(passwords are not written), so rerunning ``exitnas search RUN`` continues the same study.

Commit lock: a process commits a finished trial only while holding a lock, after checking the
study still has fewer than N complete trials. Journal files and SQLite use ``flock`` on a file
next to the storage; PostgreSQL uses a session advisory lock. Other databases get no lock and
concurrent processes may then overshoot N by up to (processes - 1).

A search opens its storage once (:meth:`StorageSpec.connect`, an :class:`OpenedStorage`) and
passes that on; nothing reads the storage back out of a study.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import RunDirError
from ..io import atomic_write_json
from ._internals import JournalBackend

ENV_STORAGE = "EXITNAS_STORAGE"
OWNER_KEY = "exitnas:owner"
SESSIONS_KEY = "exitnas:sessions"
UID_KEY = "exitnas:uid"


@dataclass(frozen=True)
class StorageSpec:
    """A journal file (``journal`` = its absolute path) or a SQLAlchemy URL (``url``)."""

    journal: str | None = None
    url: str | None = None

    @property
    def display(self) -> str:
        if self.journal:
            return self.journal
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return "journal" if self.journal else self.url.split(":", 1)[0].split("+", 1)[0]

    def open(self):
        """The Optuna storage object."""
        return self.connect().optuna

    def connect(self) -> OpenedStorage:
        """Open the storage (the search passes the result on; nothing fishes it out of a
        study later)."""
        import optuna

        if self.journal:
            Path(self.journal).parent.mkdir(parents=True, exist_ok=True)
            try:  # Optuna replays the whole file here; a damaged one fails in many ways
                backend = journal_backend(self.journal)
                return OpenedStorage(self, optuna.storages.JournalStorage(backend), backend)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError,
                    AssertionError) as err:
                raise RunDirError(f"{self.journal}: not a readable Optuna journal "
                                  f"({type(err).__name__}: {str(err)[:120]})") from None
        kwargs = {}
        if self.dialect == "sqlite":  # wait for a busy database instead of failing at once
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        # processes started together on a fresh database would race to create the tables
        lock = self.lock("storage-init")
        try:
            with lock:
                return OpenedStorage(self, optuna.storages.RDBStorage(self.url, **kwargs))
        except Exception as err:  # driver missing, server down, bad URL...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunDirError(f"--storage {self.display}: cannot open ({first[:200]})") from None
        finally:
            if isinstance(lock, PgAdvisoryLock):
                lock.close()

    def lock(self, study_name: str):
        """The commit lock for ``study_name`` in this storage (a context manager)."""
        if self.journal:
            return FileLock(self.journal + ".exitnas-lock")
        if self.dialect == "sqlite":
            from sqlalchemy.engine import make_url

            db = make_url(self.url).database
            return FileLock(db + ".exitnas-lock") if db and db != ":memory:" else NullLock()
        if self.dialect == "postgresql":
            return PgAdvisoryLock(self.url, study_name)
        return NullLock()


def journal_backend(path: str) -> JournalBackend:
    """Optuna's ``JournalFileBackend`` for ``path`` with exitnas' write path (see
    :class:`~exitnas.search._internals.JournalBackend`)."""
    return JournalBackend(path)


@dataclass(frozen=True)
class OpenedStorage:
    """A storage as :meth:`StorageSpec.connect` opened it: the Optuna storage object, and the
    journal backend it writes through (None for a database)."""

    spec: StorageSpec
    optuna: Any
    journal: JournalBackend | None = None

    def sync(self) -> None:
        """fsync a journal file (end of a search); a database commits each write itself."""
        if self.journal is not None:
            self.journal.sync()

    def others_wrote(self) -> Callable[[], int] | None:
        """For a journal file: a callable returning the bytes OTHER processes have appended so
        far (file size minus this process's own appends), which changes only when someone
        else writes; None for a database."""
        journal = self.journal
        if journal is None:
            return None
        return lambda: os.stat(journal.path).st_size - journal.appended


def default_journal(run_dir) -> Path:
    return Path(run_dir.path).resolve() / "search" / "study.log"


def parse_storage(text: str) -> StorageSpec:
    if "://" in text:
        return StorageSpec(url=text)
    return StorageSpec(journal=str(Path(text).expanduser().resolve()))


def resolve_study(run_dir, *, storage: str | None, study_name: str | None,
                  default_name: str) -> tuple[StorageSpec, str]:
    """The storage and study name of ``run_dir``: from the arguments, ``$EXITNAS_STORAGE``, or
    what ``RUN/search/study.json`` recorded (the study searched last, see :func:`record_study`)."""
    record_path = Path(run_dir.path) / "search" / "study.json"
    record = read_record(record_path) if record_path.is_file() else {}
    given = storage or os.environ.get(ENV_STORAGE)
    recorded = record.get("storage")  # None = the default journal in the run directory
    if given:
        spec = parse_storage(given)
    elif recorded is None:
        spec = StorageSpec(journal=str(default_journal(run_dir)))
    elif "***" in recorded:
        raise RunDirError(f"{record_path}: this run's study is in {recorded}; pass --storage "
                          f"with the password again (or set ${ENV_STORAGE})")
    else:
        spec = parse_storage(recorded)
    return spec, study_name or record.get("study_name") or default_name


def read_record(path: Path) -> dict:
    """``RUN/search/study.json``: a JSON object with ``storage`` and ``study_name``, each a
    string or null (checked by allowlist; anything else is refused in one line)."""
    unreadable = RunDirError(f"{path}: unreadable or not a study record; delete it to start a "
                             "new study")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise unreadable from None
    if not isinstance(record, dict) or not set(record) <= {"storage", "study_name"}:
        raise unreadable
    for value in record.values():
        if value is not None and not (isinstance(value, str) and value.isprintable()
                                      and 0 < len(value) <= 4096):
            raise unreadable
    return record


def record_study(run_dir, spec: StorageSpec, name: str) -> None:
    """Record in ``RUN/search/study.json`` the storage (password hidden) and study searched."""
    record_path = Path(run_dir.path) / "search" / "study.json"
    default = spec.journal == str(default_journal(run_dir))
    data = {"storage": None if default else spec.display, "study_name": name}
    try:
        if json.loads(record_path.read_text()) == data:
            return
    except (OSError, json.JSONDecodeError):
        pass
    atomic_write_json(record_path, data)


# ---- locks -----------------------------------------------------------------------------------
class NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class FileLock:
    """``flock`` on a lock file: released by the kernel if the holder dies (kill -9)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self):
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class PgAdvisoryLock:
    """A PostgreSQL session advisory lock keyed by the study name (released if the session
    dies). One connection is kept open per process."""

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        self.key = int.from_bytes(hashlib.sha256(b"exitnas:" + study_name.encode()).digest()[:8],
                                  "big", signed=True)
        self._conn = None

    def __enter__(self):
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        if self._conn is None:
            self._conn = create_engine(self.url, poolclass=NullPool).connect()
        self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        self._conn.commit()
        return self

    def __exit__(self, *exc) -> None:
        from sqlalchemy import text

        self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        self._conn.commit()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---- process ownership of RUNNING trials -----------------------------------------------------
def _start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def owner_tag(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (the start time tells a reused pid apart)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def owner_alive(tag: str) -> bool | None:
    """True / False for a process on this host; None for another host (cannot tell)."""
    try:
        host, pid, start = tag.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return _start_ticks(int(pid)) == start


def join_session(study, lock) -> int:
    """Register this process with ``study`` (``exitnas:sessions``: the owner tags of every
    process that joined, see :func:`fail_stale_trials`); returns its index (seeds its
    sampler)."""
    with lock:
        tags = list(study.user_attrs.get(SESSIONS_KEY, []))
        study.set_user_attr(SESSIONS_KEY, tags + [owner_tag()])
    return len(tags)


def fail_stale_trials(study, keep: set[int] = frozenset()) -> list[int]:
    """Mark RUNNING trials of dead exitnas processes FAIL (except trial numbers in ``keep``);
    returns their numbers. Call it after :func:`join_session`.

    A trial carries its owner's tag (``host:pid:start``) from just after ``ask``; it is stale
    when that process is gone from this host. A trial without a tag (its process died between
    ``ask`` and tagging it) is stale when no other process that joined the study may still be
    alive (processes on other hosts count as alive)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    me = owner_tag()
    others = [t for t in study.user_attrs.get(SESSIONS_KEY, []) if t != me]
    others_may_live = any(owner_alive(t) is not False for t in others)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_KEY)
        if t.number in keep or owner == me:
            continue
        if (owner_alive(owner) is not False) if owner else others_may_live:
            continue
        try:  # by number: a trial another process asked
            study.tell(t.number, state=TrialState.FAIL)
            failed.append(t.number)
        except (UpdateFinishedTrialError, ValueError):
            pass  # another process finished or failed it first (tell: "Cannot tell a ...")
    return failed
