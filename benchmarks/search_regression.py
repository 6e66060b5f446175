"""Search throughput of two commits side by side in one run: did a refactor slow the search?

    nice -n 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_regression.py \
        --old bcaa3cb^ --new HEAD --trials 1000 --rounds 5      # ~10 min on 2 idle cores

Each commit gets a git worktree (under ``--work``) and its own quickstart run directory
(``exitnas run search_spaces/quickstart.yaml``: backbone, supernet, every depth cache), made
by that commit's code. Then ``--rounds`` rounds, each running ``exitnas search RUN --trials N``
on a fresh journal study for both commits back to back (the order alternates per round), so
load drifts hit both alike. The rate is what ``exitnas search`` prints (complete trials over
the search loop's wall time, caches already built); the wall time of the whole command is kept
too. Outputs: ``results/search/regression.csv`` (one row per round and commit) and
``results/search/regression.md`` (medians, ratio new / old, command, machine, load).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import git_state, machine  # noqa: E402
from exitnas.report import markdown  # noqa: E402

OUT = ROOT / "results" / "search"
RATE = re.compile(r"complete trials \((\d+) run now, ([0-9.]+) trials/s")


def worktree(work: Path, ref: str) -> tuple[Path, str]:
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = work / sha[:10]
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT,
                       check=True, capture_output=True)
    return path, sha


def exitnas(tree: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "exitnas", *args], cwd=tree, env=env,
                          capture_output=True, text=True)


def prepare(tree: Path) -> Path:
    run = tree / "runs" / "regression"
    if not (run / "search").is_dir():
        r = exitnas(tree, "run", "search_spaces/quickstart.yaml", "--run-dir", str(run))
        if r.returncode != 0:
            raise SystemExit(f"{tree}: exitnas run failed:\n{r.stderr[-2000:]}")
    return run


def one_search(tree: Path, run: Path, trials: int, tag: str) -> dict:
    journal = run / "search" / f"regression-{tag}.log"
    journal.unlink(missing_ok=True)
    start = time.perf_counter()
    r = exitnas(tree, "search", str(run), "--trials", str(trials), "--storage", str(journal),
                "--study-name", f"regression-{tag}")
    wall = time.perf_counter() - start
    m = RATE.search(r.stdout)
    if r.returncode != 0 or m is None or int(m.group(1)) != trials:
        raise SystemExit(f"{tree}: search failed or ran other trials:\n{r.stdout}\n{r.stderr[-2000:]}")
    journal.unlink(missing_ok=True)
    return {"trials_per_s": float(m.group(2)), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="bcaa3cb^", help="commit before the change")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exitnas-regression"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    trees = {name: worktree(args.work, ref) for name, ref in (("old", args.old), ("new", args.new))}
    runs = {name: prepare(tree) for name, (tree, _) in trees.items()}
    load_before = os.getloadavg()
    rows = []
    for i in range(args.rounds):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for name in order:
            tree, sha = trees[name]
            got = one_search(tree, runs[name], args.trials, f"{name}-{i}")
            rows.append({"round": i, "commit": name, "sha": sha[:10], "trials": args.trials, **got})
            print(f"round {i} {name}: {got['trials_per_s']:.1f} trials/s ({got['wall_s']} s)",
                  flush=True)
    load_after = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    (OUT / "regression.csv").write_text(
        ",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    med = {n: {k: statistics.median(r[k] for r in rows if r["commit"] == n)
               for k in ("trials_per_s", "wall_s")} for n in trees}
    ratio = med["new"]["trials_per_s"] / med["old"]["trials_per_s"]
    spread = {n: (min(r["trials_per_s"] for r in rows if r["commit"] == n),
                  max(r["trials_per_s"] for r in rows if r["commit"] == n)) for n in trees}
    table = markdown(pd.DataFrame(
        [[n, trees[n][1][:10], f"{med[n]['trials_per_s']:.1f}",
          f"{spread[n][0]:.1f}-{spread[n][1]:.1f}", f"{med[n]['wall_s']:.2f}"] for n in ("old", "new")],
        columns=["commit", "sha", "median trials/s", "range", "median wall s"]))
    cmd = " ".join(["benchmarks/search_regression.py", *sys.argv[1:]])
    (OUT / "regression.md").write_text(
        f"# Search throughput, two commits side by side\n\n`{cmd}` — quickstart space, in-process "
        f"Optuna search, journal storage, {args.trials} trials per search, {args.rounds} rounds "
        f"(order alternating), 1 torch thread.\n\n{table}\n\nRatio new / old (median trials/s): "
        f"**{ratio:.3f}**.\n\nEach commit ran from its own git worktree (committed code "
        f"only). Machine: {machine()}; benchmark script: {git_state(('benchmarks',))}; load average "
        f"before {load_before[0]:.2f}, after {load_after[0]:.2f}.\n")
    print(f"ratio new / old: {ratio:.3f}")


if __name__ == "__main__":
    main()
