"""Budgets: parsing, resolving against the backbone, and the space's cheapest costs.

Budgets are in the unit of the space's cost model (:mod:`exitnas.units`): a fraction of the plain
backbone's cost (a number <= 1) or an amount in that unit (``20M`` / ``1.5G`` MACs, ``3.5ms`` /
``800us``; a bare number > 1 is in the unit). Two budgets exist: the expected cost per sample
(the search constraint) and, optionally, the worst-case path cost (a sample that runs every
exit of the architecture).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..arch import Arch, Exit
from ..cost import CostTable
from ..errors import BudgetError
from ..space import Space
from ..units import MACS, Unit, parse_amount, unit_of


def parse_macs(text: str | float, *, backbone: int, what: str = "--budget") -> float:
    """``0.6`` -> 0.6 x backbone MACs; ``20M`` / ``1.5G`` / ``40000000`` -> absolute MACs."""
    return parse_amount(text, unit=MACS, backbone=backbone, what=what)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Resolved budgets in ``unit`` (None: no such constraint) and the backbone's cost they
    refer to. Stored (:meth:`to_json`) with unit-named keys: ``backbone_macs``,
    ``expected_ms``..."""

    unit: Unit = MACS
    backbone: float
    expected: float | None
    path: float | None = None
    deploy: tuple[float, ...] = ()  # ascending; thresholds are fitted for each

    def constraints(self, expected: float, path: float) -> dict[str, float]:
        """Optuna constraint values (feasible when <= 0), in units of the backbone's cost so
        that the two constraints weigh alike in NSGA-II's constrained domination."""
        out = {}
        if self.expected is not None:
            out[self.unit.name("expected")] = (expected - self.expected) / self.backbone
        if self.path is not None:
            out[self.unit.name("path")] = (path - self.path) / self.backbone
        return out

    def show(self, value: float) -> str:
        return f"{self.unit.show(value)} ({value / self.backbone:.3f} of the backbone's " \
               f"{self.unit.show(self.backbone)})"

    def to_json(self) -> dict:
        b, n = self.backbone, self.unit.name
        return {"unit": self.unit.key, n("backbone"): b, n("expected"): self.expected,
                "expected_fraction": None if self.expected is None else self.expected / b,
                n("path"): self.path,
                "path_fraction": None if self.path is None else self.path / b,
                n("deploy"): list(self.deploy),
                "deploy_fractions": [m / b for m in self.deploy]}

    @classmethod
    def from_json(cls, data: dict) -> "Budget":
        """A stored budget (no ``unit``: one stored before units, in MACs)."""
        unit = unit_of(data.get("unit", MACS.key))
        n = unit.name
        return cls(unit=unit, backbone=data[n("backbone")], expected=data[n("expected")],
                   path=data[n("path")], deploy=tuple(data[n("deploy")]))


def cheapest_costs(space: Space, costs: CostTable) -> tuple[float, float]:
    """(lowest expected cost, lowest worst-case path cost) any architecture of ``space`` can
    reach. The expected cost is at least the cost of the arch's first exit (every sample
    leaving there); the path cost is the backbone plus the fewest exits the space demands."""
    best_expected = best_path = float("inf")
    heads = space.exits.heads
    for depths in space.depth_settings():
        active = space.positions(depths)
        final = costs.backbone(depths)
        need = min(space.exits.min_exits, space.exits.max_exits, len(active))
        if need == 0:
            best_expected = min(best_expected, final)
        cheapest_head = sorted(min(costs.heads[(s, b, h)] for h in heads) for s, b in active)
        best_path = min(best_path, final + sum(cheapest_head[:need]))
        for s, b in active:
            for h in heads:
                first = costs.exit_costs(Arch(depths=depths, exits=(Exit(s, b, h),)))[0]
                best_expected = min(best_expected, first)
    return best_expected, best_path


def resolve_budget(space: Space, costs: CostTable, *, budget: str | float | None = None,
                   path_budget: str | float | None = None) -> Budget:
    """Budgets from the command line (``budget`` / ``path_budget``) or the space's ``search``
    settings, in ``costs``' unit; raises BudgetError when no architecture of the space can
    meet one."""
    unit, backbone, cfg = costs.unit, costs.backbone(), space.search

    def parse(text, what):
        return parse_amount(text, unit=unit, backbone=backbone, what=what)

    if budget is not None:
        expected = parse(budget, "--budget")
    elif cfg.budget is not None:
        expected = parse(cfg.budget, "search.budget")
    elif cfg.budget_macs is not None:  # the older spelling: an amount in MACs
        if unit is not MACS:
            raise BudgetError(f"search.budget_macs {cfg.budget_macs:g} is in MACs, but the cost "
                              f"model measures {unit.label}; set search.budget")
        expected = float(cfg.budget_macs)
    elif cfg.budget_fraction is not None:
        expected = cfg.budget_fraction * backbone
    else:
        expected = None
    if path_budget is not None:
        path = parse(path_budget, "--path-budget")
    elif cfg.max_path_fraction is not None:
        path = cfg.max_path_fraction * backbone
    else:
        path = None
    low_expected, low_path = cheapest_costs(space, costs)
    out = Budget(unit=unit, backbone=backbone, expected=expected, path=path)
    if expected is not None and expected < low_expected:
        raise BudgetError(f"budget {out.show(expected)} is below the cheapest expected cost "
                          f"of any architecture in space {space.name!r}: {out.show(low_expected)}"
                          " (every sample leaving at the first exit)")
    if path is not None and path < low_path:
        raise BudgetError(f"path budget {out.show(path)} is below the cheapest worst-case "
                          f"path of any architecture in space {space.name!r}: {out.show(low_path)}")
    return Budget(unit=unit, backbone=backbone, expected=expected, path=path,
                  deploy=deploy_budgets(space, out, low_expected))


def deploy_budgets(space: Space, budget: Budget, lowest: float) -> tuple[float, ...]:
    """``search.deploy_budgets`` in ``budget``'s unit, ascending (default: the search budget,
    else the backbone's cost); each must lie between the cheapest reachable cost and the
    search budget."""
    values, expected = space.search.deploy_budgets, budget.expected
    if values is None:
        return (float(expected if expected is not None else budget.backbone),)
    out = []
    for i, v in enumerate(values):
        cost = parse_amount(v, unit=budget.unit, backbone=budget.backbone,
                            what=f"search.deploy_budgets[{i}]")
        if expected is not None and cost > expected:
            raise BudgetError(f"search.deploy_budgets[{i}] {budget.show(cost)} is above the "
                              f"search budget {budget.show(expected)}")
        if cost < lowest:
            raise BudgetError(f"search.deploy_budgets[{i}] {budget.show(cost)} is below the "
                              f"cheapest expected cost of any architecture: {budget.show(lowest)}")
        out.append(cost)
    if len(set(out)) != len(out):
        raise BudgetError("search.deploy_budgets: lists a budget twice")
    return tuple(sorted(out))
