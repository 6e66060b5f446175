"""Joint vs disjoint vs mixed training of one fixed multi-exit CIFAR ResNet (seed paper:
Kubaty et al., "How to train your multi-exit model?").

    .venv/bin/python benchmarks/regimes.py                 # CPU size (~30 min, 1 thread, shared machine)
    .venv/bin/python benchmarks/regimes.py --full          # full scale, meant for a GPU

Model: ResNet-20 (width 16, depths 3/3/3) with 4 exits: SDN-pool heads after stage-0 block 1,
stage-1 block 1 and stage-2 block 0, plus the final exit. Every regime gets the same total epochs
(phase 1 = half of them for disjoint and mixed). Data: CIFAR-10 (JPEG) from
../shared/data/cifar10-jpeg.tar.gz (extracted into .cache/cifar10-jpeg), val held out of train.
Evaluation: accuracy of every exit on test, and the threshold sweep (100 max-softmax thresholds
in [0, 1], one shared by all exits; for each budget the best VAL point with expected MACs <=
budget × backbone MACs, its TEST accuracy reported).

Writes results/regimes/{summary.csv, per_exit.csv, summary.md, regimes.png, README.md}.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exitnas.arch import Arch  # noqa: E402
from exitnas.cost import cost_table  # noqa: E402
from exitnas.data import extract_tarball, batches, load_splits  # noqa: E402
from exitnas.policy import ExitStats  # noqa: E402
from exitnas.retrain import REGIMES, retrain  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402
from exitnas.space import parse_space  # noqa: E402

TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ARCH = "d3.3.3~s0b1=sdn_pool,s1b1=sdn_pool,s2b0=sdn_pool~max_softmax=0.9,0.9,0.9"
BUDGETS = (0.25, 0.5, 0.75, 1.0)
THRESHOLDS = np.linspace(0.0, 1.0, 100)


def cifar_root() -> Path:
    cache = Path(os.environ.get("EXITNAS_DATA_CACHE", ROOT / ".cache" / "cifar10-jpeg"))
    if not TARBALL.is_file() and not (cache / "test").is_dir():
        sys.exit(f"regimes: CIFAR-10 (JPEG) tarball not found at {TARBALL}")
    return extract_tarball(TARBALL, cache)


def make_space(args, root: Path):
    return parse_space({
        "name": "regimes_resnet20", "num_classes": 10, "input": {"channels": 3, "size": 32},
        "backbone": {"family": "resnet", "block": "basic", "stem_channels": 16, "stages": [
            {"channels": 16, "stride": 1, "depths": [3]},
            {"channels": 32, "stride": 2, "depths": [3]},
            {"channels": 64, "stride": 2, "depths": [3]}]},
        "exits": {"positions": [[0, 1], [1, 1], [2, 0]], "heads": ["sdn_pool"], "max_exits": 3},
        "data": {"dataset": "imagefolder", "root": str(root), "val_fraction": 0.1,
                 "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
                 "batch_size": args.batch_size, "eval_batch_size": 500,
                 "train_subset": args.train_subset, "test_subset": args.test_subset},
        "retrain": {"epochs": args.epochs, "phase1_fraction": 0.5, "loss": "mean_ce",
                    "optim": {"lr": args.lr, "weight_decay": 5e-4}, "seed": args.seed,
                    "channels_last": args.channels_last},
    }, file="benchmarks/regimes.py")


@torch.no_grad()
def exit_stats(model, data, splits, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """conf [K, N], pred [K, N], labels [N] of every exit."""
    model.eval()
    confs, preds, labels = [], [], []
    for x, y in batches(data, batch_size=500, mean=splits.mean, std=splits.std):
        s = ExitStats.stack([z.cpu() for z in model.forward_exits(x.to(device))])
        confs.append(s.conf)
        preds.append(s.pred)
        labels.append(y)
    return (torch.cat(confs, 1).numpy(), torch.cat(preds, 1).numpy(), torch.cat(labels).numpy())


def sweep(conf, pred, labels, costs) -> pd.DataFrame:
    """Local threshold sweep: one max-softmax threshold t at every early exit."""
    k = conf.shape[0]
    rows = []
    for t in THRESHOLDS:
        leave = np.vstack([conf[:-1] >= np.float32(t), np.ones((1, conf.shape[1]), bool)])
        idx = leave.argmax(0)
        cols = np.arange(conf.shape[1])
        acc = float((pred[idx, cols] == labels).mean())
        frac = np.bincount(idx, minlength=k) / conf.shape[1]
        rows.append({"threshold": float(t), "accuracy": acc,
                     "relative_macs": float((frac * np.asarray(costs)).sum() / costs.backbone)})
    return pd.DataFrame(rows)


class Costs(list):
    backbone: int


def budget_table(val: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for b in BUDGETS:
        fit = val[val["relative_macs"] <= b + 1e-12]
        if fit.empty:
            rows.append({"budget_fraction": b, "threshold": np.nan, "val_accuracy": np.nan,
                         "accuracy": np.nan, "relative_macs": np.nan})
            continue
        best = fit.sort_values(["accuracy", "relative_macs", "threshold"],
                               ascending=[False, True, True]).index[0]
        rows.append({"budget_fraction": b, "threshold": val.loc[best, "threshold"],
                     "val_accuracy": val.loc[best, "accuracy"],
                     "accuracy": test.loc[best, "accuracy"],
                     "relative_macs": test.loc[best, "relative_macs"]})
    return pd.DataFrame(rows)


def cross_check(val_arrays, test_arrays, costs, ours: pd.DataFrame) -> str:
    """Compare with exitnas.protocols.budget_accuracy when that module is importable."""
    try:
        from exitnas.evaluate import ArchStats
        from exitnas.protocols import budget_accuracy
    except ImportError as err:
        return f"exitnas.protocols not importable ({err}); local sweep used"

    def stats(arr):
        conf, pred, labels = arr
        return ArchStats(conf, np.zeros_like(conf), pred, labels, tuple(costs), costs.backbone)

    theirs = budget_accuracy(stats(val_arrays), stats(test_arrays))
    same = np.allclose(theirs["test_accuracy"].to_numpy(float), ours["accuracy"].to_numpy(float),
                       equal_nan=True)
    return ("local sweep agrees with exitnas.protocols.budget_accuracy" if same else
            "WARNING: local sweep differs from exitnas.protocols.budget_accuracy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true",
                   help="full scale: all 50k train images, 10k test, 60 epochs per regime")
    p.add_argument("--train-subset", type=int, default=10_000)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "regimes"))
    p.add_argument("--out", default=str(ROOT / "results" / "regimes"))
    args = p.parse_args()
    if args.full:
        args.train_subset, args.test_subset, args.epochs = None, None, 60
    torch.set_num_threads(args.threads)
    command = "benchmarks/regimes.py " + " ".join(sys.argv[1:])

    root = cifar_root()
    space = make_space(args, root)
    arch = Arch.parse(ARCH).validate(space)
    table = cost_table(space)
    costs = Costs(table.exit_costs(arch))
    costs.backbone = table.backbone()
    t0 = time.perf_counter()
    splits = load_splits(space)
    load_s = time.perf_counter() - t0
    print(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
          f"({load_s:.0f} s); C_k / backbone: {[round(c / costs.backbone, 3) for c in costs]}")
    run_dir = RunDir(args.run_dir)
    if run_dir.path.exists():
        shutil.rmtree(run_dir.path)  # a benchmark always trains from scratch
    run_dir.init(space)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    summary, per_exit, curves, notes, timing, logs = [], [], {}, [], {}, {}
    for regime in args.regimes.split(","):
        phase1 = {}

        def on_phase(phase, epoch, model, phase1=phase1):
            if phase in (2, 3) and epoch > 0:  # end of phase 1: the backbone's own accuracy
                _, pred, labels = exit_stats(model, splits.test, splits, device)
                phase1["final"] = float((pred[-1] == labels).mean())

        t = time.perf_counter()
        result = retrain(run_dir, arch, space=space, regime=regime, splits=splits,
                         on_phase_start=on_phase)
        timing[regime] = time.perf_counter() - t
        logs[regime] = (result.out / "metrics.csv").read_text()
        model = result.model.to(device)
        val_arr = exit_stats(model, splits.val, splits, device)
        test_arr = exit_stats(model, splits.test, splits, device)
        val_curve = sweep(*val_arr, costs)
        test_curve = sweep(*test_arr, costs)
        curves[regime] = test_curve
        table_b = budget_table(val_curve, test_curve)
        notes.append(f"{regime}: {cross_check(val_arr, test_arr, costs, table_b)}")
        for _, row in table_b.iterrows():
            summary.append({"regime": regime, **row.to_dict()})
        conf, pred, labels = test_arr
        for k, name in enumerate(model.exit_names):
            per_exit.append({"regime": regime, "exit": k + 1, "name": name, "macs": costs[k],
                             "relative_macs": costs[k] / costs.backbone,
                             "accuracy": float((pred[k] == labels).mean())})
        per_exit.append({"regime": regime, "exit": 0, "name": "phase1_backbone_final",
                         "macs": costs.backbone, "relative_macs": 1.0,
                         "accuracy": phase1.get("final", np.nan)})
        print(f"{regime}: {timing[regime]:.0f} s; test acc per exit "
              f"{[round(r['accuracy'], 4) for r in per_exit if r['regime'] == regime]}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_df = pd.DataFrame(summary)[["regime", "budget_fraction", "accuracy", "relative_macs",
                                        "threshold", "val_accuracy"]]
    summary_df.to_csv(out / "summary.csv", index=False, float_format="%.3f")
    exits_df = pd.DataFrame(per_exit)[["regime", "exit", "name", "macs", "relative_macs",
                                       "accuracy"]]
    exits_df.to_csv(out / "per_exit.csv", index=False, float_format="%.3f")
    for regime, text in logs.items():
        (out / f"metrics_{regime}.csv").write_text(text)
    pd.concat([c.assign(regime=r) for r, c in curves.items()])[
        ["regime", "threshold", "accuracy", "relative_macs"]].to_csv(
        out / "sweep_test.csv", index=False, float_format="%.3f")

    budget_md = summary_df.pivot(index="regime", columns="budget_fraction", values="accuracy")
    budget_md.columns = [f"{int(b * 100)} % MACs" for b in budget_md.columns]
    exit_md = exits_df[exits_df["exit"] > 0].pivot(index="regime", columns="name",
                                                    values="accuracy")
    exit_md = exit_md[[n for n in model.exit_names]]
    exit_md["phase-1 backbone (final)"] = exits_df[exits_df["exit"] == 0].set_index(
        "regime")["accuracy"]
    findings = verdict(budget_md, exit_md)
    md = ("## Test accuracy at a MACs budget (threshold sweep, thresholds fitted on val)\n\n"
          + budget_md.to_markdown(floatfmt=".3f") + "\n\n## Test accuracy of every exit\n\n"
          + exit_md.to_markdown(floatfmt=".3f") + "\n\nC_k / backbone MACs: "
          + ", ".join(f"{n} {c / costs.backbone:.3f}" for n, c in zip(model.exit_names, costs))
          + "\n\n## Findings\n\n" + findings + "\n")
    (out / "summary.md").write_text(md)
    plot(curves, exits_df, out / "regimes.png")
    readme(out, args, command, splits, costs, timing, load_s, md, notes)
    print(md)


def verdict(budget: pd.DataFrame, exits: pd.DataFrame, tie: float = 0.005) -> str:
    """The seed paper's three claims, checked on these numbers (tie = within 0.5 pp)."""
    lines = []
    if not {"joint", "disjoint", "mixed"} <= set(budget.index):
        return "(not every regime was run)"
    best_other = budget.loc[["joint", "disjoint"]].max()
    ok = (budget.loc["mixed"] >= best_other - tie)
    detail = ", ".join(f"{c}: mixed {budget.loc['mixed', c]:.3f} vs best other "
                       f"{best_other[c]:.3f}" for c in budget.columns)
    lines.append(f"- Mixed best or tied (within {tie * 100:.1f} pp) at every budget: "
                 f"{'HOLDS' if ok.all() else 'DOES NOT HOLD'} ({detail}).")
    early = [c for c in exits.columns if c not in ("final", "phase-1 backbone (final)")]
    wins = [exits.loc["joint", c] > exits.loc["disjoint", c] for c in early]
    detail = ", ".join(f"{c}: {exits.loc['joint', c]:.3f} vs {exits.loc['disjoint', c]:.3f}"
                       for c in early)
    held = "HOLDS" if all(wins) else ("PARTLY" if any(wins) else "DOES NOT HOLD")
    lines.append(f"- Joint beats disjoint at the early exits: {held} ({detail}).")
    d_final, d_bb = exits.loc["disjoint", "final"], exits.loc["disjoint", "phase-1 backbone (final)"]
    lines.append(f"- Disjoint keeps the backbone's own accuracy at the final exit: "
                 f"{'HOLDS' if abs(d_final - d_bb) < 1e-9 else 'DOES NOT HOLD'} (final "
                 f"{d_final:.3f} = phase-1 backbone {d_bb:.3f}; joint's final exit "
                 f"{exits.loc['joint', 'final']:.3f}, mixed's {exits.loc['mixed', 'final']:.3f}).")
    return "\n".join(lines)


def plot(curves: dict, exits: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for regime, c in curves.items():
        c = c.sort_values("relative_macs")
        ax[0].plot(c["relative_macs"], c["accuracy"], label=regime)
        e = exits[(exits["regime"] == regime) & (exits["exit"] > 0)]
        ax[1].plot(e["relative_macs"], e["accuracy"], marker="o", label=regime)
    for b in BUDGETS:
        ax[0].axvline(b, color="grey", lw=0.5, ls=":")
    ax[0].set(xlabel="expected MACs / backbone MACs", ylabel="test accuracy",
              title="threshold sweep (test)")
    ax[1].set(xlabel="C_k / backbone MACs", ylabel="test accuracy", title="every exit (anytime)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("ResNet-20 w16, 4 exits, CIFAR-10 (JPEG): joint vs disjoint vs mixed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def readme(out: Path, args, command, splits, costs, timing, load_s, md, notes) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        model_name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                          if l.startswith("model name"))
    except (OSError, StopIteration):
        model_name = cpu
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU only: {model_name}, {os.cpu_count()} cores, torch.set_num_threads({args.threads}); " \
        "the machine was shared with other jobs at the time"
    text = f"""# Training regimes: joint vs disjoint vs mixed

Seed paper: Kubaty et al., "How to train your multi-exit model? Analyzing the impact of
training strategies". Script: `benchmarks/regimes.py`.

## Command

    .venv/bin/python {command}

(`--full` runs the full-scale version: all 50,000 train images, the 10,000 test images and 60
epochs per regime; meant for a GPU.)

## Setup

- Data: CIFAR-10 (JPEG) from `../shared/data/cifar10-jpeg.tar.gz` (lossy re-encoding: numbers
  are close to, not equal to, those on the original binaries). {len(splits.train)} train /
  {len(splits.val)} val (held out of a {args.train_subset or 50000}-image train subset, seed 0,
  never augmented) / {len(splits.test)} test images. Train augmentation: random crop (pad 4) +
  horizontal flip.
- Model: ResNet-20 (basic blocks, widths 16/32/64, 3/3/3 blocks), 4 exits: SDN-pool heads after
  stage-0 block 1, stage-1 block 1, stage-2 block 0, and the final exit. Arch id `{ARCH}`.
  Backbone {costs.backbone:,} MACs (fvcore, batch 1); C_k / backbone =
  {', '.join(f'{c / costs.backbone:.3f}' for c in costs)} (heads on the way included).
- Training: {args.epochs} epochs in total for every regime (joint: {args.epochs} x phase 2;
  disjoint: {round(args.epochs / 2)} x phase 1 + {args.epochs - round(args.epochs / 2)} x phase 3;
  mixed: {round(args.epochs / 2)} x phase 1 + {args.epochs - round(args.epochs / 2)} x phase 2 with re-initialised
  heads), SGD (momentum 0.9, Nesterov, weight decay 5e-4), lr {args.lr}, cosine schedule per
  phase, batch {args.batch_size}, loss = mean cross-entropy of all exits, seed {args.seed}.
- Evaluation: 100 max-softmax thresholds in [0, 1] (one shared by every early exit); for each
  budget (25/50/75/100 % of the backbone's MACs) the threshold with the best val accuracy whose
  val expected MACs fit the budget; its test accuracy is reported. "phase-1 backbone" = test
  accuracy of the final exit at the end of phase 1 (disjoint and mixed).
- Machine: {device}. Data loading {load_s:.0f} s; training wall time per regime:
  {', '.join(f'{r} {s / 60:.1f} min' for r, s in timing.items())}.
- Sweep: {'; '.join(notes)}.

## Files

- `summary.csv`: regime, budget_fraction, accuracy (test), relative_macs (test expected MACs /
  backbone), threshold, val_accuracy.
- `per_exit.csv`: regime, exit (1-based; 0 = the phase-1 backbone's final exit), name, macs
  (C_k), relative_macs, accuracy (test).
- `metrics_<regime>.csv`: the per-epoch training log (phase, lr, train loss, val accuracy of
  every exit).
- `sweep_test.csv`: the whole test curve of each regime. `summary.md`: the tables below.
  `regimes.png`: test accuracy vs relative MACs (sweep) and per exit.

{md}"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
