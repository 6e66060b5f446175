"""Cost models (issue 16, item 1): units and budgets written with them, the ``table`` CSV read
by allowlist, the ``latency`` model measured with the runtime and cached, and a search scored
in ms end to end (study, front, picks, export manifest, runtime)."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_DATA, run_cli
from exitnas.cost import COST_MODELS, cost_table, mac_table
from exitnas.cost_csv import COLUMNS, read_table, table_rows, write_table
from exitnas.errors import BudgetError, ConfigError
from exitnas.space import load_space
from exitnas.units import MACS, MS, parse_amount
from search_support import tiny_run, trained_tiny  # noqa: F401

TINY = TEST_DATA / "tiny.yaml"
FAST_LATENCY = {"cost.model": "latency", "cost.rounds": 3, "cost.warmup": 1}


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- units and budgets -----------------------------------------------------------------------
def test_amounts_in_their_unit():
    assert parse_amount("3.5ms", unit=MS, backbone=10.0, what="b") == 3.5
    assert parse_amount("800us", unit=MS, backbone=10.0, what="b") == pytest.approx(0.8)
    assert parse_amount("2s", unit=MS, backbone=10.0, what="b") == 2000.0
    assert parse_amount("0.5", unit=MS, backbone=10.0, what="b") == 5.0   # a fraction
    assert parse_amount(7, unit=MS, backbone=10.0, what="b") == 7.0       # a bare amount > 1
    assert parse_amount("20M", unit=MACS, backbone=1e9, what="b") == 20e6
    assert parse_amount("1.5g", unit=MACS, backbone=1e9, what="b") == 1.5e9


@pytest.mark.parametrize("text, unit, words", [
    ("3.5ms", MACS, "is in ms, but the cost model measures MACs"),
    ("20M", MS, "is in MACs, but the cost model measures ms"),
    ("5 parsecs", MS, "expected a fraction"),
    ("4xy", MS, "unknown suffix 'xy'"),
    ("0ms", MS, "must be > 0"),
])
def test_amounts_refused_in_one_line(text, unit, words):
    with pytest.raises(BudgetError) as err:
        parse_amount(text, unit=unit, backbone=10.0, what="--budget")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("--budget")


@fuzz(400)
@given(st.one_of(st.text(max_size=24), st.floats(allow_nan=True), st.integers(-10, 10**30),
                 st.none(), st.booleans()))
def test_any_budget_text_is_an_amount_or_one_line(text):
    for unit in (MACS, MS):
        try:
            got = parse_amount(text, unit=unit, backbone=1000.0, what="--budget")
        except BudgetError as err:
            assert "\n" not in str(err)
        else:
            assert math.isfinite(got) and got > 0


def test_cost_section_is_checked():
    with pytest.raises(ConfigError, match="cost.model: unknown value 'flops' .known: fvcore_macs"):
        load_space(TINY, {"cost.model": "flops"})
    with pytest.raises(ConfigError, match="cost.table: cost.model 'table' needs cost.table"):
        load_space(TINY, {"cost.model": "table"})
    with pytest.raises(ConfigError, match="cost.table: a table is read by cost.model 'table'"):
        load_space(TINY, {"cost.table": "x.csv"})
    assert {"fvcore_macs", "latency", "table"} <= set(COST_MODELS.names())
    space = load_space(TINY)
    assert space.cost.model == "fvcore_macs" and cost_table(space) is mac_table(space)
    # the network is the same whatever measures its cost: runs and caches are shared
    assert load_space(TINY, FAST_LATENCY).fingerprint == space.fingerprint


def test_budget_in_ms_needs_an_ms_cost_model(tmp_path):
    from exitnas.search import resolve_budget

    space = load_space(TINY)
    with pytest.raises(BudgetError, match="is in ms, but the cost model measures MACs"):
        resolve_budget(space, cost_table(space), budget="2ms")
    with pytest.raises(ConfigError, match="search.budget: 'abc' is not an amount"):
        load_space(TINY, {"search.budget": "abc"})
    with pytest.raises(ConfigError, match=r"search.deploy_budgets\[1\]: '3xy': unknown suffix"):
        load_space(TINY, {"search.deploy_budgets": [0.5, "3xy"]})


def test_a_space_written_before_cost_models_still_loads(tmp_path):
    """Every stored config.yaml of an older run holds search.budget_macs (null or MACs)."""
    import yaml

    from exitnas.search import resolve_budget

    old = yaml.safe_load(TINY.read_text())
    old["search"]["budget_macs"] = None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    space = load_space(path)
    assert space.search.budget_macs is None and space.cost.model == "fvcore_macs"
    backbone = cost_table(space).backbone()
    old["search"]["budget_macs"] = 0.95 * backbone
    path.write_text(yaml.safe_dump(old))
    space = load_space(path)
    assert resolve_budget(space, cost_table(space)).expected == 0.95 * backbone
    with pytest.raises(ConfigError, match="search.budget_macs: set search.budget or"):
        load_space(path, {"search.budget": "0.5"})
    latency = load_space(path, FAST_LATENCY)
    from exitnas.cost import CostTable

    # an ms table by hand: the refusal needs no measurement
    ms = CostTable(unit=MS, stem=1.0, blocks=dict.fromkeys(mac_table(space).blocks, 1.0),
                   heads=dict.fromkeys(mac_table(space).heads, 0.1), final=0.5)
    with pytest.raises(BudgetError, match="search.budget_macs .* is in MACs, but the cost model "
                                          "measures ms"):
        resolve_budget(latency, ms)


# ---- the table model: a CSV checked by allowlist ---------------------------------------------
def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _valid_rows(space) -> list[list[str]]:
    rows = [list(COLUMNS)]
    for i, r in enumerate(table_rows(mac_table(space))):  # MACs as if measured in ms
        rows.append([str(r[c]) if c != "cost" else f"{0.01 * (i + 1):.4f}" for c in COLUMNS[:-1]]
                    + ["ms"])
    return rows


def test_table_model_reads_what_it_wrote_and_scores_with_it(tmp_path):
    space = load_space(TINY)
    path = tmp_path / "device.csv"
    path.write_text(_csv(_valid_rows(space)))
    table = cost_table(load_space(TINY, {"cost.model": "table", "cost.table": str(path)}))
    assert table.unit is MS and table.stem == pytest.approx(0.01)
    assert set(table.blocks) == set(mac_table(space).blocks)
    assert set(table.heads) == set(mac_table(space).heads)
    again = tmp_path / "again.csv"
    write_table(table, again)
    first, second = (read_table(p, mac_table(space), counted="x") for p in (again, path))
    assert first == second
    macs = tmp_path / "macs.csv"
    write_table(mac_table(space), macs)  # a MACs table stays exact integers
    assert read_table(macs, mac_table(space)).blocks == mac_table(space).blocks


@pytest.mark.parametrize("edit, words", [
    (lambda r: r[:1] + [r[1] + ["extra"]] + r[2:], ":2: 7 fields, expected 6"),
    (lambda r: [r[0][:-1] + ["units"]] + r[1:], ":1: the header must be"),
    (lambda r: r[:-1], "no row for 1 segment(s) of the space, first: final"),
    (lambda r: r + [r[-1]], ": final: listed twice"),
    (lambda r: r + [["block", "7", "0", "", "1.0", "ms"]], ": block 7 0: not a segment"),
    (lambda r: r[:2] + [r[2][:-1] + ["macs"]] + r[3:], "differs from the first row's 'ms'"),
    (lambda r: r[:2] + [r[2][:4] + ["-1", "ms"]] + r[3:], "cost '-1' is not a number in 0..1e+15"),
    (lambda r: r[:2] + [r[2][:4] + ["nan", "ms"]] + r[3:], "cost 'nan' is not a number"),
    (lambda r: r[:2] + [r[2][:4] + ["1e308", "ms"]] + r[3:], "cost '1e308' is not a number"),
    (lambda r: r[:2] + [r[2][:4] + ["1_0", "ms"]] + r[3:], "cost '1_0' is not a number"),
    (lambda r: r[:2] + [["block", "\u00b2", "0", "", "1", "ms"]] + r[3:], "index, got '\u00b2'"),
    (lambda r: r[:2] + [r[2][:3] + ["linear"] + r[2][4:]] + r[3:], "a block row has no head"),
    (lambda r: r[:1] + [x[:4] + ["0", "ms"] for x in r[1:]], "the plain backbone costs 0"),
    (lambda r: r[:1] + [r[1][:4] + ["7", "macs"]] + [x[:4] + ["1.5", "macs"] for x in r[2:]],
     ":3: cost '1.5': MACs are whole numbers"),
    (lambda r: r[:2] + [["blob"] + r[2][1:]] + r[3:], "segment 'blob' is not one of"),
])
def test_table_refusals_name_file_and_line(tmp_path, edit, words):
    space = load_space(TINY)
    path = tmp_path / "t.csv"
    path.write_text(_csv(edit(_valid_rows(space))))
    with pytest.raises(ConfigError) as err:
        read_table(path, mac_table(space))
    assert words in str(err.value) and str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_table_refuses_bytes_that_are_not_text(tmp_path):
    space = load_space(TINY)
    path = tmp_path / "t.csv"
    path.write_bytes(b"segment,stage\xff")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_table(path, mac_table(space))
    path.write_text("segment," + "x" * 200_000 + "\n")  # a field over csv's own limit
    with pytest.raises(ConfigError, match="not a CSV file"):
        read_table(path, mac_table(space))
    path.write_bytes(b"\xef\xbb\xbf" + _csv(_valid_rows(space)).encode())  # a spreadsheet's BOM
    assert read_table(path, mac_table(space)).unit is MS


@fuzz(300)
@given(st.data())
def test_any_edit_of_a_table_reads_or_is_one_line(tmp_path_factory, data):
    space = load_space(TINY)
    text = _csv(_valid_rows(space))
    kind = data.draw(st.sampled_from(["bytes", "cut", "replace"]))
    if kind == "bytes":
        at = data.draw(st.integers(0, len(text)))
        raw = text.encode()[:at] + data.draw(st.binary(max_size=8)) + text.encode()[at:]
    elif kind == "cut":
        raw = text.encode()[:data.draw(st.integers(0, len(text)))]
    else:
        lines = text.splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = data.draw(st.text(max_size=40))
        raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    path = tmp_path_factory.mktemp("fuzz") / "t.csv"
    path.write_bytes(raw)
    try:
        table = read_table(path, mac_table(space))
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert all(v >= 0 for v in [table.stem, table.final, *table.blocks.values(),
                                    *table.heads.values()])


# ---- the latency model ---------------------------------------------------------------------
def test_latency_is_measured_with_the_runtime_and_cached(tmp_path, monkeypatch):
    from exitnas import latency

    monkeypatch.setenv("EXITNAS_CACHE", str(tmp_path))
    space = load_space(TINY, FAST_LATENCY)
    table = cost_table(space)
    assert table.unit is MS and "pt2 backend at batch 1" in table.counted
    macs = mac_table(space)
    assert set(table.blocks) == set(macs.blocks) and set(table.heads) == set(macs.heads)
    assert all(v >= 0 for v in [table.stem, *table.blocks.values()])
    assert all(v > 0 for v in [table.final, *table.heads.values()])
    files = sorted(p.name for p in (tmp_path / "latency").iterdir())
    assert len(files) == 2 and files[0].endswith(".csv") and files[1].endswith(".json")
    record = json.loads((tmp_path / "latency" / files[1]).read_text())
    assert record["machine"] == latency.machine() and record["settings"]["backend"] == "pt2"
    assert len(record["medians_ms_per_batch"]) == 2 + len(macs.blocks) + len(macs.heads) + 1

    def measured_again(space):  # a spy: the cached table must be read, not measured
        raise AssertionError("measured again")

    monkeypatch.setattr(latency, "measure", measured_again)
    assert latency.cached_table(space) == table
    with pytest.raises(AssertionError, match="measured again"):  # other settings: other table
        latency.cached_table(load_space(TINY, {**FAST_LATENCY, "cost.batch": 4}))


def test_latency_fidelity_of_the_table_to_whole_exports_is_a_benchmark():
    """The check that predicted expected latency equals a whole export's measured latency is
    benchmarks/latency_fidelity.py (timings do not belong in unit tests); here only the
    C_k arithmetic: C_k grows along the exits and counts each head once."""
    from exitnas.arch import Arch
    from exitnas.cost import CostTable

    t = CostTable(unit=MS, stem=1.0, blocks={(0, 0): 2.0, (0, 1): 3.0, (1, 0): 4.0, (1, 1): 5.0},
                  heads={(0, 0, "linear"): 0.5, (1, 0, "linear"): 0.25}, final=0.125)
    arch = Arch.from_id("d2.2~s0b0=linear,s1b0=linear~max_softmax=0.5,0.5")
    assert t.exit_costs(arch) == [3.5, 10.75, 15.875]


# ---- a search scored in ms, end to end -------------------------------------------------------
def test_search_export_and_runtime_in_ms(tiny_run, tmp_path, monkeypatch):
    from exitnas.deploy import deploy_picks
    from exitnas.export import export_run
    from exitnas.rundir import RunDir
    from exitnas.runtime import load
    from exitnas.search import SearchOptions, run_search
    from search_support import study_of

    monkeypatch.setenv("EXITNAS_CACHE", str(tmp_path / "cache"))
    run = RunDir(tiny_run)
    space = run.init(run.space(FAST_LATENCY))
    table = cost_table(space)
    budget = f"{0.9 * table.backbone():.6f}ms"
    result = run_search(tiny_run, SearchOptions(trials=24, budget=budget), log=None)
    study = study_of(tiny_run)
    assert study.metric_names == ["accuracy", "expected_ms"]
    stored = study.user_attrs["exitnas"]["budget"]
    assert stored["unit"] == "ms" and stored["expected_ms"] == pytest.approx(0.9 * table.backbone(), rel=1e-5)
    t = study.best_trials[0]
    assert set(t.constraints) >= {"expected_ms"} and t.user_attrs["cost_unit"] == "ms"
    assert t.user_attrs["ms"] == t.values[1]
    header = (tiny_run / "search" / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("trial,arch_id,accuracy,expected_ms,relative_cost,path_ms")
    assert result.front and all(r["expected_ms"] <= stored["expected_ms"] for r in result.front)
    pick = deploy_picks(run)[-1]
    assert pick.unit is MS and pick.to_json()["budget_ms"] == stored["expected_ms"]
    out = export_run(run, pick.arch, tmp_path / "export").out
    manifest = json.loads((out / "arch.json").read_text())
    assert manifest["cost"]["unit"] == "ms" and manifest["cost"]["model"] == "latency"
    assert [e["cost"] for e in manifest["exits"]] == pytest.approx(table.exit_costs(pick.arch))
    assert [e["macs"] for e in manifest["exits"]] == mac_table(space).exit_costs(pick.arch)
    p = load(out)
    assert p.cost_unit == "ms"
    import numpy as np

    res = p.predict(np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    assert res.cost.tolist() == pytest.approx(np.asarray(table.exit_costs(pick.arch))[res.exit].tolist())
    # the same study cannot be continued under another cost model
    run.init(run.space({"cost.model": "fvcore_macs"}))
    with pytest.raises(Exception, match="was run with another budget"):
        run_search(tiny_run, SearchOptions(trials=30), log=None)


def test_space_cost_writes_the_table_the_table_model_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITNAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "device.csv"
    proc = run_cli("cost", TINY, "--set", "cost.model=latency", "--set", "cost.rounds=3",
                   "--set", "cost.warmup=0", "--table-out", out, "--format", "json",
                   env={"EXITNAS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cost_unit"] == "ms" and data["backbone_ms"] > 0
    space = load_space(TINY, {"cost.model": "table", "cost.table": str(out)})
    assert cost_table(space).backbone() == pytest.approx(data["backbone_ms"])
    bad = run_cli("cost", TINY, "--set", "cost.model=table", "--set",
                  f"cost.table={tmp_path / 'missing.csv'}")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "missing.csv: cannot read the cost table" in bad.stderr
