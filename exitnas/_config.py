"""Strict dict -> frozen dataclass conversion with field paths in every error.

Fields may carry constraints in ``metadata``: ``ge``/``le``/``gt``/``lt`` (numbers, applied to
each item of a tuple), ``choices`` (a registry-like object or a collection of allowed values),
``nonempty``. Unknown keys and wrong types are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

from .errors import ConfigError

_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
            raise ConfigError(f"{value!r} is not one of {', '.join(map(repr, allowed))}", path=path)
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
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {_describe(value)}", path=path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_describe(value)}", path=path)
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
    return f"{type(value).__name__} {value!r}"


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
                    raise ConfigError(f"{item!r} is not {word} {meta[key]!r}", path=where)
        if "choices" in meta and item not in meta["choices"]:
            choices = meta["choices"]
            known = choices.names() if hasattr(choices, "names") else sorted(choices)
            raise ConfigError(f"unknown value {item!r} (known: {', '.join(map(str, known))})",
                              path=where)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a plain mapping, checking every field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {_describe(data)}", path=path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown key {key!r} (known: {', '.join(fields)})",
                path=f"{path}.{key}" if path else str(key),
            )
    hints = typing.get_type_hints(cls)
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
                raise ConfigError(f"unknown key in override {key!r}", path=key)
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown key in override {key!r}", path=key)
        node[parts[-1]] = value
    return from_dict(type(obj), raw)
