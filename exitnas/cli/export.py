"""``exitnas export RUN --arch ID`` and ``exitnas predict DIR INPUTS...``."""
from __future__ import annotations

import json
from pathlib import Path

from . import command
from ..errors import DataError
from ..units import UNITS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@command("export", help="write an arch's weights, arch.json and .pt2 / ONNX graphs (atomic)")
class Export:
    @staticmethod
    def add_arguments(p):
        p.add_argument("run_dir", help="run directory (holds config.yaml)")
        p.add_argument("--arch", required=True, help="arch id, JSON, or JSON file")
        p.add_argument("--out", help="output folder (default RUN/export/<arch id>)")
        p.add_argument("--weights", help="safetensors of the model (or of a supernet) to export "
                                         "instead of the run's retrained / supernet weights")
        p.add_argument("--no-onnx", action="store_true", help="write .pt2 programs only")

    @staticmethod
    def run(args):
        from ..arch import Arch
        from ..export import export_run

        result = export_run(args.run_dir, Arch.parse(args.arch), args.out, weights=args.weights,
                            onnx=not args.no_onnx)
        src = result.source
        what = {"retrain": f"retrained model ({src.get('regime')})", "supernet": "trained supernet",
                "weights": "--weights"}[src["kind"]]
        if src["weights"] == "supernet":
            what += ", arch extracted after BN recalibration"
        print(f"exported {result.arch.id} to {result.out}")
        print(f"weights: {what}: {src['path']}")
        if "calibration" in src:  # temperatures stored with the weights (exitnas.calibration)
            print(f"calibration: {src['calibration']['method']}: {src['calibration']['path']}")
        print("onnx: " + ("written" if result.onnx_skipped is None
                          else f"skipped ({result.onnx_skipped})"))
        print(f"files: {', '.join(result.files)}")


def _collect(inputs: list[str]) -> list[tuple[Path, str | None]]:
    """(image file, label from its folder or None) for files and ImageFolder trees."""
    out: list[tuple[Path, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            out.append((path, None))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{path}: no image files found")
            out += [(f, f.parent.name if f.parent != path else None) for f in files]
        else:
            raise DataError(f"{path}: no such file or folder")
    return out


@command("predict", help="classify images with an export, with per-sample early exit")
class Predict:
    @staticmethod
    def add_arguments(p):
        p.add_argument("export_dir", help="folder written by `exitnas export`")
        p.add_argument("inputs", nargs="+", help="image files or ImageFolder trees (root/<class>/*)")
        p.add_argument("--backend", choices=("pt2", "onnx"), default="pt2")
        p.add_argument("--format", choices=("table", "json"), default="table")
        p.add_argument("--batch-size", type=int, default=256)

    @staticmethod
    def run(args):
        import numpy as np

        from ..runtime import ExportError, load, read_image

        if args.batch_size < 1:
            raise DataError(f"--batch-size {args.batch_size}: must be >= 1")
        predictor = load(args.export_dir, backend=args.backend)
        items = _collect(args.inputs)
        c, size = predictor.input_shape[0], predictor.input_shape[1]
        rows = []
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            try:
                images = np.stack([read_image(p, c, size, predictor.view) for p, _ in chunk])
            except ExportError as err:
                raise DataError(str(err)) from None
            res = predictor.predict(predictor.preprocess(images))
            num = int if UNITS[predictor.cost_unit].integer else float
            for (path, label), pred, ex, cost in zip(chunk, res.pred, res.exit, res.cost):
                rows.append({"file": str(path), "label": label,
                             "pred": predictor.classes[int(pred)], "exit": int(ex),
                             "exit_name": predictor.exit_names[int(ex)],
                             predictor.cost_unit: num(cost)})
        _print(rows, predictor, args.format)


def _summary(rows: list[dict], predictor) -> dict:
    n, unit = len(rows), predictor.cost_unit
    mean = sum(r[unit] for r in rows) / n
    counts = [sum(r["exit"] == k for r in rows) for k in range(predictor.num_exits)]
    known = set(predictor.classes)  # folder names that are not class names are no labels
    labelled = [r for r in rows if r["label"] in known]
    out = {"images": n, f"mean_{unit}": mean, f"relative_{unit}": mean / predictor.backbone_cost,
           "exit_counts": dict(zip(predictor.exit_names, counts))}
    if labelled:
        out["accuracy"] = sum(r["label"] == r["pred"] for r in labelled) / len(labelled)
    return out


def _print(rows: list[dict], predictor, fmt: str) -> None:
    summary = _summary(rows, predictor)
    if fmt == "json":
        print(json.dumps({"predictions": rows, "summary": summary}, indent=2))
        return
    width = max(len("file"), *(len(r["file"]) for r in rows))
    unit, label = predictor.cost_unit, predictor.cost_label
    shown = ",.0f" if UNITS[unit].integer else ",.4g"
    print(f"{'file':<{width}}  {'pred':<12}{'exit':<16}{label:>14}")
    for r in rows:
        print(f"{r['file']:<{width}}  {r['pred']:<12}{r['exit_name']:<16}{r[unit]:>14{shown}}")
    line = (f"{summary['images']} images, mean {summary[f'mean_{unit}']:{shown}} {label} "
            f"({summary[f'relative_{unit}']:.3f} of the backbone); exits: "
            + ", ".join(f"{k} {v}" for k, v in summary["exit_counts"].items()))
    if "accuracy" in summary:
        line += f"; accuracy {summary['accuracy']:.3f} (labels from class-named folders)"
    print(line)
