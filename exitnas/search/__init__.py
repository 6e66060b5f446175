"""Search: multi-objective NSGA-II over the trained supernet under a MACs budget.

    from exitnas.search import SearchOptions, run_search
    result = run_search("runs/quick", SearchOptions(trials=200, budget="0.6"))

Objectives: validation accuracy (max) and expected MACs per sample (min), scored from cached
exit statistics; constraints: expected MACs <= budget, optionally worst-case path MACs <= a
second budget. Backends: in-process Optuna (default) or Ray Tune (``backend="ray"``). The study
lives in ``RUN/search/study.log`` (an Optuna journal file) or any storage URL.
"""
from ._budget import Budget, cheapest_costs, parse_macs, resolve_budget
from ._front import FrontSummary, hypervolume_2d, pareto_front, summarise, write_outputs
from ._genome import Genome
from ._objective import DIRECTIONS, METRIC_NAMES, CacheStore, Objective, TrialRecord
from ._run import SearchOptions, SearchResult, open_study, run_search
from ._sampler import SAMPLERS, make_sampler
from ._storage import StorageSpec, fail_stale_trials, parse_storage

__all__ = ["Budget", "cheapest_costs", "parse_macs", "resolve_budget", "FrontSummary",
           "hypervolume_2d", "pareto_front", "summarise", "write_outputs", "Genome",
           "DIRECTIONS", "METRIC_NAMES", "CacheStore", "Objective", "TrialRecord",
           "SearchOptions", "SearchResult", "open_study", "run_search", "SAMPLERS",
           "make_sampler", "StorageSpec", "fail_stale_trials", "parse_storage"]
