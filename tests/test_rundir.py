"""exitnas.rundir: the run directory's config is written once, kept when nothing changed,
replaced when only settings changed, and another space's directory is refused untouched."""
from __future__ import annotations

import pytest

from conftest import tree_digest
from exitnas.errors import RunDirError
from exitnas.rundir import RunDir


def test_init_writes_then_keeps_the_config(tmp_path, tiny_space):
    run = RunDir(tmp_path / "run")
    assert not run.exists()
    assert run.init(tiny_space) == tiny_space and run.exists()
    stamp = run.config_path.stat().st_mtime_ns
    assert run.init(tiny_space) == tiny_space
    assert run.config_path.stat().st_mtime_ns == stamp  # nothing rewritten
    assert run.space() == tiny_space


def test_changed_settings_replace_the_stored_ones(tmp_path, tiny_space):
    run = RunDir(tmp_path / "run")
    run.init(tiny_space)
    more = tiny_space.with_overrides({"search.trials": 77})
    run.init(more)
    assert run.space().search.trials == 77


def test_another_space_is_refused_and_nothing_changes(tmp_path, tiny_space):
    run = RunDir(tmp_path / "run")
    run.init(tiny_space)
    before = tree_digest(run.path)
    other = tiny_space.with_overrides({"exits.max_exits": 1})  # another network definition
    assert other.fingerprint != tiny_space.fingerprint
    with pytest.raises(RunDirError, match="belongs to space 'tiny'.*use another --run-dir"):
        run.init(other)
    assert tree_digest(run.path) == before


def test_not_a_run_directory_says_how_to_start(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory.*train-supernet"):
        RunDir(tmp_path / "nothing").space()


def test_sub_creates_and_paths_join(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.sub("cache").is_dir() and run / "cache" == tmp_path / "run" / "cache"
