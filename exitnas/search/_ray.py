"""The Ray Tune backend: ``Tuner`` + ``OptunaSearch`` with the same sampler and storage.

One Tune trial is one Optuna trial. The driver runs the sampler (``OptunaSearch`` asks and
tells on the persistent study, so every trial is visible there while it runs); workers score
architectures. What workers get, once:

- the supernet lives in ONE actor, :class:`_CacheServer`, pinned to the driver's node (it needs
  the run directory and the data): its weights travel once through the object store; it
  computes each depth setting's exit statistics once (BN recalibrated; or reads them from
  ``RUN/cache``) and puts them in the object store once;
- each worker process keeps the statistics it fetched in a per-process dict, and Tune reuses
  the worker actors, so a worker fetches each depth setting at most once;
- the small rest (space, cost table, budget, the actor's handle) reaches the trainable through
  ``tune.with_parameters``.

Faults: a trial whose worker dies is retried (``FailureConfig(max_failures=3)``) with the same
configuration and the same Optuna trial. A killed driver is resumed with ``Tuner.restore``: the
searcher's checkpoint maps Tune trials to Optuna trial ids (JSON, no pickle), so re-run trials
finish their original Optuna trial; RUNNING Optuna trials that no restored Tune trial owns are
marked FAIL. Exactly N: the searcher stops suggesting once the storage holds N complete trials
plus its own running ones, and the driver tops up with a fresh Tuner if trials failed for good.

Trust: ``Tuner.restore`` unpickles the experiment folder, so it is checked first (see
``_trust``). Auth: a driver given ``--address`` runs in Ray's token mode (``RAY_AUTH_MODE=token``
unless set; Ray 2.60 never turns it on for an explicit address) and a missing or wrong token is
one line, exit 2.

``EXITNAS_TRIAL_SLEEP_S`` (tests only) makes every trial sleep that long before scoring, so a
test can kill a worker or the driver mid-trial.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..io import atomic_write_json
from ._objective import DIRECTIONS, METRIC_NAMES, CacheStore, Fitter, Objective, TrialRecord
from ._storage import OWNER_KEY, fail_stale_trials, owner_tag
from ._trust import read_state, trusted_experiment

RESULT_KEY = "exitnas_record"
SLEEP_ENV = "EXITNAS_TRIAL_SLEEP_S"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
MAX_FAILURES = 3
TOP_UP_ROUNDS = 3


def _ray():
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise RunDirError("--backend ray needs Ray Tune: pip install 'exitnas[ray]'") from None
    return ray


# ---- the cache actor -------------------------------------------------------------------------
class _CacheServerImpl:
    """Holds the supernet; serves each depth setting's statistics as one object-store ref."""

    def __init__(self, space_dict: dict, run_path: str, weights: bytes) -> None:
        import torch
        from safetensors.torch import load as load_tensors

        from ..data import load_splits
        from ..rundir import RunDir
        from ..space import parse_space
        from ..supernet import Supernet

        torch.set_num_threads(1)
        space = parse_space(space_dict)
        net = Supernet(space)
        net.load_state_dict(load_tensors(weights))
        self.store = CacheStore(run_dir=RunDir(run_path), net=net, splits=load_splits(space))
        self.refs: dict[tuple[int, ...], Any] = {}
        self.fetches = 0
        self.starts: dict[str, int] = {}

    def get(self, depths: tuple[int, ...]) -> list:
        import ray

        depths = tuple(depths)
        self.fetches += 1
        if depths not in self.refs:
            self.refs[depths] = ray.put(self.store(depths))
        return [self.refs[depths]]  # a list: the caller gets the ref, not a copy

    def started(self, trial_id: str) -> None:
        self.starts[trial_id] = self.starts.get(trial_id, 0) + 1

    def stats(self) -> dict:
        return {**self.store.stats(), "worker_fetches": self.fetches,
                "trial_starts": sum(self.starts.values()),
                "retried_trials": sum(1 for n in self.starts.values() if n > 1)}


@dataclass(frozen=True)
class _WorkerContext:
    key: str
    genome: Any
    costs: Any
    budget: Any
    server: Any


_OBJECTIVES: dict[str, Objective] = {}  # per worker process: key -> objective with its caches


class _RemoteCaches:
    def __init__(self, server) -> None:
        self.server, self.memo = server, {}

    def __call__(self, depths):
        import ray

        depths = tuple(depths)
        if depths not in self.memo:
            ref = ray.get(self.server.get.remote(depths))[0]
            self.memo[depths] = ray.get(ref)
        return self.memo[depths]


def _trial(config: dict, context: _WorkerContext) -> None:
    """The Tune trainable: decode, score from cached statistics, report."""
    import ray
    from ray import tune

    objective = _OBJECTIVES.get(context.key)
    if objective is None:
        objective = _OBJECTIVES[context.key] = Objective(
            costs=context.costs, budget=context.budget, caches=_RemoteCaches(context.server),
            fitter=Fitter.from_space(context.genome.space, context.budget))
    context.server.started.remote(tune.get_context().get_trial_id())
    if os.environ.get(SLEEP_ENV):
        time.sleep(float(os.environ[SLEEP_ENV]))
    record = objective(context.genome.decode(config))
    node = ray.get_runtime_context().get_node_id()
    worker = f"{node[:12]}/{os.getpid()}"
    tune.report({"accuracy": record.accuracy, "expected_macs": record.expected_macs,
                 RESULT_KEY: json.dumps({**record.to_json(), "worker": worker})})


# ---- the searcher ----------------------------------------------------------------------------
def _searcher_class():
    from optuna.trial import Trial, TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch on exitnas' study: user attributes and constraints set before ``tell``,
        an owner tag on every asked trial, a stop at N complete trials, JSON checkpoints."""

        def __init__(self, *, genome, target: int, **kwargs) -> None:
            self._genome, self._target = genome, target
            super().__init__(space=_DefineByRun(genome), metric=list(METRIC_NAMES),
                             mode=["max" if d == "maximize" else "min" for d in DIRECTIONS],
                             **kwargs)

        def _states(self) -> dict[int, TrialState]:
            storage = self._ot_study._storage
            return {t._trial_id: t.state
                    for t in storage.get_all_trials(self._ot_study._study_id, deepcopy=False)}

        def suggest(self, trial_id: str):
            if trial_id not in self._ot_trials:
                states = self._states()
                complete = sum(s == TrialState.COMPLETE for s in states.values())
                running = sum(states.get(t._trial_id) == TrialState.RUNNING
                              for tid, t in self._ot_trials.items())
                if complete + running >= self._target:
                    return Searcher.FINISHED
            config = super().suggest(trial_id)
            ot = self._ot_trials[trial_id]
            ot.storage.set_trial_system_attr(ot._trial_id, OWNER_KEY, owner_tag())
            return config

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            ot = self._ot_trials.get(trial_id)
            if ot is None:  # re-run after a restore, its Optuna trial had already finished
                self._completed_trials.add(trial_id)
                return
            if ot is not None and result and not error and RESULT_KEY in result:
                data = json.loads(result[RESULT_KEY])
                if ot.storage.get_trial(ot._trial_id).state == TrialState.RUNNING:
                    TrialRecord.from_json(data).apply(ot)
                    ot.set_user_attr("worker", data["worker"])
            super().on_trial_complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            state = {"trials": {tid: t._trial_id for tid, t in self._ot_trials.items()},
                     "completed": sorted(self._completed_trials)}
            Path(checkpoint_path).write_text(json.dumps(state))

        def restore(self, checkpoint_path: str) -> None:
            state = json.loads(Path(checkpoint_path).read_text())
            states = self._states()
            # Only RUNNING trials are adopted: a Tune trial re-run after its Optuna trial
            # finished (the driver died between tell and checkpoint) is not told twice.
            self._ot_trials = {tid: Trial(self._ot_study, ot_id)
                               for tid, ot_id in state["trials"].items()
                               if states.get(ot_id) == TrialState.RUNNING}
            self._completed_trials = set(state["completed"])
            fail_stale_trials(self._ot_study, keep={t.number for t in self._ot_trials.values()})
            tag = owner_tag()
            for t in self._ot_trials.values():
                t.storage.set_trial_system_attr(t._trial_id, OWNER_KEY, tag)

    return StudySearch


class _DefineByRun:
    """OptunaSearch's define-by-run space: suggest the genome, return None (the captured
    parameters become the Tune config)."""

    def __init__(self, genome) -> None:
        self.genome = genome

    def __call__(self, trial) -> None:
        self.genome.suggest(trial)
        return None


# ---- the driver ------------------------------------------------------------------------------
def _init_ray(address: str | None, workers: int, log) -> None:
    ray = _ray()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if not address:  # a private local instance, even if a cluster runs on this machine
        ray.init(address="local", num_cpus=workers, _node_ip_address="127.0.0.1", **kwargs)
        return
    mode = _cluster_auth_mode(log)
    try:
        ray.init(address=address, **kwargs)
    except ray.exceptions.AuthenticationError:
        raise RunDirError(f"--address {address}: Ray token authentication is on but this "
                          "process has no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or "
                          "copy the cluster's ~/.ray/auth_token here (launch/README.md)") from None
    except ConnectionError as err:
        hint = ("is RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token the cluster's "
                "token?" if mode == "token" else "it may require a token (RAY_AUTH_MODE=token)")
        raise RunDirError(f"--address {address}: cannot connect to the Ray cluster ({err}); is "
                          f"it running, and {hint}") from None


def _cluster_auth_mode(log) -> str:
    """Ray 2.60 sends its token only in token mode, and connecting by an explicit address
    never turns token mode on: unset, ``RAY_AUTH_MODE`` becomes ``token`` (the shipped
    cluster runs with it); ``disabled`` connects without a token, with a warning."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() not in ("token", "disabled"):
        raise RunDirError(f"RAY_AUTH_MODE={mode!r}: expected token or disabled")
    if mode is not None and mode.lower() == "disabled":
        print("search: RAY_AUTH_MODE=disabled: connecting without a token; anyone who can reach "
              "the cluster can run code on it", file=log, flush=True)
        return "disabled"
    if mode is None:
        os.environ[AUTH_MODE_ENV] = "token"
        if "ray._raylet" in sys.modules:  # Ray caches its config: refresh it, as ray.init does
            from ray._raylet import Config

            Config.initialize("")
    return "token"


def _load_study(spec, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=spec.open())


def _count_complete(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run_ray(*, run, space, spec, study_name, costs, budget, genome, sampler_kind, seed,
            population, n_trials, workers, address, weights, log=sys.stderr) -> dict:
    """Run Ray Tune trials until the study holds ``n_trials`` complete trials."""
    from ._run import join_session
    from ._sampler import make_sampler, session_seed

    exp_root = (run.path / "search" / "ray").resolve()
    state_path = exp_root / "state.json"
    state = read_state(state_path)
    study = _load_study(spec, study_name)
    before = _count_complete(study)
    resume = None  # checked before Ray is even imported: a refused run directory starts nothing
    if state.get("study") == study_name and state.get("target") == n_trials and before < n_trials:
        folder = trusted_experiment(run.path, state_path, state.get("experiment"))
        resume = folder if (folder / "tuner.pkl").is_file() else None  # = Tuner.can_restore
    ray = _ray()
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    umask = os.umask(0)
    os.umask(umask | 0o022)  # what this driver writes is writable by its owner only
    restored, rounds = False, 0
    try:
        _init_ray(address, workers, log)
        start = time.perf_counter()
        node = ray.get_runtime_context().get_node_id()
        server = ray.remote(_CacheServerImpl).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(space.to_dict(), str(run.path.resolve()), Path(weights).read_bytes())
        context = _WorkerContext(key=f"{study_name}:{os.getpid()}:{time.time()}", genome=genome,
                                 costs=costs, budget=budget, server=server)
        trainable = tune.with_resources(tune.with_parameters(_trial, context=context), {"cpu": 1})
        if resume is not None:
            print(f"search: resuming Ray Tune experiment {resume}", file=log, flush=True)
            join_session(study, spec.lock(study_name))  # before the searcher judges stale trials
            tune.Tuner.restore(str(resume), trainable=trainable, resume_unfinished=True,
                               resume_errored=True).fit()
            restored = True
        StudySearch = _searcher_class()
        while _count_complete(study) < n_trials and rounds < TOP_UP_ROUNDS:
            rounds += 1
            session = join_session(study, spec.lock(study_name))
            fail_stale_trials(study)
            name = f"tune-{session}"
            atomic_write_json(state_path, {"experiment": name, "study": study_name,
                                           "target": n_trials})
            sampler = make_sampler(sampler_kind, seed=session_seed(seed, session),
                                   population_size=population)
            searcher = StudySearch(genome=genome, target=n_trials, storage=spec.open(),
                                   study_name=study_name, sampler=sampler)
            tune_config = tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=workers),
                num_samples=n_trials - _count_complete(study), reuse_actors=True)
            run_config = tune.RunConfig(
                name=name, storage_path=str(exp_root), verbose=0,
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES))
            tune.Tuner(trainable, tune_config=tune_config, run_config=run_config).fit()
        loop_seconds = time.perf_counter() - start
        stats = ray.get(server.stats.remote())
        nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    finally:
        ray.shutdown()
        os.umask(umask)
    after = _count_complete(study)
    return {"committed": after - before, "loop_seconds": loop_seconds, "cache": stats,
            "ray_restored": restored, "ray_rounds": rounds, "ray_nodes": nodes}
