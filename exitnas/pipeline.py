"""``exitnas run``: supernet -> search -> retrain -> export -> report on one run directory.

Every step resumes: training continues from its last epoch checkpoint, the search tops its
study up to the configured number of completed trials, the architectures chosen for
retraining are written to ``RUN/selected.json`` once so a rerun retrains the same ones, finished
retrains and exports are skipped, and the report is rewritten from what exists. Rerunning the
same command after a kill continues where it stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .arch import Arch
from .errors import RunDirError
from .io import atomic_write_json
from .rundir import RunDir
from .space import Space


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    selected: tuple[Arch, ...]
    exports: tuple[Path, ...]
    report: Path


def spread(front: list[dict], k: int) -> list[dict]:
    """Up to ``k`` members of a front (sorted by cost) spread evenly over its cost range:
    always the cheapest and the most accurate, then evenly spaced ranks in between."""
    rows = sorted(front, key=lambda r: r["expected_macs"])
    if len(rows) <= k:
        return rows
    if k == 1:
        return [rows[-1]]
    picks = sorted({round(i * (len(rows) - 1) / (k - 1)) for i in range(k)})
    return [rows[i] for i in picks]


def select_archs(run: RunDir, space: Space, front: list[dict]) -> list[Arch]:
    """The archs to retrain: read from ``RUN/selected.json`` if an earlier run chose them."""
    path = run.path / "selected.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return [Arch.from_id(a) for a in data["archs"]]
    if not front:
        raise RunDirError(f"{run.path / 'search'}: the search found no feasible architecture "
                          "under the budget; raise search.budget_fraction or add trials")
    chosen = spread(front, space.search.retrain_top)
    atomic_write_json(path, {"archs": [r["arch_id"] for r in chosen],
                             "rule": f"{space.search.retrain_top} front members spread over "
                                     "the expected-MACs range"})
    return [Arch.from_id(r["arch_id"]) for r in chosen]


def run_pipeline(run: RunDir, space: Space, *, log: Callable[[str], None] = print) -> RunResult:
    from .export import export_run
    from .report import write_report
    from .retrain import retrain, retrain_dir
    from .search import SearchOptions, run_search
    from .train import train_supernet

    space = run.init(space)
    if space.supernet.init == "backbone" and space.backbone.weights is None:
        from .backbone import train_backbone

        log(f"[0/5] backbone -> {run.path / 'backbone'}")
        train_backbone(run, space, log=log)
    log(f"[1/5] supernet -> {run.path / 'supernet'}")
    train_supernet(run, space, log=log)

    log(f"[2/5] search ({space.search.trials} trials) -> {run.path / 'search'}")
    result = run_search(run.path, SearchOptions())
    log(f"      {result.trials} trials, {len(result.front)} on the feasible front, "
        f"hypervolume {result.hypervolume:.4g}; front: {run.path / 'search' / 'front.md'}")
    log(f"      inspect: exitnas dashboard {run.path}")

    archs = select_archs(run, space, result.front)
    log(f"[3/5] retrain {len(archs)} archs ({space.retrain.regime}) -> {run.path / 'retrain'}")
    for arch in archs:
        if (retrain_dir(run, arch, space.retrain.regime) / "model.safetensors").is_file():
            log(f"      done before: {arch.id}")
            continue
        retrain(run, arch, space=space, log=log)

    log(f"[4/5] export -> {run.path / 'export'}")
    exports = []
    for arch in archs:
        out = run.path / "export" / arch.id
        if not (out / "arch.json").is_file():
            export_run(run, arch, out)
        exports.append(out)
        log(f"      {out}   (try: exitnas predict {out} IMAGE...)")

    log(f"[5/5] report -> {run.path / 'report'}")
    write_report(run)
    log(f"done: {run.path}. Next: exitnas dashboard {run.path} | exitnas predict "
        f"{exports[0] if exports else 'EXPORT_DIR'} IMAGES...")
    return RunResult(run.path, tuple(archs), tuple(exports), run.path / "report")
