"""Strict YAML reading and dict -> frozen dataclass conversion with field paths in every error.

Fields may carry constraints in ``metadata``: ``ge``/``le``/``gt``/``lt`` (numbers, applied to
each item of a tuple), ``choices`` (a registry-like object or a collection of allowed values),
``nonempty``. Unknown keys and wrong types are errors, never silently ignored. Every number
is finite and fits int64 / float64; every string is printable text.

YAML is read by :func:`read_yaml`: UTF-8 only, at most ``MAX_YAML_BYTES``, nesting at most
``MAX_DEPTH`` deep, no duplicate keys, integers of at most ``MAX_INT_CHARS`` characters, and
PyYAML's safe tags only (no Python objects).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import reprlib
import types
import typing
import unicodedata
from typing import Any, Union

import yaml

from .errors import ConfigError

_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_YAML_BYTES = 1 << 20  # a space file is a few KiB
MAX_DEPTH = 32            # a space nests 4 levels
MAX_INT_CHARS = 40        # int64 needs 20 digits; room for 0x / 0b / underscores
MAX_STR = 4096            # characters in one config string
INT64 = (-(2**63), 2**63 - 1)
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A short, one-line repr of a user's value for error messages (never huge)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return _REPR.repr(value)


def key_text(key: Any) -> str:
    """A key as it appears in a field path: itself when it is short printable text."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 80:
        return key
    return show(key)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH while composing. Used only to
    compose (nodes, no values); :func:`parse_yaml` checks the nodes, then builds the values
    with ``yaml.safe_load``."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_int(node) -> None:
    if node.tag == "tag:yaml.org,2002:int" and len(str(node.value)) > MAX_INT_CHARS:
        raise yaml.constructor.ConstructorError(
            None, None, f"integer of {len(str(node.value))} characters is too long",
            node.start_mark)


def _check_nodes(root) -> None:
    """Refuse over-long integers and duplicate mapping keys (merge keys may override), in
    document order. Keys are compared as the values they stand for (``1`` and ``0x1`` clash),
    built by PyYAML's SafeConstructor."""
    keys = yaml.constructor.SafeConstructor()
    stack, done = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in done:  # an alias: checked where its anchor stands
            continue
        done.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            _check_int(node)
            continue
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # non-scalar keys are refused by PyYAML itself
                _check_int(key_node)
                key = keys.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {show(key)}", key_node.start_mark)
                seen.add(key)
            children = [n for pair in node.value for n in pair]
        else:
            children = list(node.value)
        stack.extend(reversed(children))


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(err, yaml.reader.ReaderError):
        return f"character {err.character!r} at offset {err.position} is not allowed in YAML"
    problem = getattr(err, "problem", None) or "invalid YAML"
    return f"YAML syntax error{where}: {problem}"


def parse_yaml(text: str, *, file: str | None = None, path: str = "") -> Any:
    """``text`` -> plain data: composed with :class:`_StrictLoader` (depth), its nodes checked
    (:func:`_check_nodes`), then ``yaml.safe_load``; errors are ConfigErrors."""
    try:
        root = yaml.compose(text, Loader=_StrictLoader)  # nodes only: nothing is constructed
        if root is not None:
            _check_nodes(root)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err), file=file, path=path) from None


def read_yaml(path, *, file: str | None = None) -> Any:
    """Read a YAML file: UTF-8 text of at most MAX_YAML_BYTES, then :func:`parse_yaml`."""
    from pathlib import Path

    path = Path(path)
    file = str(path) if file is None else file
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read file ({err.strerror or type(err).__name__})",
                          file=file) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"larger than {MAX_YAML_BYTES} bytes; not a space file", file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text (byte {raw[err.start]:#04x} at line {line}, "
                          f"offset {err.start})", file=file) from None
    return parse_yaml(text.removeprefix("\ufeff"), file=file)


def field(default: Any = dataclasses.MISSING, *, doc: str = "", **checks: Any) -> Any:
    """A dataclass field with validation metadata; tuple/list defaults are stored as tuples."""
    meta = dict(checks, doc=doc)
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return dataclasses.field(default_factory=lambda: value, metadata=meta)
    if dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: value, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append((_shape_matches(arg, value), err))
        # report the error of the branch the value looks like (a list -> the tuple branch)
        raise max(errors, key=lambda e: e[0])[1]
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{show(value)} is not one of {', '.join(map(repr, allowed))}",
                              path=path)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {_describe(value)}", path=path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"expected {len(args)} items, got {len(value)}", path=path)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {_describe(value)}", path=path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_describe(value)}", path=path)
        if not INT64[0] <= value <= INT64[1]:
            raise ConfigError(f"{show(value)} is out of range (64-bit integers)", path=path)
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {_describe(value)}", path=path)
        if isinstance(value, int) and abs(value) > 1e308:
            raise ConfigError(f"{show(value)} is out of range (64-bit floats)", path=path)
        if not math.isfinite(value):
            raise ConfigError(f"expected a finite number, got {value!r}", path=path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_describe(value)}", path=path)
        if len(value) > MAX_STR:
            raise ConfigError(f"string of {len(value)} characters is longer than {MAX_STR}",
                              path=path)
        bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
        if bad is not None:
            raise ConfigError(f"{show(value)} holds the control character {bad!r}", path=path)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _shape_matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if isinstance(value, (list, tuple)):
        return origin is tuple
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp)
    return not (origin is tuple or dataclasses.is_dataclass(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {show(value)}"


def _check(meta: dict, value: Any, path: str) -> None:
    if value is None:
        return
    items = list(enumerate(value)) if isinstance(value, tuple) else [(None, value)]
    if meta.get("nonempty") and isinstance(value, tuple) and not value:
        raise ConfigError("must not be empty", path=path)
    for i, item in items:
        where = path
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            for key, op, word in (
                ("ge", lambda a, b: a >= b, ">="),
                ("gt", lambda a, b: a > b, ">"),
                ("le", lambda a, b: a <= b, "<="),
                ("lt", lambda a, b: a < b, "<"),
            ):
                if key in meta and not op(item, meta[key]):
                    raise ConfigError(f"{show(item)} is not {word} {meta[key]!r}", path=where)
        if "choices" in meta and item not in meta["choices"]:
            choices = meta["choices"]
            known = choices.names() if hasattr(choices, "names") else sorted(choices)
            raise ConfigError(f"unknown value {show(item)} (known: {', '.join(map(str, known))})",
                              path=where)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation: slow, so once per class


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a plain mapping, checking every field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {_describe(data)}", path=path)
    if hasattr(cls, "config_schema"):  # keys declared by a registry (space.PolicyConfig)
        cls = cls.config_schema()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown key {show(key)} (known: {', '.join(fields)})",
                path=f"{path}.{key_text(key)}" if path else key_text(key),
            )
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            value = _convert(hints[name], data[name], sub)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            raise ConfigError("is required", path=sub)
        _check(dict(f.metadata), value, sub)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(err.detail, path=".".join(p for p in (path, err.path) if p)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict` (tuples become lists) for YAML/JSON output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def with_overrides(obj: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of a config dataclass with dotted-key overrides (``search.trials=50``)
    applied and re-validated; unknown keys and bad values raise ConfigError."""
    raw = to_dict(obj)
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown key in override {show(key)}", path=key_text(key))
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown key in override {show(key)}", path=key_text(key))
        node[parts[-1]] = value
    return from_dict(type(obj), raw)
