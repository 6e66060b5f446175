"""Cost model ``table``: per-segment costs from a CSV measured on the target device.

The HADAS / AEBNAS lookup-table idea: time (or meter) every segment once on the device that will
run the network, then search on any machine. The CSV has exactly the columns of
:data:`COLUMNS`, one row per segment of the space and no other rows::

    segment,stage,block,head,cost,unit
    stem,,,,0.021,ms
    block,0,0,,0.034,ms
    head,0,0,linear,0.004,ms
    final,,,,0.006,ms

``unit`` is one of :data:`exitnas.units.UNITS` and the same on every row; costs are finite and
>= 0. ``exitnas cost SPACE --set cost.model=latency --table-out FILE`` writes this format from a
measurement with the runtime (``latency``'s cache is the same format). The file is checked by allowlist: anything
else (another column, a segment the space does not have, one it lacks, a second row for one
segment) is one ConfigError naming the file, line and value.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .cost import COST_MODELS, CostModel, CostTable
from .errors import ConfigError
from .units import UNITS, Unit

if TYPE_CHECKING:
    from .space import Space

COLUMNS = ("segment", "stage", "block", "head", "cost", "unit")
MAX_BYTES = 4 << 20  # a table is one row per segment: a few KiB
MAX_COST = 1e15      # above any real segment (1e15 MACs, 30 years in ms); sums stay finite
_INDEX = re.compile(r"[0-9]{1,6}")
_NUMBER = re.compile(r"[0-9]{1,20}(\.[0-9]{0,20})?([eE][+-]?[0-9]{1,3})?")


def table_rows(table: CostTable) -> list[dict]:
    """The CSV rows of ``table`` (COLUMNS order)."""
    u = table.unit.key
    rows = [{"segment": "stem", "stage": "", "block": "", "head": "", "cost": table.stem, "unit": u}]
    rows += [{"segment": "block", "stage": s, "block": b, "head": "", "cost": c, "unit": u}
             for (s, b), c in sorted(table.blocks.items())]
    rows += [{"segment": "head", "stage": s, "block": b, "head": h, "cost": c, "unit": u}
             for (s, b, h), c in sorted(table.heads.items())]
    rows.append({"segment": "final", "stage": "", "block": "", "head": "", "cost": table.final,
                 "unit": u})
    return rows


def write_table(table: CostTable, path: Path) -> None:
    """``table`` as a CSV this model reads back (atomic)."""
    from .io import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows({**r, "cost": repr(float(r["cost"]))} for r in table_rows(table))
    atomic_write_text(Path(path), buf.getvalue())


def _index(text: str, where: str) -> int:
    if not _INDEX.fullmatch(text):
        raise ConfigError(f"expected a block / stage index, got {text[:40]!r}", file=where)
    return int(text)


def read_table(path: str | Path, expected: CostTable, *, counted: str = "") -> CostTable:
    """Read ``path`` into a table with exactly ``expected``'s segments (module docs)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read the cost table ({err.strerror or err})", file=str(path)) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"larger than {MAX_BYTES} bytes", file=str(path))
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not a header
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", file=str(path)) from None
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise ConfigError(f"not a CSV file ({err})", file=str(path)) from None
    if not lines or tuple(lines[0]) != COLUMNS:
        raise ConfigError(f"the header must be {','.join(COLUMNS)}", file=f"{path}:1")
    want = {("stem",): None, ("final",): None}
    want.update({("block", s, b): None for s, b in expected.blocks})
    want.update({("head", s, b, h): None for s, b, h in expected.heads})
    got: dict[tuple, float] = {}
    unit: Unit | None = None
    for n, row in enumerate(lines[1:], start=2):
        where = f"{path}:{n}"
        if len(row) != len(COLUMNS):
            raise ConfigError(f"{len(row)} fields, expected {len(COLUMNS)}", file=where)
        segment, stage, block, head, value, key = row
        if segment in ("stem", "final"):
            if stage or block or head:
                raise ConfigError(f"a {segment} row has no stage, block or head", file=where)
            seg: tuple = (segment,)
        elif segment == "block":
            if head:
                raise ConfigError("a block row has no head", file=where)
            seg = ("block", _index(stage, where), _index(block, where))
        elif segment == "head":
            seg = ("head", _index(stage, where), _index(block, where), head)
        else:
            raise ConfigError(f"segment {segment[:40]!r} is not one of stem, block, head, final",
                              file=where)
        name = " ".join(str(p)[:40] for p in seg)
        if seg not in want:
            raise ConfigError(f"{name}: not a segment of the space", file=where)
        if seg in got:
            raise ConfigError(f"{name}: listed twice", file=where)
        if key not in UNITS:
            raise ConfigError(f"unit {key[:40]!r} is not one of {', '.join(UNITS)}", file=where)
        if unit is not None and UNITS[key] is not unit:
            raise ConfigError(f"unit {key!r} differs from the first row's {unit.key!r}", file=where)
        unit = UNITS[key]
        cost = float(value) if _NUMBER.fullmatch(value) else math.nan
        if not math.isfinite(cost) or not 0 <= cost <= MAX_COST:
            raise ConfigError(f"cost {value[:40]!r} is not a number in 0..{MAX_COST:g}",
                              file=where)
        if unit.integer and not cost.is_integer():
            raise ConfigError(f"cost {value[:40]!r}: {unit.label} are whole numbers", file=where)
        got[seg] = int(cost) if unit.integer else cost
    missing = [s for s in want if s not in got]
    if missing:
        raise ConfigError(f"no row for {len(missing)} segment(s) of the space, first: "
                          f"{' '.join(map(str, missing[0]))}", file=str(path))
    if got[("stem",)] + got[("final",)] + sum(v for k, v in got.items() if k[0] == "block") <= 0:
        raise ConfigError("the plain backbone costs 0: budgets and relative costs divide by it",
                          file=str(path))
    return CostTable(unit=unit, stem=got[("stem",)], final=got[("final",)],
                     blocks={k[1:]: v for k, v in got.items() if k[0] == "block"},
                     heads={k[1:]: v for k, v in got.items() if k[0] == "head"},
                     counted=counted or f"per-segment costs read from {path.name}")


@COST_MODELS.register("table")
class TableCosts(CostModel):
    """Costs read from ``cost.table`` (a CSV, module docs), in the file's unit."""

    def check(self, cfg) -> None:
        if cfg.table is None:
            raise ConfigError("cost.model 'table' needs cost.table: the CSV of per-segment "
                              "costs", path="table")

    def table(self, space: Space) -> CostTable:
        from .cost import mac_table

        return read_table(space.cost.table, mac_table(space))
