"""Scoring of the CIFAR-10 benchmark (:mod:`benchmarks.cifar10`): every method's networks on
val and test, the three protocols at each budget, AUC, fidelity, and the results folder.

A method is a set of networks; a protocol gives each network its operating points for a budget
(threshold sweep: one max-softmax threshold for every exit, 100 values in [0, 1]; budgeted
batch: MSDNet's p = i/20; fitted: :func:`exitnas.thresholds.fit_thresholds` on val for that
budget). For a budget b (a fraction of the backbone's MACs) the method's operating point is
the most accurate on VAL among all its networks' points with val expected MACs <= b (ties: the
cheaper); its TEST accuracy and test expected MACs are reported. A network without early exits
has one point whatever the protocol. MACs: fvcore, batch 1, every head on the way counted.
"""
from __future__ import annotations

import csv
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks._common import model_stats
from exitnas import protocols as P
from exitnas.arch import Arch
from exitnas.baselines import sdn_arch
from exitnas.cost import cost_table
from exitnas.data import load_splits
from exitnas.evaluate import ArchStats, load_or_build_cache
from exitnas.finetune import finetune_dir
from exitnas.retrain import retrain_dir
from exitnas.supernet import Supernet
from exitnas.thresholds import fit_budgets, fit_thresholds

BUDGETS = (0.25, 0.5, 0.75)
AUC_GRID = tuple(round(0.05 * i, 2) for i in range(1, 16))  # 5 % .. 75 % of the backbone
PROTOCOLS = ("sweep", "budgeted", "fitted")
SUMMARY_COLUMNS = ["method", "weights", "protocol", "budget_fraction", "seed", "test_accuracy",
                   "val_accuracy", "test_relative_macs"]


class Net:
    """One network: its val statistics, and its test statistics made on first use (only
    chosen operating points are ever scored on test)."""

    def __init__(self, name: str, arch: Arch, val: ArchStats, test) -> None:
        self.name, self.arch, self.val, self._test = name, arch, val, test

    @cached_property
    def test(self) -> ArchStats:
        return self._test() if callable(self._test) else self._test

    @cached_property
    def _fixed(self) -> dict[str, list[tuple]]:
        """The budget-free (val accuracy, val relative MACs, thresholds) of the sweep and the
        budgeted batch."""
        k = self.val.num_exits - 1
        if k == 0:
            return {p: [self._point(())] for p in PROTOCOLS}
        sweep = [self._point((float(t),) * k) for t in P.SWEEP_THRESHOLDS]
        budgeted = [self._point(P.budgeted_batch_thresholds(self.val.conf, p))
                    for p in P.BUDGETED_BATCH_P]
        return {"sweep": sweep, "budgeted": budgeted}

    def _point(self, thresholds: tuple) -> tuple:
        s = self.val.score("max_softmax", thresholds)
        return s.accuracy, s.expected_cost / self.val.backbone_cost, tuple(thresholds)

    @cached_property
    def _fits(self) -> dict[float, tuple]:
        """The fitted point of every budget the benchmark asks for, fitted in one call (the
        starts are scored once for all budgets)."""
        budgets = sorted(set(BUDGETS) | set(AUC_GRID))
        fits = fit_budgets(self.val, budgets=[b * self.val.backbone_cost for b in budgets])
        return {b: self._point(f.thresholds) if f.feasible else None
                for b, f in zip(budgets, fits)}

    def points(self, protocol: str, budget: float) -> list[tuple]:
        """(val accuracy, val relative MACs, max-softmax thresholds) of ``protocol``'s
        operating points for ``budget``."""
        if protocol != "fitted" or self.val.num_exits == 1:
            return self._fixed[protocol]
        if budget in self._fits:
            point = self._fits[budget]
        else:
            fit = fit_thresholds(self.val, budget=budget * self.val.backbone_cost)
            point = self._point(fit.thresholds) if fit.feasible else None
        return [] if point is None else [point]


def choose(nets: list[Net], protocol: str, budget: float) -> dict | None:
    """The method's operating point for ``budget`` (module docs), chosen on val and then
    scored on test; None when none fits."""
    best = None
    for net in nets:
        for va, vc, ts in net.points(protocol, budget):
            if vc <= budget + 1e-12 and (best is None or (va, -vc) > (best[0], -best[1])):
                best = (va, vc, ts, net)
    if best is None:
        return None
    va, vc, ts, net = best
    t = net.test.score("max_softmax", ts)
    return {"val_accuracy": va, "val_relative_macs": vc, "test_accuracy": t.accuracy,
            "test_relative_macs": t.expected_cost / net.test.backbone_cost,
            "network": net.name, "arch": net.arch.id,
            "params": ",".join("inf" if math.isinf(x) else f"{x:.4f}" for x in ts)}


class SeedNets:
    """One seed's networks with their val and test statistics: inherited ones from the
    supernet's exit caches (BN re-estimated per depth setting, as the search scored them),
    trained ones from a pass of the model, stored in ``RUN/benchmark/stats`` per weights
    file."""

    def __init__(self, bench, seed: int) -> None:
        self.bench, self.seed = bench, seed
        self.run, self.space = bench.run(seed), bench.space(seed)
        self.costs = cost_table(self.space)
        self._caches: dict = {}

    @cached_property
    def splits(self):
        return load_splits(self.space)

    @cached_property
    def supernet(self) -> Supernet:
        with torch.random.fork_rng(devices=[]):
            return Supernet(self.space, pretrained=False).load(self.run.path / "supernet" / "weights.safetensors")

    def _cached(self, arch: Arch, split: str) -> ArchStats:
        key = (arch.depths, split)
        if key not in self._caches:  # one read (or build) per depth setting and split
            self._caches[key] = load_or_build_cache(self.run, self.supernet, arch.depths,
                                                    self.splits, split=split)
        return ArchStats.from_cache(self._caches[key], arch, self.costs)

    def inherited(self, arch: Arch, name: str) -> Net:
        return Net(name, arch, self._cached(arch, "val"), lambda: self._cached(arch, "test"))

    def _model_stats(self, arch: Arch, weights: Path, split: str) -> ArchStats:
        return model_stats(self.space, arch, weights, self.splits, split,
                           self.run.path / "benchmark" / "stats")

    def trained(self, arch: Arch, weights: Path, name: str) -> Net:
        return Net(name, arch, self._model_stats(arch, weights, "val"),
                   lambda: self._model_stats(arch, weights, "test"))

    def picks(self) -> list[dict]:
        import json

        return json.loads((self.run.path / "selected.json").read_text())["picks"]

    def methods(self) -> dict[tuple[str, str], list[Net]]:
        """(method, weights) -> networks."""
        picks = {p["arch_id"]: p for p in self.picks()}
        archs = [Arch.from_id(a) for a in picks]
        sdn = sdn_arch(self.space, self.costs)
        ft = lambda a: finetune_dir(self.run, a, "mixed") / "model.safetensors"  # noqa: E731
        statics = [Arch(depths=d, exits=(), policy="max_softmax", thresholds=())
                   for d in self.space.depth_settings()]
        return {
            ("searched", "inherited"): [self.inherited(a, f"pick {i}") for i, a in enumerate(archs)],
            ("searched", "finetuned"): [self.trained(a, ft(a), f"pick {i}")
                                        for i, a in enumerate(archs)],
            ("sdn", "inherited"): [self.inherited(sdn, "sdn")],
            ("sdn", "ic_only"): [self.trained(sdn, retrain_dir(self.run, sdn, "disjoint")
                                              / "model.safetensors", "sdn")],
            ("sdn", "finetuned"): [self.trained(sdn, ft(sdn), "sdn")],
            ("static", "inherited"): [self.inherited(a, f"static {a.id}") for a in statics],
        }

    def consistency(self) -> list[dict]:
        """Each deploy pick scored again from the caches with its recorded thresholds: the
        val accuracy and expected MACs the search recorded (what ships is what was scored)."""
        rows = []
        for p in self.picks():
            arch = Arch.from_id(p["arch_id"])
            s = self.inherited(arch, "").val.score(arch.policy, arch.thresholds)
            rows.append({"seed": self.seed, "budget_fraction": p["budget_fraction"],
                         "arch": arch.id, "study_val_accuracy": p["val_accuracy"],
                         "rescored_val_accuracy": s.accuracy,
                         "study_val_expected_macs": p["val_expected_macs"],
                         "rescored_val_expected_macs": s.expected_cost,
                         "equal": s.accuracy == p["val_accuracy"]
                         and math.isclose(s.expected_cost, p["val_expected_macs"], rel_tol=1e-9)})
        return rows


def seed_tables(nets: SeedNets) -> dict[str, list[dict]]:
    """One seed's rows: ``summary`` (the fixed columns), ``choices`` (which network and
    thresholds each summary row took), ``curves`` (every protocol on :data:`AUC_GRID`) and
    ``auc`` (mean test accuracy over that grid, 0 where nothing fits: the area under the
    budget curve up to 75 % over its width)."""
    out: dict[str, list[dict]] = {"summary": [], "choices": [], "curves": [], "auc": []}
    for (method, weights), members in nets.methods().items():
        for protocol in PROTOCOLS:
            key = {"method": method, "weights": weights, "protocol": protocol}
            for b in BUDGETS:
                c = choose(members, protocol, b) or {}
                row = {**key, "budget_fraction": b, "seed": nets.seed,
                       **{k: c.get(k, np.nan) for k in SUMMARY_COLUMNS[-3:]}}
                out["summary"].append(row)
                out["choices"].append({**row, **{k: c.get(k, "") for k in (
                    "val_relative_macs", "network", "arch", "params")}})
            curve = [choose(members, protocol, b) or {} for b in AUC_GRID]
            out["curves"] += [{**key, "seed": nets.seed, "budget_fraction": b,
                               "test_accuracy": c.get("test_accuracy", np.nan),
                               "val_accuracy": c.get("val_accuracy", np.nan)}
                              for b, c in zip(AUC_GRID, curve)]
            out["auc"].append({**key, "seed": nets.seed, "budget_lo": AUC_GRID[0],
                               "budget_hi": AUC_GRID[-1],
                               "auc": float(np.mean([c.get("test_accuracy", 0.0) for c in curve])),
                               "val_auc": float(np.mean([c.get("val_accuracy", 0.0)
                                                         for c in curve]))})
    return out


def objective(stats: ArchStats, budgets_macs: list[float]) -> float:
    """The search's objective: mean fitted val accuracy over the deploy budgets (0 where a
    budget cannot be met)."""
    fits = fit_budgets(stats, budgets=budgets_macs)
    return float(np.mean([f.accuracy if f.feasible else 0.0 for f in fits]))


def fidelity_rows(bench, nets: SeedNets) -> list[dict]:
    """Per front network: the search's objective and final-exit val accuracy, inherited and
    after fine-tuning (mixed, the benchmark's epochs)."""
    seed = nets.seed
    with open(nets.run.path / "search" / "front.csv", newline="") as fh:
        study = {r["arch_id"]: float(r["accuracy"]) for r in csv.DictReader(fh)}
    budgets = [b * nets.costs.backbone() for b in nets.space.search.deploy_budgets]
    rows = []
    for arch in bench.fidelity_archs(seed):
        inh = nets.inherited(arch, arch.id)
        ft = nets.trained(arch, finetune_dir(nets.run, arch, "mixed") / "model.safetensors",
                          arch.id)
        rows.append({"seed": seed, "arch": arch.id, "study_objective": study.get(arch.id),
                     "inherited_objective": objective(inh.val, budgets),
                     "finetuned_objective": objective(ft.val, budgets),
                     "inherited_final_val": inh.val.exit_accuracy[-1],
                     "finetuned_final_val": ft.val.exit_accuracy[-1]})
    return rows


def kendall(rows: list[dict]) -> list[dict]:
    from scipy.stats import kendalltau

    out = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        for measure, a, b in (("fitted val accuracy, mean over deploy budgets",
                               "inherited_objective", "finetuned_objective"),
                              ("final exit val accuracy", "inherited_final_val",
                               "finetuned_final_val")):
            tau, p = kendalltau([r[a] for r in mine], [r[b] for r in mine])
            out.append({"measure": f"seed {seed}: {measure}", "kendall_tau": float(tau),
                        "p_value": float(p), "n": len(mine)})
    return out


def write_results(bench, out: Path) -> None:
    """Every table, the plot and the README (:mod:`benchmarks.cifar10_readme`)."""
    import json

    from benchmarks.cifar10_readme import write_readme

    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"summary": [], "choices": [], "curves": [], "auc": [],
                                   "consistency": []}
    fidelity = []
    for seed in bench.scale.seeds:
        nets = SeedNets(bench, seed)
        for name, part in seed_tables(nets).items():
            rows[name] += part
        rows["consistency"] += nets.consistency()
        if seed in bench.scale.fidelity_seeds:
            fidelity += fidelity_rows(bench, nets)
    backbone = json.loads((bench.work / "backbone.json").read_text())
    tables = {name: pd.DataFrame(r) for name, r in rows.items()}
    tables["summary"] = tables["summary"][SUMMARY_COLUMNS]
    tables["fidelity_networks"] = pd.DataFrame(fidelity)
    tables["fidelity"] = pd.DataFrame(kendall(fidelity),
                                      columns=["measure", "kendall_tau", "p_value", "n"])
    tables["backbone"] = pd.DataFrame([{"seed": bench.scale.seeds[0],
                                        "test_accuracy": backbone["test_accuracy"],
                                        "epochs": backbone["epochs"]}])
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    plot_curves(tables["curves"], out / "curves.png")
    write_readme(bench, out, tables, backbone)


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """Test accuracy (mean over seeds) of each method's fitted operating point vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = curves[curves["protocol"] == "fitted"].groupby(
        ["method", "weights", "budget_fraction"], as_index=False)["test_accuracy"].mean()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, weights), g in df.groupby(["method", "weights"]):
        ax.plot(g["budget_fraction"] * 100, g["test_accuracy"] * 100, marker="o", ms=3,
                label=f"{method} ({weights})")
    ax.set_xlabel("expected-MACs budget, % of the backbone (operating point chosen on val)")
    ax.set_ylabel("test accuracy, % (CIFAR-10 JPEG)")
    ax.set_title("fitted exit rule, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["Net", "choose", "SeedNets", "seed_tables", "fidelity_rows", "kendall",
           "write_results", "BUDGETS", "AUC_GRID", "PROTOCOLS", "SUMMARY_COLUMNS"]
