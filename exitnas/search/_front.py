"""The feasible Pareto front of a study and its hypervolume, written to ``RUN/search``.

Files: ``trials.csv`` (every complete trial), ``front.csv`` / ``front.md`` (the feasible
non-dominated trials, cheapest first; one row per distinct architecture), ``front.png`` (all
trials, the front and the budget) and ``hypervolume.json``.

Hypervolume is taken in the plane (accuracy, relative cost = expected cost / the backbone's
cost), both normalised to [0, 1]-ish so runs of different spaces compare, with the reference point
(accuracy 0, relative cost = the expected-cost budget as a fraction of the backbone): the area
that the front dominates inside the feasible box. Cost columns name the cost model's unit
(``expected_macs``, ``path_ms``...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..units import MACS, Unit
from ._budget import Budget


@dataclass(frozen=True)
class FrontSummary:
    trials: int
    feasible: int
    front: list[dict]
    hypervolume: float
    reference: dict


def trial_rows(study, unit: Unit = MACS) -> list[dict]:
    """One dict per COMPLETE trial that carries exitnas' user attributes (costs in
    ``unit``, the study's)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        ua = t.user_attrs
        if "arch_id" not in ua or t.values is None:
            continue  # a trial some other tool added to the study
        feasible = all(v <= 0 for v in t.constraints.values()) if t.constraints \
            else bool(ua.get("feasible", True))
        rows.append({"trial": t.number, "arch_id": ua["arch_id"], "accuracy": t.values[0],
                     unit.name("expected"): t.values[1], "relative_cost": ua["relative_cost"],
                     unit.name("path"): ua[unit.name("path")], "feasible": feasible,
                     "n_exits": len(ua["arch"]["exits"]),
                     "exit_accuracy": ";".join(f"{a:.3f}" for a in ua["exit_accuracy"])})
    return rows


def pareto_front(rows: list[dict], unit: Unit = MACS) -> list[dict]:
    """Feasible rows not dominated in (accuracy max, expected cost min), cheapest first; the
    earliest trial of each distinct architecture / point."""
    best, out, key = -1.0, [], unit.name("expected")
    for r in sorted((r for r in rows if r["feasible"]),
                    key=lambda r: (r[key], -r["accuracy"], r["trial"])):
        if r["accuracy"] > best:
            out.append(r)
            best = r["accuracy"]
    return out


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (accuracy, cost) — accuracy maximised, cost minimised —
    inside the box bounded by ``ref`` = (accuracy, cost)."""
    pts = sorted((c, a) for a, c in points if a > ref[0] and c < ref[1])
    area, best = 0.0, ref[0]
    for c, a in pts:
        if a > best:
            area += (a - best) * (ref[1] - c)
            best = a
    return area


def reference_point(budget: Budget, rows: list[dict]) -> dict:
    if budget.expected is not None:
        cost = budget.expected / budget.backbone
    else:  # no budget: the costliest trial seen bounds the box
        cost = max((r["relative_cost"] for r in rows), default=1.0)
    return {"accuracy": 0.0, "relative_cost": cost}


def summarise(study, budget: Budget) -> FrontSummary:
    rows = trial_rows(study, budget.unit)
    front = pareto_front(rows, budget.unit)
    ref = reference_point(budget, rows)
    hv = hypervolume_2d([(r["accuracy"], r["relative_cost"]) for r in front],
                        (ref["accuracy"], ref["relative_cost"]))
    return FrontSummary(trials=len(rows), feasible=sum(r["feasible"] for r in rows),
                        front=front, hypervolume=hv, reference=ref)


def write_outputs(folder: Path, study, budget: Budget, *, study_name: str, storage: str,
                  counted: str = "") -> FrontSummary:
    """Write trials.csv, front.csv, front.md, front.png and hypervolume.json (atomically);
    ``counted``: what the costs are (the cost table's words)."""
    import pandas as pd

    from ..io import atomic_path, atomic_write_json, atomic_write_text
    from ..report import markdown

    folder.mkdir(parents=True, exist_ok=True)
    s = summarise(study, budget)
    u = budget.unit
    rows = trial_rows(study, u)
    on_front = {r["trial"] for r in s.front}
    cols = ["trial", "arch_id", "accuracy", u.name("expected"), "relative_cost", u.name("path"),
            "feasible", "n_exits", "exit_accuracy"]
    trials = pd.DataFrame(rows, columns=cols).sort_values("trial")
    trials["on_front"] = trials["trial"].isin(on_front)
    front = pd.DataFrame(s.front, columns=cols).drop(columns=["feasible"])
    for name, df in (("trials.csv", trials), ("front.csv", front)):
        with atomic_path(folder / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.3f")
    b = budget.to_json()
    lines = [f"# Pareto front — study `{study_name}`", "",
             f"Storage: `{storage}`. {s.trials} complete trials, {s.feasible} feasible, "
             f"{len(s.front)} on the feasible front.",
             f"Backbone: {u.show(budget.backbone)}" + (f" ({counted})" if counted else "")
             + ". Budget: "
             + (f"expected cost <= {budget.show(budget.expected)}"
                if budget.expected is not None else "none")
             + (f"; worst-case path <= {u.show(budget.path)}" if budget.path else "") + ".",
             f"Hypervolume in (accuracy, relative cost): {s.hypervolume:.4f}, reference point "
             f"(accuracy {s.reference['accuracy']}, relative cost "
             f"{s.reference['relative_cost']:.3f}).", "",
             markdown(front[["trial", "accuracy", u.name("expected"), "relative_cost", "n_exits",
                             "arch_id"]], digits=3)]
    atomic_write_text(folder / "front.md", "\n".join(lines))
    atomic_write_json(folder / "hypervolume.json", {
        "hypervolume": s.hypervolume,
        "objectives": ["accuracy (maximise)", f"relative_cost = expected {u.label} / backbone "
                       f"{u.label} (minimise)"],
        "reference_point": s.reference, "front_size": len(s.front), "trials": s.trials,
        "feasible_trials": s.feasible, "budget": b, "study": study_name})
    _plot(folder / "front.png", trials, front, budget)
    return s


def _plot(path: Path, trials, front, budget: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    feas = trials[trials["feasible"]]
    infeas = trials[~trials["feasible"]]
    ax.scatter(infeas["relative_cost"], infeas["accuracy"], s=8, c="#bbbbbb", label="infeasible")
    ax.scatter(feas["relative_cost"], feas["accuracy"], s=8, c="#7aa6d8", label="feasible")
    if len(front):
        ax.step(front["relative_cost"], front["accuracy"], where="post", c="#c0392b",
                marker="o", ms=4, label="feasible Pareto front")
    if budget.expected is not None:
        ax.axvline(budget.expected / budget.backbone, ls="--", c="k", lw=1, label="budget")
    ax.set_xlabel(f"expected {budget.unit.label} / backbone {budget.unit.label}")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
