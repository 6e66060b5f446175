"""Property-based fuzz of every command that parses user input (issue 12, item 2).

Each generated case calls ``exitnas.cli.main`` in-process with stdout / stderr captured:
space files (random bytes, byte and line edits, truncation at every line, deleted /
duplicated / renamed keys, values of the wrong type, huge numbers, NaN, inf, -0.0, unicode,
deep nesting), arch ids and arch JSON (inline and as files), ``--set`` overrides, MACs
budgets, run directories and exports with missing, empty, truncated, garbled or swapped files,
and command-line flags. Every case must

- exit 0 or 2 (1 is ``exitnas: internal error``: a bug to fix, never a pass);
- on exit 2 print exactly one line on stderr and leave every file under the case's folder
  byte-for-byte as it was (no file changed, removed or added);
- on exit 0 change nothing but the command's own outputs (``may_write``);
- never print a traceback.

Hypothesis runs derandomized with no example database, so CI sees the same cases each run.
Arguments never hold NUL (a real command line cannot). A few cases run through
``python -m exitnas`` to show the real entry point behaves as ``main`` does.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
import io
import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, SPACES, TEST_DATA, run_cli, tree_digest
from exitnas.cli import main

TINY = TEST_DATA / "tiny.yaml"
BASES = {p.name: p.read_text() for p in (TINY, *sorted(SPACES.glob("*.yaml")))}
_FAST_DUMP = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
TREES = {name: yaml.safe_load(text) for name, text in BASES.items()}
ARCH = "d2.2~s0b1=conv~max_softmax=0.8"
COUNTS: collections.Counter = collections.Counter()
SECONDS: collections.Counter = collections.Counter()  # time inside main, per group
SLOWEST: list = []
GROUPS = {"space_bytes", "space_lines", "space_tree", "space_cost", "arch_id", "arch_json",
          "set", "finetune", "budget", "run_dir", "export_dir", "weights", "flags"}
MIN_CASES = 3000


def fuzz(n: int):
    """Hypothesis settings of one strategy: ``n`` examples, deterministic, no deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- the property every case must hold -----------------------------------------------------
def check(group: str, argv: list, tree: Path, *,
          may_write: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``exitnas ARGV`` in-process and assert the contract; returns (status, stderr)."""
    argv = [str(a) for a in argv]
    before = tree_digest(tree)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    seconds = time.perf_counter() - start
    after = tree_digest(tree)
    COUNTS[group] += 1
    SECONDS[group] += seconds
    SLOWEST.append((seconds, code, argv[:2] + [a[-40:] for a in argv[2:]]))
    text = err.getvalue()
    shown = f"exitnas {argv!r} -> exit {code}\nstderr: {text[-2000:]}"
    assert code in (0, 2), shown
    assert "Traceback" not in text and "internal error" not in text, shown
    if code == 2:
        lines = text.splitlines()
        assert len(lines) == 1 and lines[0].startswith("exitnas"), shown
        assert after == before, f"{shown}\nchanged: {_changed(before, after)}"
    else:
        stray = [k for k in _changed(before, after)
                 if not any(fnmatch.fnmatch(k, pat) for pat in may_write)]
        assert not stray, f"{shown}\nchanged outside {may_write}: {stray}"
    return code, text


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    """Where case folders live: tmpfs when there is one (a folder made and removed per case
    costs ~3 ms on this machine's disk, 0.1 ms there)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="exitnas-fuzz-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def case_dir(scratch: Path):
    path = Path(tempfile.mkdtemp(dir=scratch))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(scratch) -> Path:
    """A tiny run with every step done (supernet, 4 search trials, one retrain, one export
    without ONNX), built once and copied for each case."""
    from exitnas.arch import Arch
    from exitnas.export import export_run
    from exitnas.retrain import retrain
    from exitnas.rundir import RunDir
    from exitnas.search import SearchOptions, run_search
    from exitnas.space import load_space
    from exitnas.train import train_supernet

    root = scratch / "trained" / "run"
    space = load_space(TINY, {"supernet.epochs": 1, "retrain.epochs": 2,
                              "data.synthetic_size": 64, "supernet.bn_calib_batches": 1,
                              "supernet.random_subnets": 0})
    run = RunDir(root)
    run.init(space)
    train_supernet(run, space, log=None)
    with open(os.devnull, "w") as quiet:
        run_search(root, SearchOptions(trials=4), log=quiet)
    arch = Arch.from_id(ARCH)
    retrain(run, arch, space=space, log=None)
    export_run(run, arch, root / "export" / "good", onnx=False)
    return root


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)
    return path


@pytest.fixture(scope="session")
def busy_port():
    """A loopback port that is taken, so `exitnas dashboard` reads everything, then fails
    to bind instead of serving forever."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def copy_run(trained_run: Path, where: Path) -> Path:
    run = where / "run"
    shutil.copytree(trained_run, run)
    return run


# ---- value strategies ---------------------------------------------------------------------
HUGE = st.sampled_from([10**7, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63 - 1,
                        10**30, 10**400, -10**30, 1e308, -1e308, 1.7976931348623157e308,
                        5e-324, 1e-320])
SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0])
UNICODE = st.text(st.characters(exclude_categories=()), min_size=1, max_size=12)


def nest(depth: int, leaf=1):
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"k": leaf}
    return leaf


WEIRD = st.one_of(
    HUGE, SPECIAL, UNICODE, st.none(), st.booleans(), st.integers(-3, 9),
    st.floats(allow_nan=True, allow_infinity=True), st.text(string.printable, max_size=10),
    st.lists(st.integers(-2, 5), max_size=4), st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-1, 3), max_size=3),
    st.binary(max_size=6), st.integers(2, 40).map(nest), st.just([[0, 0]]),
    st.sampled_from(["all", "linear", "resnet", "basic", "max_softmax", "1e-3", "1e999", ""]),
)
# small, valid-looking numbers only: a space passed to `cost` must stay cheap to build
SMALL = st.one_of(HUGE, SPECIAL, st.integers(-2, 4), st.floats(-1, 2), st.booleans(),
                  st.none(), st.text(max_size=6), st.lists(st.integers(-1, 4), max_size=3))


def _paths(node, prefix=()):
    """Every (path, value) in a nested YAML structure, the root first."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_tree(draw, base, values=WEIRD, max_edits: int = 3):
    """A YAML structure with 1..max_edits edits: delete, rename, replace, wrap."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        paths = [p for p, _ in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        op = draw(st.sampled_from(["delete", "rename", "replace", "replace", "wrap"]))
        if op == "delete":
            del parent[last]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(st.just(str(last) + "s"), st.just(str(last).upper()),
                                 st.just(str(last)[:-1]), UNICODE, st.integers(0, 3)))
            parent[new] = parent.pop(last)
        elif op == "wrap":
            parent[last] = draw(st.sampled_from([[parent[last]], {"value": parent[last]}]))
        else:  # a copy: a later edit inside it must not change the strategy's constant
            parent[last] = copy.deepcopy(draw(values))
    return data


def dump(data, draw) -> bytes:
    style = dict(allow_unicode=draw(st.booleans()), sort_keys=False,
                 default_flow_style=draw(st.sampled_from([False, None, True])))
    try:  # libyaml's emitter is fast; it refuses lone surrogates, which PyYAML's escapes
        text = yaml.dump(data, Dumper=_FAST_DUMP, **style)
    except yaml.YAMLError:
        text = yaml.safe_dump(data, **style)
    return text.encode("utf-8", "surrogatepass")


def line_edit(text: str, draw) -> bytes:
    """One text-level edit: duplicate / drop / swap / indent a line, or insert a snippet."""
    lines = text.splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    j = draw(st.integers(0, len(lines) - 1))
    snippet = draw(st.sampled_from([
        "a: " + "[" * 40 + "]" * 40 + "\n", "a: " + "[" * 5000 + "\n",
        "x: " + "{a: " * 60 + "1" + "}" * 60 + "\n", "name: &a [1, 2]\nversion: *a\n",
        "b: &b [x, x, x, x, x, x, x, x, x]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\nname: [*d, *d, *d, *d, *d, *d, *d]\n",
        "num_classes: " + "9" * 5000 + "\n", "num_classes: 0x" + "f" * 200 + "\n",
        "version: 1:30:00\n", "name: !!python/object/apply:os.system [echo pwned]\n",
        "name: !!binary aGVsbG8=\n", "name: 2001-12-14t21:59:43.10-05:00\n",
        "\t- 1\n", "? [a, b]\n: 1\n", "<<: {name: x}\n", "name: *missing\n", "%YAML 1.1\n---\n",
        "---\n---\n", "...\n", "\x00\n", "\x07bell: 1\n", "name: \"\\ud800\"\n",
        "name: \"a\\u2028b\"\n", "\ufeffname: x\n", "name: |\n  a\n  b\n",
    ]))
    op = draw(st.sampled_from(["dup", "drop", "swap", "indent", "insert", "crlf", "tabs"]))
    if op == "dup":
        lines.insert(i, lines[i])
    elif op == "drop":
        del lines[i]
    elif op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "indent":
        lines[i] = " " * draw(st.integers(1, 5)) + lines[i]
    elif op == "insert":
        lines.insert(i, snippet)
    elif op == "crlf":
        lines = [ln.replace("\n", "\r\n") for ln in lines]
    else:
        lines = [ln.replace("  ", "\t") for ln in lines]
    return "".join(lines).encode("utf-8", "surrogatepass")


@st.composite
def space_bytes(draw) -> bytes:
    """Random bytes, a valid file with bytes inserted / replaced / cut, or a re-encoding."""
    base = BASES[draw(st.sampled_from(sorted(BASES)))].encode()
    kind = draw(st.sampled_from(["random", "insert", "replace", "cut", "encode", "prefix"]))
    if kind == "random":
        return draw(st.binary(max_size=400))
    pos = draw(st.integers(0, len(base)))
    junk = draw(st.binary(min_size=1, max_size=16))
    if kind == "insert":
        return base[:pos] + junk + base[pos:]
    if kind == "replace":
        return base[:pos] + junk + base[pos + len(junk):]
    if kind == "cut":
        return base[:pos]
    if kind == "prefix":
        return junk + base
    codec = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252", "utf-8-sig"]))
    text = base.decode()
    if codec in ("latin-1", "cp1252"):
        text = text.replace("name: ", "name: café ", 1)
    return text.encode(codec)


# ---- space files ---------------------------------------------------------------------------
@fuzz(500)
@given(data=space_bytes())
def test_space_check_on_random_and_damaged_bytes(data, scratch):
    with case_dir(scratch) as d:
        path = d / "space.yaml"
        path.write_bytes(data)
        check("space_bytes", ["space", "check", path], d)


@fuzz(450)
@given(data=st.data())
def test_space_check_on_line_edits(data, scratch):
    name = data.draw(st.sampled_from(sorted(BASES)))
    body = line_edit(BASES[name], data.draw)
    with case_dir(scratch) as d:
        path = d / "space.yaml"
        path.write_bytes(body)
        check("space_lines", ["space", "check", path], d)


def test_space_check_on_every_truncation_at_a_line(scratch):
    """Every base space cut after each of its lines (and mid-line) parses or fails in one line."""
    for name, text in BASES.items():
        lines = text.splitlines(keepends=True)
        for i in range(len(lines) + 1):
            for cut in ("".join(lines[:i]), "".join(lines[:i]) + lines[i][: len(lines[i]) // 2]
                        if i < len(lines) else None):
                if cut is None:
                    continue
                with case_dir(scratch) as d:
                    path = d / "space.yaml"
                    path.write_text(cut)
                    check("space_lines", ["space", "check", path], d)


@fuzz(700)
@given(data=st.data())
def test_space_check_on_structural_edits(data, scratch):
    name = data.draw(st.sampled_from(sorted(BASES)))
    tree = data.draw(mutated_tree(TREES[name]))
    with case_dir(scratch) as d:
        path = d / "space.yaml"
        path.write_bytes(dump(tree, data.draw))
        check("space_tree", ["space", "check", path], d)


def _cost_on_structural_edits(data, scratch):
    """`cost` builds the network, so edits keep numbers small (or absurd, which is refused)."""
    tree = data.draw(mutated_tree(TREES["tiny.yaml"], values=SMALL, max_edits=2))
    with case_dir(scratch) as d:
        path = d / "space.yaml"
        path.write_bytes(dump(tree, data.draw))
        check("space_cost", ["cost", path, "--format", data.draw(st.sampled_from(["table", "json"]))],
              d)


@fuzz(30)
@given(data=st.data())
def test_cost_on_structural_edits(data, scratch):
    _cost_on_structural_edits(data, scratch)


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_cost_on_structural_edits_more(data, scratch):
    """Many more of the cases above (CI's slow run)."""
    _cost_on_structural_edits(data, scratch)


# ---- arch ids and arch JSON ----------------------------------------------------------------
INT_TOK = st.one_of(st.integers(0, 3).map(str), st.sampled_from(
    ["", "01", "-1", "+1", "1e3", "9" * 30, "\u0663", "1_0", " 1", "1.", "..", "0x1"]))
NUM_TOK = st.one_of(
    st.floats(0, 1).map(lambda v: f"{v:.4g}"), st.floats(allow_nan=True).map(repr),
    st.integers(-5, 5).map(str),
    st.sampled_from(["0.5.5", "1..", ".", "", "1e999", "-0", "nan", "inf", "1e-999", "0x1p-1",
                     ".5", "5.", "+1", "1e", "e5", "\uff15", "0.5 ", "1" * 400]))
NAME_TOK = st.sampled_from(["linear", "conv", "mlp", "sdn_pool", "lstm", "", "Linear", "l" * 90,
                            "caf\u00e9", "a b", "x=y", "max_softmax", "entropy", "patience",
                            "oracle"])
SEP = st.sampled_from(["~"] * 10 + ["", "~~", "-", " ~ ", "\u223c"])
EXIT_TOK = st.one_of(st.builds(lambda s, b, h: f"s{s}b{b}={h}", INT_TOK, INT_TOK, NAME_TOK),
                     st.text(max_size=8))


@st.composite
def arch_ids(draw) -> str:
    from exitnas.arch import sample_arch
    from exitnas.space import load_space

    kind = draw(st.sampled_from(["grammar", "grammar", "grammar", "mutate", "mutate", "valid",
                                 "text"]))
    if kind == "text":
        return draw(st.text(st.characters(exclude_characters="\x00"), max_size=60))
    if kind in ("valid", "mutate"):
        space = _tiny_space()
        arch_id = sample_arch(space, random.Random(draw(st.integers(0, 10**6)))).id
        if kind == "valid":
            return arch_id
        chars = list(arch_id)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(chars)))
            c = draw(st.sampled_from(list("d0123456789.~,=sb_-+eE x\u00e9") + ["~none~", "..."]))
            op = draw(st.sampled_from(["insert", "delete", "replace"]))
            if op == "insert" or not chars:
                chars.insert(i, c)
            elif op == "delete":
                del chars[min(i, len(chars) - 1)]
            else:
                chars[min(i, len(chars) - 1)] = c
        return "".join(chars)
    depths = ".".join(draw(st.lists(INT_TOK, max_size=3)))
    exits = draw(st.one_of(st.just("none"), st.lists(EXIT_TOK, min_size=1, max_size=3)
                           .map(",".join)))
    values = ",".join(draw(st.lists(NUM_TOK, max_size=3)))
    policy = draw(NAME_TOK)
    eq = draw(st.sampled_from(["="] * 6 + ["", "=="]))
    return f"d{depths}{draw(SEP)}{exits}{draw(SEP)}{policy}{eq}{values}"


_SPACE_CACHE: dict = {}


def _tiny_space():
    if "tiny" not in _SPACE_CACHE:
        from exitnas.space import load_space

        _SPACE_CACHE["tiny"] = load_space(TINY)
    return _SPACE_CACHE["tiny"]


@fuzz(900)
@given(arch=arch_ids(), fmt=st.sampled_from(["table", "json"]))
def test_cost_on_arch_ids(arch, fmt, scratch):
    with case_dir(scratch) as d:
        space = d / "space.yaml"
        shutil.copy(TINY, space)
        check("arch_id", ["cost", space, "--arch", arch, "--format", fmt], d)


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 5), HUGE, SPECIAL, st.floats(),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@st.composite
def arch_json(draw) -> bytes:
    """A valid arch's JSON with edits, any JSON value, deep nesting, or non-UTF-8 bytes."""
    from exitnas.arch import sample_arch

    doc = sample_arch(_tiny_space(), random.Random(draw(st.integers(0, 10**6)))).to_json()
    kind = draw(st.sampled_from(["edit", "edit", "edit", "any", "deep", "bytes", "wrapped"]))
    if kind == "any":
        return json.dumps(draw(JSON_VALUE)).encode()
    if kind == "deep":
        n = draw(st.sampled_from([30, 500, 5000, 100000]))
        return (("[" * n + "]" * n) if draw(st.booleans()) else ('{"a":' * n + "1" + "}" * n)
                ).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=60)) + json.dumps(doc).encode()[draw(st.integers(0, 40)):]
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUE)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["extra", "Depths", "ID"]))] = 1
    if kind == "wrapped":
        doc = {"arch": doc, "format": "exitnas-export"}
    return json.dumps(doc, allow_nan=True).encode()


@fuzz(400)
@given(doc=arch_json(), as_file=st.booleans())
def test_cost_on_arch_json(doc, as_file, scratch):
    with case_dir(scratch) as d:
        space = d / "space.yaml"
        shutil.copy(TINY, space)
        if as_file or not doc.lstrip().startswith(b"{") or b"\x00" in doc:
            (d / "arch.json").write_bytes(doc)
            arch = d / "arch.json"
        else:
            arch = doc.decode("utf-8", "surrogateescape")
        check("arch_json", ["cost", space, "--arch", arch], d)


def _config_keys() -> list[str]:
    from exitnas.cli.config import reference_rows

    return sorted({k for k, *_ in reference_rows() if "[]" not in k})


KEYS = _config_keys()
SET_VALUES = st.one_of(
    st.sampled_from(["1", "0", "-1", "2", "0.5", "1e-3", "1e999", ".nan", ".inf", "-.inf",
                     "-0.0", "nan", "[1, 2]", "[]", "{}", "{a: 1, a: 2}", "[" * 100,
                     "[" * 50 + "]" * 50, "!!python/object/apply:os.system [echo pwned]",
                     "9" * 50, "9" * 5000, "0x" + "f" * 100, "~", "null", "true", "yes", "on",
                     "2001-12-14", "!!binary aGk=", "&a [*a]", "*x", "'open", '"\\ud800"',
                     "caf\u00e9", "a\nb", "\t", "sgd", "adamw", "mixed", "digits", "synthetic",
                     "cifar10", "imagefolder", "linear", "[linear, lstm]", "[[0, 0]]", "all",
                     "[max_softmax]", "[0.5, 0.4]", "'1'"]),
    st.text(st.characters(exclude_characters="\x00"), max_size=12),
    st.integers(-2, 2**70).map(str), st.floats().map(repr))


@st.composite
def set_items(draw) -> list[str]:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(
            st.sampled_from([k for k in KEYS if k != "retrain.regime"]),
            st.sampled_from(KEYS).map(lambda k: k + "x"), st.sampled_from(KEYS).map(str.upper),
            st.sampled_from(["", ".", "a..b", "supernet.", ".epochs", "backbone.stages.0",
                             "backbone.stages[0].channels", " supernet.epochs ", "name.x"]),
            st.text(st.characters(exclude_characters="\x00="), max_size=10)))
        if draw(st.integers(0, 9)) == 0:
            items.append(key)  # no '='
        else:
            items.append(f"{key}={draw(SET_VALUES)}")
    return items


def _retrain_on_set_overrides(items, trained_run, scratch):
    """`retrain` of the run's finished arch: an override it accepts finds the retrain done
    (retrain.regime, which would start a new one, is left out); one it refuses fails in one
    line before anything is read or written."""
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        argv = ["retrain", run, "--arch", ARCH]
        for item in items:
            argv += ["--set", item]
        check("set", argv, d)


@fuzz(60)
@given(items=set_items())
def test_retrain_on_set_overrides(items, trained_run, scratch):
    _retrain_on_set_overrides(items, trained_run, scratch)


@pytest.mark.slow
@fuzz(250)
@given(items=set_items())
def test_retrain_on_set_overrides_more(items, trained_run, scratch):
    """Many more of the cases above (CI's slow run)."""
    _retrain_on_set_overrides(items, trained_run, scratch)


@pytest.fixture(scope="session")
def foreign_run(scratch) -> Path:
    """A run directory initialised for another space (quickstart): `run`, `train-supernet`
    and `train-backbone` of tiny.yaml parse and validate every override, then refuse the
    directory."""
    from exitnas.rundir import RunDir
    from exitnas.space import load_space

    root = scratch / "foreign" / "run"
    RunDir(root).init(load_space(SPACES / "quickstart.yaml"))
    return root


@fuzz(250)
@given(items=set_items(), cmd=st.sampled_from(["run", "train-supernet", "train-backbone"]))
def test_run_and_train_supernet_on_set_overrides(items, cmd, foreign_run, scratch):
    with case_dir(scratch) as d:
        run = d / "run"
        shutil.copytree(foreign_run, run)
        argv = [cmd, TINY, "--run-dir", run]
        for item in items:
            argv += ["--set", item]
        check("set", argv, d)


def _finetune_case(arch, items, trained_run, scratch):
    argv = ["finetune", "RUN", "--arch", arch, "--resume"]
    for item in items:
        argv += ["--set", item]
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        check("finetune", [run if a == "RUN" else a for a in argv], d)


@fuzz(120)
@given(arch=st.one_of(arch_ids(), st.just(ARCH)), items=st.lists(set_items(), max_size=1)
       .map(lambda x: x[0] if x else []))
def test_finetune_on_arch_ids_and_set_overrides(arch, items, trained_run, scratch):
    """`finetune --resume` with no fine-tuning checkpoint yet: the arch and every override
    are parsed and checked, then the run is refused in one line; nothing trains."""
    _finetune_case(arch, items, trained_run, scratch)


@pytest.mark.slow
@fuzz(400)
@given(arch=st.one_of(arch_ids(), st.just(ARCH)), items=st.lists(set_items(), max_size=1)
       .map(lambda x: x[0] if x else []))
def test_finetune_on_arch_ids_and_set_overrides_more(arch, items, trained_run, scratch):
    """Many more of the cases above (CI's slow run)."""
    _finetune_case(arch, items, trained_run, scratch)


# ---- budgets ------------------------------------------------------------------------------
BUDGETS = st.one_of(
    st.sampled_from(["20M", "1e99", "-1", "nan", "0", "inf", "-inf", "1e999", "0.9", "1", "1.0",
                     "1.5G", "", " ", "0.0", "-0", "1e-999", "5e-324", "20 M", "20MB", "20m",
                     "1,5", "0.5.5", "1e3K", "9" * 400, "1" * 40 + "G", "\u0662\u0660M", "0x10",
                     "1/2", "50%", "20M ", " 0.9", "0.9\n", "1e308G", "NaN", "1_000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.builds(lambda v, s: f"{v:g}{s}", st.floats(-10, 1e12), st.sampled_from(["", "K", "M", "G"])),
    st.text(st.characters(exclude_characters="\x00"), max_size=8))


def _search_on_budgets(budget, path, trained_run, scratch):
    """`search` on a study that already holds its 4 trials: a budget other than the study's
    is refused in one line (and the storage untouched); the study's own budget runs no trial
    and rewrites the search outputs."""
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        argv = ["search", run, "--trials", "4", "--budget", budget]
        if path is not None:
            argv += ["--path-budget", path]
        check("budget", argv, d, may_write=("search/*",))


@fuzz(60)
@given(budget=BUDGETS, path=st.one_of(st.none(), BUDGETS))
def test_search_on_budgets(budget, path, trained_run, scratch):
    _search_on_budgets(budget, path, trained_run, scratch)


@pytest.mark.slow
@fuzz(300)
@given(budget=BUDGETS, path=st.one_of(st.none(), BUDGETS))
def test_search_on_budgets_more(budget, path, trained_run, scratch):
    """Many more of the cases above (CI's slow run)."""
    _search_on_budgets(budget, path, trained_run, scratch)


# ---- run directories and exports ----------------------------------------------------------
def corrupt(run: Path, rel: str, op: str, draw) -> None:
    """Damage ``run/rel``: delete, empty, truncate, garble, swap with another file, edit."""
    path = run / rel
    data = path.read_bytes()
    if op == "delete":
        path.unlink()
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "truncate" and len(data) > 1:
        path.write_bytes(data[:draw(st.integers(1, len(data) - 1))])
    elif op == "garble":
        pos = draw(st.integers(0, min(len(data), 256)))
        junk = draw(st.binary(min_size=1, max_size=8))
        path.write_bytes(data[:pos] + junk + data[pos + len(junk):])
    elif op == "swap":
        others = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
                        and p != path)
        other = run / draw(st.sampled_from(others))
        data2 = other.read_bytes()
        other.write_bytes(data)
        path.write_bytes(data2)
    elif op == "edit" and rel.endswith((".json", ".yaml")):
        try:
            doc = json.loads(data) if rel.endswith(".json") else yaml.safe_load(data)
        except (ValueError, yaml.YAMLError):
            doc = None
        if isinstance(doc, (dict, list)) and list(_paths(doc))[1:]:
            doc = draw(mutated_tree(doc))
        text = (json.dumps(doc, allow_nan=True, default=repr) if rel.endswith(".json")
                else yaml.safe_dump(doc))
        path.write_text(text)
    else:
        path.write_bytes(draw(st.binary(max_size=64)))


def _run_files(trained_run: Path, *patterns: str) -> list[str]:
    return sorted(str(p.relative_to(trained_run)) for p in trained_run.rglob("*")
                  if p.is_file() and any(fnmatch.fnmatch(str(p.relative_to(trained_run)), pat)
                                         for pat in patterns))


OPS = st.sampled_from(["delete", "empty", "truncate", "garble", "swap", "edit", "random"])
RETRAINED = f"retrain/{ARCH}/mixed"
# command -> (argv from (run dir, scratch, context), files it reads, what it may write)
RUN_COMMANDS = {
    "search": (lambda r, s, c: ["search", r, "--trials", "4"],
               ("config.yaml", "search/study.*", "supernet/weights.safetensors"),
               ("search/*", "cache/*")),
    "retrain": (lambda r, s, c: ["retrain", r, "--arch", ARCH],
                ("config.yaml", f"{RETRAINED}/*"), (f"{RETRAINED}/*",)),
    "report": (lambda r, s, c: ["report", r], ("config.yaml", f"{RETRAINED}/*"),
               ("report/*", "cache/*")),
    "export": (lambda r, s, c: ["export", r, "--arch", ARCH, "--out", s / "out", "--no-onnx"],
               ("config.yaml", f"{RETRAINED}/model.safetensors", f"{RETRAINED}/arch.json"), ()),
    "dashboard": (lambda r, s, c: ["dashboard", r, "--port", c["port"]],
                  ("config.yaml", "search/study.json", "search/study.log"), ()),
}
RUN_WEIGHTS = {"search": 4, "retrain": 4, "report": 1, "export": 1, "dashboard": 3}


def _commands_on_damaged_run_directories(data, trained_run, scratch, busy_port):
    cmd = data.draw(st.sampled_from([c for c, w in RUN_WEIGHTS.items() for _ in range(w)]))
    argv_of, reads, writes = RUN_COMMANDS[cmd]
    files = _run_files(trained_run, *reads)
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        for rel in data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=2,
                                      unique=True)):
            if (run / rel).is_file():
                corrupt(run, rel, data.draw(OPS), data.draw)
        check("run_dir", argv_of(run, d, {"port": busy_port}), run, may_write=writes)


@fuzz(30)
@given(data=st.data())
def test_commands_on_damaged_run_directories(data, trained_run, scratch, busy_port):
    _commands_on_damaged_run_directories(data, trained_run, scratch, busy_port)


@pytest.mark.slow
@fuzz(250)
@given(data=st.data())
def test_commands_on_damaged_run_directories_more(data, trained_run, scratch, busy_port):
    """Many more of the cases above (CI's slow run)."""
    _commands_on_damaged_run_directories(data, trained_run, scratch, busy_port)


def _predict_on_damaged_exports(data, trained_run, scratch, image):
    files = _run_files(trained_run, "export/good/*")
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        for rel in data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=2,
                                      unique=True)):
            if (run / rel).is_file():
                corrupt(run, rel, data.draw(OPS), data.draw)
        fmt = data.draw(st.sampled_from(["table", "json"]))
        check("export_dir", ["predict", run / "export" / "good", image, "--format", fmt], run)


@fuzz(10)
@given(data=st.data())
def test_predict_on_damaged_exports(data, trained_run, scratch, image):
    _predict_on_damaged_exports(data, trained_run, scratch, image)


@pytest.mark.slow
@fuzz(60)
@given(data=st.data())
def test_predict_on_damaged_exports_more(data, trained_run, scratch, image):
    """Many more of the cases above (CI's slow run)."""
    _predict_on_damaged_exports(data, trained_run, scratch, image)


@st.composite
def damaged_safetensors(draw, good: bytes) -> bytes:
    """A safetensors file with its header JSON edited, its length field changed, or cut."""
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    kind = draw(st.sampled_from(["header", "header", "length", "cut", "pickle"]))
    if kind == "cut":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "length":
        fake = draw(st.sampled_from([0, 1, n - 1, n + 1, 2**63, 2**64 - 1, len(good)]))
        return fake.to_bytes(8, "little") + good[8:]
    if kind == "pickle":
        return b"\x80\x04" + draw(st.binary(max_size=40))
    name = draw(st.sampled_from(sorted(header)))
    if name == "__metadata__" or draw(st.booleans()):
        header[name] = draw(JSON_VALUE)
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(st.one_of(
            JSON_VALUE, st.sampled_from(["F16", "I64", "BOOL", "F8_E4M3", "X"]),
            st.lists(st.integers(-1, 10**12), max_size=3)))
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + good[8 + n:]


def _export_on_damaged_weights(data, trained_run, scratch):
    good = (trained_run / RETRAINED / "model.safetensors").read_bytes()
    blob = data.draw(damaged_safetensors(good))
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        weights = run / "w.safetensors"
        weights.write_bytes(blob)
        check("weights", ["export", run, "--arch", ARCH, "--weights", weights,
                          "--out", d / "out", "--no-onnx"], run)


@fuzz(15)
@given(data=st.data())
def test_export_on_damaged_weights(data, trained_run, scratch):
    _export_on_damaged_weights(data, trained_run, scratch)


@pytest.mark.slow
@fuzz(80)
@given(data=st.data())
def test_export_on_damaged_weights_more(data, trained_run, scratch):
    """Many more of the cases above (CI's slow run)."""
    _export_on_damaged_weights(data, trained_run, scratch)


# ---- command-line flags --------------------------------------------------------------------
FLAG_ARGV = st.lists(st.one_of(
    st.sampled_from(["space", "check", "cost", "config", "reference", "search", "retrain",
                     "export", "predict", "report", "train-supernet", "run", "dashboard",
                     "--arch", "--set", "--format", "json", "--budget", "--trials", "-1", "0",
                     "--port", "99999", "-5", "--host", "256.0.0.1", "a\nb", "--epochs",
                     "--batch-size", "--regime", "--loss", "--workers", "--population",
                     "--seed", "--sampler", "--backend", "ray", "--address", "--debug", "-h",
                     "--version", "--resume", "--restart", "--no-onnx", "--weights", "--out",
                     "--storage", "--study-name", "--path-budget", "--", "TINY", "nowhere",
                     ARCH]),
    st.text(st.characters(exclude_characters="\x00"), max_size=6)), max_size=7)


@fuzz(300)
@given(argv=FLAG_ARGV)
def test_any_argument_list(argv, scratch):
    """Random argument lists. No run directory is named (only a space file and a missing
    path), so no command can get as far as training, searching or serving."""
    with case_dir(scratch) as d:
        argv = [str(TINY) if a == "TINY" else str(d / "nowhere") if a == "nowhere" else a
                for a in argv]
        check("flags", argv, d)


ODD = st.one_of(st.sampled_from(["-1", "0", "1", "4", "99999", "65536", "2" * 30, "1e3", "",
                                 "x", "a\nb", "-", "\u00e9", "256.0.0.1", "not a host",
                                 "localhost", "127.0.0.1", "mixed", "joint", "mean_ce", "focal",
                                 "random", "nsga2", "optuna", "ray"]),
                st.integers(-2**70, 2**70).map(str),
                st.text(st.characters(exclude_characters="\x00"), max_size=6))
# per command: flags to fuzz, and values that would start real work (training, a new study,
# Ray, a server on a free port or address) and so are left out
FLAGS = {
    "search": (["--trials", "--workers", "--population", "--seed", "--sampler", "--backend",
                "--address"], {"--backend": {"ray"}, "--trials": "int>4"}),
    "retrain": (["--regime", "--epochs", "--loss", "--resume"],
                {"--regime": {"joint", "disjoint"}}),
    "report": (["--batch-size"], {"--batch-size": "int>0"}),
    "predict": (["--batch-size", "--backend", "--format"], {"--batch-size": "int>0"}),
    "dashboard": (["--port", "--host"], {"--port": "port", "--host": "host"}),
}


def _does_real_work(cmd: str, flag: str, value: str, busy_port: int) -> bool:
    from exitnas.cli.search import _valid_host

    rule = FLAGS[cmd][1].get(flag)
    if rule is None:
        return False
    if isinstance(rule, set):
        return value in rule
    if rule == "host":
        return _valid_host(value) and value not in ("127.0.0.1", "localhost")
    try:
        number = int(value)
    except ValueError:
        return False
    if rule == "port":
        return 0 <= number <= 65535 and number != busy_port
    return number > int(rule.split(">")[1])


def _flag_values(data, cmd, trained_run, scratch, busy_port, image):
    """One odd value for each flag of the commands that read a run directory or an export."""
    flag = data.draw(st.sampled_from(FLAGS[cmd][0]))
    value = data.draw(ODD)
    if flag == "--resume":
        extra = [flag]
    elif _does_real_work(cmd, flag, value, busy_port):
        return
    else:
        extra = [flag, value]
    with case_dir(scratch) as d:
        run = copy_run(trained_run, d)
        base = {"search": ["search", run, "--trials", "4"],
                "retrain": ["retrain", run, "--arch", ARCH], "report": ["report", run],
                "dashboard": ["dashboard", run, "--port", busy_port],
                "predict": ["predict", run / "export" / "good", image]}[cmd]
        check("flags", base + extra, d, may_write=("run/report/*", "run/cache/*", "run/search/*"))


@fuzz(40)
@given(data=st.data(), cmd=st.sampled_from(sorted(FLAGS)))
def test_flag_values(data, cmd, trained_run, scratch, busy_port, image):
    _flag_values(data, cmd, trained_run, scratch, busy_port, image)


@pytest.mark.slow
@fuzz(200)
@given(data=st.data(), cmd=st.sampled_from(sorted(FLAGS)))
def test_flag_values_more(data, cmd, trained_run, scratch, busy_port, image):
    """Many more of the cases above (CI's slow run)."""
    _flag_values(data, cmd, trained_run, scratch, busy_port, image)


# ---- the real entry point ------------------------------------------------------------------
SUBPROCESS_CASES = [
    ["space", "check", "@bad_utf8"],
    ["cost", TINY, "--arch", "d1..2~s0b0=linear~max_softmax=0.5"],
    ["cost", TINY, "--arch", "d1.2~s0b0=linear~max_softmax=0.5.5"],
]


def test_real_entry_point_behaves_like_main(scratch):
    """`python -m exitnas` gives the same status and stderr line as in-process main."""
    with case_dir(scratch) as d:
        (d / "bad_utf8").write_bytes(b"name: caf\xe9\n")
        procs = []
        for argv in SUBPROCESS_CASES:
            argv = [str(d / a[1:]) if str(a).startswith("@") else str(a) for a in argv]
            procs.append((argv, subprocess.Popen(
                [sys.executable, "-m", "exitnas", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))))
        for argv, proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, (argv, err)
            assert "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
            code, inproc = check("flags", argv, d)
            assert (code, inproc) == (2, err)


def test_internal_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    """An exception exitnas did not expect: one line, exit 1; --debug re-raises it. (A
    planted failure: no real input may reach this path, which is what the fuzz asserts.)"""
    import exitnas.cli.config

    def boom():
        raise ZeroDivisionError("planted\nsecond line")

    monkeypatch.setattr(exitnas.cli.config, "reference_markdown", boom)
    assert main(["config", "reference"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["exitnas: internal error: ZeroDivisionError: planted\\nsecond "
                                "line; rerun with --debug for the traceback"]
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "config", "reference"])


def test_generated_cases_add_up():
    """At least MIN_CASES cases ran (when every fuzz test of this module ran)."""
    print(f"\nfuzz cases: {sum(COUNTS.values())} {dict(sorted(COUNTS.items()))}")
    print("seconds in main:", {k: round(v, 1) for k, v in sorted(SECONDS.items())})
    for row in sorted(SLOWEST, reverse=True)[:12]:
        print(f"  {row[0]:.2f}s exit {row[1]}: {row[2]}")
    if set(COUNTS) != GROUPS:
        pytest.skip(f"only {sorted(COUNTS)} ran")
    assert sum(COUNTS.values()) >= MIN_CASES, dict(COUNTS)
