"""search/_trust.py: resuming a Ray search unpickles the run directory, so a layout others could
have planted is refused (one line naming the path) before anything is unpickled or started.
The unit tests call the checks directly; the end-to-end test plants real pickles and resumes
them with ``exitnas search --backend ray`` inside a loopback-only network namespace."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from conftest import run_cli, tree_digest
from search_support import copy_run, namespaces_work, scenario, train_tiny_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("ray-tiny") / "run", steps=10)


# ---- the checks, called directly -------------------------------------------------------------
def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """RUN/search/ray/{state.json, tune-0/tuner.pkl}, every part private to its owner."""
    run = tmp_path / "run"
    folder = run / "search" / "ray" / "tune-0"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"not unpickled by the check")
    state = run / "search" / "ray" / "state.json"
    state.write_text(json.dumps({"experiment": "tune-0"}))
    for p in (run, run / "search", run / "search" / "ray", folder):
        p.chmod(0o755)
    for p in (state, folder / "tuner.pkl"):
        p.chmod(0o644)
    return run, state


def test_a_private_experiment_is_trusted(tmp_path):
    from exitnas.search._trust import trusted_experiment

    run, state = _layout(tmp_path)
    assert trusted_experiment(run, state, "tune-0") == (run / "search/ray/tune-0").resolve()


@pytest.mark.parametrize("case, words", [
    ("group-writable file", "writable by group or others (mode 664)"),
    ("others-writable folder", "writable by group or others (mode 757)"),
    ("symlink inside", "a symbolic link"),
    ("dotdot", "outside"),
    ("not a name", "expected a folder name"),
])
def test_layouts_others_could_plant_are_refused(tmp_path, case, words):
    from exitnas.errors import RunDirError
    from exitnas.search._trust import trusted_experiment

    run, state = _layout(tmp_path)
    folder = run / "search" / "ray" / "tune-0"
    name = "tune-0"
    if case == "group-writable file":
        (folder / "tuner.pkl").chmod(0o664)
    elif case == "others-writable folder":
        (run / "search").chmod(0o757)
    elif case == "symlink inside":
        (tmp_path / "elsewhere.pkl").write_bytes(b"x")
        (folder / "tuner.pkl").unlink()
        (folder / "tuner.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    elif case == "dotdot":
        (tmp_path / "outside").mkdir()
        name = "../../../outside"
    else:
        name = ["tune-0"]
    with pytest.raises(RunDirError) as err:
        trusted_experiment(run, state, name)
    message = str(err.value)
    assert words in message and "\n" not in message
    assert case == "not a name" or "refusing to resume" in message


def test_state_file_is_read_without_surprises(tmp_path):
    from exitnas.errors import RunDirError
    from exitnas.search._trust import read_state

    path = tmp_path / "state.json"
    assert read_state(path) == {}  # absent: a fresh search
    path.write_text('{"experiment": "tune-1", "study": "s", "target": 8}')
    assert read_state(path) == {"experiment": "tune-1", "study": "s", "target": 8}
    path.write_bytes(b"\xff{")
    with pytest.raises(RunDirError, match="unreadable"):
        read_state(path)
    path.write_text("[1, 2]")
    with pytest.raises(RunDirError, match="expected a JSON object, got list"):
        read_state(path)


# ---- end to end: a planted experiment is refused before Ray starts ---------------------------
class _Payload:
    """Unpickling this writes ``path``: the planted tuner.pkl's stand-in for any code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('unpickled')",))


def _plant(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")


TRUST_CASES = {  # case (planted below) -> the words its refusal must say
    "group-writable-experiment": "writable by group or others (mode 775)",
    "group-writable-search-folder": "writable by group or others (mode 775)",
    "foreign-owner": "owned by uid 65534, not by you",
    "dotdot": "outside",
    "symlink": "outside",
    "symlink-inside": "a symbolic link",
    "trusted": None,  # the control: the same plant, safe permissions -> it IS unpickled
}


@pytest.mark.skipif(not namespaces_work(), reason="needs root and unshare to keep Ray inside a "
                    "loopback-only network namespace")
def test_resume_refuses_run_directories_others_could_plant(trained, tmp_path):
    pytest.importorskip("ray.tune")
    base = copy_run(trained, tmp_path / "base")
    r = run_cli("search", base, "--trials", "3", env={"OMP_NUM_THREADS": "1"})  # in-process
    assert r.returncode == 0, r.stderr
    study = json.loads((base / "search" / "study.json").read_text())["study_name"]
    cases = tmp_path / "cases"
    for case in TRUST_CASES:
        run = copy_run(base, cases / case / "run")
        marker = cases / case / "marker"
        ray_dir = run / "search" / "ray"
        name = "tune-0"
        if case in ("dotdot", "symlink"):
            _plant(cases / case / "outside", marker)
            if case == "dotdot":
                name = "../../../outside"
                ray_dir.mkdir(parents=True)
            else:
                ray_dir.mkdir(parents=True)
                (ray_dir / name).symlink_to(cases / case / "outside")
        else:
            _plant(ray_dir / name, marker)
        if case == "group-writable-experiment":
            (ray_dir / name).chmod(0o775)
        elif case == "group-writable-search-folder":
            (run / "search").chmod(0o775)
        elif case == "foreign-owner":
            os.chown(ray_dir / name / "tuner.pkl", 65534, 65534)
        elif case == "symlink-inside":
            (ray_dir / name / "tuner.pkl").rename(cases / case / "tuner.pkl")
            (ray_dir / name / "tuner.pkl").symlink_to(cases / case / "tuner.pkl")
        (ray_dir / "state.json").write_text(json.dumps(
            {"experiment": name, "study": study, "target": 8}))
    before = {case: tree_digest(cases / case) for case in TRUST_CASES}
    outcomes = scenario("trust", cases, 8, check=False)["cases"]
    assert sorted(outcomes) == sorted(TRUST_CASES)
    for case, words in TRUST_CASES.items():
        out = outcomes[case]
        if words is None:  # the control proves the plant is live: restore unpickled it
            assert out["marker"] and out["ray_sessions"] == 1, out
            continue
        assert out["rc"] == 2 and out["stderr"].count("\n") == 1, (case, out)
        assert out["stderr"].startswith("exitnas: error: ") and words in out["stderr"], (case, out)
        assert "refusing to resume" in out["stderr"]
        assert not out["marker"], case         # nothing was unpickled
        assert out["ray_sessions"] == 0, case  # Ray never started
        assert tree_digest(cases / case) == before[case], case  # nothing written
