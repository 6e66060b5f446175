"""Does the ``latency`` cost model predict what an export really takes? (issue 16, item 2)

    .venv/bin/python benchmarks/latency_fidelity.py            # ~15-25 min on 2 free cores
    .venv/bin/python benchmarks/latency_fidelity.py --images 300 --rounds 2   # quicker

For 5 architectures of ``search_spaces/resnet_cifar.yaml`` (CIFAR-10 JPEG at 32 px; depths,
exits and heads differ), each backend (pt2, onnx) and batch size (1, 64): the space's latency
table is measured by ``exitnas.latency`` with those settings (one thread), the architecture is
extracted from a randomly initialised supernet (BatchNorm re-estimated on train batches, as
exports are) and exported, and its max-softmax thresholds are set on val so that samples spread
over the exits (every early exit takes about 1 / (exits + 1) of val). Then on ``--images``
test images:

- ``predicted_ms``: the cost model's expected latency per image for the exits the runtime
  actually took, mean over the images of C_k of the sample's exit (``Result.cost``);
- ``measured_ms``: the runtime's wall time per image (``Predictor.predict`` over the images in
  batches of ``batch``), median of ``--rounds`` rounds, all archs of one setting interleaved;
- ``error`` = predicted / measured - 1.

Weights do not change a latency; what the weights change (which exit each sample takes) is
taken from the run itself, so this measures the cost model alone. Writes
``results/latency/fidelity.csv`` (``arch, backend, batch, predicted_ms, measured_ms, error`` +
exit fractions).

``--phases run``: ``exitnas run search_spaces/quickstart.yaml --set cost.model=latency --set
search.budget=<half the backbone's ms>ms`` end to end (backbone, supernet, search in ms,
deploy, export), then every deployed export's runtime latency per image on the test split
(batch 1, pt2, one thread, median of ``--rounds``) against the budget it was deployed for:
``results/latency/run.csv``. Both phases rewrite ``results/latency/README.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import cifar10_root, git_state, load_average, machine  # noqa: E402

from exitnas.arch import Arch  # noqa: E402
from exitnas.cost import cost_table  # noqa: E402
from exitnas.data import batches, load_splits  # noqa: E402
from exitnas.export import write_export  # noqa: E402
from exitnas.io import atomic_write_text  # noqa: E402
from exitnas.policy import ExitStats  # noqa: E402
from exitnas.report import markdown  # noqa: E402
from exitnas.runtime import load  # noqa: E402
from exitnas.space import load_space  # noqa: E402
from exitnas.supernet import Supernet, calibration_batches  # noqa: E402

OUT = ROOT / "results" / "latency"
ARCHS = ("d3.3.3~s0b1=linear,s1b1=linear~max_softmax=0.5,0.5",
         "d5.5.5~s0b2=linear,s1b0=conv,s2b1=linear~max_softmax=0.5,0.5,0.5",
         "d1.2.3~s1b0=mlp~max_softmax=0.5",
         "d4.4.2~s0b0=sdn_pool,s0b3=linear,s1b2=linear,s2b0=mlp~max_softmax=0.5,0.5,0.5,0.5",
         "d2.5.4~s1b4=conv,s2b2=linear~max_softmax=0.5,0.5")
SETTINGS = (("pt2", 1), ("pt2", 64), ("onnx", 1), ("onnx", 64))


def spread_thresholds(model, val_x: torch.Tensor) -> tuple[float, ...]:
    """Per-exit max-softmax thresholds under which early exit k takes ~1/(K+1) of ``val_x``:
    walking the exits, the threshold is the quantile of the confidences of the samples still
    in that lets that share leave."""
    with torch.no_grad():
        logits = model.forward_exits(val_x)
    conf = ExitStats.stack(logits).conf.numpy()
    k, n = conf.shape[0] - 1, conf.shape[1]
    left, out = np.ones(n, dtype=bool), []
    for j in range(k):
        c = conf[j][left]
        share = min(1.0, (n / (k + 1)) / max(c.size, 1))
        t = float(np.quantile(c, 1 - share)) if c.size else 1.0
        out.append(round(min(max(t, 0.0), 1.0), 4))
        left &= ~(conf[j] >= np.float32(out[-1]))
    return tuple(out)


def exports(space, splits, work: Path, val_x: torch.Tensor) -> dict[str, Path]:
    net = Supernet(space, pretrained=False).eval()
    out = {}
    for arch_id in ARCHS:
        arch = Arch.parse(arch_id).validate(space)
        model = net.extract(arch, calib=calibration_batches(space, splits)).eval()
        arch = arch.with_thresholds(spread_thresholds(model, val_x))
        model.thresholds = arch.thresholds  # the manifest's policy is the arch's
        folder = work / arch.id.replace("~", "_").replace(",", "-").replace("=", "")[:80]
        write_export(model, space=space, arch=arch, splits=splits, out=folder,
                     source={"kind": "benchmark", "weights": "random init, BN re-estimated"},
                     onnx=space.cost.backend == "onnx")
        out[arch.id] = folder
    return out


def run_phase(args) -> pd.DataFrame:
    """``exitnas run`` with a budget in ms, then each export's measured latency on test."""
    import subprocess

    from exitnas.rundir import RunDir

    quick = ROOT / "search_spaces" / "quickstart.yaml"
    sets = {"cost.model": "latency", "cost.rounds": args.table_rounds}
    space = load_space(quick, sets)
    half = 0.5 * cost_table(space).backbone()
    run_dir = args.work / "quickstart-ms"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run of the current code and table, not resumed
    cmd = [sys.executable, "-m", "exitnas", "run", str(quick), "--run-dir", str(run_dir),
           *[f"--set={k}={v}" for k, v in {**sets, "search.budget": f"{half:.6f}ms",
                                             "search.deploy_budgets": "null"}.items()]]
    subprocess.run(cmd, check=True, cwd=ROOT)
    run = RunDir(run_dir)
    splits = load_splits(run.space())
    test_x = np.concatenate([x.numpy() for x, _ in batches(
        splits.test, batch_size=500, mean=splits.mean, std=splits.std)])
    rows = []
    for folder in sorted((run_dir / "export").iterdir()):
        manifest = json.loads((folder / "arch.json").read_text())
        p = load(folder, "pt2", threads=1)
        times = []
        for r in range(args.rounds + 1):
            t = time.perf_counter()
            res = [p.predict(test_x[i:i + 1]) for i in range(len(test_x))]
            if r:
                times.append((time.perf_counter() - t) / len(test_x) * 1e3)
        predicted = float(np.concatenate([x.cost for x in res]).mean())
        measured = statistics.median(times)
        rows.append({"arch": manifest["arch"]["id"], "budget_ms": half,
                     "predicted_ms": predicted, "measured_ms": measured,
                     "error": predicted / measured - 1, "under_budget": measured <= half,
                     "backbone_ms": manifest["cost"]["backbone"], "test_images": len(test_x)})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", default="fidelity,run", help="comma list of: fidelity, run")
    ap.add_argument("--images", type=int, default=1000, help="test images timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--table-rounds", type=int, default=30, help="cost.rounds of the tables")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "latency-bench")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("EXITNAS_CACHE", str(args.work / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    for phase in args.phases.split(","):
        started, load_before, t0 = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), \
            load_average(), time.perf_counter()
        df = fidelity_phase(args) if phase == "fidelity" else run_phase(args)
        df.to_csv(args.out / f"{phase}.csv", index=False, float_format="%.4f")
        runs[phase] = {"command": "benchmarks/latency_fidelity.py " + " ".join(sys.argv[1:]),
                       "machine": machine(), "code": git_state(), "started": started,
                       "load_before": load_before, "load_after": load_average(),
                       "seconds": time.perf_counter() - t0}
        runs_path.write_text(json.dumps(runs, indent=2) + "\n")
        write_readme(args.out, runs)


def fidelity_phase(args) -> pd.DataFrame:
    base = load_space(ROOT / "search_spaces" / "resnet_cifar.yaml", {
        "data.dataset": "imagefolder", "data.root": str(cifar10_root()),
        "data.train_subset": 2000, "data.test_subset": args.images, "data.eval_batch_size": 500})
    splits = load_splits(base)
    val_x = next(iter(batches(splits.val, batch_size=500, mean=splits.mean, std=splits.std)))[0]
    test_x = np.concatenate([x.numpy() for x, _ in batches(
        splits.test, batch_size=500, mean=splits.mean, std=splits.std)])[:args.images]
    rows = []
    with tempfile.TemporaryDirectory(prefix="exitnas-fidelity-") as tmp:
        for backend, batch in SETTINGS:
            space = base.with_overrides({"cost.model": "latency", "cost.backend": backend,
                                         "cost.batch": batch, "cost.threads": 1,
                                         "cost.rounds": args.table_rounds})
            table = cost_table(space)
            folders = exports(space, splits, Path(tmp) / f"{backend}-{batch}", val_x)
            preds = {a: load(f, backend, threads=1) for a, f in folders.items()}
            times: dict[str, list[float]] = {a: [] for a in preds}
            results = {}
            for r in range(args.rounds + 1):  # round 0 warms up
                for a, p in preds.items():
                    t = time.perf_counter()
                    res = [p.predict(test_x[i:i + batch]) for i in range(0, len(test_x), batch)]
                    if r:
                        times[a].append((time.perf_counter() - t) / len(test_x) * 1e3)
                    results[a] = res
            for a, p in preds.items():
                cost = np.concatenate([res.cost for res in results[a]])
                exit_idx = np.concatenate([res.exit for res in results[a]])
                predicted, measured = float(cost.mean()), statistics.median(times[a])
                rows.append({"arch": a, "backend": backend, "batch": batch,
                             "predicted_ms": predicted, "measured_ms": measured,
                             "error": predicted / measured - 1,
                             "exit_fractions": ";".join(
                                 f"{f:.3f}" for f in np.bincount(exit_idx, minlength=p.num_exits)
                                 / len(exit_idx)),
                             "backbone_ms_predicted": table.backbone()})
            print(pd.DataFrame(rows[-len(preds):]).to_string(index=False), flush=True)
    return pd.DataFrame(rows)


def write_readme(out: Path, runs: dict) -> None:
    parts = ["# Latency cost model vs measured runtime latency\n\n",
             __doc__.split("\n\n", 2)[2].replace("``", "`")]
    for phase, what in (("fidelity", "fidelity.csv"), ("run", "run.csv")):
        run = runs.get(phase)
        if run is None or not (out / what).is_file():
            parts.append(f"\n## {what}\n\nNot run yet (`--phases {phase}`).\n")
            continue
        df = pd.read_csv(out / what)
        worst = df.loc[df["error"].abs().idxmax()]
        parts.append(f"\n## {what}\n\nCommand: `.venv/bin/python {run['command']}`  \n"
                     f"Machine: {run['machine']}  \nCode: {run['code']}  \n"
                     f"Load average before: {run['load_before']}, after: {run['load_after']}  \n"
                     f"Wall time: {run['seconds']:.0f} s, started {run['started']} UTC\n\n"
                     f"Worst |error|: {100 * abs(worst['error']):.1f} % (`{worst['arch']}`"
                     + (f", {worst['backend']}, batch {worst['batch']}" if "backend" in df else "")
                     + "); goal: <= 10 % everywhere."
                     + (f" Exports under their budget: {int(df['under_budget'].sum())} of "
                        f"{len(df)}." if "under_budget" in df else "") + "\n\n"
                     + markdown(df, digits=4))
    atomic_write_text(out / "README.md", "".join(parts))


if __name__ == "__main__":
    main()
