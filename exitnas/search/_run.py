"""``run_search``: one search step on a run directory, resumable and safe to run concurrently.

    result = run_search("runs/quick", SearchOptions(trials=200, budget="0.6"))
    result.front[0]["arch_id"], result.hypervolume

Order of work (:func:`search_context`): read the run's space and budget, check the trained
supernet's weights (bad input fails here, before anything is written), open the storage and
open (or create) the study; then the chosen backend (:mod:`._backend`) gets that one context,
marks RUNNING trials of dead processes FAIL and runs until the study holds N complete trials;
last, the front is written.
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
from ..runtime import sha256_file
from ._backend import BACKENDS, SearchContext
from ._budget import resolve_budget
from ._front import FrontSummary, write_outputs
from ._genome import Genome
from ..units import unit_of
from ._objective import DIRECTIONS, metric_names
from ._sampler import SAMPLERS
from ._storage import OpenedStorage, record_study, resolve_study
from . import _inprocess, _ray  # noqa: F401,E402  (importing them registers the shipped backends)

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

    Supernet(space, pretrained=False).load(path)


def open_study(storage: OpenedStorage, name: str, *, identity: dict):
    """Create or load the study; refuse one made for another space, supernet or budget."""
    import optuna

    where = storage.spec.display
    try:  # load first: create_study(load_if_exists=True) appends to a journal even when the
        # study exists, so a run refused below would still have changed the storage
        study = optuna.load_study(storage=storage.optuna, study_name=name,
                                  sampler=optuna.samplers.RandomSampler())
    except KeyError:
        study = optuna.create_study(storage=storage.optuna, study_name=name,
                                    directions=list(DIRECTIONS), load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler())
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise RunDirError(f"study {name!r} in {where} has directions "
                          f"{[d.name for d in study.directions]}, not an exitnas study")
    old = study.user_attrs.get("exitnas")
    if old is None:
        study.set_user_attr("exitnas", identity)
        study.set_metric_names(metric_names(unit_of(identity["budget"]["unit"])))
    else:
        old = dict(old)
        if isinstance(old.get("budget"), dict) and "unit" not in old["budget"]:
            old["budget"] = {"unit": "macs", **old["budget"]}  # stored before cost units: MACs
        if "cost" not in old and identity["cost"]["model"] == "fvcore_macs":
            old["cost"] = identity["cost"]  # stored before cost models: fvcore MACs, not pinned
        for key, what in (("fingerprint", "space"), ("weights", "supernet weights"),
                          ("budget", "budget"), ("cost", "cost table")):
            if old.get(key) != identity[key]:
                raise RunDirError(
                    f"study {name!r} in {where} was run with another {what} "
                    f"({_short(old.get(key))}, now {_short(identity[key])}); "
                    "pass --study-name NEW to start a separate study")
    return study


def _short(value) -> str:
    if isinstance(value, dict) and "expected_fraction" in value:  # a budget
        unit = unit_of(value.get("unit", "macs"))
        parts = [f"{k} <= {unit.show(value[unit.name(k)])}"
                 for k in ("expected", "path") if value.get(unit.name(k)) is not None]
        return ", ".join(parts) or "no budget"
    return json.dumps(value)


def quiet_optuna() -> None:
    """Optuna logs every study creation at INFO and warns on experimental features."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def search_context(run_dir, options: SearchOptions = SearchOptions(), *,
                   log=sys.stderr) -> SearchContext:
    """Resolve ``options`` against the run's space, check the budget and the supernet, open
    the storage and the study (bad input fails here, before anything is written)."""
    run = RunDir(run_dir)
    space = run.space()
    cfg = space.search
    trials = options.trials or cfg.trials
    backend = options.backend or cfg.backend
    sampler = options.sampler or cfg.sampler
    if trials < 1:
        raise RunDirError(f"--trials {trials}: must be >= 1")
    if backend not in BACKENDS:
        raise RunDirError(f"--backend {backend!r}: expected {' or '.join(BACKENDS)}")
    if sampler not in SAMPLERS:
        raise RunDirError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    costs = cost_table(space)
    budget = resolve_budget(space, costs, budget=options.budget, path_budget=options.path_budget)
    weights = weights_path(run)
    check_weights(space, weights)
    spec, name = resolve_study(run, storage=options.storage or cfg.storage,
                               study_name=options.study_name,
                               default_name=f"exitnas-{space.name}-{run.path.resolve().name}")
    table = hashlib.sha256(json.dumps(costs.to_json(), sort_keys=True).encode()).hexdigest()
    identity = {"space": space.name, "fingerprint": space.fingerprint,
                "weights": sha256_file(weights)[:16], "budget": budget.to_json(),
                "thresholds": cfg.thresholds,
                "cost": {"model": space.cost.model, "table": table[:16]}}
    storage = spec.connect()
    study = open_study(storage, name, identity=identity)
    record_study(run, spec, name)
    return SearchContext(
        run=run, space=space, costs=costs, budget=budget, genome=Genome(space), weights=weights,
        storage=storage, study=study, study_name=name, lock=spec.lock(name), backend=backend,
        sampler=sampler, seed=cfg.seed if options.seed is None else options.seed,
        population=options.population or cfg.population_size, n_trials=trials,
        workers=options.workers or cfg.workers, address=options.address, log=log)


def run_search(run_dir, options: SearchOptions = SearchOptions(), *,
               log=sys.stderr) -> SearchResult:
    """Search until the run's study holds ``options.trials`` complete trials (continuing what
    an earlier or concurrent process did), then write the front to ``RUN/search``. Progress
    lines go to ``log`` (None: quiet)."""
    quiet_optuna()
    ctx = search_context(run_dir, options, log=log)
    start = time.perf_counter()
    outcome = BACKENDS[ctx.backend]().run(ctx)
    seconds = time.perf_counter() - start
    ctx.storage.sync()
    display = ctx.storage.spec.display
    summary: FrontSummary = write_outputs(ctx.run.path / "search", ctx.study, ctx.budget,
                                          study_name=ctx.study_name, storage=display,
                                          counted=ctx.costs.counted)
    rate = outcome.committed / outcome.loop_seconds if outcome.loop_seconds else None
    info = {"backend": ctx.backend, "sampler": ctx.sampler, "seed": ctx.seed, "storage": display,
            "study": ctx.study_name, "trials_target": ctx.n_trials,
            "trials_complete": summary.trials, "committed_by_this_process": outcome.committed,
            "seconds": seconds, "trials_per_s": rate, "front_size": len(summary.front),
            "hypervolume": summary.hypervolume, "reference_point": summary.reference,
            "loop_seconds": outcome.loop_seconds, **outcome.info}
    atomic_write_json(ctx.run.path / "search" / "summary.json", info)
    return SearchResult(study_name=ctx.study_name, storage=display, trials=summary.trials,
                        front=summary.front, hypervolume=summary.hypervolume, summary=info)
