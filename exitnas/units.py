"""Cost units and amounts written with them (``20M`` MACs, ``3.5ms``).

A cost model (:mod:`exitnas.cost`) measures in one :class:`Unit`. Every budget, table column,
study attribute, plot axis and manifest field names its unit: external names are
``<what>_<unit.key>`` (``expected_macs``, ``expected_ms``), so MACs runs keep the names they
always had.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BudgetError


@dataclass(frozen=True, kw_only=True)
class Unit:
    """``key``: the suffix of external names; ``label``: how numbers are shown; ``integer``:
    exact integers (sums stay exact); ``suffixes``: what a written amount may end with and the
    factor to this unit (``""``: a bare number > 1 is in this unit); ``examples``: amounts to
    show in error messages."""

    key: str
    label: str
    integer: bool
    suffixes: tuple[tuple[str, float], ...]
    examples: str

    def name(self, what: str) -> str:
        """The external name of ``what`` in this unit: ``expected`` -> ``expected_macs``."""
        return f"{what}_{self.key}"

    def show(self, value: float) -> str:
        return f"{value:,.0f} {self.label}" if self.integer else f"{value:,.4g} {self.label}"


MACS = Unit(key="macs", label="MACs", integer=True,
            suffixes=(("", 1.0), ("k", 1e3), ("m", 1e6), ("g", 1e9)), examples="20M or 1.5G")
MS = Unit(key="ms", label="ms", integer=False,
          suffixes=(("", 1.0), ("ms", 1.0), ("us", 1e-3), ("s", 1e3)), examples="3.5ms or 800us")
UNITS = {u.key: u for u in (MACS, MS)}

# a decimal number (no sign, no nan / inf), then letters; blanks around
_AMOUNT = re.compile(r"[ \t]*([0-9]{0,30}\.?[0-9]{1,30}(?:[eE][+-]?[0-9]{1,3})?)[ \t]*([a-zA-Z]{0,3})[ \t]*")


def unit_of(key: str) -> Unit:
    """The unit named ``key`` in a stored record; one line when unknown."""
    if key not in UNITS:
        raise BudgetError(f"unknown cost unit {key!r} (known: {', '.join(UNITS)})")
    return UNITS[key]


def amount_problem(text: str | float) -> str | None:
    """What is wrong with ``text`` as an amount in any unit (None: it reads), checked where a
    space is read, before the cost model's unit is known."""
    if isinstance(text, bool):
        return f"expected a number or a string such as 0.5, 20M or 3.5ms, got {text!r}"
    if isinstance(text, (int, float)):
        return None if math.isfinite(text) and text > 0 else f"{text!r} must be a number > 0"
    m = _AMOUNT.fullmatch(text)
    if not m:
        return f"{text[:80]!r} is not an amount such as 0.5, 20M or 3.5ms"
    if not any(m.group(2).lower() in dict(u.suffixes) for u in UNITS.values()):
        return f"{text[:80]!r}: unknown suffix {m.group(2)!r}"
    if float(m.group(1)) <= 0:
        return f"{text!r} must be > 0"
    return None


def parse_amount(text: str | float, *, unit: Unit, backbone: float, what: str) -> float:
    """``0.6`` -> 0.6 x ``backbone``; a number > 1 or one with a suffix of ``unit`` -> that
    amount in ``unit`` (``20M`` -> 2e7 MACs, ``800us`` -> 0.8 ms). A suffix of another unit is
    refused naming both (a ``3.5ms`` budget for a MACs cost model)."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BudgetError(f"{what} {text!r}: expected a number or a string such as "
                          f"{unit.examples}")
    if isinstance(text, (int, float)):
        value, suffix = float(text), ""
    else:
        m = _AMOUNT.fullmatch(text)
        if not m:
            shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "..."
            raise BudgetError(f"{what} {shown}: expected a fraction of the backbone (<= 1) or "
                              f"{unit.label} such as {unit.examples}")
        value, suffix = float(m.group(1)), m.group(2).lower()
    factors = dict(unit.suffixes)
    if suffix not in factors:
        other = next((u for u in UNITS.values() if suffix in dict(u.suffixes)), None)
        if other is not None:
            raise BudgetError(f"{what} {text!r} is in {other.label}, but the cost model "
                              f"measures {unit.label} (set cost.model, or write the budget in "
                              f"{unit.label} such as {unit.examples})")
        raise BudgetError(f"{what} {text!r}: unknown suffix {suffix!r} (for {unit.label}: "
                          f"{', '.join(s for s, _ in unit.suffixes if s)})")
    amount = value * backbone if suffix == "" and value <= 1.0 else value * factors[suffix]
    if not math.isfinite(amount):
        raise BudgetError(f"{what} {text!r}: not a finite number of {unit.label}")
    if value <= 0:
        raise BudgetError(f"{what} {text!r}: must be > 0")
    return amount
