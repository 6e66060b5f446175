"""``run_search``: one search step on a run directory, resumable and safe to run concurrently.

    result = run_search("runs/quick", SearchOptions(trials=200, budget="0.6"))
    result.front[0]["arch_id"], result.hypervolume

Order of work: read the run's space and budget (bad input fails here, before anything is
written), load the trained supernet, open (or create) the study, mark RUNNING trials of dead
processes FAIL, run the backend until the study holds N complete trials, write the front.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cost import cost_table
from ..errors import RunDirError
from ..io import atomic_write_json
from ..rundir import RunDir
from ._budget import Budget, resolve_budget
from ._front import FrontSummary, write_outputs
from ._genome import Genome
from ._objective import DIRECTIONS, METRIC_NAMES
from ._sampler import SAMPLERS, session_seed
from ._storage import (SESSIONS_KEY, StorageSpec, fail_stale_trials, owner_tag, record_study,
                       resolve_study, sync_storage)

WEIGHTS = "supernet/weights.safetensors"


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """Command-line overrides; None = the space's ``search`` settings."""

    trials: int | None = None
    budget: str | None = None
    path_budget: str | None = None
    backend: str | None = None
    address: str | None = None
    storage: str | None = None
    study_name: str | None = None
    sampler: str | None = None
    seed: int | None = None
    workers: int | None = None
    population: int | None = None


@dataclass(frozen=True)
class SearchResult:
    study_name: str
    storage: str
    trials: int
    front: list[dict]
    hypervolume: float
    summary: dict = field(default_factory=dict)


def weights_path(run: RunDir) -> Path:
    path = run / WEIGHTS
    if not path.is_file():
        raise RunDirError(f"{path}: trained supernet not found; train it first with "
                          f"`exitnas train-supernet CONFIG --run-dir {run.path}`")
    return path


def check_weights(space, path: Path) -> None:
    """Refuse supernet weights that do not load into ``space``'s supernet before the study is
    opened (the backends load them only after that, and a refused run must write nothing)."""
    from ..supernet import Supernet

    Supernet(space).load(path)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def open_study(spec: StorageSpec, name: str, *, identity: dict):
    """Create or load the study; refuse one made for another space, supernet or budget."""
    import optuna

    storage = spec.open()
    try:  # load first: create_study(load_if_exists=True) appends to a journal even when the
        # study exists, so a run refused below would still have changed the storage
        study = optuna.load_study(storage=storage, study_name=name,
                                  sampler=optuna.samplers.RandomSampler())
    except KeyError:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),
                                    load_if_exists=True, sampler=optuna.samplers.RandomSampler())
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise RunDirError(f"study {name!r} in {spec.display} has directions "
                          f"{[d.name for d in study.directions]}, not an exitnas study")
    old = study.user_attrs.get("exitnas")
    if old is None:
        study.set_user_attr("exitnas", identity)
        study.set_metric_names(list(METRIC_NAMES))
    else:
        for key, what in (("fingerprint", "space"), ("weights", "supernet weights"),
                          ("budget", "budget")):
            if old.get(key) != identity[key]:
                raise RunDirError(
                    f"study {name!r} in {spec.display} was run with another {what} "
                    f"({_short(old.get(key))}, now {_short(identity[key])}); "
                    "pass --study-name NEW to start a separate study")
    return study


def _short(value) -> str:
    if isinstance(value, dict) and "backbone_macs" in value:  # a budget
        parts = [f"{k.replace('_macs', '')} <= {value[k]:,.0f} MACs"
                 for k in ("expected_macs", "path_macs") if value.get(k) is not None]
        return ", ".join(parts) or "no budget"
    return json.dumps(value)


def join_session(study, lock) -> int:
    """Register this process with ``study`` (``exitnas:sessions``: the owner tags of every
    process that joined, see ``fail_stale_trials``); returns its index (seeds its sampler)."""
    with lock:
        tags = list(study.user_attrs.get(SESSIONS_KEY, []))
        study.set_user_attr(SESSIONS_KEY, tags + [owner_tag()])
    return len(tags)


def quiet_optuna() -> None:
    """Optuna logs every study creation at INFO and warns on experimental features."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_search(run_dir, options: SearchOptions = SearchOptions(), *, log=sys.stderr) -> SearchResult:
    """Search until the run's study holds ``options.trials`` complete trials (continuing what
    an earlier or concurrent process did), then write the front to ``RUN/search``. Progress
    lines go to ``log`` (None: quiet)."""
    quiet_optuna()
    run = RunDir(run_dir)
    space = run.space()
    cfg = space.search
    trials = options.trials or cfg.trials
    backend = options.backend or cfg.backend
    sampler_kind = options.sampler or cfg.sampler
    seed = cfg.seed if options.seed is None else options.seed
    workers = options.workers or cfg.workers
    population = options.population or cfg.population_size
    if trials < 1:
        raise RunDirError(f"--trials {trials}: must be >= 1")
    if backend not in ("optuna", "ray"):
        raise RunDirError(f"--backend {backend!r}: expected optuna or ray")
    if sampler_kind not in SAMPLERS:
        raise RunDirError(f"--sampler {sampler_kind!r}: expected one of {', '.join(SAMPLERS)}")
    costs = cost_table(space)
    budget = resolve_budget(space, costs, budget=options.budget, path_budget=options.path_budget)
    weights = weights_path(run)
    check_weights(space, weights)
    spec, name = resolve_study(run, storage=options.storage or cfg.storage,
                               study_name=options.study_name,
                               default_name=f"exitnas-{space.name}-{run.path.resolve().name}")
    identity = {"space": space.name, "fingerprint": space.fingerprint,
                "weights": file_digest(weights), "budget": budget.to_json(),
                "thresholds": cfg.thresholds}
    study = open_study(spec, name, identity=identity)
    record_study(run, spec, name)
    lock = spec.lock(name)
    genome = Genome(space)
    start = time.perf_counter()
    extra: dict = {}
    if backend == "ray":
        from ._ray import run_ray

        extra = run_ray(run=run, space=space, spec=spec, study_name=name, costs=costs,
                        budget=budget, genome=genome, sampler_kind=sampler_kind, seed=seed,
                        population=population, n_trials=trials, workers=workers,
                        address=options.address, weights=weights, log=log)
        committed = extra.pop("committed")
    else:
        committed, extra = _run_local(run=run, space=space, study=study, lock=lock, costs=costs,
                                      budget=budget, genome=genome, sampler_kind=sampler_kind,
                                      seed=seed, population=population, n_trials=trials,
                                      weights=weights, log=log)
    seconds = time.perf_counter() - start
    sync_storage(study._storage)
    summary: FrontSummary = write_outputs(run.path / "search", study, budget, study_name=name,
                                          storage=spec.display)
    info = {"backend": backend, "sampler": sampler_kind, "seed": seed, "storage": spec.display,
            "study": name, "trials_target": trials, "trials_complete": summary.trials,
            "committed_by_this_process": committed, "seconds": seconds,
            "trials_per_s": committed / extra["loop_seconds"] if extra.get("loop_seconds") else None,
            "front_size": len(summary.front), "hypervolume": summary.hypervolume,
            "reference_point": summary.reference, **extra}
    atomic_write_json(run.path / "search" / "summary.json", info)
    return SearchResult(study_name=name, storage=spec.display, trials=summary.trials,
                        front=summary.front, hypervolume=summary.hypervolume, summary=info)


def _run_local(*, run, space, study, lock, costs, budget: Budget, genome, sampler_kind, seed,
               population, n_trials, weights, log) -> tuple[int, dict]:
    from ..data import load_splits
    from ..supernet import Supernet
    from ._inprocess import run_inprocess
    from ._objective import CacheStore, Fitter, Objective
    from ._sampler import make_sampler

    session = join_session(study, lock)
    failed = fail_stale_trials(study)
    net = Supernet(space).load(weights)
    caches = CacheStore(run_dir=run, net=net, splits=load_splits(space))
    objective = Objective(costs=costs, budget=budget, caches=caches,
                          fitter=Fitter.from_space(space, budget))
    sampler = make_sampler(sampler_kind, seed=session_seed(seed, session),
                           population_size=population)
    start = time.perf_counter()
    committed = run_inprocess(study=study, lock=lock, objective=objective, genome=genome,
                              sampler=sampler, n_trials=n_trials, log=log)
    return committed, {"loop_seconds": time.perf_counter() - start, "cache": caches.stats(),
                       "session": session, "stale_failed": failed}
