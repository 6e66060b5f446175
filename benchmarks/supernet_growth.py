"""How the supernet should grow from a trained backbone (issue 13, stage 1): the distillation
teacher (``supernet.teacher``: the moving largest network, or the frozen backbone) and how
candidate heads touch the backbone (``supernet.heads``: detached, or sampled exit sets whose
losses reach it), each grown from the CIFAR-10 benchmark's stage-0 backbone.

    .venv/bin/python benchmarks/supernet_growth.py --work runs/cifar10 [--epochs 1]

Needs ``WORK/seed0/backbone/weights.safetensors`` (``benchmarks/cifar10.py --until backbone``).
Per variant (``WORK/growth/<variant>``, resumable) it measures on val: the full network's and
the smallest network's final-exit accuracy (BN re-estimated), the mean accuracy of every
candidate head at full depth, and what a search would see: SDN's placement and the best of
``--structures`` random structures over every depth setting, thresholds fitted at 25 / 50 / 75 %
of the backbone's MACs. Writes ``results/supernet_growth/{growth.csv, README.md}``.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import Sessions, machine  # noqa: E402
from benchmarks.cifar10 import SCALES, Bench  # noqa: E402
from exitnas.arch import sample_arch  # noqa: E402
from exitnas.baselines import sdn_arch  # noqa: E402
from exitnas.cost import cost_table  # noqa: E402
from exitnas.data import load_splits  # noqa: E402
from exitnas.evaluate import ArchStats, load_or_build_cache  # noqa: E402
from exitnas.report import markdown  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402
from exitnas.supernet import Supernet  # noqa: E402
from exitnas.thresholds import fit_budgets  # noqa: E402
from exitnas.train import _supernet_eval, train_supernet  # noqa: E402

VARIANTS = {  # name -> supernet overrides
    "largest-detached": {"supernet.teacher": "largest", "supernet.heads": "detached"},
    "backbone-detached": {"supernet.teacher": "backbone", "supernet.heads": "detached"},
    "largest-sampled": {"supernet.teacher": "largest", "supernet.heads": "sampled"},
    "backbone-sampled": {"supernet.teacher": "backbone", "supernet.heads": "sampled"},
}
BUDGETS = (0.25, 0.5, 0.75)


def search_view(run: RunDir, space, splits, n: int, seed: int = 0) -> dict:
    """Fitted val accuracy at each budget of SDN's placement and of the best of ``n`` random
    structures (the same structures for every variant)."""
    costs = cost_table(space)
    net = Supernet(space, pretrained=False).load(run.path / "supernet" / "weights.safetensors")
    budgets = [b * costs.backbone() for b in BUDGETS]
    caches = {}

    def fits(arch):
        if arch.depths not in caches:
            caches[arch.depths] = load_or_build_cache(run, net, arch.depths, splits)
        stats = ArchStats.from_cache(caches[arch.depths], arch, costs)
        return [f.accuracy if f.feasible else float("nan")
                for f in fit_budgets(stats, budgets=budgets)]

    out = {f"sdn_fitted_{b:.2f}": a for b, a in zip(BUDGETS, fits(sdn_arch(space, costs)))}
    rng = random.Random(seed)
    best = [float("nan")] * len(BUDGETS)  # NaN until some structure fits the budget
    for _ in range(n):
        for i, a in enumerate(fits(sample_arch(space, rng))):
            if not math.isnan(a) and (math.isnan(best[i]) or a > best[i]):
                best[i] = a
    out.update({f"random_best_fitted_{b:.2f}": a for b, a in zip(BUDGETS, best)})
    return out


def grow_variants(bench: Bench, *, epochs: int, structures: int, variants=tuple(VARIANTS),
                  log=print) -> list[dict]:
    """Each variant grown for ``epochs`` from the benchmark's stage-0 backbone in
    ``WORK/growth/<variant>`` (resumable), with its measurements (module docs)."""
    base = bench.space(bench.scale.seeds[0]).with_overrides(
        {"backbone.weights": str(bench.backbone), "supernet.epochs": epochs})
    splits = load_splits(base)
    rows = []
    for name in variants:
        space = base.with_overrides(VARIANTS[name])
        run = RunDir(bench.work / "growth" / name)
        result = train_supernet(run, space, splits=splits, log=log)
        seconds = sum(float(r["seconds"]) for r in result.history)  # every epoch, resumed or not
        net = Supernet(space, pretrained=False).load(run.path / "supernet" / "weights.safetensors")
        rows.append({"variant": name, "epochs": epochs, "train_seconds": round(seconds),
                     **_supernet_eval(net, splits, space, torch.device("cpu")),
                     **search_view(run, space, splits, structures)})
        log(str(rows[-1]))
    return rows


def growth_markdown(rows: list[dict], structures: int) -> str:
    return ("Val accuracies (fractions) after BN re-estimation; `*_exits`: the mean over every "
            "candidate head; `sdn_fitted_b` / `random_best_fitted_b`: fitted val accuracy at "
            f"budget b of SDN's placement / the best of {structures} random structures (the "
            "same ones for every variant; NaN: none fits); `train_seconds` include other jobs' "
            "load.\n\n" + markdown(pd.DataFrame(rows), digits=4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="the benchmark scale whose data and settings to use")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "cifar10")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "supernet_growth")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--structures", type=int, default=300)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = p.parse_args(argv)
    bench = Bench(SCALES[args.scale], args.work.resolve())
    if not bench.backbone.is_file():
        sys.exit(f"{bench.backbone}: no stage-0 backbone; run benchmarks/cifar10.py "
                 "--until backbone first")
    Sessions(args.work / "growth" / "sessions.json").start(epochs=args.epochs)
    rows = grow_variants(bench, epochs=args.epochs, structures=args.structures,
                         variants=args.variants)
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "growth.csv", index=False, float_format="%.4f")
    (args.out / "README.md").write_text("\n".join([
        "# Growing the supernet from the trained backbone: teacher and heads",
        "",
        f"    python benchmarks/supernet_growth.py --scale {args.scale} --work {args.work} "
        f"--epochs {args.epochs} --structures {args.structures}",
        "",
        f"Machine: {machine()}. Data: CIFAR-10 (JPEG); the stage-0 backbone of "
        f"`benchmarks/cifar10.py`; every variant: {args.epochs} epoch(s) of "
        "`benchmarks/cifar10.yaml`'s supernet settings.",
        "",
        growth_markdown(rows, args.structures), ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
