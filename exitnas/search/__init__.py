"""Search: multi-objective NSGA-II over the trained supernet under a cost budget.

    from exitnas.search import SearchOptions, run_search
    result = run_search("runs/quick", SearchOptions(trials=200, budget="0.6"))

Objectives: validation accuracy (max) and expected cost per sample (min; in the unit of the
space's cost model: MACs, ms), scored from cached exit statistics; constraints: expected cost <=
budget, optionally worst-case path cost <= a second budget. Backends (:class:`Backend`, each given one :class:`SearchContext`): in-process
Optuna (default) or Ray Tune (``backend="ray"``). The study lives in ``RUN/search/study.log``
(an Optuna journal file) or any storage URL.

Modules import one way (``tests/test_search.py`` checks there is no cycle): ``_run`` imports
the backends (``_inprocess``, ``_ray``), which import ``_backend`` (the context and the
interface), ``_objective``, ``_sampler`` and ``_storage``; those import ``_budget`` and
``_internals`` (every use of an Optuna or Ray private name); ``_genome``, ``_trust``,
``_front`` import nothing of the search package but ``_budget`` (and ``exitnas.units``).
"""
from ._backend import BACKENDS, Backend, BackendResult, SearchContext, register_backend
from ._budget import Budget, cheapest_costs, parse_macs, resolve_budget
from ._front import FrontSummary, hypervolume_2d, pareto_front, summarise, write_outputs
from ._genome import Genome
from ._objective import DIRECTIONS, CacheStore, Objective, TrialRecord, metric_names
from ._run import SearchOptions, SearchResult, open_study, run_search, search_context
from ._sampler import SAMPLERS, make_sampler
from ._storage import OpenedStorage, StorageSpec, fail_stale_trials, parse_storage

__all__ = ["BACKENDS", "Backend", "BackendResult", "SearchContext", "register_backend", "Budget",
           "cheapest_costs", "parse_macs", "resolve_budget", "FrontSummary",
           "hypervolume_2d", "pareto_front", "summarise", "write_outputs", "Genome",
           "DIRECTIONS", "metric_names", "CacheStore", "Objective", "TrialRecord",
           "SearchOptions", "SearchResult", "open_study", "run_search", "search_context",
           "SAMPLERS", "make_sampler", "OpenedStorage", "StorageSpec", "fail_stale_trials",
           "parse_storage"]
