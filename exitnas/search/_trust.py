"""Resuming a Ray search runs code from the run directory; refuse one that others could plant.

``Tuner.restore`` unpickles ``tuner.pkl`` from the experiment folder, and the trials in its
``experiment_state-*.json`` are cloudpickled: whoever can write ``RUN/search/ray`` can run
code as the user who resumes. So a run directory is trusted like code. Before a Ray search
resumes, :func:`trusted_experiment` checks, without unpickling anything:

- the experiment that ``RUN/search/ray/state.json`` names resolves (symlinks followed) to a
  folder directly inside ``RUN/search/ray``;
- the run directory, ``RUN/search``, ``RUN/search/ray``, ``state.json``, the experiment folder
  and everything in it are owned by the current user and not writable by group or others, and
  none of them (below the run directory) is a symbolic link.

Otherwise it raises :class:`~exitnas.errors.RunDirError` with one line naming the path and
the reason. A fresh search (no matching state) restores nothing and is not checked.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import RunDirError

WHY = "a Ray search resumes by unpickling it (Tuner.restore)"


def read_state(path: Path) -> dict:
    """``RUN/search/ray/state.json`` ({} when absent); one line if it does not parse."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: unreadable ({type(err).__name__}); delete it to start a "
                          "fresh Ray experiment") from None
    if not isinstance(state, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state


def trusted_experiment(run_path: Path, state_path: Path, name) -> Path:
    """The experiment folder ``state.json`` names (resolved), if it is safe to restore from."""
    if not isinstance(name, str) or not name:
        raise RunDirError(f"{state_path}: experiment: expected a folder name, got {name!r}")
    run = Path(os.path.abspath(run_path))
    root = run / "search" / "ray"
    folder = (root / name).resolve()
    if folder.parent != root.resolve():
        raise RunDirError(f"{state_path}: experiment {name!r} resolves to {folder}, outside "
                          f"{root}; refusing to resume from it ({WHY})")
    _check(run, run, follow=True)  # the run directory itself may be a link the user made
    for path in (run / "search", root, state_path, root / name):
        _check(path, run)
    for top, dirs, files in os.walk(folder):
        for entry in dirs + files:
            _check(Path(top) / entry, run)
    return folder


def _check(path: Path, run: Path, *, follow: bool = False) -> None:
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"{path}: a symbolic link in the Ray experiment's path; refusing to "
                          f"resume ({WHY}, so it must hold only its owner's own files)")
    if st.st_uid != os.getuid():
        raise RunDirError(f"{path}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                          f"refusing to resume ({WHY})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RunDirError(f"{path}: writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); refusing to resume ({WHY}); if you "
                          f"trust its contents: chmod -R go-w {run}")
