"""``exitnas config reference``: every config key with its type, default and meaning."""
from __future__ import annotations

import dataclasses
import typing

from . import command
from ..space import Space


def _type_text(tp) -> str:
    text = str(tp).replace("typing.", "").replace("exitnas.space.", "")
    return getattr(tp, "__name__", text) if not typing.get_args(tp) else text


def reference_rows(cls=Space, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field of the config, depth first."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if hasattr(tp, "config_schema"):  # keys declared by a registry (space.PolicyConfig)
            tp = tp.config_schema()
        if dataclasses.is_dataclass(tp):
            rows += reference_rows(tp, f"{key}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(list(f.default_factory())) if isinstance(f.default_factory(), tuple) \
                else repr(f.default_factory())
        else:
            default = "required"
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.append((key, "list", default, f.metadata.get("doc", "")))
            rows += reference_rows(typing.get_args(tp)[0], f"{key}[].")
            continue
        rows.append((key, _type_text(tp), default, f.metadata.get("doc", "")))
    return rows


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in reference_rows():
        doc = doc.replace("|", "\\|")  # a bar would end the Markdown cell
        lines.append(f"| `{key}` | {tp} | `{default}` | {doc} |")
    return "\n".join(lines)


@command("config reference", help="print every config key with its type and default (Markdown)")
class ConfigReference:
    @staticmethod
    def add_arguments(p):
        pass

    @staticmethod
    def run(args):
        print(reference_markdown())
