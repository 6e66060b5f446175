"""Joint vs disjoint vs mixed training of one multi-exit CIFAR-10 ResNet-20 (seed paper: Kubaty
et al., "How to train your multi-exit model?"), all on the CIFAR-10 benchmark's stage-0
backbone.

    .venv/bin/python benchmarks/regimes.py --work runs/cifar10 [--epochs 10] [--seeds 0 1 2]

Needs ``WORK/seed0/backbone/weights.safetensors`` (``benchmarks/cifar10.py --until
backbone``). Model: SDN's placement (ResNet-20 at full depth, ``sdn_pool`` after the blocks
nearest 15..90 % of the backbone's MACs). Every regime gets the same total epochs, the
backbone's B plus ``--epochs`` E:

- disjoint: the stage-0 backbone (B epochs), then E epochs of the heads alone on it, frozen
  (``retrain --regime disjoint`` with ``retrain.phase1: backbone``);
- mixed: the stage-0 backbone, then E epochs of everything with fresh heads (``mixed`` with
  ``retrain.phase1: backbone``);
- joint: B + E epochs of everything from scratch (``retrain --regime joint``).

Each (regime, seed) is a resumable run under ``WORK/regimes/seed<k>``; the report covers what
has finished (``n`` per regime). Evaluation: every exit's test accuracy, and the threshold sweep,
budgeted batch and fitted exit rule at 25 / 50 / 75 / 100 % of the backbone's MACs (operating
points chosen on val, reported on test; :mod:`benchmarks.cifar10_eval`). Writes
``results/regimes/{summary.csv, per_exit.csv, README.md, regimes.png}``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks._common import Sessions, Timings, machine, model_stats  # noqa: E402
from benchmarks.cifar10 import SCALES, Bench  # noqa: E402
from benchmarks.cifar10_eval import Net, choose  # noqa: E402
from exitnas.baselines import sdn_arch  # noqa: E402
from exitnas.cost import cost_table  # noqa: E402
from exitnas.data import load_splits  # noqa: E402
from exitnas.report import markdown  # noqa: E402
from exitnas.retrain import REGIMES, retrain  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402

BUDGETS = (0.25, 0.5, 0.75, 1.0)
LR = 0.1  # every phase has its own cosine schedule from this peak (exitnas.retrain)


def regime_space(bench: Bench, seed: int, regime: str, epochs: int):
    space = bench.space(seed).with_overrides({"backbone.weights": str(bench.backbone),
                                              "retrain.optim.lr": LR})
    total = space.backbone_training.epochs + epochs
    if regime == "joint":
        return space.with_overrides({"retrain.phase1": "train", "retrain.epochs": total})
    return space.with_overrides({"retrain.phase1": "backbone", "retrain.epochs": epochs})


def train(bench: Bench, seed: int, regime: str, epochs: int) -> Path:
    space = regime_space(bench, seed, regime, epochs)
    run = RunDir(bench.work / "regimes" / f"seed{seed}")
    run.init(space)
    arch = sdn_arch(space, cost_table(space))
    return retrain(run, arch, space=space, regime=regime, log=bench.log).out


def evaluate(bench: Bench, seed: int, regime: str, epochs: int, out: Path, splits):
    space = regime_space(bench, seed, regime, epochs)
    arch = sdn_arch(space, cost_table(space))
    folder = bench.work / "regimes" / "stats"
    weights = out / "model.safetensors"
    val, test = (model_stats(space, arch, weights, splits, s, folder) for s in ("val", "test"))
    net = Net(regime, arch, val, test)
    rows = []
    for protocol in ("sweep", "budgeted", "fitted"):
        for b in BUDGETS:
            c = choose([net], protocol, b) or {}
            rows.append({"regime": regime, "seed": seed, "protocol": protocol,
                         "budget_fraction": b,
                         **{k: c.get(k, np.nan) for k in ("test_accuracy", "val_accuracy",
                                                          "test_relative_macs")}})
    exits = [{"regime": regime, "seed": seed, "exit": k, "name": name,
              "relative_macs": m / test.backbone_cost, "test_accuracy": a}
             for k, (name, m, a) in enumerate(zip(test.names, test.exit_costs, test.exit_accuracy))]
    return rows, exits


def verdict(exits: pd.DataFrame, backbone_test: float) -> list[str]:
    """The seed paper's ordering, measured (means over the seeds each regime has)."""
    mean = exits.groupby(["regime", "exit"])["test_accuracy"].mean().unstack()
    final = mean.columns.max()
    early = [c for c in mean.columns if c != final]
    lines = []

    def have(*names):
        return all(n in mean.index for n in names)

    if have("mixed", "joint"):
        d = (mean.loc["mixed", final] - mean.loc["joint", final]) * 100
        lines.append(f"- mixed >= joint at the final exit: {'holds' if d >= 0 else 'does not hold'}"
                     f" ({d:+.2f} points)")
    if have("joint", "disjoint"):
        d = (mean.loc["joint", early].mean() - mean.loc["disjoint", early].mean()) * 100
        lines.append(f"- joint > disjoint at the early exits (mean over them): "
                     f"{'holds' if d > 0 else 'does not hold'} ({d:+.2f} points)")
    if have("disjoint"):
        d = (mean.loc["disjoint", final] - backbone_test) * 100
        lines.append(f"- disjoint keeps the backbone's final-exit accuracy: "
                     f"{'holds' if abs(d) <= 0.01 else 'does not hold'} ({d:+.2f} points; the "
                     "frozen backbone and its BN statistics are the stage-0 ones)")
    return lines


def write(out: Path, summary: pd.DataFrame, exits: pd.DataFrame, args, bench: Bench,
          splits) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    exits.to_csv(out / "per_exit.csv", index=False, float_format="%.6g")
    backbone = json.loads((bench.work / "backbone.json").read_text())
    table = summary.groupby(["protocol", "regime", "budget_fraction"])["test_accuracy"] \
        .agg(["mean", "std", "count"]).reset_index()
    per_exit = exits.groupby(["regime", "exit", "name"])[["relative_macs", "test_accuracy"]] \
        .mean().reset_index()
    fig, ax = plt.subplots(figsize=(6, 4))
    for regime, g in per_exit.groupby("regime"):
        ax.plot(g["relative_macs"] * 100, g["test_accuracy"] * 100, marker="o", label=regime)
    ax.set_xlabel("C_k, % of the backbone's MACs")
    ax.set_ylabel("test accuracy of exit k, % (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "regimes.png", dpi=120)
    plt.close(fig)
    space = regime_space(bench, args.seeds[0], "disjoint", args.epochs)
    (out / "README.md").write_text("\n".join([
        "# Training regimes: joint vs disjoint vs mixed, on one trained backbone",
        "",
        "Seed paper: Kubaty et al., \"How to train your multi-exit model?\". Script: "
        "`benchmarks/regimes.py` (its docstring has the design).",
        "",
        "## Command",
        "",
        f"    python benchmarks/regimes.py --scale {args.scale} --work {args.work} --epochs "
        f"{args.epochs} --seeds "
        + " ".join(map(str, args.seeds)),
        "",
        f"Machine: {machine()}. Data: CIFAR-10 (JPEG), {len(splits.train):,} train / "
        f"{len(splits.val):,} val / {len(splits.test):,} test. "
        f"Model: `{sdn_arch(space, cost_table(space)).id}`. Stage-0 backbone: "
        f"{backbone['epochs']} epochs, test accuracy {backbone['test_accuracy']:.4f}. Every "
        f"regime: {backbone['epochs']} + {args.epochs} epochs in total, SGD lr {LR} cosine per "
        f"phase, loss {space.retrain.loss}. Seeds finished per regime: "
        + ", ".join(f"{r} {n}" for r, n in exits.groupby("regime")["seed"].nunique().items())
        + ".",
        "",
        "## The seed paper's ordering",
        "",
        *verdict(exits, backbone["test_accuracy"]),
        "",
        "## Test accuracy of every exit (mean over seeds)",
        "",
        markdown(per_exit, digits=4),
        "",
        "## At a MACs budget (operating point chosen on val, test accuracy; mean, std, seeds)",
        "",
        markdown(table, digits=4),
        "",
        "Stage wall times: `" + str(bench.work / "regimes" / "timings.json") + "`.",
        ""]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "cifar10")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "regimes")
    p.add_argument("--epochs", type=int, default=10, help="epochs after the backbone's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=["disjoint", "mixed", "joint"])
    args = p.parse_args(argv)
    bench = Bench(SCALES[args.scale], args.work.resolve())
    if not bench.backbone.is_file() or not (bench.work / "backbone.json").is_file():
        sys.exit(f"{bench.backbone}: no stage-0 backbone; run benchmarks/cifar10.py "
                 "--until backbone first")
    Sessions(bench.work / "regimes" / "sessions.json").start(epochs=args.epochs)
    timings = Timings(bench.work / "regimes" / "timings.json")
    splits = load_splits(regime_space(bench, args.seeds[0], "disjoint", args.epochs))
    summary, exits = [], []
    for regime in args.regimes:  # cheap regimes first: a stop leaves whole regimes behind
        for seed in args.seeds:
            stage = f"{regime} seed{seed}"
            run_out = timings.run(stage, train, bench, seed, regime, args.epochs)
            s, e = evaluate(bench, seed, regime, args.epochs, run_out, splits)
            summary += s
            exits += e
            write(args.out, pd.DataFrame(summary), pd.DataFrame(exits), args, bench, splits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
