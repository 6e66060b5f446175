"""The in-process search loop of benchmarks/search_throughput.py, timed: ``run_search`` rows,
plain ask/tell on a storage, a per-phase breakdown and the rate along one long study."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path


def inprocess(run: Path, storage: str | None, name: str, trials: int) -> dict:
    from exitnas.search import SearchOptions, run_search

    storage = storage or str(run / "search" / "study.log")  # the default journal file
    r = run_search(run, SearchOptions(trials=trials, storage=storage, study_name=name), log=None)
    s = r.summary
    assert s["trials_complete"] == trials and s["cache"]["built"] == 0, s
    return {"trials": s["committed_by_this_process"], "seconds": s["loop_seconds"],
            "trials_per_s": s["trials_per_s"]}


def asktell_on_storage(run: Path, path: Path, trials: int, store, space) -> dict:
    """The plain Optuna loop on a persistent study (stock JournalFileBackend)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from exitnas.cost import cost_table
    from exitnas.search import Genome, Objective, make_sampler, resolve_budget

    costs = cost_table(space)
    objective = Objective(costs=costs, budget=resolve_budget(space, costs), caches=store)
    genome = Genome(space)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"],
                                sampler=make_sampler("nsga2", seed=0, population_size=24))
    t = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        record = objective(genome.decode(genome.suggest(trial)))
        record.apply(trial)
        study.tell(trial, record.values)
    seconds = time.perf_counter() - t
    return {"trials": trials, "seconds": seconds, "trials_per_s": trials / seconds}


def scratch_study():
    """(study, commit lock, others-wrote counter, journal path) of a throw-away journal study
    opened as ``run_search`` opens one."""
    import optuna

    from exitnas.search import StorageSpec

    path = Path(tempfile.mkdtemp()) / "study.log"
    spec = StorageSpec(journal=str(path))
    storage = spec.connect()
    study = optuna.create_study(storage=storage.optuna, directions=["maximize", "minimize"])
    return study, spec.lock(study.study_name), storage.others_wrote(), path


def scratch_objective(space, store, *, fitted: bool = False):
    """(objective, genome) over ``store``'s cached statistics; ``fitted``: thresholds fitted
    per trial as ``run_search`` does under ``search.thresholds: fitted``."""
    from exitnas.cost import cost_table
    from exitnas.search import Genome, Objective, resolve_budget
    from exitnas.search._objective import Fitter

    costs = cost_table(space)
    budget = resolve_budget(space, costs)
    fitter = Fitter.from_space(space, budget) if fitted else None
    return Objective(costs=costs, budget=budget, caches=store, fitter=fitter), Genome(space)


def scratch_loop(space, store, sampler):
    """(objective, genome, mirror, journal path) of the in-process loop on a throw-away
    journal study, for timing the loop's parts by hand."""
    from exitnas.search._inprocess import StudyMirror

    study, lock, others_wrote, path = scratch_study()
    objective, genome = scratch_objective(space, store)
    return objective, genome, StudyMirror(study, sampler, lock, others_wrote=others_wrote), path


def breakdown(run: Path, trials: int, store, space) -> list[dict]:
    """The in-process loop (StudyMirror + commit) with a timer around each phase."""
    from exitnas.search import make_sampler

    objective, genome, mirror, path = scratch_loop(
        space, store, make_sampler("nsga2", seed=0, population_size=24))
    phases = {k: 0.0 for k in ("ask", "suggest (NSGA-II sampling)", "decode", "score",
                               "attrs + tell (memory)", "commit (lock, pull, write)")}
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = mirror.memory.ask()
        t1 = time.perf_counter()
        params = genome.suggest(trial)
        t2 = time.perf_counter()
        arch = genome.decode(params)
        t3 = time.perf_counter()
        record = objective(arch)
        t4 = time.perf_counter()
        record.apply(trial)
        frozen = mirror.memory.tell(trial, record.values)
        t5 = time.perf_counter()
        mirror.commit(frozen, trials + 1)
        t6 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            phases[key] += dt
    shutil.rmtree(path.parent, ignore_errors=True)
    total = sum(phases.values())
    return [{"phase": k, "ms_per_trial": 1e3 * v / trials, "share": v / total}
            for k, v in phases.items()]


def _per_thousand(done: list, sampler: str) -> list[dict]:
    n = len(done)
    return [{"sampler": sampler, "trials_done": f"{lo}-{min(lo + 1000, n)}",
             "trials_per_s": (min(lo + 1000, n) - 1 - lo)
             / (done[min(lo + 1000, n) - 1] - done[lo]).total_seconds()}
            for lo in range(0, n, 1000)]


def scaling(run: Path, trials: int, stock_trials: int, store, space) -> list[dict]:
    """Rate per 1,000 trials along one study: ``run_search``'s loop for ``trials``, and the
    plain ask / tell loop with Optuna's NSGAIISampler for ``stock_trials``."""
    import optuna

    from exitnas.search._storage import parse_storage

    inprocess(run, None, "tp-scaling", trials)
    study = optuna.load_study(study_name="tp-scaling",
                              storage=parse_storage(str(run / "search" / "study.log")).open())
    out = _per_thousand(sorted(t.datetime_complete for t in study.get_trials()),
                        "run_search (exitnas loop)")
    objective, genome, mirror, path = scratch_loop(
        space, store, optuna.samplers.NSGAIISampler(population_size=24, seed=0))
    study = mirror.study
    for _ in range(stock_trials):
        trial = mirror.memory.ask()
        record = objective(genome.decode(genome.suggest(trial)))
        record.apply(trial)
        mirror.commit(mirror.memory.tell(trial, record.values), stock_trials + 1)
    out += _per_thousand(sorted(t.datetime_complete for t in study.get_trials()),
                         "NSGAIISampler (Optuna 5.0)")
    shutil.rmtree(path.parent, ignore_errors=True)
    return out
