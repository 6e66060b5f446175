"""``exitnas run``: backbone -> supernet -> search -> deploy -> export -> report on one run
directory.

The backbone (stage 0) is trained when the supernet grows from it (``supernet.init:
backbone`` without ``backbone.weights``). The deploy step picks, for every
``search.deploy_budgets`` entry, the searched sub-network with the best val accuracy at that
budget (:mod:`exitnas.deploy`); the picks are written to ``RUN/selected.json`` once, so a rerun
exports the same ones. Each is exported with the supernet's own weights, BatchNorm re-estimated
for its depths: the model the search scored, with its val accuracy and expected MACs.
Fine-tuning (``exitnas finetune``) and retraining from scratch (``exitnas retrain``) are
separate commands, measured against it in the report.

Every step resumes: training continues from its last epoch checkpoint, the search tops its
study up to the configured number of completed trials, finished exports are skipped, and the
report is rewritten from what exists. Rerunning the same command after a kill continues where
it stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .arch import Arch
from .io import atomic_write_json
from .rundir import RunDir
from .space import Space


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    selected: tuple[Arch, ...]
    exports: tuple[Path, ...]
    report: Path


def select_archs(run: RunDir) -> list[Arch]:
    """One arch per deploy budget (:func:`exitnas.deploy.deploy_picks`), read from
    ``RUN/selected.json`` if an earlier run chose them."""
    from .deploy import deploy_picks

    path = run.path / "selected.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return [Arch.from_id(p["arch_id"]) for p in data["picks"]]
    picks = deploy_picks(run)
    atomic_write_json(path, {"rule": "per deploy budget, the searched sub-network with the best "
                                     "val accuracy at that budget, thresholds fitted for it",
                             "picks": [p.to_json() for p in picks]})
    return [p.arch for p in picks]


def run_pipeline(run: RunDir, space: Space, *, log: Callable[[str], None] = print) -> RunResult:
    from .export import export_run
    from .report import write_report
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

    archs = select_archs(run)
    log(f"[3/5] deploy: {len(archs)} budget(s) -> {run.path / 'selected.json'}")
    log(f"[4/5] export (the supernet's weights, BN re-estimated) -> {run.path / 'export'}")
    exports = []
    for arch in dict.fromkeys(archs):
        out = run.path / "export" / arch.id
        if (out / "arch.json").is_file():
            log(f"      done before: {out}")
        else:
            export_run(run, arch, out, weights=run.path / "supernet" / "weights.safetensors")
            log(f"      {out}   (try: exitnas predict {out} IMAGE...)")
        exports.append(out)

    log(f"[5/5] report -> {run.path / 'report'}")
    write_report(run)
    log(f"done: {run.path}. Next: exitnas dashboard {run.path} | exitnas finetune {run.path} "
        f"--arch ID --regime mixed | exitnas predict "
        f"{exports[0] if exports else 'EXPORT_DIR'} IMAGES...")
    return RunResult(run.path, tuple(archs), tuple(exports), run.path / "report")
