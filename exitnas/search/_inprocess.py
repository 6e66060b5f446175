"""The in-process backend: Optuna's sampler in this process, one storage write per trial.

The sampler runs on an in-memory mirror of the study: ``ask``, suggest the genome, score it
from the cached statistics, ``tell`` — all in memory — then the finished trial (parameters,
values, constraints, user attributes, NSGA-II's generation) is committed to the persistent
storage as ONE record with ``study.add_trial``. Trials other processes commit to the same study
are pulled into the mirror before every commit, so concurrent processes share one population.

Why not ask/tell on the persistent storage directly: every ``suggest_*`` and ``set_user_attr``
is a separate storage write (~25 per trial here), which caps a journal file at ~80 trials/s and
PostgreSQL far lower; one write per trial keeps the default storage well above 100 trials/s. A
killed process never leaves a half-written or RUNNING trial: what was not committed is simply
re-sampled when the command is rerun.

Exactly N: the commit happens under the storage's commit lock, and only while the study has
fewer than N complete trials; otherwise the finished trial is dropped and the process stops.
"""
from __future__ import annotations

import sys
import time
import uuid

import optuna
from optuna.trial import TrialState

from ._backend import Backend, BackendResult, SearchContext, register_backend
from ._objective import DIRECTIONS, CacheStore, Fitter, Objective
from ._sampler import make_sampler, session_seed
from ._storage import UID_KEY, fail_stale_trials, join_session


class StudyMirror:
    """In-memory copy of the persistent study's complete trials, for the sampler.
    ``others_wrote``: :meth:`~exitnas.search._storage.OpenedStorage.others_wrote` of the
    storage ``study`` is on."""

    def __init__(self, study, sampler, lock, *, others_wrote=None) -> None:
        self.study, self.lock = study, lock
        # bytes other processes wrote to a journal file: unchanged since the last pull means
        # nothing new to read, which saves reading the whole study (O(n)) on every commit
        self._others = others_wrote
        self._others_seen = None
        self.memory = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
        self._scan = 0             # storage trials before this index are finished and seen
        self._prefix_complete = 0  # COMPLETE trials among them
        self._seen: set[int] = set()
        self._mine: set[str] = set()
        self.complete = 0

    def pull(self) -> int:
        """Copy finished trials new in the storage into the mirror; returns the storage's
        number of COMPLETE trials."""
        if self._others is not None:
            self._others_seen = self._others()  # before reading: a later write is read next time
        trials = self.study.get_trials(deepcopy=False)
        tail_complete = 0
        for i in range(self._scan, len(trials)):
            t = trials[i]
            if not t.state.is_finished():
                continue
            if i == self._scan:  # extend the finished prefix
                self._scan += 1
                self._prefix_complete += t.state == TrialState.COMPLETE
            elif t.state == TrialState.COMPLETE:
                tail_complete += 1
            if t.number in self._seen:
                continue
            self._seen.add(t.number)
            if t.state == TrialState.COMPLETE and t.system_attrs.get(UID_KEY) not in self._mine:
                self.memory.add_trial(t)
        self.complete = self._prefix_complete + tail_complete
        return self.complete

    def commit(self, frozen, n_trials: int) -> bool:
        """Write ``frozen`` to the storage unless it already holds ``n_trials`` complete."""
        uid = uuid.uuid4().hex
        frozen.system_attrs = {**frozen.system_attrs, UID_KEY: uid}
        with self.lock:
            if self._others is None or self._others() != self._others_seen:
                self.pull()
            if self.complete >= n_trials:
                return False
            self.study.add_trial(frozen)
            self._mine.add(uid)
            self.complete += 1
        return True


@register_backend("optuna")
class InProcessBackend(Backend):
    """Optuna's sampler in this process, scoring from the run's cached exit statistics."""

    def run(self, ctx: SearchContext) -> BackendResult:
        from ..data import load_splits
        from ..supernet import Supernet

        session = join_session(ctx.study, ctx.lock)
        failed = fail_stale_trials(ctx.study)
        net = Supernet(ctx.space, pretrained=False).load(ctx.weights)
        caches = CacheStore(run_dir=ctx.run, net=net, splits=load_splits(ctx.space))
        objective = Objective(costs=ctx.costs, budget=ctx.budget, caches=caches,
                              fitter=Fitter.from_space(ctx.space, ctx.budget))
        sampler = make_sampler(ctx.sampler, seed=session_seed(ctx.seed, session),
                               population_size=ctx.population)
        start = time.perf_counter()
        committed = run_inprocess(study=ctx.study, lock=ctx.lock, objective=objective,
                                  genome=ctx.genome, sampler=sampler, n_trials=ctx.n_trials,
                                  others_wrote=ctx.storage.others_wrote(), log=ctx.log)
        return BackendResult(committed=committed, loop_seconds=time.perf_counter() - start,
                             info={"cache": caches.stats(), "session": session,
                                   "stale_failed": failed})


def run_inprocess(*, study, lock, objective: Objective, genome, sampler, n_trials: int,
                  others_wrote=None, log=sys.stderr) -> int:
    """Run trials until the study has ``n_trials`` COMPLETE trials; returns how many this
    process committed."""
    mirror = StudyMirror(study, sampler, lock, others_wrote=others_wrote)
    with lock:
        mirror.pull()
    committed, start, last = 0, time.perf_counter(), time.perf_counter()
    while mirror.complete < n_trials:
        trial = mirror.memory.ask()
        record = objective(genome.decode(genome.suggest(trial)))
        record.apply(trial)
        frozen = mirror.memory.tell(trial, record.values)
        if not mirror.commit(frozen, n_trials):
            break
        committed += 1
        now = time.perf_counter()
        if log is not None and now - last > 5:
            last = now
            print(f"search: {mirror.complete}/{n_trials} trials complete "
                  f"({committed / (now - start):.1f} trials/s here)", file=log, flush=True)
    return committed
