"""Training checkpoints (which one may be resumed) and the metrics CSV rebuilt from them."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .errors import CheckpointError
from .io import atomic_write_text, load_checkpoint


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


_NONE = object()


def _space_default(key: str):
    """The default of the space setting ``key`` (``data.loader``), flattened as in settings;
    a marker equal to nothing when ``key`` names none. A setting added to exitnas after a
    checkpoint was written resumes only at its default: the behaviour the old run had."""
    import dataclasses

    from .space import Space

    node = Space  # the class at the top, then the default instances below it
    for part in key.split("."):
        f = ({f.name: f for f in dataclasses.fields(node)}.get(part)
             if dataclasses.is_dataclass(node) else None)
        if f is None:
            return _NONE
        if not isinstance(node, type):
            node = getattr(node, part)
        elif f.default is not dataclasses.MISSING:
            node = f.default
        elif f.default_factory is not dataclasses.MISSING:
            node = f.default_factory()
        else:
            return _NONE
    return list(node) if isinstance(node, tuple) else node


def open_checkpoint(path: Path, *, identity: dict, settings: dict, resume: bool,
                    restart: bool) -> dict | None:
    """The checkpoint to continue from, or None to start fresh.

    Without a checkpoint: fresh (``resume`` demands one). With one: it must have been made for
    the same ``identity`` (kind, space, arch, regime...) and the same ``settings`` (one the
    checkpoint predates counts as its default), else a one-line CheckpointError says what
    differs. ``restart`` ignores it (it is replaced when the first new epoch ends)."""
    if restart:
        return None
    if not path.is_file():
        if resume:
            raise CheckpointError(f"{path}: nothing to resume (no checkpoint yet); "
                                  "run without --resume to start")
        return None
    state = load_checkpoint(path)
    old_id = state.get("identity")
    if not isinstance(old_id, dict) or "epoch" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not an exitnas training checkpoint")
    for key, want in identity.items():
        if old_id.get(key) != want:
            raise CheckpointError(f"{path}: checkpoint belongs to {key} {old_id.get(key)!r}, "
                                  f"not {want!r}; refusing to resume from it")
    old, new = _flatten(state.get("settings", {})), _flatten(settings)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                  and not (k not in old and new[k] == _space_default(k)))
    if diff:
        k = diff[0]
        raise CheckpointError(f"{path}: made with {k}={old.get(k)!r}, this run has "
                              f"{k}={new.get(k)!r}; rerun with the same settings to resume, "
                              "or pass --restart to start over")
    return state


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the metrics CSV from the history kept in the checkpoint (so a resumed run never
    duplicates or loses a row)."""
    if not rows:
        return
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
