"""Supernet training step vs a plain backbone step at the same batch size, measured side by side.

    .venv/bin/python benchmarks/supernet_step.py            # writes results/supernet/

A supernet step (exitnas.train.SandwichStep) runs the largest network with every candidate exit
head, the smallest and ``supernet.random_subnets`` random depth settings (each with its candidate
heads), in-place distillation, one backward and one SGD step. The plain step trains the largest
backbone alone (final head only). Steps alternate (plain, supernet, plain, ...) so both see the
same machine load; medians are reported.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import cpu_model  # noqa: E402

from exitnas.arch import Arch  # noqa: E402
from exitnas.space import load_space  # noqa: E402
from exitnas.supernet import Supernet, build_model  # noqa: E402
from exitnas.train import SandwichStep, make_optimizer, sandwich_depths  # noqa: E402

SPACES = ("search_spaces/quickstart.yaml", "search_spaces/resnet_cifar.yaml")


def measure(space_file: str, batch: int, rounds: int) -> dict:
    space = load_space(ROOT / space_file)
    torch.manual_seed(0)
    net = Supernet(space)
    step = SandwichStep(net, distill=space.supernet.distill,
                        temperature=space.supernet.distill_temperature)
    plain = build_model(space, Arch(depths=space.max_depths, exits=(), policy="max_softmax"), seed=0)
    opt_s = make_optimizer(net.parameters(), space.supernet.optim)
    opt_p = make_optimizer(plain.parameters(), space.supernet.optim)
    c, s = space.input.channels, space.input.size
    x, y = torch.randn(batch, c, s, s), torch.randint(0, space.num_classes, (batch,))
    rng = random.Random(0)

    def supernet_step():
        opt_s.zero_grad()
        total, _ = step(x, y, sandwich_depths(space, rng, space.supernet.random_subnets))
        total.backward()
        opt_s.step()

    def plain_step():
        opt_p.zero_grad()
        F.cross_entropy(plain(x)[-1], y).backward()
        opt_p.step()

    times = {"plain": [], "supernet": []}
    for i in range(rounds + 2):
        for name, fn in (("plain", plain_step), ("supernet", supernet_step)):
            t = time.perf_counter()
            fn()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t)
    p, sn = statistics.median(times["plain"]), statistics.median(times["supernet"])
    return {"space": space.name, "batch": batch, "input": f"{c}x{s}x{s}",
            "largest_depths": ".".join(map(str, space.max_depths)),
            "candidate_heads": len(net.heads), "passes": 2 + space.supernet.random_subnets,
            "plain_ms": 1000 * p, "supernet_ms": 1000 * sn, "ratio": sn / p, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "supernet"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(SPACES[0], 64, args.rounds), measure(SPACES[1], 128, args.rounds)]
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "step_time.csv", index=False, float_format="%.3f")
    md = df.to_markdown(index=False, floatfmt=".3f")
    (out / "step_time.md").write_text(md + "\n")
    cpu = cpu_model()
    (out / "README.md").write_text(f"""# Supernet step time vs a plain backbone step

Command: `.venv/bin/python benchmarks/supernet_step.py {' '.join(sys.argv[1:])}`

Each space's supernet training step (`exitnas.train.SandwichStep`: the largest network with
every candidate exit head, the smallest and `supernet.random_subnets` random depth settings with
their candidate heads, in-place distillation from the largest's final exit, one backward, one
SGD step) against a plain training step of the largest backbone alone (final head only, cross
entropy, SGD), at the same batch size, on random inputs of the space's size. The two steps
alternate for {args.rounds} rounds after 2 warm-up rounds so both see the same machine load;
the medians are reported. `ratio` = supernet_ms / plain_ms.

Machine: {cpu}, {os.cpu_count()} cores, CPU only, torch.set_num_threads({args.threads}), torch
{torch.__version__}; shared with other jobs at the time (absolute times are noisy, the ratio
less so).

{md}

Why the ratio is what it is: a step runs `passes` forward/backward passes (largest + smallest +
random), and every pass evaluates every candidate head active at its depth; head gradients are
detached from the backbone (heads learn on the shared features), which saves some of the
backward cost.
""")
    print(md)


if __name__ == "__main__":
    main()
