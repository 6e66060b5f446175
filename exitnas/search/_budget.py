"""MACs budgets: parsing, resolving against the backbone, and the space's cheapest costs.

A budget is either a fraction of the plain backbone's MACs (a number <= 1) or absolute MACs
(a number > 1, optionally with a K / M / G suffix: ``20M``, ``1.5G``). Two budgets exist:
the expected MACs per sample (the search constraint) and, optionally, the worst-case path
MACs (a sample that runs every exit of the architecture).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..arch import Arch, Exit
from ..cost import CostTable
from ..errors import BudgetError
from ..space import Space

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}
# a decimal number (no sign, no nan / inf), then an optional K / M / G; blanks around
_BUDGET = re.compile(r"[ \t]*([0-9]{0,30}\.?[0-9]{1,30}(?:[eE][+-]?[0-9]{1,3})?)[ \t]*([kKmMgG]?)[ \t]*")


def parse_macs(text: str | float, *, backbone: int, what: str = "--budget") -> float:
    """``0.6`` -> 0.6 x backbone MACs; ``20M`` / ``1.5G`` / ``40000000`` -> absolute MACs."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BudgetError(f"{what} {text!r}: expected a number or a string such as 20M")
    if isinstance(text, (int, float)):
        value, suffix = float(text), ""
    else:
        m = _BUDGET.fullmatch(text)
        if not m:
            shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "..."
            raise BudgetError(f"{what} {shown}: expected a fraction of the backbone (<= 1) or "
                              "MACs such as 20M or 1.5G")
        value, suffix = float(m.group(1)), m.group(2).upper()
    macs = value * backbone if suffix == "" and value <= 1.0 else value * _SUFFIX[suffix]
    if not math.isfinite(macs):
        raise BudgetError(f"{what} {text!r}: not a finite number of MACs")
    if value <= 0:
        raise BudgetError(f"{what} {text!r}: must be > 0")
    return macs


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Resolved budgets in MACs (None: no such constraint) and the backbone they refer to."""

    backbone_macs: int
    expected_macs: float | None
    path_macs: float | None = None
    deploy_macs: tuple[float, ...] = ()  # ascending; thresholds are fitted for each

    def constraints(self, expected: float, path: float) -> dict[str, float]:
        """Optuna constraint values (feasible when <= 0), in units of the backbone's MACs so
        that the two constraints weigh alike in NSGA-II's constrained domination."""
        out = {}
        if self.expected_macs is not None:
            out["expected_macs"] = (expected - self.expected_macs) / self.backbone_macs
        if self.path_macs is not None:
            out["path_macs"] = (path - self.path_macs) / self.backbone_macs
        return out

    def to_json(self) -> dict:
        b = self.backbone_macs
        return {"backbone_macs": b, "expected_macs": self.expected_macs,
                "expected_fraction": None if self.expected_macs is None else self.expected_macs / b,
                "path_macs": self.path_macs,
                "path_fraction": None if self.path_macs is None else self.path_macs / b,
                "deploy_macs": list(self.deploy_macs),
                "deploy_fractions": [m / b for m in self.deploy_macs]}


def cheapest_costs(space: Space, costs: CostTable) -> tuple[float, float]:
    """(lowest expected MACs, lowest worst-case path MACs) any architecture of ``space`` can
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


def _fmt(macs: float, backbone: int) -> str:
    return f"{macs:,.0f} MACs ({macs / backbone:.3f} of the backbone's {backbone:,})"


def resolve_budget(space: Space, costs: CostTable, *, budget: str | float | None = None,
                   path_budget: str | float | None = None) -> Budget:
    """Budgets from the command line (``budget`` / ``path_budget``) or the space's ``search``
    settings; raises BudgetError when no architecture of the space can meet one."""
    backbone = costs.backbone()
    cfg = space.search
    if budget is not None:
        expected = parse_macs(budget, backbone=backbone, what="--budget")
    elif cfg.budget_macs is not None:
        expected = float(cfg.budget_macs)
    elif cfg.budget_fraction is not None:
        expected = cfg.budget_fraction * backbone
    else:
        expected = None
    if path_budget is not None:
        path = parse_macs(path_budget, backbone=backbone, what="--path-budget")
    elif cfg.max_path_fraction is not None:
        path = cfg.max_path_fraction * backbone
    else:
        path = None
    low_expected, low_path = cheapest_costs(space, costs)
    if expected is not None and expected < low_expected:
        raise BudgetError(f"budget {_fmt(expected, backbone)} is below the cheapest expected cost "
                          f"of any architecture in space {space.name!r}: {_fmt(low_expected, backbone)}"
                          " (every sample leaving at the first exit)")
    if path is not None and path < low_path:
        raise BudgetError(f"path budget {_fmt(path, backbone)} is below the cheapest worst-case "
                          f"path of any architecture in space {space.name!r}: {_fmt(low_path, backbone)}")
    return Budget(backbone_macs=backbone, expected_macs=expected, path_macs=path,
                  deploy_macs=deploy_budgets(space, backbone, expected, low_expected))


def deploy_budgets(space: Space, backbone: int, expected: float | None,
                   lowest: float) -> tuple[float, ...]:
    """``search.deploy_budgets`` in MACs, ascending (default: the search budget, else the
    backbone's MACs); each must lie between the cheapest reachable cost and the search budget."""
    values = space.search.deploy_budgets
    if values is None:
        return (float(expected if expected is not None else backbone),)
    out = []
    for i, v in enumerate(values):
        macs = parse_macs(v, backbone=backbone, what=f"search.deploy_budgets[{i}]")
        if expected is not None and macs > expected:
            raise BudgetError(f"search.deploy_budgets[{i}] {_fmt(macs, backbone)} is above the "
                              f"search budget {_fmt(expected, backbone)}")
        if macs < lowest:
            raise BudgetError(f"search.deploy_budgets[{i}] {_fmt(macs, backbone)} is below the "
                              f"cheapest expected cost of any architecture: {_fmt(lowest, backbone)}")
        out.append(macs)
    if len(set(out)) != len(out):
        raise BudgetError("search.deploy_budgets: lists a budget twice")
    return tuple(sorted(out))
