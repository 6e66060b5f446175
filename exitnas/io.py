"""Crash-safe file writing and safe weight loading.

Every output is written to a temporary file in the same directory, flushed, fsynced and
renamed over the target, so a kill -9 leaves either the old or the new complete file. Weights
are stored as safetensors; checkpoints with optimizer state are ``torch.save`` files that are
only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors (atomic)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle, a truncated file) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .runtime import is_pickle_head

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if is_pickle_head(head):
        raise CheckpointError(f"{path}: is a pickle / torch.save archive, not safetensors; refusing to load it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(err).splitlines()[0]})") from None


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save a dict of tensors / numbers / strings (atomic); read back with
    :func:`load_checkpoint`, which uses ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: corrupt, truncated or unsafe checkpoint ({first[:160]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint holds a {type(state).__name__}, not a dict")
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (:func:`load_weights`) or from a ``.pth`` / ``.pt``
    ``torch.save`` file (``weights_only=True``, and it must hold only str -> tensor: an
    allowlist; torchvision's published weights are such files)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_weights(path)
    if path.suffix not in (".pth", ".pt"):
        raise CheckpointError(f"{path}: weights must be .safetensors, .pth or .pt, not "
                              f"{path.suffix or 'a file without suffix'!r}")
    state = load_checkpoint(path)
    bad = next((k for k, v in state.items()
                if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise CheckpointError(f"{path}: not a state dict (entry {str(bad)[:80]!r} is a "
                              f"{type(state[bad]).__name__}, not a tensor)")
    return state
