"""The ``exitnas`` command line: a registry of subcommands, one module per pipeline step.

Each module in this package registers commands with ``@command("name")``; nested names
("space check") become nested subcommands. Any :class:`~exitnas.errors.ExitnasError` becomes
one line on stderr and exit status 2, with no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from typing import Callable

import yaml

from ..errors import ConfigError, ExitnasError

Handler = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, *, help: str) -> Callable:
    """Register ``cls`` with ``add_arguments(parser)`` and ``run(args)`` static methods."""

    def deco(cls):
        if name in _COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        _COMMANDS[name] = (cls.add_arguments, cls.run, help)
        return cls

    return deco


def parse_sets(items: list[str] | None) -> dict:
    """``--set a.b=3`` pairs -> {"a.b": 3}; values are parsed as YAML scalars."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}", file="--set")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"value {value!r} does not parse", file="--set", path=key) from None
    return out


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a config value, e.g. --set supernet.epochs=5 (repeatable)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    from .. import __version__

    parser = _Parser(prog="exitnas", description="Search, train and export early-exit networks.")
    parser.add_argument("--version", action="version", version=f"exitnas {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name in sorted(_COMMANDS):
        add_args, run, help_text = _COMMANDS[name]
        *group, leaf = name.split(" ")
        target = subs
        if group:
            g = group[0]
            if g not in groups:
                gp = subs.add_parser(g, help=f"{g} commands")
                groups[g] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                              parser_class=_Parser)
                groups[g].required = True
            target = groups[g]
        p = target.add_parser(leaf, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ExitnasError as err:
        print(f"exitnas: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("exitnas: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
