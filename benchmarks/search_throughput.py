"""Search throughput over cached exit statistics, per storage and backend; NSGA-II vs random.

    .venv/bin/python benchmarks/search_throughput.py        # ~20 min on 2 busy cores

Two spaces:
- ``quickstart``: search_spaces/quickstart.yaml (scikit-learn digits 8x8; 18 depth settings,
  7 exit positions x 4 heads, 3 policies; val = 216 images), its backbone and supernet trained
  by ``exitnas train-backbone`` / ``train-supernet`` into runs/search-bench (done here if
  missing);
- ``cifar10``: search_spaces/resnet_cifar.yaml with depths {3, 5} per stage (ResNet-20 ...
  ResNet-32, 8 depth settings, 14 positions x 4 heads, <= 6 exits) on the CIFAR-10 JPEG
  tarball (val = 5,000 images), a randomly initialised supernet (speed does not depend on the
  weights) in runs/search-bench-cifar.
Every depth setting's cache is built before timing, so the rates are "over cached logits".
One torch thread.

Outputs (results/search/):
- ``throughput.csv``: space, backend, storage, variant, is_default, trials, seconds,
  trials_per_s, speedup_vs_rerun. In-process rows time the search loop of ``run_search`` (ask,
  suggest, score, tell, commit) on fresh studies; ``ask/tell on storage`` is the plain Optuna
  way (every suggest and attribute a storage write, stock journal backend), for comparison;
  the Ray row runs ``--backend ray`` (2 workers, local instance) inside a loopback-only network
  namespace and reports the steady-state rate (trial 10 to the last). ``rerun`` evaluates each
  trial without the cache: BN recalibration for its depths, ``Supernet.extract`` and
  ``MultiExitModel.predict`` over val (for cifar10 with max-softmax thresholds at each exit's
  median confidence, so about half the remaining samples leave at every exit);
  speedup_vs_rerun = trials_per_s / the same space's rerun trials_per_s.
- ``scaling.csv``: rate per 1,000 trials along one study, exitnas' NSGA-II vs Optuna's own.
- ``breakdown.csv``: where an in-process trial's time goes (ms per trial by phase).
- ``hypervolume.csv``: space, sampler, seed, trials, hypervolume, front_size (+ reference
  point) for NSGA-II and random search at equal trials (``--hv-trials``), ``--seeds`` seeds, on
  quickstart and on a trained CIFAR-10 supernet copied from runs/cifar10-bench when present.
- ``sampler.csv`` / ``sampler_summary.csv``: recorded at commit 402eba8 by this script's
  former ``--phases sampler``: Optuna's NSGAIISampler against exitnas' IndexedNSGAIISampler
  at 200 / 500 / 1,000 trials, pairs back to back; the indexed sampler was no faster, so it
  was removed (``exitnas/search/_sampler.py``) and the phase with it.
- ``README.md``: command, data, machine, tables.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "results" / "search"
SPACE = ROOT / "search_spaces" / "quickstart.yaml"

from benchmarks.search_throughput_loop import (asktell_on_storage, breakdown,  # noqa: E402
                                               inprocess, scaling)
from benchmarks.search_throughput_readme import write_readme  # noqa: E402


def ensure_run(run: Path) -> None:
    """The quickstart's stage-0 backbone and the supernet grown from it, as `exitnas run`
    trains them."""
    for step, out in (("train-backbone", "backbone"), ("train-supernet", "supernet")):
        if not (run / out / "weights.safetensors").is_file():
            r = subprocess.run([sys.executable, "-m", "exitnas", step, str(SPACE), "--run-dir",
                                str(run)], env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                raise SystemExit(f"{step} failed")


def ensure_cifar_run(run: Path, data_root: Path) -> None:
    """A random-init supernet of resnet_cifar with depths {3, 5} on the CIFAR-10 JPEG data."""
    import torch
    import yaml

    from exitnas.rundir import RunDir
    from exitnas.space import parse_space
    from exitnas.supernet import Supernet

    if (run / "supernet" / "weights.safetensors").is_file():
        return
    if not (data_root / "train").is_dir():
        tar = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
        import tarfile

        data_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(data_root, filter="data")
    cfg = yaml.safe_load((ROOT / "search_spaces" / "resnet_cifar.yaml").read_text())
    cfg["name"] = "resnet_cifar_d35"
    for st in cfg["backbone"]["stages"]:
        st["depths"] = [3, 5]
    cfg["data"] = {**cfg["data"], "dataset": "imagefolder", "root": str(data_root)}
    space = parse_space(cfg)
    RunDir(run).init(space)
    torch.manual_seed(0)
    Supernet(space, pretrained=False).save(run / "supernet" / "weights.safetensors")


def warm_caches(run: Path):
    from exitnas.data import load_splits
    from exitnas.rundir import RunDir
    from exitnas.search import CacheStore
    from exitnas.supernet import Supernet

    rd = RunDir(run)
    space = rd.space()
    net = Supernet(space, pretrained=False).load(run / "supernet" / "weights.safetensors")
    splits = load_splits(space)
    store = CacheStore(run_dir=rd, net=net, splits=splits)
    for depths in space.depth_settings():
        store(depths)
    return rd, space, net, splits, store


def rerun(space, net, splits, archs: int, store=None) -> dict:
    """Evaluate trials without the cache: BN recalibration, extraction, predict over val.
    With ``store``, max-softmax thresholds at each exit's median confidence (cifar10: an
    untrained supernet is never confident enough to exit)."""
    import optuna
    import torch

    from exitnas.cost import cost_table
    from exitnas.data import batches
    from exitnas.search import Genome
    from exitnas.supernet import calibration_batches

    genome = Genome(space)
    costs = cost_table(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                                directions=["maximize", "minimize"])
    cfg = space.data
    t = time.perf_counter()
    for _ in range(archs):
        trial = study.ask()
        arch = genome.decode(genome.suggest(trial))
        if store is not None:
            cache = store(arch.depths)
            rows = cache.rows(arch)[:-1]
            arch = arch.with_thresholds(tuple(float(cache.conf[r].median()) for r in rows),
                                        policy="max_softmax")
        model = net.extract(arch, calib=calibration_batches(space, splits)).eval()
        correct, exits = 0, []
        with torch.no_grad():
            for x, y in batches(splits.val, batch_size=cfg.eval_batch_size, mean=splits.mean,
                                std=splits.std):
                p = model.predict(x)
                correct += int((p.pred == y).sum())
                exits.append(p.exit)
        c = costs.exit_costs(arch)
        expected = float(sum(c[int(k)] for k in torch.cat(exits))) / len(splits.val)
        study.tell(trial, [correct / len(splits.val), expected])
    seconds = time.perf_counter() - t
    return {"trials": archs, "seconds": seconds, "trials_per_s": archs / seconds}


def postgres_server(root: Path):
    """Start Debian's PostgreSQL as user postgres on 127.0.0.1 (None if it cannot)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or os.geteuid() != 0 or not shutil.which("runuser"):
        return None, None
    pw = pwd.getpwnam("postgres")
    os.chown(root, pw.pw_uid, pw.pw_gid)
    bindir = Path(bins[-1]).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(*cmd):
        return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)],
                              capture_output=True, text=True, timeout=120)

    pg(bindir / "initdb", "-D", root / "data", "-A", "trust", "-U", "postgres", "--no-sync")
    pg(bindir / "pg_ctl", "-D", root / "data", "-l", root / "log", "-w", "-o",
       f"-h 127.0.0.1 -p {port} -k {root}", "start")
    pg(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "exitnas")
    stop = lambda: pg(bindir / "pg_ctl", "-D", root / "data", "-m", "fast", "-w", "stop")  # noqa: E731
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/exitnas", stop


def ray_row(run: Path, trials: int) -> dict | None:
    """``--backend ray`` on a copy of the run, inside a loopback-only network namespace."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    work = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    shutil.copytree(run, work / "run", ignore=shutil.ignore_patterns("search"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(work), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    try:
        r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c",
                            'ip link set lo up && exec "$0" "$@"', sys.executable, "-m", "exitnas",
                            "search", str(work / "run"), "--backend", "ray", "--workers", "2",
                            "--trials", str(trials)], capture_output=True, text=True, env=env,
                           timeout=1800)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return None
        summary = json.loads((work / "run" / "search" / "summary.json").read_text())
        # one measure, as for every other row: trials over the search loop's wall time (Ray's
        # start-up and Tune's scheduling included)
        seconds = summary["loop_seconds"]
        return {"trials": trials, "seconds": seconds, "trials_per_s": trials / seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hypervolumes(run: Path, space_name: str, trials: int, seeds: int) -> list[dict]:
    from exitnas.search import SearchOptions, run_search

    out = []
    for sampler in ("nsga2", "random"):
        for seed in range(seeds):
            r = run_search(run, SearchOptions(trials=trials, sampler=sampler, seed=seed,
                                              storage=str(run / "search" / "study.log"),
                                              study_name=f"hv-{sampler}-{seed}"), log=None)
            ref = r.summary["reference_point"]
            out.append({"space": space_name, "sampler": sampler, "seed": seed, "trials": trials,
                        "hypervolume": r.hypervolume, "front_size": len(r.front),
                        "ref_accuracy": ref["accuracy"], "ref_relative_cost": ref["relative_cost"]})
            print(out[-1], flush=True)
    return out


def copy_trained_run(src: Path, dst: Path) -> Path:
    """config, supernet weights and exit caches of another run (read-only use of ``src``)."""
    if not (dst / "supernet" / "weights.safetensors").is_file():
        (dst / "supernet").mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "config.yaml", dst / "config.yaml")
        shutil.copy2(src / "supernet" / "weights.safetensors", dst / "supernet")
        if (src / "cache").is_dir():
            shutil.copytree(src / "cache", dst / "cache", dirs_exist_ok=True)
    shutil.rmtree(dst / "search", ignore_errors=True)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="throughput,hv",
                   help="comma-separated: throughput, hv")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "search-bench")
    p.add_argument("--cifar-run", type=Path, default=ROOT / "runs" / "search-bench-cifar")
    p.add_argument("--cifar-root", type=Path, default=ROOT / ".cache" / "cifar10-jpeg")
    p.add_argument("--hv-cifar-from", type=Path, default=ROOT / "runs" / "cifar10-bench",
                   help="a run with a trained CIFAR-10 supernet (copied, not modified)")
    p.add_argument("--trials", type=int, default=1000, help="trials per throughput row")
    p.add_argument("--sql-trials", type=int, default=200, help="trials for SQLite / PostgreSQL")
    p.add_argument("--ray-trials", type=int, default=200)
    p.add_argument("--stock-trials", type=int, default=300, help="trials for stock ask/tell")
    p.add_argument("--scaling-trials", type=int, default=5000)
    p.add_argument("--stock-scaling-trials", type=int, default=3000)
    p.add_argument("--rerun-archs", type=int, default=20)
    p.add_argument("--hv-trials", type=int, default=300)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-cifar", action="store_true")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    if not phases <= {"throughput", "hv"}:
        p.error(f"--phases {args.phases!r}: expected throughput and/or hv")

    import pandas as pd
    import torch

    from exitnas.search._run import quiet_optuna

    torch.set_num_threads(1)
    quiet_optuna()
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_run(args.run)
    shutil.rmtree(args.run / "search", ignore_errors=True)
    loads = json.loads((OUT / "load.json").read_text()) if (OUT / "load.json").is_file() else {}
    if "throughput" in phases:
        loads["throughput"] = os.getloadavg()
        throughput(args)
    if "hv" in phases:
        loads["hv"] = os.getloadavg()
        hv = hypervolumes(args.run, "quickstart", args.hv_trials, args.seeds)
        if (args.hv_cifar_from / "supernet" / "weights.safetensors").is_file():
            run = copy_trained_run(args.hv_cifar_from, ROOT / "runs" / "search-bench-hv")
            hv += hypervolumes(run, "cifar10", args.hv_trials, args.seeds)
        pd.DataFrame(hv).to_csv(OUT / "hypervolume.csv", index=False, float_format="%.4f")
    (OUT / "load.json").write_text(json.dumps(loads))
    write_readme(args, loads)


def throughput(args) -> None:
    import pandas as pd

    rd, space, net, splits, store = warm_caches(args.run)

    rows, q = [], "quickstart"
    tmp = Path(tempfile.mkdtemp(prefix="exitnas-bench-"))
    try:
        base = {q: rerun(space, net, splits, args.rerun_archs)}
        print("rerun", base, flush=True)
        rows.append(dict(space=q, backend="optuna", storage="journal", variant="one write per trial",
                         is_default=True, **inprocess(args.run, None, "tp-journal", args.trials)))
        print(rows[-1], flush=True)
        rows.append(dict(space=q, backend="optuna", storage="sqlite", variant="one write per trial",
                         is_default=False, **inprocess(args.run, f"sqlite:///{tmp / 's.db'}",
                                                       "tp-sqlite", args.sql_trials)))
        print(rows[-1], flush=True)
        pg_root = Path(tempfile.mkdtemp(prefix="exitnas-pg-", dir="/tmp"))
        url, stop = postgres_server(pg_root)
        if url:
            try:
                rows.append(dict(space=q, backend="optuna", storage="postgresql",
                                 variant="one write per trial", is_default=False,
                                 **inprocess(args.run, url, "tp-pg", args.sql_trials)))
                print(rows[-1], flush=True)
            finally:
                stop()
        shutil.rmtree(pg_root, ignore_errors=True)
        rows.append(dict(space=q, backend="optuna", storage="journal",
                         variant="ask/tell on storage (stock)", is_default=False,
                         **asktell_on_storage(args.run, tmp / "stock.log", args.stock_trials, store,
                                              space)))
        print(rows[-1], flush=True)
        if not args.skip_ray:
            row = ray_row(args.run, args.ray_trials)
            if row:
                rows.append(dict(space=q, backend="ray", storage="journal",
                                 variant="2 workers, local", is_default=False, **row))
                print(rows[-1], flush=True)
        rows.append(dict(space=q, backend="none", storage="none", variant="rerun the network per trial",
                         is_default=False, **base[q]))
        parts = breakdown(args.run, args.trials, store, space)
        scale = scaling(args.run, args.scaling_trials, args.stock_scaling_trials, store, space)
        print(scale, flush=True)
        if not args.skip_cifar:
            ensure_cifar_run(args.cifar_run, args.cifar_root)
            shutil.rmtree(args.cifar_run / "search", ignore_errors=True)
            _, cspace, cnet, csplits, cstore = warm_caches(args.cifar_run)
            base["cifar10"] = rerun(cspace, cnet, csplits, max(3, args.rerun_archs // 2), cstore)
            print("rerun cifar10", base["cifar10"], flush=True)
            rows.append(dict(space="cifar10", backend="optuna", storage="journal",
                             variant="one write per trial", is_default=True,
                             **inprocess(args.cifar_run, None, "tp-journal", args.trials)))
            print(rows[-1], flush=True)
            rows.append(dict(space="cifar10", backend="none", storage="none",
                             variant="rerun the network per trial", is_default=False,
                             **base["cifar10"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    df = pd.DataFrame(rows)
    df["speedup_vs_rerun"] = [r["trials_per_s"] / base[r["space"]]["trials_per_s"] for r in rows]
    df = df[["space", "backend", "storage", "variant", "is_default", "trials", "seconds",
             "trials_per_s", "speedup_vs_rerun"]]
    df.to_csv(OUT / "throughput.csv", index=False, float_format="%.3f")
    bd = pd.DataFrame(parts)
    bd.to_csv(OUT / "breakdown.csv", index=False, float_format="%.3f")
    sc = pd.DataFrame(scale)
    sc.to_csv(OUT / "scaling.csv", index=False, float_format="%.3f")



if __name__ == "__main__":
    main()
