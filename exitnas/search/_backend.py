"""Backends: the ways to run trials, each given ONE :class:`SearchContext`.

    @register_backend("mine")
    class Mine(Backend):
        def run(self, ctx: SearchContext) -> BackendResult: ...

A backend runs trials on ``ctx.study`` until it holds ``ctx.n_trials`` COMPLETE trials,
continuing whatever earlier or concurrent processes did, and commits them through
``ctx.storage`` (the storage :func:`~exitnas.search.run_search` opened; a backend never reads
it back out of the study). Everything else a search needs is decided before a backend runs:
the budget, the checked supernet weights, the study (opened and identity-checked) and the
commit lock. Shipped: ``optuna`` (in-process, :mod:`._inprocess`) and ``ray`` (Ray Tune,
:mod:`._ray`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

from ..cost import CostTable
from ..rundir import RunDir
from ..space import Space
from ._budget import Budget
from ._genome import Genome
from ._storage import OpenedStorage


@dataclass(frozen=True, kw_only=True)
class SearchContext:
    """What a backend gets: the resolved settings of one ``run_search`` call."""

    run: RunDir
    space: Space
    costs: CostTable
    budget: Budget
    genome: Genome
    weights: Path                # the supernet's weights, already checked to load
    storage: OpenedStorage       # opened once, by run_search
    study: Any                   # optuna.Study on ``storage``, identity checked
    study_name: str
    lock: Any                    # the commit lock of the study (a context manager)
    backend: str                 # a name in BACKENDS
    sampler: str                 # a name in exitnas.search.SAMPLERS
    seed: int
    population: int              # NSGA-II population size
    n_trials: int                # COMPLETE trials the study should hold at the end
    workers: int                 # concurrent trials (Ray)
    address: str | None          # a Ray cluster (None: a private local instance)
    log: TextIO | None           # progress lines (None: quiet)


@dataclass(frozen=True, kw_only=True)
class BackendResult:
    """What a backend reports: trials this process committed, the seconds its trial loop
    took, and backend-specific facts for ``RUN/search/summary.json`` (``info``)."""

    committed: int
    loop_seconds: float
    info: dict = field(default_factory=dict)


class Backend(abc.ABC):
    """A way to run a search's trials (see the module docstring)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def run(self, ctx: SearchContext) -> BackendResult:
        """Run trials until ``ctx.study`` holds ``ctx.n_trials`` complete trials."""


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str):
    """Class decorator: register a :class:`Backend` under ``name`` (a duplicate raises)."""
    def wrap(cls: type[Backend]) -> type[Backend]:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered ({BACKENDS[name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"backend {name!r}: {cls!r} is not a Backend subclass")
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return wrap
