"""CIFAR-10 benchmark (issue 13): searched early-exit ResNets vs SDN's hand-placed exits and
static sub-networks, all grown from one trained backbone.

    .venv/bin/python benchmarks/cifar10.py --work runs/cifar10         # CPU scale, resumable
    .venv/bin/python benchmarks/cifar10.py --scale smoke               # minutes: every stage
    .venv/bin/python benchmarks/cifar10.py --scale full                # longer schedules (GPU)

Data: CIFAR-10 (JPEG), ``../shared/data/cifar10-jpeg.tar.gz``: 45,000 train / 5,000 val held
out (never augmented) / 10,000 test. Space and settings: ``benchmarks/cifar10.yaml``.

Stages, each resumed from ``WORK`` after any stop (rerun the same command):

1. ``backbone``: ResNet-20 at full depth, final exit only (``exitnas train-backbone``), once;
   ``growth``: the supernet variants of :mod:`benchmarks.supernet_growth` (teacher, heads)
   grown briefly from it, one chosen on val by :data:`GROWTH_RULE` for every seed;
2. per seed (``WORK/seed<k>``, every seed from that one backbone): ``supernet`` (elastic depth
   grown on it, every candidate head), ``search`` (NSGA-II, thresholds fitted per deploy budget)
   and its deploy picks (``RUN/selected.json``), ``ic_only`` (SDN's recipe: its heads trained on
   the frozen backbone for as many epochs as the supernet stage), ``finetune`` (the picks and
   SDN, mixed, from the inherited weights), ``fidelity`` (front networks fine-tuned the same
   way: Kendall tau of inherited vs fine-tuned val accuracy);
3. ``report``: ``OUT/{summary.csv, auc.csv, fidelity.csv, backbone.csv, ...}`` and README.

Methods (:mod:`benchmarks.cifar10_eval`): searched (inherited / fine-tuned), SDN (inherited /
IC-only / fine-tuned), static (the best sub-network without early exits, inherited). Protocols:
threshold sweep, budgeted batch, fitted exit rule; operating points chosen on val, accuracy on
test.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import Sessions, Timings, cifar10_root  # noqa: E402
from exitnas.arch import Arch  # noqa: E402
from exitnas.backbone import load_backbone, train_backbone  # noqa: E402
from exitnas.baselines import sdn_arch  # noqa: E402
from exitnas.cost import cost_table  # noqa: E402
from exitnas.data import batches, load_splits  # noqa: E402
from exitnas.finetune import finetune, structure_id  # noqa: E402
from exitnas.io import atomic_write_json  # noqa: E402
from exitnas.loop import seeded_supernet  # noqa: E402
from exitnas.pipeline import select_archs  # noqa: E402
from exitnas.retrain import retrain  # noqa: E402
from exitnas.runtime import sha256_file  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402
from exitnas.search import SearchOptions, run_search  # noqa: E402
from exitnas.space import Space, load_space  # noqa: E402
from exitnas.train import train_supernet  # noqa: E402

SPACE = ROOT / "benchmarks" / "cifar10.yaml"
GROWTH_KEYS = ("random_best_fitted_0.25", "random_best_fitted_0.50")
GROWTH_RULE = ("the variant whose best random structure has the highest fitted val accuracy "
               "at 25 % plus 50 % of the backbone's MACs (the goal's budgets); ties: the first")
STAGES = ("backbone", "growth", "supernet", "search", "ic_only", "finetune", "fidelity", "report")


@dataclass(frozen=True, kw_only=True)
class Scale:
    """One size of the benchmark: overrides of ``benchmarks/cifar10.yaml``, the seeds, the
    fine-tuning epochs (every fine-tuned model gets them), and the fidelity measurement
    (``fidelity_networks`` distinct front networks per seed of ``fidelity_seeds``)."""

    name: str
    overrides: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune_epochs: int = 2
    ic_only_lr: float = 0.1       # fresh heads on frozen features: the from-scratch rate
    fidelity_networks: int = 10
    fidelity_seeds: tuple[int, ...] = (0,)
    growth_epochs: int = 1        # per supernet_growth variant
    growth_structures: int = 300
    growth_variants: tuple[str, ...] | None = None  # None: every supernet_growth variant
    work: str = "runs/cifar10"
    out: str = "results/cifar10"


SCALES = {
    # ~4 h alone on 2 CPU cores (backbone ~100 min, then ~35 min per seed, fidelity ~25 min)
    "cpu": Scale(name="cpu"),
    # every stage on 800 train / 500 test images, one epoch each: minutes (CI runs it)
    "smoke": Scale(name="smoke", overrides={
        "data.train_subset": 800, "data.test_subset": 500, "backbone_training.epochs": 1,
        "supernet.epochs": 1, "search.trials": 40, "search.population_size": 20},
        seeds=(0, 1), finetune_epochs=1, fidelity_networks=3, growth_structures=20,
        growth_variants=("largest-detached", "backbone-detached"),
        work="runs/cifar10-smoke", out="runs/cifar10-smoke/results"),
    # longer schedules, meant for a GPU
    "full": Scale(name="full", overrides={
        "backbone_training.epochs": 160, "backbone_training.channels_last": False,
        "supernet.epochs": 30, "supernet.random_subnets": 2, "supernet.channels_last": False,
        "retrain.channels_last": False, "search.trials": 4000, "search.population_size": 100},
        finetune_epochs=15, fidelity_networks=20, fidelity_seeds=(0, 1, 2), growth_epochs=3,
        work="runs/cifar10-full", out="results/cifar10-full"),
}


class Bench:
    """The benchmark's work directory: one run directory per seed, all grown from the
    backbone trained in the first seed's."""

    def __init__(self, scale: Scale, work: Path, *, log=print) -> None:
        self.scale, self.work, self.log = scale, work, log
        self.timings = Timings(work / "timings.json")
        self._growth: dict | None = None
        self.data_root = str(cifar10_root())

    def run(self, seed: int) -> RunDir:
        return RunDir(self.work / f"seed{seed}")

    @property
    def backbone(self) -> Path:
        return self.run(self.scale.seeds[0]).path / "backbone" / "weights.safetensors"

    @property
    def growth(self) -> dict | None:
        """The growth stage's measurements and the variant it chose (``WORK/growth.json``,
        read once)."""
        if self._growth is None and (self.work / "growth.json").is_file():
            self._growth = json.loads((self.work / "growth.json").read_text())
        return self._growth

    def space(self, seed: int) -> Space:
        """Seed ``seed``'s space: the scale's overrides, the seeds, and once the growth stage
        has chosen, its supernet variant."""
        from benchmarks.supernet_growth import VARIANTS

        o = {"data.root": self.data_root, **self.scale.overrides}
        if self.growth is not None:
            o.update(VARIANTS[self.growth["choice"]])
        o.update({"supernet.seed": seed, "search.seed": seed, "retrain.seed": seed})
        if seed != self.scale.seeds[0]:
            o["backbone.weights"] = str(self.backbone)
        return load_space(SPACE, o)

    def stage(self, name: str, fn, *args):
        return self.timings.run(name, fn, *args)

    # ---- stages ------------------------------------------------------------------------------
    def train_backbone(self) -> dict:
        seed = self.scale.seeds[0]
        run, space = self.run(seed), self.space(seed)
        run.init(space)
        result = train_backbone(run, space, log=self.log)
        return backbone_accuracy(space, result.weights, self.work / "backbone.json",
                                 epochs=space.backbone_training.epochs)

    def choose_growth(self) -> dict:
        """Every variant of :mod:`benchmarks.supernet_growth` grown for ``growth_epochs`` from
        the backbone; the supernet stage then uses the one chosen by :data:`GROWTH_RULE` (val
        only), stored once in ``WORK/growth.json`` so every seed and every rerun uses it."""
        from benchmarks.supernet_growth import VARIANTS, grow_variants

        if self.growth is not None:
            return self.growth
        rows = grow_variants(self, epochs=self.scale.growth_epochs,
                             structures=self.scale.growth_structures,
                             variants=self.scale.growth_variants or tuple(VARIANTS), log=self.log)
        score = lambda r: sum(0.0 if r[k] != r[k] else r[k] for k in GROWTH_KEYS)  # noqa: E731
        choice = max(rows, key=score)["variant"]  # ties: the first in VARIANTS order
        data = {"rule": GROWTH_RULE, "choice": choice, "rows": rows,
                "epochs": self.scale.growth_epochs, "structures": self.scale.growth_structures}
        atomic_write_json(self.work / "growth.json", data)
        self._growth = data
        return data

    def grow_supernet(self, seed: int) -> None:
        if self.growth is None:
            raise SystemExit("the growth stage has not chosen the supernet's variant yet")
        train_supernet(self.run(seed), self.space(seed), log=self.log)

    def search(self, seed: int) -> list[Arch]:
        run = self.run(seed)
        run_search(run.path, SearchOptions(), log=sys.stderr)
        return select_archs(run)

    def ic_only(self, seed: int) -> Path:
        """SDN's IC-only recipe: its heads on the frozen stage-0 backbone (retrain disjoint,
        phase 1 = the backbone) for as many epochs as the supernet stage."""
        space = self.space(seed)
        space = space.with_overrides({"retrain.phase1": "backbone",
                                      "retrain.epochs": space.supernet.epochs,
                                      "retrain.optim.lr": self.scale.ic_only_lr})
        result = retrain(self.run(seed), sdn_arch(space, cost_table(space)), space=space,
                         regime="disjoint", log=self.log)
        return result.out

    def finetune(self, seed: int, archs: list[Arch]) -> None:
        run, space = self.run(seed), self.space(seed)
        splits = load_splits(space)
        for arch in archs:
            finetune(run, arch, space=space, regime="mixed", epochs=self.scale.finetune_epochs,
                     splits=splits, log=self.log)

    def fidelity_archs(self, seed: int) -> list[Arch]:
        """``fidelity_networks`` distinct structures of the search's feasible front, spread
        evenly over its cost range (cheapest and most accurate always in)."""
        import csv

        with open(self.run(seed).path / "search" / "front.csv", newline="") as fh:
            rows = sorted(csv.DictReader(fh), key=lambda r: float(r["expected_macs"]))
        distinct = list({structure_id(Arch.from_id(r["arch_id"])): Arch.from_id(r["arch_id"])
                         for r in rows}.values())
        k = self.scale.fidelity_networks
        if len(distinct) <= k:
            return distinct
        return [distinct[round(i * (len(distinct) - 1) / (k - 1))] for i in range(k)]

    def per_seed(self, seed: int, until: str) -> None:
        space = self.space(seed)
        tag = f"seed{seed}"
        self.stage(f"{tag} supernet", self.grow_supernet, seed)
        if until == "supernet":
            return
        picks = self.stage(f"{tag} search", self.search, seed)
        if until == "search":
            return
        self.stage(f"{tag} ic_only", self.ic_only, seed)
        if until == "ic_only":
            return
        sdn = sdn_arch(space, cost_table(space))
        self.stage(f"{tag} finetune", self.finetune, seed, [*dict.fromkeys(picks), sdn])
        if until == "finetune" or seed not in self.scale.fidelity_seeds:
            return
        self.stage(f"{tag} fidelity", self.finetune, seed, self.fidelity_archs(seed))


@torch.no_grad()
def backbone_accuracy(space: Space, weights: Path, path: Path, *, epochs: int) -> dict:
    """Val and test accuracy of the trained backbone (full depth, final exit), stored in
    ``path`` for this weights file."""
    sha = sha256_file(weights)
    if path.is_file():
        known = json.loads(path.read_text())
        if known.get("sha256") == sha:
            return known
    splits = load_splits(space)
    net = load_backbone(seeded_supernet(space, 0), weights).eval()
    out = {"sha256": sha, "epochs": epochs}
    for split in ("val", "test"):
        hits = n = 0
        for x, y in batches(getattr(splits, split), batch_size=space.data.eval_batch_size,
                            mean=splits.mean, std=splits.std):
            hits += int((net.forward_exits(x, space.max_depths, ())[-1].argmax(1) == y).sum())
            n += len(y)
        out[f"{split}_accuracy"] = hits / n
    atomic_write_json(path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--work", type=Path, help="work directory (default: the scale's)")
    p.add_argument("--out", type=Path, help="results folder (default: the scale's)")
    p.add_argument("--until", choices=STAGES, default="report",
                   help="stop after this stage (for every seed)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    if args.threads:
        torch.set_num_threads(args.threads)
    work = (args.work or ROOT / scale.work).resolve()
    out = (args.out or ROOT / scale.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    Sessions(work / "sessions.json").start(scale=scale.name, until=args.until)
    bench = Bench(scale, work)
    bench.stage("backbone", bench.train_backbone)
    if args.until != "backbone":
        bench.stage("growth", bench.choose_growth)
    if args.until not in ("backbone", "growth"):
        for seed in scale.seeds:
            bench.per_seed(seed, args.until)
    if args.until == "report":
        from benchmarks.cifar10_eval import write_results

        write_results(bench, out)
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
