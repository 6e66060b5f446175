"""Helpers for the search tests: a tiny trained supernet in a run directory, study counts."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).resolve().parent / "data" / "tiny.yaml"


def train_tiny_run(run_path: Path, *, steps: int = 40, seed: int = 0) -> Path:
    """RunDir(run_path).init(tiny space) + a supernet trained for ``steps`` quick SGD steps on
    the synthetic data (sandwich of max / min / random depths, every exit's CE) and saved to
    RUN/supernet/weights.safetensors."""
    import torch
    import torch.nn.functional as F

    from exitnas.data import batches, load_splits
    from exitnas.rundir import RunDir
    from exitnas.space import load_space
    from exitnas.supernet import Supernet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    torch.manual_seed(seed)
    rng = random.Random(seed)
    space = load_space(TINY)
    run = RunDir(run_path)
    run.init(space)
    splits = load_splits(space)
    net = Supernet(space).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    done, epoch = 0, 0
    while done < steps:
        for x, y in batches(splits.train, batch_size=32, mean=splits.mean, std=splits.std,
                            shuffle=True, seed=epoch, drop_last=True):
            opt.zero_grad()
            for depths in (space.max_depths, space.min_depths,
                           tuple(rng.choice(st.depths) for st in space.backbone.stages)):
                logits = net.forward_exits(x, depths)
                (sum(F.cross_entropy(z, y) for z in logits) / len(logits)).backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    net.eval().save(run / "supernet/weights.safetensors")
    torch.set_num_threads(threads)
    return run_path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def study_of(run_path: Path, storage: str | None = None):
    """The run's Optuna study (as recorded in RUN/search/study.json)."""
    import optuna

    from exitnas.rundir import RunDir
    from exitnas.search._storage import resolve_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = json.loads((run_path / "search" / "study.json").read_text())["study_name"]
    spec, name = resolve_study(RunDir(run_path), storage=storage, study_name=name,
                               default_name=name)
    return optuna.load_study(study_name=name, storage=spec.open())


def trial_counts(run_path: Path, storage: str | None = None) -> dict:
    """COMPLETE / RUNNING / FAIL counts, and whether trial numbers and committed trial uids
    are unique."""
    from optuna.trial import TrialState

    trials = study_of(run_path, storage).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    uids = [t.system_attrs.get("exitnas:uid") for t in complete if "exitnas:uid" in t.system_attrs]
    return {"complete": len(complete),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "fail": sum(t.state == TrialState.FAIL for t in trials),
            "numbers_unique": len(numbers) == len(set(numbers)) == len(trials),
            "numbers_contiguous": sorted(numbers) == list(range(len(trials))),
            "uids_unique": len(uids) == len(set(uids))}
