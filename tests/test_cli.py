"""exitnas.cli: every registered command is listed and has help; no command, an unknown
command and a malformed --set are one line and exit 2; --set values are YAML scalars."""
from __future__ import annotations

import pytest

from conftest import run_cli
from exitnas.cli import build_parser, one_line, parse_sets
from exitnas.errors import ConfigError


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in _commands():
        assert name in r.stdout, name
    assert {"run", "train-backbone", "train-supernet", "search", "export", "finetune",
            "retrain", "predict", "report", "dashboard"} <= set(_commands())


@pytest.mark.parametrize("args", [(), ("no-such-command",), ("search", "--bogus-flag", "x")])
def test_usage_errors_are_one_line_exit_2(args):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(
        ("exitnas: error", "exitnas "))


def test_parse_sets():
    assert parse_sets(["a.b=3", "c=[1, 2]", "d=text", "e=true"]) == {
        "a.b": 3, "c": [1, 2], "d": "text", "e": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets(["novalue"])
    with pytest.raises(ConfigError, match="set twice"):
        parse_sets(["a=1", "a=2"])


def test_one_line_escapes_line_breaks_and_controls():
    assert one_line("a\nb\x00c\td") == "a\\nb\\x00c\td"
