"""CPU wall time of the early-exit runtime vs the plain backbone, at thresholds that give
~25 / 50 / 75 % of the backbone's MACs (exitnas.runtime on .pt2 programs and on ONNX Runtime).

    .venv/bin/python benchmarks/runtime_latency.py                     # ResNet-20, CIFAR-10
    .venv/bin/python benchmarks/runtime_latency.py --model resnet50    # ResNet-50 at 224 px
    .venv/bin/python benchmarks/runtime_latency.py --rounds 3          # quicker, noisier

Model ``resnet20``: ResNet-20 (search_spaces/resnet_cifar.yaml at depths 3/3/3) with 4 linear
exits (s0b0, s0b2, s1b1, s2b0) + the final exit, retrained jointly for a few epochs on a
CIFAR-10 (JPEG) subset (exitnas.retrain; cached under .cache/runtime-bench/) so confidences are
realistic, then exported (exitnas.export). Model ``resnet50``: torchvision's ResNet-50
(search_spaces/resnet50_imagenet.yaml, full depth 3/4/6/3, 10 classes) at 224 px on CIFAR-10
(JPEG) images resized to 224, with 4 linear exits (s0b2, s1b3, s2b2, s2b5), randomly initialised
with BatchNorm re-estimated on train batches (training it is out of reach on 2 cores; the
weights decide which samples leave, not what a graph costs), batch 1 only.

Variants: ``pt2`` and ``onnx`` run the export as the runtime does (pt2: segment and head
graphs, statistics on the host; ONNX Runtime: one fused exit graph per exit passed, segment,
head and the exit statistics); ``pt2_fused`` / ``onnx_unfused`` run the same export the other
way, side by side in the same rounds. The plain backbone is the same trained weights
(every segment, final head only) exported as its own one-segment model, run by the same
runtime. Thresholds: one max-softmax threshold shared by all exits, bisected on VAL so the
expected MACs / plain-backbone MACs hit each target; timed on TEST images.

Timing: one intra-op thread (torch and ONNX Runtime), batch 1 (one image per call) and batch
256; backends pt2 (the default, NCHW), pt2_nhwc (load(..., channels_last=True)) and onnx. Each round times every configuration once, in a rotated order; the time ratio is the
median over rounds of (config time / backbone time in the same round). A second pass splits
each configuration's time into segments, heads, exit rule + bookkeeping, and gathering the
samples that go on (median of 3 passes); a third times every graph alone (time vs MACs along
the network). Two extra configurations isolate overheads: ``no_exit`` (every head and rule
evaluated, nobody leaves) and ``segments_only`` (the backbone cut into its segments, final head
only).

Writes results/runtime/{latency.csv, latency.md, breakdown.csv, graphs.csv} (``resnet50``:
the same names with ``_resnet50``).
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exitnas.arch import Arch  # noqa: E402
from benchmarks._common import cifar10_root, git_state, load_average, machine  # noqa: E402
from exitnas.data import load_splits, normalize  # noqa: E402
from exitnas.export import write_export  # noqa: E402
from exitnas.model import MultiExitModel, exits_from_logits  # noqa: E402
from exitnas.retrain import load_retrained, retrain, retrain_dir  # noqa: E402
from exitnas.rundir import RunDir  # noqa: E402
from exitnas.runtime import exit_calls, load  # noqa: E402
from exitnas.space import load_space  # noqa: E402

OUT = ROOT / "results" / "runtime"
ARCH = "d3.3.3~s0b0=linear,s0b2=linear,s1b1=linear,s2b0=linear~max_softmax=0.9,0.9,0.9,0.9"
ARCH50 = "d3.4.6.3~s0b2=linear,s1b3=linear,s2b2=linear,s2b5=linear~max_softmax=0.9,0.9,0.9,0.9"
TARGETS = (0.25, 0.5, 0.75)
COLUMNS = ["backend", "batch", "config", "target_fraction", "threshold", "mac_ratio",
           "time_ratio", "gap_points", "ms_per_sample", "backbone_ms_per_sample",
           "val_mac_ratio", "accuracy", "exit_fractions"]


def _resnet50(args):
    """ResNet-50 at 224 px, random weights, BN re-estimated (module docs)."""
    from exitnas.supernet import Supernet, calibration_batches

    space = load_space(ROOT / "search_spaces" / "resnet50_imagenet.yaml", {
        "num_classes": 10, "backbone.weights": None, "data.root": str(cifar10_root()),
        "data.loader": "memory", "data.train_subset": 2000, "data.test_subset": 400,
        "data.val_fraction": 0.1, "data.eval_batch_size": 50,
        "data.batch_size": 16, "data.num_workers": 0, "supernet.bn_calib_batches": 2})
    run = RunDir(args.work / "run50")
    space = run.init(space)
    arch = Arch.parse(ARCH50).validate(space)
    splits = load_splits(space)
    net = Supernet(space, pretrained=False)
    return space, splits, arch, net.extract(arch, calib=calibration_batches(space, splits)).eval()


def _resnet20(args):
    """ResNet-20, retrained jointly (once, cached)."""
    space = load_space(ROOT / "search_spaces" / "resnet_cifar.yaml", {
        "data.dataset": "imagefolder", "data.root": str(cifar10_root()),
        "data.train_subset": args.train_subset, "data.eval_batch_size": 500,
        "retrain.regime": "joint", "retrain.epochs": args.epochs, "retrain.optim.lr": 0.05})
    run = RunDir(args.work / "run")
    space = run.init(space)
    arch = Arch.parse(ARCH).validate(space)
    splits = load_splits(space)
    if not (retrain_dir(run, arch, "joint") / "model.safetensors").is_file():
        retrain(run, arch, space=space, regime="joint", splits=splits)
    return space, splits, arch, load_retrained(run, arch, "joint", space)


def prepare(args):
    """Train or build the early-exit model, export it and the plain backbone."""
    torch.set_num_threads(2)
    space, splits, arch, model = (_resnet50 if args.model == "resnet50" else _resnet20)(args)
    work = args.work / "export" / args.model
    ee_dir, plain_dir = work / "ee", work / "plain"
    source = {"kind": "benchmark", "weights": "model", "model": args.model}
    if not (ee_dir / "arch.json").is_file() or \
            json.loads((ee_dir / "arch.json").read_text())["format_version"] < 3:
        write_export(model, space=space, arch=arch, splits=splits, out=ee_dir, source=source)
    if not (plain_dir / "arch.json").is_file() or \
            json.loads((plain_dir / "arch.json").read_text())["format_version"] < 3:
        plain = MultiExitModel(segments=[torch.nn.Sequential(*[m for s in model.segments for m in s])],
                               heads=[model.heads[-1]], policy="max_softmax", thresholds=(),
                               exit_names=["final"])
        plain_arch = Arch(depths=arch.depths, exits=(), policy="max_softmax", thresholds=())
        write_export(plain.eval(), space=space, arch=plain_arch, splits=splits, out=plain_dir,
                     source={**source, "note": f"backbone of {arch.id}: every segment, final head only"})
    return space, splits, ee_dir, plain_dir


def fit_threshold(logits: list[torch.Tensor], costs: np.ndarray, backbone: float, target: float) -> float:
    """Shared max-softmax threshold whose expected MACs on these (val) logits ≈ target × backbone
    (expected MACs grow with the threshold: bisection)."""
    k = len(logits) - 1
    lo, hi = 0.0, 1.0
    for _ in range(40):
        t = (lo + hi) / 2
        idx = exits_from_logits(logits, "max_softmax", (t,) * k).exit.numpy()
        if costs[idx].mean() / backbone < target:
            lo = t
        else:
            hi = t
    return (lo + hi) / 2


def _passes(pred, x: np.ndarray | torch.Tensor, batch: int) -> None:
    for i in range(0, len(x), batch):
        pred.predict(x[i:i + batch])


class SegmentsOnly:
    """The early-exit model's segments chained with the final head, no early heads and no exit
    rule: what cutting the backbone into graphs costs by itself."""

    def __init__(self, p) -> None:
        self.p = p

    def predict(self, x):
        for k in range(self.p.num_exits):
            x = self.p.segment(k, x)
        return self.p.head(self.p.num_exits - 1, x)


class Timed:
    """Wrap a callable and add its wall time to ``acc[key]`` (the breakdown pass)."""

    def __init__(self, fn, acc: dict, key: str) -> None:
        self.fn, self.acc, self.key = fn, acc, key

    def __call__(self, *a):
        t = time.perf_counter()
        out = self.fn(*a)
        self.acc[self.key] += time.perf_counter() - t
        return out


def unfused(p):
    """The predictor ``p`` running its export's separate segment and head graphs with the exit
    statistics on the host (benchmark-only access to its exit calls)."""
    p._exits = exit_calls(p._b, {}, p._segments, p._heads, p.temperatures)
    return p


def fused(p):
    """The predictor ``p`` running its export's fused exit graphs whatever its backend does."""
    graphs = p.manifest["graphs"]
    p._exits = [p._b.graph(graphs[f"exit_{k}"]) for k in range(p.num_exits)]
    return p


def breakdown(p, x, batch: int) -> dict:
    """ms per sample in the exit calls (fused: segment + head + statistics in one graph;
    unfused: segments and heads graphs + host statistics), in gathering the samples that go on,
    and the rest (exit rule, numpy bookkeeping, Python dispatch) over one pass; benchmark-only
    instrumentation of the predictor's parts."""
    acc = {"exit_calls": 0.0, "gather": 0.0}
    saved = p._exits, p._b.take
    p._exits = [Timed(f, acc, "exit_calls") for f in saved[0]]
    p._b.take = Timed(saved[1], acc, "gather")
    try:
        t = time.perf_counter()
        _passes(p, x, batch)
        acc["total"] = time.perf_counter() - t
    finally:
        p._exits, p._b.take = saved
    acc["rule_and_python"] = acc["total"] - acc["exit_calls"] - acc["gather"]
    return {k: v / len(x) * 1e3 for k, v in acc.items()}  # ms per sample


def graph_profile(p, x, batch: int, reps: int) -> list[dict]:
    """Median time of every segment and head on its own (``x`` pushed through the chain):
    how time per MAC changes along the network."""
    def median_time(fn, arg):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            out = fn(arg)
            times.append(time.perf_counter() - t)
        return float(np.median(times)) / batch * 1e3, out

    rows, h, graphs = [], x[:batch], p.manifest["graphs"]
    for k in range(p.num_exits):
        exit_ms, _ = median_time(lambda v: p.exit(k, v), h)
        seg_ms, feats = median_time(lambda v: p.segment(k, v), h)
        head_ms, _ = median_time(lambda v: p.head(k, v), feats)
        rows.append({"graph": f"segment_{k}", "macs": graphs[f"segment_{k}"]["macs"], "ms_per_sample": seg_ms})
        rows.append({"graph": f"head_{k}", "macs": graphs[f"head_{k}"]["macs"], "ms_per_sample": head_ms})
        rows.append({"graph": f"exit_{k}", "macs": graphs[f"exit_{k}"]["macs"], "ms_per_sample": exit_ms})
        h = feats
    parts = [r for r in rows if not r["graph"].startswith("exit_")]
    total_t = sum(r["ms_per_sample"] for r in parts)
    total_m = sum(r["macs"] for r in parts)
    for r in rows:
        r["macs_share"] = r["macs"] / total_m
        r["time_share"] = r["ms_per_sample"] / total_t
        r["ns_per_mac"] = r["ms_per_sample"] * 1e6 / r["macs"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n1", type=int, default=200, help="test images timed one by one per round")
    ap.add_argument("--n256", type=int, default=1024, help="test images timed in batches of 256")
    ap.add_argument("--epochs", type=int, default=4, help="joint retraining epochs")
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "runtime-bench")
    ap.add_argument("--model", choices=("resnet20", "resnet50"), default="resnet20")
    ap.add_argument("--nhwc", action="store_true", help="also time pt2 with channels_last")
    args = ap.parse_args()
    started, load_before = time.time(), load_average()
    if args.model == "resnet50":  # ~0.1 s per image on one thread: batch 1, fewer images
        args.n256, args.n1 = 0, min(args.n1, 40)
    suffix = "" if args.model == "resnet20" else f"_{args.model}"

    space, splits, ee_dir, plain_dir = prepare(args)
    torch.set_num_threads(1)
    same = lambda p: p  # noqa: E731 - the runtime's own way
    variants = {"pt2": ("pt2", False, same), "onnx": ("onnx", False, same),
                "pt2_fused": ("pt2", False, fused), "onnx_unfused": ("onnx", False, unfused)}
    if args.nhwc:
        variants["pt2_nhwc"] = ("pt2", True, same)
    preds = {v: {d.name: way(load(d, b, threads=1, channels_last=cl))
                 for d in (plain_dir, ee_dir)} for v, (b, cl, way) in variants.items()}
    ref = preds["pt2"]["ee"]
    backbone = float(preds["pt2"]["plain"].exit_macs[0])
    costs = ref.exit_macs.astype(np.float64)
    k = ref.num_exits - 1

    val = normalize(splits.val.images, splits.mean, splits.std)
    val_logits = [torch.as_tensor(z) for z in ref.all_exits(val)]
    configs = {"backbone": None}
    for target in TARGETS:
        configs[f"t{int(target * 100)}"] = (target, fit_threshold(val_logits, costs, backbone, target))
    configs["no_exit"] = (None, 2.0)  # every exit evaluated, nobody leaves: the exits' overhead
    configs["segments_only"] = None    # the cut backbone: segments + final head, no early heads

    n = max(args.n1, args.n256)
    pick = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))[:n]
    labels = splits.test.labels[pick].numpy()  # a random subset: the folder order is by class
    x_t = normalize(splits.test.images[pick], splits.mean, splits.std)
    inputs = {v: x_t if b == "pt2" else x_t.numpy() for v, (b, _, _) in variants.items()}
    plans = [(b, 1, args.n1) for b in preds] + [(b, 256, args.n256) for b in preds if args.n256]

    def runner(backend: str, name: str):
        if name == "backbone":
            return preds[backend]["plain"]
        p = preds[backend]["ee"]
        if name == "segments_only":
            return SegmentsOnly(p)
        p.set_policy("max_softmax", (configs[name][1],) * k)
        return p

    times = {(b, bs, c): [] for b, bs, _ in plans for c in configs}
    names = list(configs)
    for r in range(args.rounds):
        for b, bs, count in plans:
            for c in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                p = runner(b, c)
                gc.collect()
                t = time.perf_counter()
                _passes(p, inputs[b][:count], bs)
                times[(b, bs, c)].append((time.perf_counter() - t) / count)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows, parts = [], []
    for b, bs, count in plans:
        base = np.asarray(times[(b, bs, "backbone")])
        for c in names:
            p = runner(b, c)
            t = np.asarray(times[(b, bs, c)])
            target, thr = configs[c] if configs[c] else (None, float("nan"))
            if c == "segments_only":
                logits = np.concatenate([np.asarray(p.predict(inputs[b][i:i + bs]))
                                         for i in range(0, count, bs)])
                pred, exits, macs = logits.argmax(1), np.full(count, k), 1.0
            else:
                res = p.predict(inputs[b][:count])
                pred, exits, macs = res.pred, res.exit, float(res.cost.mean()) / backbone
            val_ratio = (1.0 if configs[c] is None else float(costs[exits_from_logits(
                val_logits, "max_softmax", (thr,) * k).exit.numpy()].mean() / backbone))
            ratio = float(np.median(t / base))
            fr = np.bincount(exits, minlength=k + 1) / count
            rows.append({"backend": b, "batch": bs, "config": c, "target_fraction": target,
                         "threshold": thr, "mac_ratio": macs, "time_ratio": ratio,
                         "gap_points": 100 * (ratio - macs),
                         "ms_per_sample": float(np.median(t)) * 1e3,
                         "backbone_ms_per_sample": float(np.median(base)) * 1e3,
                         "val_mac_ratio": val_ratio,
                         "accuracy": float((pred == labels[:count]).mean()),
                         "exit_fractions": " ".join(f"{f:.2f}" for f in fr)})
    OUT.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=COLUMNS)  # written first: the passes below only explain it
    df.to_csv(OUT / f"latency{suffix}.csv", index=False, float_format="%.3f")
    show = df.drop(columns=["exit_fractions"])
    (OUT / f"latency{suffix}.md").write_text(
        f"Runtime latency ({args.model}), {machine()}, 1 thread, {args.rounds} rounds, code "
        f"{git_state()}, load average before {load_before}, after {load_average()}, "
        f"{time.time() - started:.0f} s\n\n"
        + show.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    for b, bs, count in plans:
        for c in names:
            if c != "segments_only":
                p = runner(b, c)
                runs = [breakdown(p, inputs[b][:count], bs) for _ in range(3)]
                parts.append({"backend": b, "batch": bs, "config": c,
                              **{key: float(np.median([r[key] for r in runs])) for key in runs[0]}})
    pd.DataFrame(parts).to_csv(OUT / f"breakdown{suffix}.csv", index=False, float_format="%.4f")
    prof = []
    for b, bs, count in plans:
        x = inputs[b][:bs] if bs > 1 else inputs[b][:1]
        prof += [{"backend": b, "batch": bs, **r}
                 for r in graph_profile(preds[b]["ee"], x, bs,
                                        reps=7 if bs > 1 or args.model == "resnet50" else 50)]
    pd.DataFrame(prof).to_csv(OUT / f"graphs{suffix}.csv", index=False, float_format="%.4f")
    print(pd.DataFrame(parts).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(pd.DataFrame(prof).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
