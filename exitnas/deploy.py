"""Deploy by budget: for each ``search.deploy_budgets`` entry, the searched sub-network with
the best val accuracy at that budget, with the thresholds fitted for it.

    picks = deploy_picks(RunDir("runs/q"))        # one Pick per deploy budget, cheapest first
    export_run(run, picks[0].arch, weights=run / "supernet/weights.safetensors")

A pick is chosen among the study's complete trials whose fit at that budget is feasible:
highest val accuracy, then lower expected cost, then the earlier trial. Its arch carries the
thresholds fitted for that budget, so exporting it with the supernet's weights (BatchNorm
re-estimated for its depths) ships exactly what the search scored: the same val accuracy and
expected cost (``val_accuracy``, ``val_expected_<unit>``). With ``search.thresholds: evolved``
a trial's own thresholds count at every budget its expected cost fits under. Costs are in the
unit of the study's cost model (``picks.json`` keys name it: ``budget_macs``, ``budget_ms``).
Picks are uncalibrated (search scoring is, :mod:`exitnas.calibration`) and so is their export;
``exitnas finetune`` calibrates a pick (``policy.calibration``) and re-fits its thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass

from .arch import Arch
from .errors import RunDirError
from .rundir import RunDir
from .units import MACS, Unit


@dataclass(frozen=True, kw_only=True)
class Pick:
    budget: float            # in unit
    budget_fraction: float   # of the plain backbone's cost
    arch: Arch               # with the thresholds fitted for this budget
    trial: int
    val_accuracy: float
    val_expected_cost: float
    unit: Unit = MACS

    def to_json(self) -> dict:
        n = self.unit.name
        return {n("budget"): self.budget, "budget_fraction": self.budget_fraction,
                "arch_id": self.arch.id, "trial": self.trial, "val_accuracy": self.val_accuracy,
                n("val_expected"): self.val_expected_cost, "cost_unit": self.unit.key}


def _fits(trial, budgets: tuple[float, ...], unit: Unit) -> list[dict]:
    ua, n = trial.user_attrs, unit.name
    if ua.get("fits"):
        return ua["fits"]
    arch = Arch.from_json(ua["arch"])  # evolved thresholds: the trial's own at every budget
    return [{n("budget"): b, "thresholds": list(arch.thresholds), "accuracy": trial.values[0],
             n("expected"): trial.values[1], "feasible": trial.values[1] <= b} for b in budgets]


def pick_budgets(trials, budgets: tuple[float, ...], backbone: float,
                 unit: Unit = MACS) -> list[Pick]:
    """One :class:`Pick` per budget (in ``unit``, ascending) from complete Optuna trials (a
    trial's fit for a budget is the one recorded for exactly that budget); a budget no trial
    meets is a RunDirError."""
    n = unit.name
    best: list[tuple | None] = [None] * len(budgets)
    for t in trials:
        if "arch_id" not in t.user_attrs or t.values is None:
            continue
        fits = {f[n("budget")]: f for f in _fits(t, budgets, unit)}
        for i, b in enumerate(budgets):
            f = fits.get(b)
            if f is None or not f["feasible"]:
                continue
            key = (f["accuracy"], -f[n("expected")], -t.number)
            if best[i] is None or key > best[i][0]:
                best[i] = (key, t, f)
    picks = []
    for b, entry in zip(budgets, best):
        if entry is None:
            raise RunDirError(f"no searched architecture meets the deploy budget of "
                              f"{unit.show(b)} ({b / backbone:.3f} of the backbone); add trials "
                              "or raise it")
        _, t, f = entry
        arch = Arch.from_json(t.user_attrs["arch"]).with_thresholds(tuple(f["thresholds"]))
        picks.append(Pick(budget=b, budget_fraction=b / backbone, arch=arch, unit=unit,
                          trial=t.number, val_accuracy=float(f["accuracy"]),
                          val_expected_cost=float(f[n("expected")])))
    return picks


def deploy_picks(run: RunDir) -> list[Pick]:
    """:func:`pick_budgets` over the run's study (as ``RUN/search/study.json`` records it), at
    the deploy budgets that study was searched for."""
    import optuna
    from optuna.trial import TrialState

    from .search._budget import Budget
    from .search._storage import resolve_study

    if not (run.path / "search" / "study.json").is_file():
        raise RunDirError(f"{run.path}: no search yet; run `exitnas search {run.path}` first")
    spec, name = resolve_study(run, storage=None, study_name=None, default_name="")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=spec.open())
    stored = study.user_attrs.get("exitnas", {}).get("budget", {})
    try:
        budget = Budget.from_json(stored)
    except KeyError:
        budget = None
    if budget is None or not budget.deploy:
        raise RunDirError(f"study {name!r} records no deploy budgets (made by an older "
                          "exitnas); search again in a new run directory")
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return pick_budgets(trials, budget.deploy, budget.backbone, budget.unit)


__all__ = ["Pick", "pick_budgets", "deploy_picks"]
