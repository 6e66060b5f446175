"""Scoring speed: one arch from the cached exit statistics vs re-running its extracted network.

    .venv/bin/python benchmarks/scoring_speed.py            # ~3 min on 2 cores

Space: search_spaces/resnet_cifar.yaml at its deepest setting (depths 5/5/5 = ResNet-32 w16,
14 positions x 4 heads = 56 candidate exits), randomly initialised supernet (speed does not
depend on the weights). Data: 10,000 synthetic 3x32x32 images (standard normal, 10 classes),
already normalised and in memory. Archs: random, each with 6 early exits (the space's maximum)
+ the final exit; thresholds at the median confidence of each exit over the data, so about
half the samples still running leave at every exit (a realistic early-exit workload for the
rerun; the cached scorer's cost does not depend on them).

Rows (results/scoring/speed.csv):
- ``cached``: ``evaluate.score(cache, arch, costs)`` for max_softmax (accuracy, expected MACs,
  exit fractions) over the 10,000 cached samples; ``cached_entropy`` / ``cached_patience``
  the other policies;
- ``rerun``: ``MultiExitModel.predict`` of the extracted arch over the same 10,000 samples
  (batches of 500; the network part of what the cache replaces, extraction not timed), per arch
  the faster of ``rerun_<T>threads`` (``--threads``) and ``rerun_1thread``, timed side by side
  (on a shared machine one thread can be the faster);
- ``cache_build``: the one-time pass that fills the cache for a depth setting (all 56 heads).
``ratio_to_cached`` = median / cached median.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exitnas.arch import Arch, Exit  # noqa: E402
from exitnas.cost import cost_table  # noqa: E402
from exitnas.evaluate import build_cache, score  # noqa: E402
from exitnas.space import load_space  # noqa: E402
from exitnas.supernet import Supernet  # noqa: E402

OUT = ROOT / "results" / "scoring"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--archs", type=int, default=100, help="archs scored from the cache")
    p.add_argument("--rerun-archs", type=int, default=3, help="archs re-run through the network")
    p.add_argument("--repeats", type=int, default=20, help="cached passes over all archs")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the network")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    space = load_space(ROOT / "search_spaces" / "resnet_cifar.yaml")
    net = Supernet(space).eval()
    costs = cost_table(space)
    depths = space.max_depths
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    chunks = [(x[i:i + args.batch_size], y[i:i + args.batch_size])
              for i in range(0, args.samples, args.batch_size)]

    t0 = time.perf_counter()
    cache = build_cache(net, depths, chunks)
    build_ms = (time.perf_counter() - t0) * 1e3
    print(f"cache built: {len(cache.exits)} exits x {cache.num_samples} samples in {build_ms / 1e3:.1f} s")

    median_conf = np.median(cache.conf.numpy(), axis=1)
    rng = random.Random(0)
    positions = space.positions(depths)
    archs = []
    for _ in range(args.archs):
        pos = sorted(rng.sample(positions, 6))
        exits = tuple(Exit(s, b, rng.choice(space.exits.heads)) for s, b in pos)
        rows = [cache.exits.index(e) for e in exits]
        archs.append(Arch(depths=depths, exits=exits,
                          thresholds=tuple(float(median_conf[r]) for r in rows)))

    variants = {"cached": archs,
                "cached_entropy": [a.with_thresholds(tuple(0.5 for _ in a.exits), "entropy")
                                   for a in archs],
                "cached_patience": [a.with_thresholds((2.0,), "patience") for a in archs]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        for name, group in variants.items():
            for a in group:
                times[name].append(timed(lambda: score(cache, a, costs)))

    early = []
    reruns = {f"rerun_{args.threads}threads": args.threads, "rerun_1thread": 1}
    for name in reruns:
        times[name] = []
    for a in archs[:args.rerun_archs]:
        model = net.extract(a).eval()

        def run():
            for xb, _ in chunks:
                out = model.predict(xb)
                early.append(float((out.exit < len(a.exits)).float().mean()))

        for name, threads in reruns.items():  # side by side, per arch
            torch.set_num_threads(threads)
            times[name].append(timed(run))
            print(f"{name} {a.id}: {times[name][-1]:.0f} ms")
    torch.set_num_threads(args.threads)
    # the baseline: per arch the faster thread setting (conservative for the ratio)
    times["rerun"] = [min(ts) for ts in zip(*(times[n] for n in reruns))]
    times["cache_build"] = [build_ms]

    base = statistics.median(times["cached"])
    rows = []
    for name in ("cached", "cached_entropy", "cached_patience", "rerun", *reruns, "cache_build"):
        t = times[name]
        rows.append({"what": name, "median_ms_per_arch": statistics.median(t),
                     "p90_ms_per_arch": float(np.percentile(t, 90)), "archs": len(archs)
                     if name.startswith("cached") else (len(t) if name.startswith("rerun") else 1),
                     "timings": len(t), "samples": args.samples, "early_exits": 6,
                     "torch_threads": reruns.get(name, "fastest" if name == "rerun" else
                                                 ("numpy" if name.startswith("cached") else args.threads)),
                     "ratio_to_cached": statistics.median(t) / base})
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "speed.csv", index=False, float_format="%.3f")
    from exitnas.report import markdown

    (args.out / "speed.md").write_text(markdown(df, digits=3))
    print(df.to_string(index=False))
    print(f"share of samples leaving early in rerun batches: {np.mean(early):.3f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
