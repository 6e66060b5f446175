"""The ``exitnas`` command line: a registry of subcommands, one module per pipeline step.

Each module in this package registers commands with ``@command("name")``; nested names
("space check") become nested subcommands. Any :class:`~exitnas.errors.ExitnasError` becomes
one line on stderr and exit status 2, with no traceback. Any other exception is a bug in
exitnas: one line (``exitnas: internal error: ...``) and exit status 1; ``exitnas --debug``
shows its traceback instead.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
import sys
import unicodedata
import warnings
from typing import Callable

from .._config import key_text, parse_yaml
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
        key = key.strip()
        if key in out:
            raise ConfigError(f"{key_text(key)} is set twice", file="--set")
        out[key] = parse_yaml(value, file="--set", path=key_text(key))
    return out


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a config value, e.g. --set supernet.epochs=5 (repeatable)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    from .. import __version__

    parser = _Parser(prog="exitnas", description="Search, train and export early-exit networks.")
    parser.add_argument("--version", action="version", version=f"exitnas {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an internal error (a bug in exitnas)")
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


def one_line(text: str) -> str:
    """``text`` with every line break and control character escaped (an error message names
    the user's values, which may hold any character)."""
    return "".join(c if c == "\t" or unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp")
                   else ascii(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (one line, status 2)
        return 0 if done.code is None else done.code if isinstance(done.code, int) else 2
    if not hasattr(args, "_run"):
        parser.print_help()
        print("exitnas: error: no command given (see the list above)", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ExitnasError as err:
        print(f"exitnas: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("exitnas: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line unless --debug asks for the traceback
        if args.debug:
            raise
        print(f"exitnas: internal error: {type(err).__name__}: {one_line(str(err))[:500]}; "
              "rerun with --debug for the traceback", file=sys.stderr)
        return 1
