"""search/_budget.py: MACs budgets parsed, resolved against the backbone, the cheapest cost."""
from __future__ import annotations

import pytest


def test_parse_macs_units_and_errors():
    from exitnas.errors import BudgetError
    from exitnas.search import parse_macs

    assert parse_macs("0.6", backbone=1000) == 600.0
    assert parse_macs("1", backbone=1000) == 1000.0
    assert parse_macs("20M", backbone=1000) == 20e6
    assert parse_macs("1.5G", backbone=1000) == 1.5e9
    assert parse_macs("2500", backbone=1000) == 2500.0
    assert parse_macs("3k", backbone=1000) == 3000.0
    for bad in ("0", "-1", "12X", "", "M"):
        with pytest.raises(BudgetError):
            parse_macs(bad, backbone=1000)


def test_cheapest_cost_is_the_cheapest_first_exit(tiny_space):
    from exitnas.arch import Arch, Exit
    from exitnas.cost import cost_table
    from exitnas.errors import BudgetError
    from exitnas.search import cheapest_costs, resolve_budget

    costs = cost_table(tiny_space)
    brute = min(costs.exit_costs(Arch(depths=d, exits=(Exit(s, b, h),)))[0]
                for d in tiny_space.depth_settings() for s, b in tiny_space.positions(d)
                for h in tiny_space.exits.heads)
    low_expected, low_path = cheapest_costs(tiny_space, costs)
    assert low_expected == brute
    cheapest_head = min(costs.heads[(0, 0, h)] for h in tiny_space.exits.heads)
    assert low_path == costs.backbone((1, 1)) + cheapest_head  # min_exits = 1
    assert resolve_budget(tiny_space, costs, budget=str(brute)).expected == brute
    with pytest.raises(BudgetError, match=f"{brute:,}"):
        resolve_budget(tiny_space, costs, budget=str(brute - 1))
    b = resolve_budget(tiny_space, costs, budget="0.5", path_budget="0.95")
    assert (b.expected, b.path) == (0.5 * costs.backbone(), 0.95 * costs.backbone())
