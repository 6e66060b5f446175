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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..io import atomic_write_json
from ._backend import Backend, BackendResult, SearchContext, register_backend
from ._internals import (adopt_trial, local_ray_init_kwargs, refresh_ray_config,
                         searcher_completed, searcher_study, searcher_trials,
                         set_searcher_completed, set_searcher_trials, set_trial_system_attr,
                         trial_id)
from ._objective import DIRECTIONS, CacheStore, Fitter, Objective, TrialRecord, metric_names
from ._sampler import make_sampler, session_seed
from ._storage import OWNER_KEY, fail_stale_trials, join_session, owner_tag
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
        net = Supernet(space, pretrained=False)
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
    tune.report({"accuracy": record.accuracy, record.unit.name("expected"): record.expected_cost,
                 RESULT_KEY: json.dumps({**record.to_json(), "worker": worker})})


# ---- the searcher ----------------------------------------------------------------------------
def _searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch on exitnas' study: user attributes and constraints set before ``tell``,
        an owner tag on every asked trial, a stop at N complete trials, JSON checkpoints."""

        def __init__(self, *, genome, target: int, unit, **kwargs) -> None:
            self._genome, self._target = genome, target
            super().__init__(space=_DefineByRun(genome), metric=metric_names(unit),
                             mode=["max" if d == "maximize" else "min" for d in DIRECTIONS],
                             **kwargs)

        def _states(self) -> dict[int, TrialState]:
            return {trial_id(t): t.state
                    for t in searcher_study(self).get_trials(deepcopy=False)}

        def suggest(self, tune_id: str):
            asked = searcher_trials(self)
            if tune_id not in asked:
                states = self._states()
                complete = sum(s == TrialState.COMPLETE for s in states.values())
                running = sum(states.get(trial_id(t)) == TrialState.RUNNING
                              for t in asked.values())
                if complete + running >= self._target:
                    return Searcher.FINISHED
            config = super().suggest(tune_id)
            set_trial_system_attr(searcher_trials(self)[tune_id], OWNER_KEY, owner_tag())
            return config

        def on_trial_complete(self, tune_id: str, result=None, error: bool = False) -> None:
            ot = searcher_trials(self).get(tune_id)
            if ot is None:  # re-run after a restore, its Optuna trial had already finished
                searcher_completed(self).add(tune_id)
                return
            if result and not error and RESULT_KEY in result:
                data = json.loads(result[RESULT_KEY])
                if ot.storage.get_trial(trial_id(ot)).state == TrialState.RUNNING:
                    TrialRecord.from_json(data).apply(ot)
                    ot.set_user_attr("worker", data["worker"])
            super().on_trial_complete(tune_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            state = {"trials": {tid: trial_id(t) for tid, t in searcher_trials(self).items()},
                     "completed": sorted(searcher_completed(self))}
            Path(checkpoint_path).write_text(json.dumps(state))

        def restore(self, checkpoint_path: str) -> None:
            state = json.loads(Path(checkpoint_path).read_text())
            states = self._states()
            study = searcher_study(self)
            # Only RUNNING trials are adopted: a Tune trial re-run after its Optuna trial
            # finished (the driver died between tell and checkpoint) is not told twice.
            adopted = {tid: adopt_trial(study, ot_id) for tid, ot_id in state["trials"].items()
                       if states.get(ot_id) == TrialState.RUNNING}
            set_searcher_trials(self, adopted)
            set_searcher_completed(self, set(state["completed"]))
            fail_stale_trials(study, keep={t.number for t in adopted.values()})
            tag = owner_tag()
            for t in adopted.values():
                set_trial_system_attr(t, OWNER_KEY, tag)

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
def _init_ray(address: str | None, workers: int, log, *, log_to_driver: bool = False) -> None:
    ray = _ray()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    kwargs = dict(include_dashboard=False, log_to_driver=log_to_driver, logging_level="ERROR")
    if not address:  # a private local instance, even if a cluster runs on this machine
        ray.init(address="local", num_cpus=workers, **local_ray_init_kwargs(), **kwargs)
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
        refresh_ray_config()  # Ray caches its config: refresh it, as ray.init does
    return "token"


def _count_complete(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _resume_folder(ctx: SearchContext, state_path: Path, before: int) -> Path | None:
    """The Tune experiment to restore, checked before Ray is even imported (a refused run
    directory starts nothing); None for a fresh search."""
    state = read_state(state_path)
    if (state.get("study") == ctx.study_name and state.get("target") == ctx.n_trials
            and before < ctx.n_trials):
        folder = trusted_experiment(ctx.run.path, state_path, state.get("experiment"))
        return folder if (folder / "tuner.pkl").is_file() else None  # = Tuner.can_restore
    return None


def _trainable(ctx: SearchContext):
    """The Tune trainable, with the cache actor pinned to this (the driver's) node."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    server = ray.remote(_CacheServerImpl).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
    ).remote(ctx.space.to_dict(), str(ctx.run.path.resolve()), Path(ctx.weights).read_bytes())
    context = _WorkerContext(key=f"{ctx.study_name}:{os.getpid()}:{time.time()}",
                             genome=ctx.genome, costs=ctx.costs, budget=ctx.budget, server=server)
    return tune.with_resources(tune.with_parameters(_trial, context=context), {"cpu": 1}), server


def _tune_round(ctx: SearchContext, trainable, exp_root: Path, state_path: Path) -> None:
    """One fresh Tuner that runs trials until the study holds N complete (or fails)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    session = join_session(ctx.study, ctx.lock)
    fail_stale_trials(ctx.study)
    name = f"tune-{session}"
    atomic_write_json(state_path, {"experiment": name, "study": ctx.study_name,
                                   "target": ctx.n_trials})
    sampler = make_sampler(ctx.sampler, seed=session_seed(ctx.seed, session),
                           population_size=ctx.population)
    searcher = _searcher_class()(genome=ctx.genome, target=ctx.n_trials, unit=ctx.budget.unit,
                                 storage=ctx.storage.optuna, study_name=ctx.study_name,
                                 sampler=sampler)
    tune_config = tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=ctx.workers),
        num_samples=ctx.n_trials - _count_complete(ctx.study), reuse_actors=True)
    run_config = tune.RunConfig(
        name=name, storage_path=str(exp_root), verbose=0,
        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES))
    tune.Tuner(trainable, tune_config=tune_config, run_config=run_config).fit()


@register_backend("ray")
class RayBackend(Backend):
    """Ray Tune trials (a local instance, or the cluster at ``ctx.address``)."""

    def run(self, ctx: SearchContext) -> BackendResult:
        exp_root = (ctx.run.path / "search" / "ray").resolve()
        state_path = exp_root / "state.json"
        before = _count_complete(ctx.study)
        resume = _resume_folder(ctx, state_path, before)
        ray = _ray()
        from ray import tune

        umask = os.umask(0)
        os.umask(umask | 0o022)  # what this driver writes is writable by its owner only
        restored, rounds = False, 0
        try:
            _init_ray(ctx.address, ctx.workers, ctx.log)
            start = time.perf_counter()
            trainable, server = _trainable(ctx)
            if resume is not None:
                print(f"search: resuming Ray Tune experiment {resume}", file=ctx.log, flush=True)
                join_session(ctx.study, ctx.lock)  # before the searcher judges stale trials
                tune.Tuner.restore(str(resume), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True).fit()
                restored = True
            while _count_complete(ctx.study) < ctx.n_trials and rounds < TOP_UP_ROUNDS:
                rounds += 1
                _tune_round(ctx, trainable, exp_root, state_path)
            loop_seconds = time.perf_counter() - start
            stats = ray.get(server.stats.remote())
            nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
        finally:
            ray.shutdown()
            os.umask(umask)
        return BackendResult(committed=_count_complete(ctx.study) - before,
                             loop_seconds=loop_seconds,
                             info={"cache": stats, "ray_restored": restored,
                                   "ray_rounds": rounds, "ray_nodes": nodes})
