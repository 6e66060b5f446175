"""Scoring a trial: cached exit statistics -> objectives, constraints and user attributes.

Objectives: validation accuracy (maximise) and expected cost per sample (minimise), in the cost
model's unit (study metric names ``accuracy`` and ``expected_<unit>``: ``expected_macs``). With
``search.thresholds: fitted`` (default) the trial's exit thresholds are fitted on val for every
deploy budget (:class:`Fitter`); the accuracy objective is the mean over the deploy budgets of
the fitted accuracy (0 at a budget the arch cannot meet), the trial's arch carries the
thresholds of the largest budget, and its expected cost is theirs. Each budget's fit is kept
in ``user_attrs["fits"]`` (and ``val_acc@<fraction>``), which is what deployment picks from.
With ``evolved`` thresholds the accuracy is the arch's own under its genes' thresholds. Constraints (Optuna's ``trial.set_constraint``; feasible when <= 0, named
``expected_<unit>`` / ``path_<unit>``): expected cost <= budget and, when set, worst-case path
cost <= the path budget. optuna-dashboard 0.21
reads feasibility only from the ``constraints`` system attribute, the list Optuna's older
``constraints_func`` wrote, so the same values are written there too (Optuna 5 reads both
formats: ``trial.constraints`` then holds each value twice, by name and by index, and
feasibility, NSGA-II's constrained domination order and ``study.best_trials`` are unchanged).
The facts also go into ``user_attrs`` (``feasible``, ``<unit>`` (the expected cost: ``macs``,
``ms``), ``relative_cost``, ``path_<unit>``, ``cost_unit``, ``arch_id``...).

The statistics of a depth setting come from :class:`CacheStore`: one pass of the supernet
(BatchNorm recalibrated first) through ``exitnas.evaluate.load_or_build_cache``, kept in memory
for the life of the process on top of the run directory's disk cache, so a depth setting seen
once is never run through the network again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..arch import Arch
from ..cost import CostTable
from ..evaluate import ArchStats, ExitCache, load_or_build_cache, score
from ..units import MACS, Unit, unit_of
from ._budget import Budget
from ._internals import set_trial_system_attr

DIRECTIONS = ("maximize", "minimize")
# optuna.study._constrained_optimization._CONSTRAINTS_KEY; optuna_dashboard._serializer reads it
DASHBOARD_CONSTRAINTS_KEY = "constraints"


def metric_names(unit: Unit) -> list[str]:
    """The study's objective names for costs in ``unit``."""
    return ["accuracy", unit.name("expected")]


class CacheStore:
    """Exit statistics per depth setting for one supernet; each is obtained (read from
    ``RUN/cache`` or computed) at most once per process. ``built`` counts network passes."""

    def __init__(self, *, run_dir, net, splits, digest: str | None = None,
                 split: str = "val") -> None:
        self.run_dir, self.net, self.splits, self.split = run_dir, net, splits, split
        self.digest = digest
        self._memo: dict[tuple[int, ...], ExitCache] = {}
        self.built = 0    # depth settings passed through the network by this process
        self.loaded = 0   # depth settings read from RUN/cache
        self.requests = 0

    def _files(self, depths: tuple[int, ...]) -> dict[str, float]:
        folder = Path(self.run_dir.path) / "cache"
        pattern = f"{self.split}-d{'.'.join(map(str, depths))}-*.safetensors"
        return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)} if folder.is_dir() else {}

    def __call__(self, depths: tuple[int, ...]) -> ExitCache:
        self.requests += 1
        depths = tuple(depths)
        cache = self._memo.get(depths)
        if cache is None:
            from ._storage import FileLock

            folder = Path(self.run_dir.path) / "cache"
            folder.mkdir(parents=True, exist_ok=True)
            # concurrent processes on this run directory: one builds, the others then read
            with FileLock(str(folder / f".build-{self.split}-d{'.'.join(map(str, depths))}.lock")):
                before = self._files(depths)
                cache = load_or_build_cache(self.run_dir, self.net, depths, self.splits,
                                            split=self.split, digest=self.digest)
            if self._files(depths) != before:
                self.built += 1
            else:
                self.loaded += 1
            self._memo[depths] = cache
        return cache

    def stats(self) -> dict[str, int]:
        return {"built": self.built, "loaded": self.loaded, "requests": self.requests,
                "depth_settings": len(self._memo)}


@dataclass(frozen=True)
class TrialRecord:
    """Everything one trial yields."""

    arch: Arch
    accuracy: float
    expected_cost: float
    relative_cost: float
    path_cost: float
    exit_accuracy: tuple[float, ...]
    exit_fractions: tuple[float, ...]
    constraints: dict[str, float]
    fits: tuple[dict, ...] = field(default=())  # per deploy budget (Fitter.fit)
    unit: Unit = MACS

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    @property
    def values(self) -> list[float]:
        return [self.accuracy, self.expected_cost]

    def user_attrs(self) -> dict[str, Any]:
        u = self.unit
        return {"arch_id": self.arch.id, "arch": self.arch.to_json(), "cost_unit": u.key,
                u.key: self.expected_cost, "relative_cost": self.relative_cost,
                u.name("path"): self.path_cost, "exit_accuracy": list(self.exit_accuracy),
                "exit_fractions": list(self.exit_fractions), "feasible": self.feasible,
                "fits": list(self.fits),
                **{f"val_acc@{f['fraction']:.3g}": f["accuracy"] for f in self.fits}}

    def apply(self, trial) -> None:
        """Set user attributes and constraints on an Optuna trial (before ``tell``): by name
        (``set_constraint``) and as the list optuna-dashboard reads."""
        for key, value in self.user_attrs().items():
            trial.set_user_attr(key, value)
        for key, value in self.constraints.items():
            trial.set_constraint(key, value)
        set_trial_system_attr(trial, DASHBOARD_CONSTRAINTS_KEY,
                              [float(v) for v in self.constraints.values()])

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch.to_json(), "accuracy": self.accuracy, "unit": self.unit.key,
                "expected_cost": self.expected_cost, "relative_cost": self.relative_cost,
                "path_cost": self.path_cost, "exit_accuracy": list(self.exit_accuracy),
                "exit_fractions": list(self.exit_fractions), "constraints": self.constraints,
                "fits": list(self.fits)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrialRecord":
        return cls(arch=Arch.from_json(data["arch"]), accuracy=data["accuracy"],
                   expected_cost=data["expected_cost"], relative_cost=data["relative_cost"],
                   path_cost=data["path_cost"], exit_accuracy=tuple(data["exit_accuracy"]),
                   exit_fractions=tuple(data["exit_fractions"]),
                   constraints=dict(data["constraints"]), fits=tuple(data.get("fits", ())),
                   unit=unit_of(data["unit"]))


@dataclass(frozen=True)
class Fitter:
    """Fits a trial's thresholds on val for each deploy budget (``budgets``, in ``unit``,
    ascending); ``ranges`` holds the threshold ranges of the space's fitted policies
    (``Policy.fitted``)."""

    budgets: tuple[float, ...]
    ranges: Mapping[str, tuple[float, float]]
    backbone: float
    unit: Unit = MACS

    @classmethod
    def from_space(cls, space, budget: Budget) -> "Fitter | None":
        if space.search.thresholds != "fitted":
            return None
        from ..policy import get_policy

        fitted = [p for p in map(get_policy, space.policy.names) if p.fitted]
        return cls(budget.deploy, {p.name: p.param_range(space.policy) for p in fitted},
                   budget.backbone, budget.unit)

    def fit(self, cache: ExitCache, arch: Arch, costs: CostTable) -> tuple[Arch, tuple[dict, ...]]:
        """(arch with the largest budget's thresholds, one dict per budget: budget_<unit>,
        fraction, thresholds, accuracy, expected_<unit>, feasible)."""
        from ..thresholds import fit_budgets

        if arch.policy in self.ranges:
            fits = fit_budgets(ArchStats.from_cache(cache, arch, costs), budgets=self.budgets,
                               policy=arch.policy, value_range=self.ranges[arch.policy])
            rows = [(f.thresholds, f.accuracy, f.expected_cost, f.feasible) for f in fits]
            arch = arch.with_thresholds(fits[-1].thresholds)
        else:  # a policy that is not fitted (patience): the arch's own rule at every budget
            s = score(cache, arch, costs)
            rows = [(arch.thresholds, s.accuracy, s.expected_cost, s.expected_cost <= b)
                    for b in self.budgets]
        n = self.unit.name
        return arch, tuple({n("budget"): b, "fraction": b / self.backbone,
                            "thresholds": list(t), "accuracy": float(a),
                            n("expected"): float(m), "feasible": bool(ok)}
                           for b, (t, a, m, ok) in zip(self.budgets, rows))


class Objective:
    """arch -> :class:`TrialRecord`, from cached statistics (no network pass); thresholds
    fitted by ``fitter`` when given."""

    def __init__(self, *, costs: CostTable, budget: Budget,
                 caches: Callable[[tuple[int, ...]], ExitCache], fitter: Fitter | None = None) -> None:
        self.costs, self.budget, self.caches, self.fitter = costs, budget, caches, fitter

    def __call__(self, arch: Arch) -> TrialRecord:
        cache = self.caches(arch.depths)
        fits: tuple[dict, ...] = ()
        if self.fitter is not None:
            arch, fits = self.fitter.fit(cache, arch, self.costs)
        s = score(cache, arch, self.costs)
        accuracy = float(s.accuracy)
        if fits:
            accuracy = sum(f["accuracy"] if f["feasible"] else 0.0 for f in fits) / len(fits)
        path = s.exit_costs[-1]
        return TrialRecord(arch=arch, accuracy=accuracy,
                           expected_cost=float(s.expected_cost),
                           relative_cost=float(s.expected_cost) / self.budget.backbone,
                           path_cost=path, exit_accuracy=tuple(map(float, s.exit_accuracy)),
                           exit_fractions=tuple(map(float, s.exit_fractions)),
                           constraints=self.budget.constraints(s.expected_cost, path), fits=fits,
                           unit=self.budget.unit)
