"""Samplers: NSGA-II (default) or uniform random search (for baselines)."""
from __future__ import annotations

from collections import defaultdict

import optuna
from optuna.samplers import NSGAIISampler
from optuna.trial import TrialState

from ._internals import (generation_key, parent_cache_key_prefix, share_ga_keys, study_id,
                         study_storage, trial_id)

SAMPLERS = ("nsga2", "random")


def make_sampler(kind: str, *, seed: int, population_size: int):
    """A fresh Optuna sampler. NSGA-II's constrained domination uses the trials'
    ``set_constraint`` values (feasible first, then the smaller total violation)."""
    if kind == "nsga2":
        return IndexedNSGAIISampler(population_size=population_size, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r} (known: {', '.join(SAMPLERS)})")


def session_seed(seed: int, session: int) -> int:
    """The sampler seed of the ``session``-th process to join a study: the given seed for the
    first, so a fresh single-process search is reproducible; distinct streams for resumed or
    concurrent processes, so they do not re-sample the first generation."""
    return seed if session == 0 else (seed * 1_000_003 + session * 7_919) % (2**31 - 1)


class IndexedNSGAIISampler(NSGAIISampler):
    """Optuna's NSGA-II, same samples, without its per-ask scans of the whole study.

    ``get_trial_generation``, ``get_population`` and ``get_parent_population`` each walk
    every trial of the study on every ask (O(n) per trial: the search ran at half speed
    by 2,000 trials, profiled). Here complete trials are indexed by generation and id as
    they appear; the index covers the finished prefix of the study's trials and falls
    back to Optuna's own scan when a finished trial follows an unfinished one.

    ``benchmarks/search_throughput.py --phases sampler`` times it against Optuna's own
    ``NSGAIISampler`` side by side; keep it only while it is faster at 200-1,000 trials."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._index: dict[int, dict] = {}

    def _indexed(self, study) -> dict | None:
        ix = self._index.setdefault(study_id(study), {"n": 0, "gen": defaultdict(list),
                                                      "id": {}})
        trials = study.get_trials(deepcopy=False)
        key = generation_key(self)
        n = ix["n"]
        while n < len(trials) and trials[n].state.is_finished():
            t = trials[n]
            if t.state == TrialState.COMPLETE:
                ix["gen"][t.system_attrs.get(key, -1)].append(t)
                ix["id"][trial_id(t)] = t
            n += 1
        ix["n"] = n
        if any(t.state.is_finished() for t in trials[n + 1:]):
            return None  # a finished trial behind a running one: not a prefix any more
        return ix

    def get_trial_generation(self, study, trial) -> int:
        generation = trial.system_attrs.get(generation_key(self), None)
        if generation is not None:
            return generation
        ix = self._indexed(study)
        if ix is None:
            return super().get_trial_generation(study, trial)
        top = max((g for g, ts in ix["gen"].items() if g >= 0 and ts), default=0)
        generation = top + (len(ix["gen"].get(top, ())) >= self.population_size)
        study_storage(study).set_trial_system_attr(trial_id(trial), generation_key(self),
                                                   generation)
        return generation

    def get_population(self, study, generation: int):
        ix = self._indexed(study)
        if ix is None:
            return super().get_population(study, generation)
        return list(ix["gen"].get(generation, ()))

    def get_parent_population(self, study, generation: int):
        if generation == 0:
            return []
        key = parent_cache_key_prefix(self) + str(generation)
        cached = study_storage(study).get_study_system_attrs(study_id(study)).get(key)
        ix = self._indexed(study) if cached is not None else None
        if ix is None or any(i not in ix["id"] for i in cached):
            return super().get_parent_population(study, generation)
        wanted = set(cached)  # in study order, as Optuna returns them
        return [t for t in (ix["id"][i] for i in sorted(wanted))]


# the study stays readable by Optuna's own NSGAIISampler: its attribute keys, not ones named
# after this class (which __init_subclass__ would derive)
share_ga_keys(IndexedNSGAIISampler, NSGAIISampler)
