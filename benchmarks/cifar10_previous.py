"""CIFAR-10 benchmark: searched early-exit ResNets vs SDN's hand-placed exits.

    .venv/bin/python benchmarks/cifar10_previous.py            # CPU size (benchmarks/cifar10_previous.yaml)
    .venv/bin/python benchmarks/cifar10_previous.py --smoke    # 1 epoch, 1k images: a timing probe
    .venv/bin/python benchmarks/cifar10_previous.py --full     # full scale, meant for a GPU

On CIFAR-10 (JPEG, ``/work/shared/data/cifar10-jpeg.tar.gz`` extracted into
``.cache/cifar10-jpeg``) it

1. trains the supernet on the train split (val held out) and searches it (NSGA-II,
   in-process) under the space's expected-MACs budget;
2. retrains, with the same regime and epochs, (a) the searched architectures picked for 25 %
   and 50 % of the backbone's MACs (see :func:`pick_searched`) and (b) the SDN baseline: the
   backbone at full depth with 6 ``sdn_pool`` exits at the blocks closest to
   15/30/45/60/75/90 % of the backbone's MACs (:func:`sdn_positions`);
3. reports both on test: threshold-sweep and budgeted-batch curves (thresholds fitted on val),
   accuracy at 25/50/75/100 % of the backbone's MACs, AUC;
4. measures ranking fidelity: 8 front members, supernet-inherited (BN-recalibrated, cached) val
   accuracy vs val accuracy after a short, equal retraining of each; Kendall's tau.

Every step resumes from the run directory (``runs/cifar10-bench`` by default): rerun the same
command after a kill. ``RUN/benchmark/notes.md``, if present, is copied into the README as the
run's history (aborted sessions, stages redone). Results go to ``results/cifar10/`` (``--out``); stage wall times are kept
in ``RUN/benchmark/timings.json`` and summed over resumed sessions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from exitnas import protocols as P  # noqa: E402
from exitnas.arch import Arch, Exit  # noqa: E402
from exitnas.baselines import sdn_positions  # noqa: E402  (SDN's placement rule)
from exitnas.cost import CostTable, cost_table  # noqa: E402
from exitnas.data import Splits, TensorSet, batches, extract_tarball, load_splits  # noqa: E402
from exitnas.evaluate import ArchStats, load_or_build_cache  # noqa: E402
from exitnas.io import atomic_write_json, atomic_write_text  # noqa: E402
from exitnas.report import markdown  # noqa: E402
from exitnas.retrain import load_retrained, retrain  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402
from exitnas.search import SearchOptions, run_search  # noqa: E402
from exitnas.space import Space, load_space  # noqa: E402
from exitnas.train import train_supernet  # noqa: E402

TARBALL = Path("/work/shared/data/cifar10-jpeg.tar.gz")
DATA = Path(os.environ.get("EXITNAS_DATA_CACHE", ROOT / ".cache" / "cifar10-jpeg"))  # as tests/conftest.py
SPACE = ROOT / "benchmarks" / "cifar10_previous.yaml"
from exitnas.baselines import SDN_TARGETS  # noqa: E402,F401  (SDN, Kaya et al. 2019)
PICK_BUDGETS = (0.25, 0.5)
GOAL_POINTS = 2.0  # searched >= SDN + 2 points at 25 % and 50 %


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes of one benchmark scale: overrides of the space file, and the fidelity schedule
    (each of the 8 front members retrained for ``fidelity_epochs`` on the first
    ``fidelity_train`` train images, None = all)."""

    name: str
    overrides: dict = field(default_factory=dict)
    fidelity_archs: int = 8
    fidelity_epochs: int = 2
    fidelity_train: int | None = None
    run_dir: str = "runs/cifar10-bench"
    out: str = "results/cifar10"


SCALES = {
    # ~35-45 min of single-job time on 2 CPU cores (sizes in benchmarks/cifar10_previous.yaml)
    "cpu": Scale(name="cpu", fidelity_epochs=4, fidelity_train=None),
    # timing probe: 1 epoch on 1,000 images (900 train, 100 val); the whole test set (its
    # first 1,000 images, data.test_subset, would all be one class of the sorted ImageFolder)
    "smoke": Scale(name="smoke", overrides={
        "data.train_subset": 1000, "supernet.epochs": 1,
        "retrain.epochs": 2, "search.trials": 100, "search.population_size": 20},
        fidelity_archs=3, fidelity_epochs=2, fidelity_train=500,
        run_dir="runs/cifar10-smoke", out="runs/cifar10-smoke/results"),
    # full scale for a GPU: all 45,000 train images (5,000 val), full test set, long schedules
    "full": Scale(name="full", overrides={
        "data.train_subset": None, "supernet.epochs": 120, "supernet.random_subnets": 2,
        "supernet.channels_last": False, "retrain.epochs": 160, "retrain.channels_last": False,
        "search.trials": 3000, "search.population_size": 64},
        fidelity_epochs=30, fidelity_train=None,
        run_dir="runs/cifar10-full", out="results/cifar10-full"),
}


# ---- data ----------------------------------------------------------------------------------
def extract_cifar(dest: Path = DATA) -> Path:
    """The CIFAR-10 (JPEG) tarball extracted once (ImageFolder layout train/ test/), as the
    tests' ``cifar10_root`` fixture does."""
    if not TARBALL.is_file() and not (dest / "test").is_dir():
        sys.exit(f"CIFAR-10 (JPEG) tarball not found at {TARBALL}")
    return extract_tarball(TARBALL, dest)


def head_of_train(splits: Splits, n: int | None) -> Splits:
    """The same splits with only the first ``n`` train images (train is already shuffled by
    ``load_splits``); val and test unchanged."""
    if n is None or n >= len(splits.train):
        return splits
    t = splits.train
    return Splits(TensorSet(t.images[:n], t.labels[:n]), splits.val, splits.test,
                  splits.classes, splits.mean, splits.std)


# ---- stage timings -------------------------------------------------------------------------
class Timings:
    """Wall seconds per stage, summed over the sessions that worked on it until it first
    finished (a killed stage's partial session counts; a rerun after it finished does not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        entry = self.data.setdefault(stage, {"seconds": 0.0, "sessions": 0})
        if not entry.get("done"):
            entry["seconds"] += time.perf_counter() - t0
            entry["sessions"] += 1
            entry["done"] = True
            atomic_write_json(self.path, self.data)
        return out


def record_session(path: Path, load: str) -> list[dict]:
    """Append this session (start time, the code it imported, load) to ``sessions.json``."""
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "code": git_state(), "load": load})
    atomic_write_json(path, sessions)
    return sessions


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


# ---- the SDN baseline ----------------------------------------------------------------------
def sdn_arch(space: Space, costs: CostTable) -> Arch:
    """Full depth, 6 ``sdn_pool`` exits. The thresholds (0.9) play no part in the reported
    protocols, which fit their own on val."""
    exits = tuple(Exit(s, b, "sdn_pool") for s, b in sdn_positions(space, costs))
    return Arch(depths=space.max_depths, exits=exits, policy="max_softmax",
                thresholds=(0.9,) * len(exits))


# ---- choosing the searched architectures ---------------------------------------------------
def supernet_stats(run: RunDir, net, arch: Arch, splits: Splits, costs: CostTable) -> ArchStats:
    """``arch``'s val statistics inherited from the supernet (the search's BN-recalibrated
    cache, read from ``RUN/cache``)."""
    cache = load_or_build_cache(run, net, arch.depths, splits, split="val")
    return ArchStats.from_cache(cache, arch, costs)


def pick_searched(run: RunDir, space: Space, front: list[dict], splits: Splits,
                  costs: CostTable, net) -> dict[float, Arch]:
    """For each budget b in 25 % / 50 %: the front member whose supernet-inherited VAL
    threshold sweep is most accurate at expected cost <= b x backbone MACs (the same protocol
    the benchmark reports, scored on val only, so test is never looked at). Ties: the cheaper
    member. Written to ``RUN/benchmark/picks.json`` once, so a rerun retrains the same archs."""
    path = run.path / "benchmark" / "picks.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return {float(b): Arch.from_id(a) for b, a in data["picks"].items()}
    rows = []
    for r in front:
        arch = Arch.from_id(r["arch_id"])
        fitted = P.fit_sweep_budgets(P.threshold_sweep(supernet_stats(run, net, arch, splits, costs)),
                                     PICK_BUDGETS)
        for b, acc in zip(PICK_BUDGETS, fitted["val_accuracy"]):
            rows.append({"budget": b, "arch_id": arch.id, "sweep_val_accuracy": acc,
                         "front_relative_cost": r["relative_cost"],
                         "front_accuracy": r["accuracy"]})
    table = pd.DataFrame(rows)
    picks = {}
    for b in PICK_BUDGETS:
        t = table[(table["budget"] == b) & table["sweep_val_accuracy"].notna()]
        if t.empty:
            raise SystemExit(f"no front member reaches {b:.0%} of the backbone's MACs")
        best = t.sort_values(["sweep_val_accuracy", "front_relative_cost"],
                             ascending=[False, True]).iloc[0]
        picks[b] = Arch.from_id(best["arch_id"])
    table.to_csv(run.path / "benchmark" / "pick_candidates.csv", index=False, float_format="%.4f")
    atomic_write_json(path, {"picks": {str(b): a.id for b, a in picks.items()},
                             "rule": pick_searched.__doc__.split("\n\n")[0].strip()})
    return picks


# ---- evaluation ----------------------------------------------------------------------------
def model_stats(model, splits: Splits, costs: CostTable, arch: Arch, bs: int,
                which=("val", "test")) -> list[ArchStats]:
    c = dict(exit_macs=costs.exit_costs(arch), backbone_macs=costs.backbone())
    return [ArchStats.from_model(model, batches(getattr(splits, s), batch_size=bs,
                                                mean=splits.mean, std=splits.std), **c)
            for s in which]


def curve_points(val: ArchStats, test: ArchStats) -> dict[str, pd.DataFrame]:
    """Per protocol, every operating point with its val and test accuracy and cost."""
    sv, st = P.threshold_sweep(val), P.threshold_sweep(test)
    sweep = pd.DataFrame({"param": sv["threshold"], "val_accuracy": sv["accuracy"],
                          "val_relative_macs": sv["relative_macs"],
                          "test_accuracy": st["accuracy"], "test_relative_macs": st["relative_macs"]})
    bb = P.budgeted_batch(val, test)
    budgeted = pd.DataFrame({"param": bb["p"], "val_accuracy": bb["val_accuracy"],
                             "val_relative_macs": bb["val_relative_macs"],
                             "test_accuracy": bb["test_accuracy"],
                             "test_relative_macs": bb["test_relative_macs"]})
    return {"sweep": sweep, "budgeted": budgeted}


def at_budgets(points: pd.DataFrame) -> pd.DataFrame:
    """For each budget, the operating point chosen on VAL (most accurate with val cost <= the
    budget: exitnas.protocols' sweep rule, applied to the pooled points of one method's
    models) and its TEST accuracy and cost."""
    pooled = pd.DataFrame({"threshold": np.arange(len(points), dtype=float),
                           "accuracy": points["val_accuracy"].to_numpy(),
                           "relative_macs": points["val_relative_macs"].to_numpy()})
    fitted = P.fit_sweep_budgets(pooled)
    rows = []
    for b, i in zip(fitted["budget"], fitted["threshold"]):
        if np.isnan(i):
            rows.append({"budget_fraction": b, "accuracy": np.nan})
            continue
        p = points.iloc[int(i)]
        rows.append({"budget_fraction": b, "accuracy": p["test_accuracy"],
                     "test_relative_macs": p["test_relative_macs"],
                     "val_accuracy": p["val_accuracy"], "val_relative_macs": p["val_relative_macs"],
                     "arch": p["arch"], "param": p["param"]})
    return pd.DataFrame(rows)


def evaluate_methods(models: dict[str, list[tuple[Arch, object]]], splits: Splits,
                     costs: CostTable, bs: int):
    """Tables for every method (its models pooled) and every model."""
    summary, aucs, anytime, curves = [], [], [], []
    for method, entries in models.items():
        pooled = {"sweep": [], "budgeted": []}
        for arch, model in entries:
            val, test = model_stats(model, splits, costs, arch, bs)
            for proto, pts in curve_points(val, test).items():
                pts.insert(0, "arch", arch.id)
                pts.insert(0, "method", method)
                pts.insert(2, "protocol", proto)
                pooled[proto].append(pts)
            a = P.auc_table(val, test)
            a.insert(0, "scope", arch.id)
            a.insert(0, "method", method)
            aucs.append(a)
            at = P.anytime(test).rename(columns={"accuracy": "test_accuracy"})
            at["val_accuracy"] = P.anytime(val)["accuracy"]
            at.insert(0, "arch", arch.id)
            at.insert(0, "method", method)
            anytime.append(at)
        for proto, parts in pooled.items():
            pts = pd.concat(parts, ignore_index=True)
            curves.append(pts)
            t = at_budgets(pts)
            t.insert(0, "method", method)
            t.insert(3, "protocol", proto)
            summary.append(t)
            aucs.append(pd.DataFrame([{
                "method": method, "scope": "pooled (val-selected)",
                "protocol": {"sweep": "threshold_sweep", "budgeted": "budgeted_batch"}[proto],
                "auc": P.auc(pts["val_relative_macs"], pts["val_accuracy"], pts["test_accuracy"]),
                "val_auc": P.auc(pts["val_relative_macs"], pts["val_accuracy"])}]))
    cols = ["method", "budget_fraction", "accuracy", "protocol", "test_relative_macs",
            "val_accuracy", "val_relative_macs", "arch", "param"]
    summary = pd.concat(summary, ignore_index=True).reindex(columns=cols)
    return (summary.sort_values(["protocol", "budget_fraction", "method"]).reset_index(drop=True),
            pd.concat(aucs, ignore_index=True), pd.concat(anytime, ignore_index=True),
            pd.concat(curves, ignore_index=True))


def plot_curves(curves: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = {"searched": ["#1f77b4", "#2ca02c", "#17becf", "#9467bd"], "sdn": ["#d62728"]}
    for ax, proto, title in zip(axes, ("sweep", "budgeted"),
                                ("threshold sweep (100 thresholds)", "budgeted batch (MSDNet)")):
        c = curves[curves["protocol"] == proto]
        for method in ("searched", "sdn"):
            m = c[c["method"] == method]
            for i, arch in enumerate(dict.fromkeys(m["arch"])):
                d = m[m["arch"] == arch].sort_values("test_relative_macs")
                label = f"{method}: {arch if len(arch) < 48 else arch[:45] + '...'}"
                ax.plot(d["test_relative_macs"], d["test_accuracy"],
                        "-" if method == "searched" else "--", color=colors[method][i % 4],
                        lw=1.4, label=label)
            s = summary[(summary["protocol"] == proto) & (summary["method"] == method)]
            ax.plot(s["test_relative_macs"], s["accuracy"], "o" if method == "searched" else "s",
                    color=colors[method][0], ms=7, mfc="none", mew=1.5)
        for b in P.BUDGETS:
            ax.axvline(b, color="#999999", lw=0.7, ls=":")
        ax.set_xlim(0, 1.05)
        ax.set_title(title)
        ax.set_xlabel("expected MACs / backbone MACs (test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("CIFAR-10: searched vs SDN exits (markers: val-fitted points at 25/50/75/100 %)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- ranking fidelity ----------------------------------------------------------------------
def distinct_networks(front: list[dict]) -> list[dict]:
    """Front members with distinct networks (depths and exits), the cheapest of each: members
    that differ only in thresholds would be retrained into the same weights."""
    seen, out = set(), []
    for r in sorted(front, key=lambda r: r["expected_macs"]):
        arch = Arch.from_id(r["arch_id"])
        if (arch.depths, arch.exits) not in seen:
            seen.add((arch.depths, arch.exits))
            out.append(r)
    return out


def fidelity_candidates(trials: list[dict], k: int) -> list[dict]:
    """``k`` distinct networks from the search, front first: the feasible Pareto front
    (layer 1); when it holds fewer than ``k`` distinct networks, the next non-dominated layers
    of the remaining feasible trials, until ``k`` are reached (the last layer's members spread
    over its cost range). Each row gets its ``layer``."""
    from exitnas.search import pareto_front

    rows = [dict(r) for r in trials if r["feasible"]]
    taken: set = set()
    out: list[dict] = []
    layer = 0
    while rows and len(out) < k:
        layer += 1
        front = pareto_front(rows)
        ids = {r["trial"] for r in front}
        rows = [r for r in rows if r["trial"] not in ids]
        fresh = [r for r in distinct_networks(front)
                 if _network(r["arch_id"]) not in taken]
        fresh = spread(fresh, k - len(out)) if len(out) + len(fresh) > k else fresh
        for r in fresh:
            taken.add(_network(r["arch_id"]))
            out.append({**r, "layer": layer})
    return sorted(out, key=lambda r: r["expected_macs"])


def _network(arch_id: str) -> tuple:
    arch = Arch.from_id(arch_id)
    return arch.depths, arch.exits


def read_trials(run: RunDir) -> list[dict]:
    """``RUN/search/trials.csv`` (every complete trial) as dicts."""
    df = pd.read_csv(run.path / "search" / "trials.csv")
    return df.to_dict("records")


def sweep_auc(stats: ArchStats) -> float:
    """Area under the val threshold-sweep curve (accuracy vs relative MACs on [0, 1])."""
    sw = P.threshold_sweep(stats)
    return P.auc(sw["relative_macs"], sw["accuracy"])


def fidelity(run: RunDir, space: Space, scale: Scale, trials: list[dict], splits: Splits,
             costs: CostTable, net, log) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``scale.fidelity_archs`` distinct networks from the search (:func:`fidelity_candidates`),
    each retrained (in ``RUN/fidelity``) with the space's regime for ``fidelity_epochs`` on the
    first ``fidelity_train`` train images. Val measures, supernet-inherited (BN-recalibrated
    cache) vs retrained: accuracy under the arch's own policy and thresholds (the search
    objective), final-exit accuracy, and the threshold-sweep AUC; Kendall's tau of each."""
    from scipy.stats import kendalltau

    fspace = space.with_overrides({"retrain.epochs": scale.fidelity_epochs})
    fsplits = head_of_train(splits, scale.fidelity_train)
    frun = RunDir(run.path / "fidelity")
    rows = []
    for r in fidelity_candidates(trials, scale.fidelity_archs):
        arch = Arch.from_id(r["arch_id"])
        inherited = supernet_stats(run, net, arch, splits, costs)
        retrain(frun, arch, space=fspace, splits=fsplits, log=log)
        model = load_retrained(frun, arch, fspace.retrain.regime, fspace)
        (trained,) = model_stats(model, splits, costs, arch, space.data.eval_batch_size, ("val",))
        rows.append({"arch": arch.id, "front_layer": r["layer"],
                     "relative_cost": r["relative_cost"],
                     "supernet_val_accuracy": inherited.score(arch.policy, arch.thresholds).accuracy,
                     "retrained_val_accuracy": trained.score(arch.policy, arch.thresholds).accuracy,
                     "supernet_val_final": inherited.exit_accuracy[-1],
                     "retrained_val_final": trained.exit_accuracy[-1],
                     "supernet_val_sweep_auc": sweep_auc(inherited),
                     "retrained_val_sweep_auc": sweep_auc(trained)})
    table = pd.DataFrame(rows)
    taus = []
    for measure, col in (("own policy and thresholds (search objective)", "val_accuracy"),
                         ("final exit", "val_final"), ("threshold-sweep AUC", "val_sweep_auc")):
        res = kendalltau(table[f"supernet_{col}"], table[f"retrained_{col}"])
        taus.append({"measure": measure, "kendall_tau": float(res.statistic),
                     "p_value": float(res.pvalue), "n": len(table)})
    taus = pd.DataFrame(taus)
    table["kendall_tau"] = taus["kendall_tau"].iloc[0]
    table["kendall_p"] = taus["p_value"].iloc[0]
    return table, taus


# ---- the README -----------------------------------------------------------------------------
def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "exitnas", "benchmarks"],
                               cwd=ROOT, text=True, capture_output=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" (uncommitted changes under exitnas/ or launch/: "
                   f"{', '.join(l[3:] for l in dirty.splitlines())})" if dirty else "")


def goal_lines(summary: pd.DataFrame) -> tuple[list[str], bool]:
    lines, met = [], True
    for proto in ("sweep", "budgeted"):
        for b in PICK_BUDGETS:
            s = summary[(summary["protocol"] == proto) & (summary["budget_fraction"] == b)]
            acc = dict(zip(s["method"], s["accuracy"]))
            d = 100 * (acc.get("searched", np.nan) - acc.get("sdn", np.nan))
            ok = bool(d >= GOAL_POINTS)
            met &= ok
            lines.append(f"| {proto} | {b:.0%} | {100 * acc.get('searched', np.nan):.2f} | "
                         f"{100 * acc.get('sdn', np.nan):.2f} | {d:+.2f} | "
                         f"{'met' if ok else 'NOT met'} |")
    return lines, met


def write_readme(out: Path, *, scale: Scale, command: str, space: Space, splits: Splits,
                 costs: CostTable, sdn: Arch, picks: dict, search_info: dict,
                 summary: pd.DataFrame, aucs: pd.DataFrame, fid: pd.DataFrame | None,
                 taus: pd.DataFrame | None, timings: dict, load: dict, finished: list[str],
                 run_dir: Path, sessions: list[dict],
                 pick_table: pd.DataFrame | None = None) -> None:
    glines, met = goal_lines(summary)
    wide = summary.pivot_table(index=["protocol", "budget_fraction"], columns="method",
                               values="accuracy").reset_index()
    total = sum(v["seconds"] for v in timings.values())
    sn, rt = space.supernet, space.retrain
    frac = {p: costs.stem + sum(m for q, m in costs.blocks.items() if q <= p)
            for p in space.positions()}
    md = [
        "# CIFAR-10: searched early exits vs SDN's hand-placed exits", "",
        f"Made by `benchmarks/cifar10_previous.py` (scale `{scale.name}`); this README was "
        f"written at commit {git_state()}. Every number below is in the CSVs next to this "
        "file.", "",
        "## Command", "", f"    {command}", "",
        "Resumable: rerunning the same command continues the run directory "
        f"`{run_dir}` step by step (the numbers here are what that command writes). Sessions "
        "that worked on it (the library code each one imported at its start):", "",
        "| session started (UTC) | code | load average at start |", "|---|---|---|",
        *[f"| {x['started']} | {x['code']} | {x['load']} |" for x in sessions], "",
        "## Data and sizes", "",
        f"- Data: CIFAR-10 (JPEG) from `{TARBALL}` (ImageFolder, 32x32 RGB); "
        f"{len(splits.train):,} train images (random subset of the 50,000, "
        f"`data.train_subset` {space.data.train_subset}), {len(splits.val):,} val held out of "
        f"them (never augmented; thresholds and the search use it), {len(splits.test):,} test "
        "images (reports only). Augmentation: random crop (pad 4) + flip on train.",
        f"- Space `benchmarks/cifar10_previous.yaml`: CIFAR ResNet, widths 16/32/64, 1..3 basic blocks "
        f"per stage ({len(space.depth_settings())} depth settings; 3/3/3 = ResNet-20, "
        f"{costs.backbone():,} MACs = the backbone), exits after any block with heads "
        f"{'/'.join(space.exits.heads)}, {space.exits.min_exits}..{space.exits.max_exits} "
        "early exits, max-softmax policy.",
        f"- Supernet: {sn.epochs} epochs, batch {space.data.batch_size}, SGD lr "
        f"{sn.optim.lr} cosine, sandwich rule (largest + smallest + {sn.random_subnets} random) "
        f"with in-place distillation, BN recalibrated on {sn.bn_calib_batches} batches per "
        "depth setting.",
        f"- Search: NSGA-II in-process, {search_info.get('trials_complete')} trials "
        f"(population {space.search.population_size}), objectives val accuracy / expected "
        f"MACs, budget expected MACs <= {space.search.budget_fraction} x backbone; "
        f"{search_info.get('front_size')} archs on the feasible front.",
        f"- Retraining (searched and SDN alike): regime `{rt.regime}`, {rt.epochs} epochs "
        f"(phase 1 backbone {max(1, min(rt.epochs - 1, round(rt.epochs * rt.phase1_fraction)))}, "
        f"then joint with fresh heads), loss `{rt.loss}`, SGD lr {rt.optim.lr} cosine per "
        "phase, from scratch (not from supernet weights), same seed.",
        f"- Fidelity: {scale.fidelity_archs} distinct networks from the search, each retrained "
        f"with the same regime for only {scale.fidelity_epochs} epochs on "
        f"{scale.fidelity_train or len(splits.train):,} train images (a short, equal schedule "
        "for all, to fit the CPU budget; the models above get "
        f"{rt.epochs}).",
        f"- Threads: torch {torch.get_num_threads()}; channels_last "
        f"{sn.channels_last}/{rt.channels_last} (supernet/retrain).", "",
        "## Machine", "",
        f"{os.cpu_count()}-core {_cpu_model()} CPU ({platform.machine()}), no GPU, shared with other jobs while it ran (load average at the start "
        "of every session in the table above; this last session ended at "
        f"{load.get('end', '?')}). Wall times are therefore upper bounds on single-job "
        "times.", "",
        "| stage | wall time (s) | sessions |", "|---|---|---|",
        *[f"| {k} | {v['seconds']:.0f} | {v['sessions']} |" for k, v in timings.items()],
        f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | |", "",
        f"Finished stages: {', '.join(finished)}.", "",
        "## Methods", "",
        "- **sdn**: the backbone at full depth (3/3/3) with 6 `sdn_pool` exits at the blocks "
        "whose cumulative backbone MACs are closest to 15/30/45/60/75/90 % of the backbone "
        "(`sdn_positions`: " + ", ".join(f"s{s}b{b} at {frac[(s, b)] / costs.backbone():.1%}"
                                         for s, b in (e.position for e in sdn.exits)) + "): "
        f"`{sdn.id}`.",
        "- **searched**: for each of 25 % and 50 %, the front member whose supernet-inherited "
        "VAL threshold-sweep accuracy at that budget is highest (the reported protocol, scored "
        "on val only): " + "; ".join(f"{b:.0%}: `{a.id}`" for b, a in picks.items()) + ". "
        "Its curves pool the retrained searched models; each budget's operating point is "
        "chosen on val among all of them (most accurate with val cost <= budget) and reported "
        "on test.",
        "- Protocols (exitnas.protocols): threshold sweep (100 thresholds, same at every exit) "
        "and MSDNet's budgeted batch (p = i/20, thresholds from val); accuracy at a budget = "
        "the val-selected point's TEST accuracy; AUC = area under accuracy vs relative MACs on "
        "[0, 1] (points selected on val, test accuracy). MACs: fvcore, batch 1, exit heads "
        "counted (C_k includes every head on the way).", "",
        *_pick_lines(pick_table, picks),
        "## Results (test accuracy, %)", "",
        markdown(wide.assign(**{c: wide[c].map(lambda v: f"{100 * v:.2f}")
                                for c in ("searched", "sdn") if c in wide},
                             budget_fraction=wide["budget_fraction"].map("{:.0%}".format))),
        "Goal: searched >= SDN + 2 points at 25 % and 50 % of the backbone's MACs.", "",
        "| protocol | budget | searched | sdn | difference (points) | goal |",
        "|---|---|---|---|---|---|", *glines, "",
        f"**Goal {'met' if met else 'NOT met'}** at this scale.", "",
        "![curves](curves.png)", "",
        *_phase_lines(run_dir, [*picks.values(), sdn], rt.regime),
        *([] if met else _not_met_lines(run_dir, splits, space, scale, summary, taus,
                                        [a.id for a in picks.values()])),
        "## AUC (accuracy vs relative MACs on [0, 1])", "",
        markdown(aucs), ""]
    if fid is not None:
        layers = fid["front_layer"].value_counts().sort_index()
        md += ["## Ranking fidelity", "",
               "Supernet-inherited val measures (from the search's BN-recalibrated cache) vs "
               "the same measures after the short retraining above. Architectures: distinct "
               "networks (depths + exits; members differing only in thresholds would train "
               "into the same weights) from the feasible Pareto front, topped up from the next "
               "non-dominated layers of the feasible trials when the front has fewer than "
               f"{scale.fidelity_archs} (here: " + ", ".join(
                   f"{n} from layer {k}" for k, n in layers.items()) + "). "
               "Kendall's tau (scipy.stats.kendalltau):", "",
               markdown(taus), markdown(fid.drop(columns=["kendall_tau", "kendall_p"])), ""]
    else:
        md += ["## Ranking fidelity", "", "Not finished in this session.", ""]
    notes = run_dir / "benchmark" / "notes.md"
    if notes.is_file():  # hand-written history of the run (aborted sessions, changed stages)
        md += ["## Run history (notes kept in the run directory)", "", notes.read_text(), ""]
    md += ["## Files", "",
           "- `summary.csv`: method, budget_fraction, accuracy (test), protocol (sweep / "
           "budgeted), the test cost and val accuracy/cost of the val-chosen point, its arch "
           "and parameter (threshold or p).",
           "- `auc.csv`: AUC per method (pooled, val-selected) and per model, for the anytime "
           "exits, threshold sweep and budgeted batch.",
           "- `curves.csv`: every operating point (val and test) of every model; "
           "`curves.png`: both protocols, both methods.",
           "- `anytime.csv`: every exit's accuracy (val, test) and C_k.",
           "- `fidelity.csv`, `fidelity_tau.csv`: ranking fidelity.",
           "- `front.csv`: the search's feasible Pareto front (val); `summary.md`: the tables.",
           "", "## Caveats", "",
        f"- CPU scale: {len(splits.train):,} training images, {sn.epochs} supernet and "
        f"{rt.epochs} retraining epochs; absolute accuracies are far below a converged ResNet-20 "
        "(~91 %). The comparison is at equal data, regime and epochs.", *CAVEATS, ""]
    atomic_write_text(out / "README.md", "\n".join(md))


def _phase_lines(run_dir: Path, archs: list[Arch], regime: str) -> list[str]:
    """Final-exit val accuracy of each retrained model at the end of every phase (from its
    ``metrics.csv``): shows whether phase 2 helped or hurt the backbone."""
    lines = ["Final-exit val accuracy (%) of the retrained models at the end of each phase "
             f"(regime `{regime}`):", "", "| model | end of phase 1 | end of training |",
             "|---|---|---|"]
    for arch in dict.fromkeys(archs):
        path = run_dir / "retrain" / arch.id / regime / "metrics.csv"
        if not path.is_file():
            continue
        m = pd.read_csv(path)
        p1 = m[m["phase"] == 1]["val_acc_final"]
        first = f"{100 * p1.iloc[-1]:.1f}" if len(p1) else "-"
        lines.append(f"| `{arch.id}` | {first} | {100 * m['val_acc_final'].iloc[-1]:.1f} |")
    return lines + [""]


def _not_met_lines(run_dir: Path, splits: Splits, space: Space, scale: Scale,
                   summary: pd.DataFrame, taus: pd.DataFrame | None,
                   searched: list[str]) -> list[str]:
    """Why the goal is missed at this scale and what would close it."""
    sm = pd.read_csv(run_dir / "supernet" / "metrics.csv").iloc[-1]
    drops = []  # searched models whose final exit lost > 2 points in phase 2
    for arch in dict.fromkeys(searched):
        path = run_dir / "retrain" / arch / space.retrain.regime / "metrics.csv"
        m = pd.read_csv(path) if path.is_file() else None
        if m is not None and (m["phase"] == 1).any():
            p1, end = m[m["phase"] == 1]["val_acc_final"].iloc[-1], m["val_acc_final"].iloc[-1]
            if end < p1 - 0.02:
                drops.append((arch, p1, end))
    per_epoch = pd.read_csv(run_dir / "supernet" / "metrics.csv")["seconds"].median()
    full = SCALES["full"].overrides
    hours = per_epoch * 45_000 / len(splits.train) * full["supernet.epochs"] / 3600
    return [
        "### Why the goal is not met here, and what would close it", "",
        f"- Training is far from converged: the supernet's largest network reaches "
        f"{100 * sm['val_acc_largest']:.1f} % val accuracy (smallest "
        f"{100 * sm['val_acc_smallest']:.1f} %) after {space.supernet.epochs} epochs on "
        f"{len(splits.train):,} images, and the retrained models "
        f"{100 * summary['accuracy'].min():.0f}-{100 * summary['accuracy'].max():.0f} % test "
        "at these budgets. With the largest and smallest sub-networks this close, the "
        "supernet barely separates depths"
        + (f"; its ranking of the searched archs agrees with the retrained ranking at Kendall "
           f"tau {taus['kendall_tau'].iloc[0]:.2f} (p {taus['p_value'].iloc[0]:.2f}, search "
           "objective; fidelity below)" if taus is not None else "")
        + ". Single-seed differences of ~1-2 points between retrained models are within "
        "run-to-run spread.",
        "- The `mixed` regime's phase 2 restarts at the peak learning rate with fresh heads; "
        "with only a few epochs it can leave a model's final exit below where phase 1 left it"
        + ("".join(f" (`{a}`: {100 * p1:.1f} -> {100 * end:.1f} %)" for a, p1, end in drops)
           + ". Pooling the searched models with val-selected operating points then falls "
           "back to the other searched model at that budget" if drops else "") + ".",
        "- What would close it: the same script at full scale (`--full`: all 45,000 train "
        f"images, {full['supernet.epochs']} supernet epochs, {full['retrain.epochs']} "
        f"retraining epochs, {full['search.trials']} trials) on a GPU; on these 2 CPU cores "
        f"the supernet alone would take ~{hours:.0f} h. Short of that, longer schedules (tens "
        "of supernet epochs, >= 30 retraining epochs), several seeds per model, and a lower "
        "phase-2 learning rate are the levers.", ""]


def _pick_lines(table: pd.DataFrame | None, picks: dict) -> list[str]:
    """The picked archs' supernet-inherited val sweep accuracy at their budget, next to the
    best and median front member (from ``RUN/benchmark/pick_candidates.csv``)."""
    if table is None or table.empty:
        return []
    lines = ["Pick candidates (supernet-inherited val threshold-sweep accuracy at the budget, "
             f"over {table['arch_id'].nunique()} front members):", "",
             "| budget | picked arch | its val accuracy | front median | front members reaching "
             "the budget |", "|---|---|---|---|---|"]
    for b, arch in picks.items():
        t = table[(table["budget"] == b) & table["sweep_val_accuracy"].notna()]
        mine = t[t["arch_id"] == arch.id]["sweep_val_accuracy"]
        lines.append(f"| {b:.0%} | `{arch.id}` | {100 * mine.max():.2f} | "
                     f"{100 * t['sweep_val_accuracy'].median():.2f} | {len(t)} |")
    return lines + [""]


CAVEATS = [
    "- One seed per model; differences of ~1 point are within run-to-run noise at this scale.",
    "- The fidelity retraining is deliberately short, so tau measures agreement with an "
    "early-training ranking, not with fully trained models.",
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ---- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="1 epoch on 1k images: timing probe")
    g.add_argument("--full", action="store_true", help="full scale (meant for a GPU)")
    ap.add_argument("--run-dir", help="run directory (default depends on the scale)")
    ap.add_argument("--out", help="results folder (default depends on the scale)")
    # 1 thread: on the shared 2-core machine (load ~8) a ResNet-20 training step took 0.85 s
    # with 1 thread and ~3 s with 2 (side by side), as intra-op threads wait on each other
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = ap.parse_args(argv)
    scale = SCALES["smoke" if args.smoke else "full" if args.full else "cpu"]
    torch.set_num_threads(args.threads)
    run = RunDir(ROOT / (args.run_dir or scale.run_dir))
    out = ROOT / (args.out or scale.out)
    out.mkdir(parents=True, exist_ok=True)
    env = f"EXITNAS_DATA_CACHE={DATA} " if "EXITNAS_DATA_CACHE" in os.environ else ""
    command = env + " ".join(["python", "benchmarks/cifar10_previous.py", *(argv or sys.argv[1:])])
    load = {"start": " ".join(f"{v:.1f}" for v in os.getloadavg())}
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    root = extract_cifar()
    space = load_space(SPACE, {"data.root": str(root), **scale.overrides})
    space = run.init(space)
    (run.path / "benchmark").mkdir(exist_ok=True)
    timings = Timings(run.path / "benchmark" / "timings.json")
    sessions = record_session(run.path / "benchmark" / "sessions.json", load["start"])
    splits = load_splits(space)
    costs = cost_table(space)
    bs = space.data.eval_batch_size
    log(f"data: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test; "
        f"backbone {costs.backbone():,} MACs; run dir {run.path}")

    log("[1/6] supernet")
    timings.run("1 supernet training", train_supernet, run, space, splits=splits, log=log)
    log("[2/6] search")
    result = timings.run("2 search (incl. exit caches)", run_search, run.path, SearchOptions())
    log(f"      {result.trials} trials, front {len(result.front)}")

    from exitnas.supernet import Supernet

    net = Supernet(space).load(run.path / "supernet" / "weights.safetensors")
    picks = timings.run("3 pick searched archs", pick_searched, run, space, result.front,
                        splits, costs, net)
    sdn = sdn_arch(space, costs)
    searched = list(dict.fromkeys(picks.values()))
    log(f"[3/6] retrain: searched {[a.id for a in searched]}, sdn {sdn.id}")
    models = {"searched": [], "sdn": []}
    for method, archs in (("searched", searched), ("sdn", [sdn])):
        for arch in archs:
            timings.run(f"4 retrain {method} {arch.id}", retrain, run, arch, space=space,
                        splits=splits, log=log)
            models[method].append((arch, load_retrained(run, arch, space.retrain.regime, space)))
    finished = ["supernet", "search", "retrain searched + sdn"]

    log("[4/6] evaluate")
    summary, aucs, anytime, curves = timings.run("5 evaluate (val + test passes)",
                                                 evaluate_methods, models, splits, costs, bs)
    _write_tables(out, summary, aucs, anytime, curves, result)
    plot_curves(curves, summary, out / "curves.png")
    finished.append("evaluation")

    log("[5/6] ranking fidelity")
    fid = taus = None
    fid, taus = timings.run("6 fidelity (short retrains)", fidelity, run, space, scale,
                            read_trials(run), splits, costs, net, log)
    _csv(fid, out / "fidelity.csv")
    _csv(taus, out / "fidelity_tau.csv")
    finished.append("fidelity")

    log("[6/6] write README")
    load["end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    write_readme(out, scale=scale, command=command, space=space, splits=splits, costs=costs,
                 sdn=sdn, picks=picks, search_info=result.summary, summary=summary, aucs=aucs,
                 fid=fid, taus=taus, timings=timings.data, load=load, finished=finished,
                 run_dir=run.path, sessions=sessions, pick_table=_read_csv(run.path / "benchmark" / "pick_candidates.csv"))
    _write_summary_md(out, summary, aucs, taus)
    log(f"done: {out}")
    print(summary.to_string(), flush=True)


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, float_format="%.3f")


def _write_tables(out: Path, summary, aucs, anytime, curves, result) -> None:
    _csv(summary, out / "summary.csv")
    _csv(aucs, out / "auc.csv")
    _csv(anytime, out / "anytime.csv")
    _csv(curves, out / "curves.csv")
    _csv(pd.DataFrame(result.front), out / "front.csv")


def _write_summary_md(out: Path, summary, aucs, taus) -> None:
    md = ["# CIFAR-10 benchmark summary", "", "## Accuracy at budgets (test)", "",
          markdown(summary), "## AUC", "", markdown(aucs)]
    if taus is not None:
        md += ["## Ranking fidelity", "", markdown(taus)]
    atomic_write_text(out / "summary.md", "\n".join(md))


if __name__ == "__main__":
    main()
