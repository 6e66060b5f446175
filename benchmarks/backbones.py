"""torchvision backbones in exitnas: parameters and MACs against torchvision's published
figures, and the supernet training step against the plain model's.

    .venv/bin/python benchmarks/backbones.py --phases macs   # fvcore counts only: ~1-2 min
    .venv/bin/python benchmarks/backbones.py --phases step   # 224 px, batch 16: long on a CPU
    .venv/bin/python benchmarks/backbones.py --phases step --device cuda --models resnet50

Every model of issue 14's list, 1,000 classes, random weights; ``results/backbones/README.md``
says what each column is. ``macs`` writes ``backbones.csv`` (params, exitnas's MACs, torchvision's
published GFLOPS, fvcore's count of the torchvision model), ``step`` writes ``step_time.csv``
(supernet step vs the plain model's at 224 px, batch 16, every candidate head); both rewrite
the README from the CSVs and ``runs.json``. ``--models`` re-measures some models, keeping the
other rows.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import git_state, load_average, machine  # noqa: E402

from exitnas.cost import backbone_params, cost_table  # noqa: E402
from exitnas.heads import HEADS  # noqa: E402
from exitnas.io import atomic_write_json, atomic_write_text  # noqa: E402
from exitnas.report import markdown  # noqa: E402
from exitnas.space import parse_space  # noqa: E402
from exitnas.supernet import Supernet  # noqa: E402
from exitnas.train import SandwichStep, make_optimizer, sandwich_depths  # noqa: E402
from exitnas.tv_family import describe  # noqa: E402

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
          "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
          "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
          "regnet_y_400mf", "convnext_tiny")
PHASES = ("macs", "step")
OUT = ROOT / "results" / "backbones"


def tv_space(name: str, size: int, *, heads: tuple[str, ...] = ("linear",), elastic: bool = False):
    """A 1,000-class space on torchvision model ``name`` at ``size`` px; ``elastic``: every
    depth each stage allows."""
    backbone = {"family": "torchvision", "model": name}
    if elastic:
        st = describe(name)
        backbone["stage_depths"] = [list(range(st.min_depth(s), n + 1))
                                    for s, n in enumerate(st.blocks)]
    return parse_space({"name": name, "num_classes": 1000, "input": {"channels": 3, "size": size},
                        "backbone": backbone, "exits": {"heads": list(heads)}})


def macs_row(name: str) -> dict:
    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    weights = models.get_model_weights(name).DEFAULT
    size = weights.transforms().crop_size[0]
    space = tv_space(name, size)
    model = models.get_model(name, weights=None).eval()
    params = backbone_params(Supernet(space, pretrained=False))
    if params != sum(p.numel() for p in model.parameters()):
        raise SystemExit(f"{name}: exitnas has {params} parameters, torchvision "
                         f"{sum(p.numel() for p in model.parameters())}")
    raw = FlopCountAnalysis(model, torch.zeros(1, 3, size, size))
    raw.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    ours, fv = cost_table(space).backbone() / 1e9, raw.total() / 1e9
    published = weights.meta["_ops"]
    return {"model": name, "input_px": size, "params": params, "exitnas_gmacs": ours,
            "published_gmacs": published, "exitnas_ratio": ours / published,
            "fvcore_gmacs": fv, "fvcore_ratio": fv / published}


def step_row(name: str, *, batch: int, rounds: int, warmup: int, heads: tuple[str, ...],
             device: torch.device) -> dict:
    from torchvision import models

    space = tv_space(name, 224, heads=heads, elastic=True)
    torch.manual_seed(0)
    net = Supernet(space, pretrained=False).to(device)
    step = SandwichStep(net, distill=space.supernet.distill,
                        temperature=space.supernet.distill_temperature)
    plain = models.get_model(name, weights=None).to(device)
    opt_s = make_optimizer(net.parameters(), space.supernet.optim)
    opt_p = make_optimizer(plain.parameters(), space.supernet.optim)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    rng = random.Random(0)
    net.train()
    plain.train()

    def supernet_step():
        opt_s.zero_grad()
        total, _ = step(x, y, sandwich_depths(space, rng, space.supernet.random_subnets))
        total.backward()
        opt_s.step()

    def plain_step():
        opt_p.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt_p.step()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    times = {"plain": [], "supernet": []}
    for i in range(warmup + rounds):
        for kind, fn in (("plain", plain_step), ("supernet", supernet_step)):
            t = timed(fn)
            if i >= warmup:
                times[kind].append(t)
    p, s = statistics.median(times["plain"]), statistics.median(times["supernet"])
    return {"model": name, "batch": batch, "input_px": 224, "device": str(device),
            "depth_settings": len(space.depth_settings()), "candidate_heads": len(net.heads),
            "passes": 2 + space.supernet.random_subnets, "plain_ms": 1000 * p,
            "supernet_ms": 1000 * s, "ratio": s / p, "rounds": rounds}


ABOUT = """Every model of issue 14's list as `backbone: {family: torchvision, model: NAME}`, 1,000
classes, randomly initialised (counts and step times do not depend on the weights).

- `backbones.csv` (`--phases macs`): `params`: stem, blocks and final head, checked equal to
  the torchvision model's; `exitnas_gmacs`: `cost_table(space).backbone()`, the plain backbone
  counted per segment with exitnas's rules (`exitnas/cost.py`); `published_gmacs`:
  torchvision's `models.get_model_weights(NAME).DEFAULT.meta["_ops"]` (its "GFLOPS" are GMACs
  of convolutions and linear layers); `fvcore_gmacs`: fvcore's own count of the whole
  torchvision model with its default rules; `*_ratio` = that / published. Counted at the
  DEFAULT weights' evaluation crop (`input_px`: 224, EfficientNet-B1/B2/B3 240/288/300), the
  size torchvision's figure is for.
- `step_time.csv` (`--phases step`): one supernet training step (`exitnas.train.SandwichStep`:
  the largest network with every candidate exit head, the smallest and
  `supernet.random_subnets` random depth settings, in-place distillation, one backward, one SGD
  step) against one plain step of the torchvision model (cross entropy, SGD) at 224 px, batch
  16, alternating after warm-up rounds; medians. Depth is elastic (every depth a stage allows)
  and a head of each `--heads` design (default: every registered design, `candidate_heads`
  counts them all) sits at every exit position.
- `runs.json`: command, machine, code and load of the run behind each CSV.

Why the columns differ: torchvision's figure counts convolutions and linear layers only.
exitnas folds BatchNorm into the convolution before it for this family (as inference runtimes
do) and counts what runs beside the convolutions: squeeze-excitation's pooling, gate and
scaling, residual adds, max pooling, LayerNorm and layer scale; activations count 0
(`exitnas/cost.py` lists every rule). fvcore's own count has BatchNorm (2 per element) but no
adds, multiplies or max pooling: 2-5 % above the published figure for the MobileNets and
EfficientNets, whose BatchNorm layers sit on wide expanded features.
"""


STEP_READING = """One supernet step is `passes` forward passes (largest, smallest, random) and one
backward through all of them, so about `passes` plain steps is its floor; the rest is the
candidate heads, which all run in the largest pass (every design at every position). They cost
most where features are wide and large: the bottleneck ResNets (ResNet-50 7.9x, ResNeXt-50
7.5x) carry `conv` heads (3x3 conv at min(C, 256) channels) on 56x56 and 28x28 features,
whereas MobileNets and EfficientNets, whose early features are narrow, stay at 3.2-4.3x. A
search space that keeps only `linear` heads at wide positions (`exits.heads`, or a position
list) brings a bottleneck ResNet's step towards the floor."""


def write_readme(out: Path, runs: dict) -> None:
    parts = ["# torchvision backbones: MACs vs torchvision's figures, supernet step time\n\n"]
    if (out / "backbones.csv").is_file():
        df = pd.read_csv(out / "backbones.csv")
        parts.append(markdown(df, digits=4))
        worst = df.loc[df["exitnas_ratio"].sub(1).abs().idxmax()]
        parts.append(f"\nAll {len(df)} models: exitnas's MACs within "
                     f"{100 * abs(worst['exitnas_ratio'] - 1):.2f} % of torchvision's published "
                     f"figure (worst: {worst['model']}); parameters equal torchvision's.\n\n")
    if (out / "step_time.csv").is_file():
        st = pd.read_csv(out / "step_time.csv")
        hi = st.loc[st["ratio"].idxmax()]
        parts.append(f"Supernet step / plain step over {len(st)} models: median "
                     f"{st['ratio'].median():.2f}x, {st['ratio'].min():.2f}x to "
                     f"{st['ratio'].max():.2f}x ({hi['model']}). {STEP_READING}\n\n")
    parts.append(ABOUT)
    for phase, what in (("macs", "backbones.csv"), ("step", "step_time.csv")):
        run = runs.get(phase)
        if run is None:
            parts.append(f"\n## {what}\n\nNot run yet (`--phases {phase}`).\n")
            continue
        parts.append(f"\n## {what}\n\nCommand: `.venv/bin/python {run['command']}`  \n"
                     f"Machine: {run['machine']}  \nCode: {run['code']}  \n"
                     f"Load average (1/5/15 min) before: {run['load_before']}, after: "
                     f"{run['load_after']} (shared with other jobs)  \n"
                     f"Wall time: {run['seconds']:.0f} s, started {run['started']} UTC\n")
        if phase == "step":
            parts.append("\n" + markdown(pd.read_csv(out / what), digits=3))
    atomic_write_text(out / "README.md", "".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", default="macs,step", help="comma list of: macs, step")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--heads", default=",".join(HEADS.names()),
                    help="head designs at every exit position (default: every registered one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    phases = args.phases.split(",")
    if not set(phases) <= set(PHASES):
        ap.error(f"--phases {args.phases!r}: expected macs and/or step")
    names = args.models.split(",")
    if not set(names) <= set(MODELS):
        ap.error(f"--models: unknown {sorted(set(names) - set(MODELS))} (known: "
                 f"{', '.join(MODELS)})")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    for phase in phases:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        load_before, t0 = load_average(), time.perf_counter()
        rows = []
        for name in names:
            rows.append(macs_row(name) if phase == "macs" else
                        step_row(name, batch=args.batch, rounds=args.rounds, warmup=args.warmup,
                                 heads=tuple(args.heads.split(",")),
                                 device=torch.device(args.device)))
            print(phase, rows[-1], flush=True)
        csv = out / ("backbones.csv" if phase == "macs" else "step_time.csv")
        df = pd.DataFrame(rows)
        if csv.is_file():  # --models: the other models' rows stay
            old = pd.read_csv(csv)
            df = pd.concat([old[~old["model"].isin(names)], df], ignore_index=True)
        df["order"] = df["model"].map(MODELS.index)
        df.sort_values("order").drop(columns="order").to_csv(csv, index=False, float_format="%.4f")
        runs[phase] = {"command": "benchmarks/backbones.py " + " ".join(sys.argv[1:]),
                       "machine": machine(), "code": git_state(), "started": started,
                       "load_before": load_before, "load_after": load_average(),
                       "seconds": time.perf_counter() - t0}
        atomic_write_json(runs_path, runs)
        write_readme(out, runs)


if __name__ == "__main__":
    main()
