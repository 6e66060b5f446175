"""The run directory: one folder per pipeline run, shared by every step.

    RUN/config.yaml            resolved space + settings (written by the first step)
    RUN/backbone/              stage 0: the full-depth backbone's checkpoint, weights, metrics
    RUN/supernet/              training checkpoint, final weights, metrics.csv
    RUN/cache/                 cached exit statistics per depth setting
    RUN/search/                Optuna storage, Pareto front (CSV, Markdown, PNG)
    RUN/selected.json          the deploy picks, one per deploy budget
    RUN/finetune/<structure>/  models fine-tuned from the inherited weights, per regime
    RUN/retrain/<arch id>/     models retrained from scratch, per regime
    RUN/export/<arch id>/      deployable artifacts
    RUN/report/                tables and plots
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import RunDirError
from .io import atomic_write_text
from .space import Space, load_space
from ._config import to_dict


class RunDir:
    CONFIG = "config.yaml"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    def exists(self) -> bool:
        return self.config_path.is_file()

    def init(self, space: Space) -> Space:
        """Write ``space`` as the run's config, or check that it matches the existing one.

        A run directory made from another space (different network definition) is refused;
        changed settings (epochs, trials...) replace the stored ones."""
        if self.exists():
            old = self.space()
            if old.fingerprint != space.fingerprint or old.name != space.name:
                raise RunDirError(
                    f"{self.path}: run directory belongs to space {old.name!r} "
                    f"(fingerprint {old.fingerprint}), not {space.name!r} ({space.fingerprint}); "
                    "use another --run-dir")
            if to_dict(old) == to_dict(space):
                return old
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(to_dict(space), sort_keys=False))
        return space

    def space(self, overrides: dict | None = None) -> Space:
        if not self.exists():
            raise RunDirError(f"{self.path}: not a run directory (no {self.CONFIG}); "
                              "start with `exitnas train-supernet CONFIG --run-dir DIR`")
        return load_space(self.config_path, overrides)

    def sub(self, name: str) -> Path:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return p


__all__ = ["RunDir"]
