"""fp32 vs int8 (``exitnas quantize``) of the ResNet-20 4-exit model of runtime_latency.py on
CIFAR-10 (JPEG): accuracy at every exit, AUC, early-exit accuracy and cost, CPU latency.

    .venv/bin/python benchmarks/int8.py                # a few minutes once the model is cached
    .venv/bin/python benchmarks/int8.py --rounds 3     # quicker, noisier latency

Model: benchmarks/runtime_latency.py's ``prepare`` (ResNet-20 at depths 3/3/3, 4 linear exits,
retrained jointly on a 10k CIFAR-10 train subset, cached under .cache/runtime-bench/; the same
fp32 export, max-softmax thresholds 0.9 at every exit). int8: :func:`exitnas.quantize.
quantize_export` of that export (``--calib-batches`` train batches; redone when the fp32 export
changes), thresholds re-fitted on val for the fp32 export's expected MACs on val.

Statistics: every exit of both exports over val and test through the runtime's ONNX backend
(:func:`exitnas.quantize.exit_stats`, the numbers the runtime decides on). Per exit: accuracy on
all samples (anytime) and C_k / backbone; per model: early-exit accuracy and expected MACs at its
thresholds, and the AUC of each protocol of :func:`exitnas.protocols.auc_table` (operating points
picked on val, reported on test; ``val_auc_*`` on val).

Latency: ``exitnas.runtime.load(DIR, "onnx", threads=1)`` for both (and fp32 on ``pt2`` for
reference), early exit at each model's own thresholds, ``--n1`` test images one by one and
``--n64`` in batches of 64; each round times every configuration once in a rotated order;
``ms_per_sample`` is the median over rounds, ``time_ratio_vs_fp32_onnx`` the median of the
per-round ratio to fp32 on ONNX Runtime at the same batch.

Writes results/runtime/int8.csv (long format: precision, backend, metric, exit, batch, value;
each metric's name carries its unit) and results/runtime/int8.md (the machine, then the table).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import git_state, machine  # noqa: E402
from benchmarks.runtime_latency import _passes, prepare  # noqa: E402
from exitnas.data import normalize  # noqa: E402
from exitnas.protocols import auc_table  # noqa: E402
from exitnas.quantize import exit_stats, onnx_backend, quantize_export  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402
from exitnas.runtime import load, read_manifest, sha256_file  # noqa: E402

OUT = ROOT / "results" / "runtime"
COLUMNS = ["precision", "backend", "metric", "exit", "batch", "value"]
BATCHES = (1, 64)


def int8_export(args, ee_dir: Path) -> Path:
    """The int8 export of ``ee_dir`` (cached while the fp32 export is the same)."""
    out = args.work / "export" / "ee-int8"
    try:
        q = json.loads((out / "arch.json").read_text())["quantization"]
        same = (q["fp32_export"]["arch_json_sha256"] == sha256_file(ee_dir / "arch.json")
                and q["calibration"]["batches"] == args.calib_batches)
    except (OSError, ValueError, KeyError):
        same = False
    if not same:
        t = time.perf_counter()
        quantize_export(RunDir(args.work / "run"), ee_dir, out, calib_batches=args.calib_batches)
        print(f"quantised in {time.perf_counter() - t:.1f} s: {out}", flush=True)
    return out


def accuracy_rows(name: str, root: Path, space, splits) -> list[dict]:
    """Per-exit and early-exit accuracy, costs and AUC of one export (ONNX backend)."""
    m = read_manifest(root)
    backend = onnx_backend(root, m, threads=1)
    val, test = (exit_stats(backend, m, space, splits, s) for s in ("val", "test"))
    thresholds = m["policy"]["thresholds"]
    rows = []

    def row(metric, exit_, value):
        rows.append({"precision": name, "backend": "onnx", "metric": metric, "exit": exit_,
                     "batch": None, "value": float(value)})

    for k, e in enumerate(m["exits"]):
        row("relative_macs", e["name"], test.exit_costs[k] / test.backbone_cost)
        row("val_accuracy", e["name"], val.exit_accuracy[k])
        row("test_accuracy", e["name"], test.exit_accuracy[k])
        if k < len(thresholds):
            row("threshold", e["name"], thresholds[k])
        if "int8_max_abs_diff" in e:
            row("logits_max_abs_diff", e["name"], e["int8_max_abs_diff"])
    for split, stats in (("val", val), ("test", test)):
        s = stats.score(m["policy"]["name"], thresholds)
        row(f"{split}_accuracy", "early_exit", s.accuracy)
        row(f"{split}_expected_relative_macs", "early_exit", s.expected_cost / stats.backbone_cost)
        for k, f in enumerate(s.exit_fractions):
            row(f"{split}_exit_fraction", m["exits"][k]["name"], f)
    for r in auc_table(val, test).itertuples():
        row(f"test_auc_{r.protocol}", "all", r.auc)
        row(f"val_auc_{r.protocol}", "all", r.val_auc)
    return rows


def latency_rows(args, dirs: dict, splits) -> list[dict]:
    """ms per sample of each configuration at batch 1 and 64 (module docs)."""
    preds = {("fp32", "onnx"): load(dirs["fp32"], "onnx", threads=1),
             ("int8", "onnx"): load(dirs["int8"], "onnx", threads=1),
             ("fp32", "pt2"): load(dirs["fp32"], "pt2", threads=1)}
    n = max(args.n1, args.n64)
    import torch

    torch.set_num_threads(1)
    pick = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))[:n]
    x = normalize(splits.test.images[pick], splits.mean, splits.std)
    inputs = {"onnx": x.numpy(), "pt2": x}
    counts = {1: args.n1, 64: args.n64}
    keys = list(preds)
    times = {(key, b): [] for key in keys for b in BATCHES}
    for r in range(args.rounds):
        for b in BATCHES:
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order
                gc.collect()
                t = time.perf_counter()
                _passes(preds[key], inputs[key[1]][:counts[b]], b)
                times[(key, b)].append((time.perf_counter() - t) / counts[b])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for b in BATCHES:
        base = np.asarray(times[(("fp32", "onnx"), b)])
        for key in keys:
            t = np.asarray(times[(key, b)])
            common = {"precision": key[0], "backend": key[1], "exit": "early_exit", "batch": b}
            rows.append({**common, "metric": "ms_per_sample", "value": float(np.median(t)) * 1e3})
            if key != ("fp32", "onnx"):
                rows.append({**common, "metric": "time_ratio_vs_fp32_onnx",
                             "value": float(np.median(t / base))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n1", type=int, default=200, help="test images timed one by one per round")
    ap.add_argument("--n64", type=int, default=1024, help="test images timed in batches of 64")
    ap.add_argument("--calib-batches", type=int, default=8, help="train batches to calibrate on")
    # the model of runtime_latency.py (same defaults: its cache is reused)
    ap.add_argument("--epochs", type=int, default=4, help="joint retraining epochs")
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "runtime-bench")
    ap.set_defaults(model="resnet20")  # runtime_latency.prepare's ResNet-20
    args = ap.parse_args()

    space, splits, ee_dir, _ = prepare(args)
    dirs = {"fp32": ee_dir, "int8": int8_export(args, ee_dir)}
    rows = [r for name, d in dirs.items() for r in accuracy_rows(name, d, space, splits)]
    rows += latency_rows(args, dirs, splits)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["batch"] = df["batch"].astype("Int64")
    order = {e: i for i, e in enumerate(dict.fromkeys(df["exit"]))}  # exits in network order
    df = df.sort_values(["metric", "exit", "precision", "backend", "batch"], kind="stable",
                        key=lambda c: c.map(order) if c.name == "exit" else c)
    OUT.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT / "int8.csv", index=False, float_format="%.4f")
    (OUT / "int8.md").write_text(
        f"fp32 vs int8 exports, {machine()}, 1 thread, {args.rounds} rounds, code "
        f"{git_state()}\n\n" + df.to_markdown(index=False, floatfmt=".4f") + "\n")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
