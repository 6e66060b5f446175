"""Search-space loading: shipped spaces are valid; every broken file fails with one line that
names the file and the field, exit status 2, and no traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SPACES, TEST_DATA, run_cli
from exitnas.cli import main
from exitnas.errors import ConfigError
from exitnas.space import load_space

BAD = sorted((TEST_DATA / "bad_spaces").glob("*.yaml"))


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: ")
    return first[len("# expect: "):]


def test_corpus_is_large_enough():
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_broken_space_fails_with_one_line(path, capsys):
    assert main(["space", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"exitnas: error: {path}: ")
    assert expected_message(path) in err


@pytest.mark.parametrize("name", ["depth_zero.yaml", "yaml_syntax.yaml"])
def test_broken_space_subprocess_has_no_traceback(name):
    path = TEST_DATA / "bad_spaces" / name
    proc = run_cli("space", "check", path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"exitnas: error: {path}: ")
    assert expected_message(path) in lines[0]


def test_design_example_message():
    with pytest.raises(ConfigError) as info:
        load_space(TEST_DATA / "bad_spaces" / "depth_zero.yaml")
    assert info.value.path == "backbone.stages[2].depths"
    assert info.value.detail == "0 is not >= 1"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_are_valid(path, capsys):
    assert main(["space", "check", str(path)]) == 0
    assert ": ok" in capsys.readouterr().out


def test_resnet_cifar_space_matches_the_issue():
    space = load_space(SPACES / "resnet_cifar.yaml")
    assert [s.channels for s in space.backbone.stages] == [16, 32, 64]
    assert [s.depths for s in space.backbone.stages] == [(1, 2, 3, 4, 5)] * 3
    assert space.exits.max_exits == 6
    assert set(space.exits.heads) == {"linear", "sdn_pool", "conv", "mlp"}
    # exits after any block except the final one: 15 blocks - 1
    assert len(space.positions()) == 14
    assert len(space.depth_settings()) == 125


def test_positions_follow_depths(tiny_space):
    # tiny: two stages of depth 1..2; the final block of the last stage holds the final exit
    assert tiny_space.positions((2, 2)) == [(0, 0), (0, 1), (1, 0)]
    assert tiny_space.positions((1, 1)) == [(0, 0)]
    assert tiny_space.positions((1, 2)) == [(0, 0), (1, 0)]


def test_overrides_are_validated(tiny_space_file):
    space = load_space(tiny_space_file, {"supernet.epochs": 7, "search.trials": 3})
    assert (space.supernet.epochs, space.search.trials) == (7, 3)
    with pytest.raises(ConfigError, match="supernet.epoch"):
        load_space(tiny_space_file, {"supernet.epoch": 7})
    with pytest.raises(ConfigError, match=r"supernet.epochs: 0 is not >= 1"):
        load_space(tiny_space_file, {"supernet.epochs": 0})


def test_defaults_fill_missing_sections(tiny_space):
    assert tiny_space.retrain.regime == "mixed"
    assert tiny_space.search.sampler == "nsga2"
    assert tiny_space.to_dict()["backbone"]["stages"][0]["depths"] == [1, 2]


def test_scientific_notation_is_a_number(tiny_space_file, tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string; the loader accepts it as the number it is."""
    space = load_space(tiny_space_file, {"supernet.optim.lr": "1e-3",
                                         "supernet.optim.weight_decay": "5E-4"})
    assert space.supernet.optim.lr == 1e-3
    assert space.supernet.optim.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="expected a number, got str 'fast'"):
        load_space(tiny_space_file, {"supernet.optim.lr": "fast"})


@pytest.mark.parametrize("name, fingerprint", [("quickstart", "252c1d441176ed51"),
                                               ("resnet_cifar", "5a6c79980861fbd1"),
                                               ("mobilenetv2_cifar", "7a6cb4593a0c69eb")])
def test_fingerprints_survive_keys_added_later(name, fingerprint):
    """The shipped spaces keep the fingerprints they had before backbone.model /
    stage_depths and exits.head_width existed (measured with commit 8bbdb04), so run
    directories and checkpoints made then still resume; setting a new key changes it."""
    space = load_space(SPACES / f"{name}.yaml")
    assert space.fingerprint == fingerprint
    assert space.with_overrides({"exits.head_width": 32}).fingerprint != fingerprint
