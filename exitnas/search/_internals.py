"""Every use exitnas makes of an Optuna or Ray private attribute, each with why it is needed.

No other module of ``exitnas.search`` touches a private name of Optuna or Ray (a test reads
their source to check). ``_objective.py`` relies on the value of Optuna's private
``_constrained_optimization._CONSTRAINTS_KEY`` ("constraints", the list optuna-dashboard
reads; the test checks it) and writes it through :func:`set_trial_system_attr`. :data:`CHECKED` names the versions each use below was read against in
their source; ``tests/test_search_internals.py`` fails when the installed versions differ, so
an upgrade forces a re-check of this file (then update :data:`CHECKED`).

Optuna:

- a trial's storage id (``_trial_id``): storages address trials by id and neither ``Trial``
  nor ``FrozenTrial`` exposes it publicly;
- ``Trial(study, trial_id)``: the only way to hold an Optuna trial again by its id (a Ray
  driver resumed by ``Tuner.restore`` re-adopts its RUNNING trials);
- ``JournalFileBackend.append_logs`` overridden (:class:`JournalBackend`): the same file
  format (one compact JSON record a line), written without an fsync inside the lock.

Ray 2.60:

- ``OptunaSearch._ot_study`` / ``_ot_trials`` / ``_completed_trials``: OptunaSearch keeps its
  study and its Tune-trial -> Optuna-trial map only there; exitnas' searcher counts, tags and
  checkpoints those trials (as JSON instead of OptunaSearch's pickle);
- ``ray.init(_node_ip_address=...)``: the only way to pin a local instance to 127.0.0.1;
- ``ray._raylet.Config.initialize``: Ray caches its config (auth mode) at import.
"""
from __future__ import annotations

import json
import os
import sys
import time

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

# the versions whose source every use below was checked against
CHECKED = {"optuna": "5.0.0", "ray": "2.60.0"}


# ---- Optuna: trials and studies ---------------------------------------------------------------
def trial_id(trial) -> int:
    """The storage id of a ``Trial`` or ``FrozenTrial``."""
    # private on both classes; every storage method (set_trial_system_attr, get_trial...)
    # takes it, and the Ray searcher's checkpoint records it
    return trial._trial_id


def set_trial_system_attr(trial, key: str, value) -> None:
    """A system attribute on a running ``Trial`` (Optuna 5 has no public setter)."""
    # Trial.set_system_attr was removed; Optuna's own samplers write through the storage
    trial.storage.set_trial_system_attr(trial._trial_id, key, value)


def adopt_trial(study, trial_id_: int):
    """An ``optuna.Trial`` for an existing RUNNING trial of ``study``, by storage id."""
    from optuna.trial import Trial

    # Trial's constructor is internal ("not recommended"), yet the only way back to a trial
    # asked by an earlier process: a restored Ray driver finishes the trials it had asked
    return Trial(study, trial_id_)


# ---- Optuna: the journal file -----------------------------------------------------------------
class JournalBackend(JournalFileBackend):
    """Optuna's ``JournalFileBackend`` (same format, same symlink lock, so optuna-dashboard and
    plain Optuna share the file), except that it fsyncs at most once a second and outside the
    lock. A killed process loses nothing it wrote (the data is in the page cache); only an OS
    crash can lose the last second, whose trials are then re-run. The stock backend fsyncs every
    record inside the lock: ~8 ms per trial on this machine's disk (most of a 100 trials/s
    budget), and a kill -9 inside that window leaves a lock file that blocks the rerun for the
    lock's grace period.

    Overriding ``append_logs`` relies on Optuna's journal format (records as compact JSON, one
    a line, UTF-8), which ``read_logs`` parses: a test compares the bytes with the stock
    backend's."""

    FSYNC_INTERVAL_S = 1.0

    def __init__(self, path: str) -> None:
        self._exitnas_lock = JournalFileSymlinkLock(path, grace_period=10)
        self.path = path
        self._last_sync = time.monotonic()
        self.appended = 0  # bytes this process wrote (see others_wrote)
        super().__init__(path, lock_obj=self._exitnas_lock)

    def append_logs(self, logs) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs)
                + "\n").encode("utf-8")
        self._exitnas_lock.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                _drop_torn_tail(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            self.appended += len(data)
        finally:
            self._exitnas_lock.release()
        if time.monotonic() - self._last_sync >= self.FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last_sync = time.monotonic()


def _drop_torn_tail(fd: int) -> None:
    """Cut a last line without its newline (a writer killed mid-record; replay ignores it)
    before appending: written after it, the next record would fuse with it into a line that
    does not parse, and every later replay would fail. Called with the journal lock held."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - (1 << 16))
    while True:
        chunk = os.pread(fd, size - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0 or start == 0:
            os.ftruncate(fd, start + cut + 1 if cut >= 0 else 0)
            return
        start = max(0, start - (1 << 16))


# ---- Ray Tune: OptunaSearch's state -----------------------------------------------------------
def searcher_study(searcher):
    """The Optuna study an ``OptunaSearch`` asks and tells on."""
    # _ot_study: created in OptunaSearch._setup_study, kept nowhere else; exitnas reads its
    # trials' states (stop at N complete) and fails stale trials on it after a restore
    return searcher._ot_study


def searcher_trials(searcher) -> dict:
    """``OptunaSearch``'s map of Tune trial id -> the ``optuna.Trial`` it runs."""
    # _ot_trials: the only record of which Optuna trial a Tune trial runs; exitnas counts its
    # RUNNING ones, tags them with their owner, and checkpoints the map (as trial ids, JSON)
    return searcher._ot_trials


def set_searcher_trials(searcher, trials: dict) -> None:
    # restoring from exitnas' JSON checkpoint instead of OptunaSearch's pickle
    searcher._ot_trials = trials


def searcher_completed(searcher) -> set:
    """The Tune trial ids ``OptunaSearch`` has told (it ignores later results for them)."""
    # _completed_trials: checkpointed as JSON, and marked for a Tune trial re-run after a
    # restore whose Optuna trial had already finished (so it is not told twice)
    return searcher._completed_trials


def set_searcher_completed(searcher, ids: set) -> None:
    searcher._completed_trials = ids


# ---- Ray core ---------------------------------------------------------------------------------
def local_ray_init_kwargs() -> dict:
    """``ray.init`` arguments that pin a private local instance to 127.0.0.1."""
    # _node_ip_address: private (popped from **kwargs in ray.init); without it a local
    # instance advertises the machine's address
    return {"_node_ip_address": "127.0.0.1"}


def refresh_ray_config() -> None:
    """Make an already imported Ray re-read its config (RAY_AUTH_MODE), as ``ray.init`` does."""
    if "ray._raylet" in sys.modules:
        # ray._raylet.Config caches the environment at import; exitnas sets RAY_AUTH_MODE after
        # Ray may have been imported, and Ray 2.60 has no public way to refresh it
        from ray._raylet import Config

        Config.initialize("")
