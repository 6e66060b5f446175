"""search/_internals.py: the one module that touches Optuna's and Ray's private names. Its
uses were read against the versions in ``CHECKED``; an upgrade fails here until they are
re-checked. No other search module uses a private name of theirs (read from the source), and
each use still does what exitnas relies on."""
from __future__ import annotations

import ast
import importlib.metadata
import inspect
from pathlib import Path

import pytest

from search_support import SEARCH

# Private uses in other search modules, each to move behind _internals (none left).
ELSEWHERE: set[tuple[str, str]] = set()


def _pinned(package: str) -> None:
    from exitnas.search._internals import CHECKED

    installed = importlib.metadata.version(package)
    assert installed == CHECKED[package], (
        f"{package} {installed} is installed, but exitnas/search/_internals.py was checked "
        f"against {package} {CHECKED[package]}: re-read every use listed there against "
        f"{package} {installed}'s source, then set CHECKED[{package!r}] = {installed!r}")


def test_optuna_is_the_version_internals_was_checked_against():
    _pinned("optuna")


def test_ray_is_the_version_internals_was_checked_against():
    pytest.importorskip("ray")
    _pinned("ray")


# ---- nobody else touches a private name --------------------------------------------------------
def private_uses(path: Path) -> set[tuple[str, str]]:
    """(file, name) for each private name of another package that ``path`` uses: attribute
    access ``x._name`` on anything but a name the module defines (its functions, classes,
    module globals, or attributes set in an ``__init__``), keyword arguments ``_name=``, and
    imports of ``pkg._private`` modules or ``_names`` from outside exitnas."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
            if node.name == "__init__":
                for sub in ast.walk(node):
                    targets = sub.targets if isinstance(sub, ast.Assign) else \
                        [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else []
                    for t in targets:
                        for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                            if isinstance(el, ast.Attribute):
                                own.add(el.attr)
    for node in tree.body:
        for t in (node.targets if isinstance(node, ast.Assign) else []):
            if isinstance(t, ast.Name):
                own.add(t.id)
    private = lambda name: name.startswith("_") and not name.endswith("__")  # noqa: E731
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            found.add((path.name, node.attr))
        elif isinstance(node, ast.keyword) and node.arg and private(node.arg):
            found.add((path.name, node.arg))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module])
            for m in modules:
                if m.split(".")[0] != "exitnas" and any(private(p) for p in m.split(".")):
                    found.add((path.name, m))
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] != "exitnas":
                found |= {(path.name, a.name) for a in node.names if private(a.name)}
    return found


def test_the_check_finds_planted_private_uses(tmp_path):
    planted = tmp_path / "_planted.py"
    planted.write_text(
        "import ray._raylet\n"
        "from optuna._hypervolume import compute_hypervolume\n"
        "from optuna.samplers._ga import _base\n"
        "class S(Base):\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def restore(self):\n"
        "        self._ot_trials = {}\n"
        "        return self._mine, _helper()\n"
        "def _helper():\n"
        "    ray.init(_node_ip_address='127.0.0.1')\n"
        "    return study._storage, T._GENERATION_KEY, super()._get_generation_key()\n")
    assert private_uses(planted) == {(planted.name, n) for n in (
        "ray._raylet", "optuna._hypervolume", "optuna.samplers._ga", "_base", "_ot_trials",
        "_node_ip_address", "_storage", "_GENERATION_KEY", "_get_generation_key")}


def test_no_other_search_module_uses_a_private_name_of_optuna_or_ray():
    found = set()
    for path in sorted(SEARCH.glob("*.py")):
        if path.name != "_internals.py":
            found |= private_uses(path)
    assert found <= ELSEWHERE, f"private names used outside _internals.py: {found - ELSEWHERE}"


# ---- each use still does what it is used for --------------------------------------------------
def test_optuna_trial_and_study_hooks(tmp_path):
    import optuna

    from exitnas.search import StorageSpec
    from exitnas.search._internals import adopt_trial, set_trial_system_attr, trial_id

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = StorageSpec(journal=str(tmp_path / "j.log")).open()
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    trial = study.ask()
    set_trial_system_attr(trial, "exitnas:test", [1, 2])
    frozen = study.get_trials()[0]
    assert trial_id(frozen) == trial_id(trial)
    assert storage.get_trial(trial_id(frozen)).system_attrs["exitnas:test"] == [1, 2]
    again = adopt_trial(study, trial_id(frozen))
    assert again.number == trial.number == 0
    study.tell(again, [1.0, 2.0])
    assert study.get_trials()[0].state.name == "COMPLETE"
    # the key optuna-dashboard 0.21 reads feasibility from (_objective's
    # DASHBOARD_CONSTRAINTS_KEY): Optuna's own name for its constraints list
    from optuna.study import _constrained_optimization

    assert _constrained_optimization._CONSTRAINTS_KEY == "constraints"


def test_journal_backend_writes_the_stock_format(tmp_path):
    """The same records through exitnas' append_logs and Optuna's: the same bytes, and each
    backend reads the other's file."""
    from optuna.storages.journal import JournalFileBackend

    from exitnas.search._internals import JournalBackend

    logs = [{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1, 2]},
            {"op_code": 4, "worker_id": "w", "study_id": 0, "datetime_start": "2026-01-01",
             "attrs": {"x": "é"}}]
    ours = JournalBackend(str(tmp_path / "a.log"))
    stock = JournalFileBackend(str(tmp_path / "b.log"))
    ours.append_logs(logs[:1])
    ours.append_logs(logs[1:])
    stock.append_logs(logs)
    assert (tmp_path / "a.log").read_bytes() == (tmp_path / "b.log").read_bytes()
    assert ours.appended == (tmp_path / "a.log").stat().st_size
    assert list(JournalFileBackend(str(tmp_path / "a.log")).read_logs(0)) == logs
    assert list(JournalBackend(str(tmp_path / "b.log")).read_logs(0)) == logs


def test_ray_optuna_search_state_hooks():
    pytest.importorskip("ray.tune")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from exitnas.search._internals import (searcher_completed, searcher_study, searcher_trials,
                                           set_searcher_completed, set_searcher_trials)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    def space(trial) -> None:
        trial.suggest_float("x", 0, 1)

    # no Ray process starts: OptunaSearch is plain Python around an Optuna study
    searcher = OptunaSearch(space=space,
                            metric=["a", "b"], mode=["max", "min"],
                            sampler=optuna.samplers.RandomSampler(seed=0))
    study = searcher_study(searcher)
    assert isinstance(study, optuna.Study) and searcher_trials(searcher) == {}
    config = searcher.suggest("tune-1")
    assert set(config) == {"x"} and searcher_trials(searcher)["tune-1"].number == 0
    searcher.on_trial_complete("tune-1", {"a": 1.0, "b": 2.0})
    assert searcher_completed(searcher) == {"tune-1"}
    assert study.get_trials()[0].values == [1.0, 2.0]
    set_searcher_trials(searcher, {})
    set_searcher_completed(searcher, {"tune-9"})
    searcher.on_trial_complete("tune-9", {"a": 0.0, "b": 0.0})  # told already: ignored
    assert len(study.get_trials()) == 1


def test_ray_core_hooks():
    ray = pytest.importorskip("ray")
    import ray._raylet

    from exitnas.search._internals import local_ray_init_kwargs

    (key, value), = local_ray_init_kwargs().items()
    assert value == "127.0.0.1"
    assert f'kwargs.pop("{key}"' in inspect.getsource(ray.init)  # still read by ray.init
    assert callable(ray._raylet.Config.initialize)
