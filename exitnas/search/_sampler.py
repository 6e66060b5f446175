"""Samplers: Optuna's NSGA-II (default) or uniform random search (for baselines).

exitnas kept its own ``IndexedNSGAIISampler`` (NSGA-II without the per-ask scans of the whole
study) until issue 17's side-by-side benchmark at the default trial counts: against Optuna's
``NSGAIISampler`` it was 0.88-1.07x as fast at 200 / 500 / 1,000 trials on two spaces
(``results/search/sampler_summary.csv``, measured at commit 402eba8), so Optuna's own is used.
"""
from __future__ import annotations

import optuna

SAMPLERS = ("nsga2", "random")


def make_sampler(kind: str, *, seed: int, population_size: int):
    """A fresh Optuna sampler. NSGA-II's constrained domination uses the trials'
    ``set_constraint`` values (feasible first, then the smaller total violation)."""
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r} (known: {', '.join(SAMPLERS)})")


def session_seed(seed: int, session: int) -> int:
    """The sampler seed of the ``session``-th process to join a study: the given seed for the
    first, so a fresh single-process search is reproducible; distinct streams for resumed or
    concurrent processes, so they do not re-sample the first generation."""
    return seed if session == 0 else (seed * 1_000_003 + session * 7_919) % (2**31 - 1)
