"""Post-training static int8 quantisation of an export, thresholds re-fitted on val.

    exitnas quantize RUN --export DIR [--out DIR_INT8] [--calib-batches N]   # CLI
    result = quantize_export(RunDir(RUN), DIR, out=DIR_INT8)                  # -> QuantizeResult
    p = exitnas.runtime.load(DIR_INT8, "onnx")                               # early exit as before

Every ONNX graph of the fp32 export DIR (exit graphs, segments, heads, whole model) goes through ONNX
Runtime's ``quant_pre_process`` (shape inference, graph optimisation) and ``quantize_static``:
QDQ format, int8 weights per output channel (symmetric), uint8 activations per tensor
(asymmetric), MinMax ranges, no reduced range (what ONNX Runtime advises for x86 with VNNI).
Calibration runs ``--calib-batches`` training batches of RUN (``data.batch_size`` images,
shuffled with ``supernet.seed``, not augmented: the evaluation view). A graph is calibrated on
what it sees in the fp32 network: ``model``, ``exit_0`` and ``segment_0`` on the images,
``exit_k`` and ``segment_k`` on segment k-1's fp32 outputs, ``head_k`` on segment k's fp32
outputs.

Each int8 graph is then run beside its fp32 graph on one val batch (same inputs) and the max
abs difference of its float outputs is recorded (``graphs.<name>.int8_max_abs_diff``; features
for a segment, logits for a head, features and statistics for an exit graph), as is each exit's logits difference through the int8 chain
(``exits[k].int8_max_abs_diff``). They are round-off of 8-bit arithmetic, not zero.

**Thresholds.** Quantisation moves the confidences, so the fp32 thresholds would spend another
budget. The int8 graphs are run over val through the runtime's ONNX backend (the statistics it
decides on), and the thresholds are fitted (:func:`~exitnas.finetune.fit_arch`, i.e.
:func:`~exitnas.thresholds.fit_thresholds`) for the budget the fp32 export was deployed at: its
own expected cost on val at its thresholds, measured the same way, in its cost unit. C_k stay the
fp32 export's: fvcore MACs do not change with the number format; a latency cost model's ms were
measured on the fp32 graphs (arch.json ``quantization.costs`` says so). A policy that is not
fitted (``patience``) keeps its parameters.

DIR_INT8 (default ``DIR-int8``) holds the int8 ``.onnx`` graphs and arch.json with
``precision: int8``, the fitted thresholds and ``quantization`` (settings, what was calibrated
on, the checks, budget, fp32 and int8 val accuracy). It has no ``.pt2`` programs and no
weights.safetensors (those are fp32): the runtime refuses backend pt2 on it. It is made in a
temporary folder, copied next to DIR_INT8 and swapped in with one rename, as
:mod:`exitnas.export` does; nothing is written before every check passed. DIR is only read (its
files checked against its arch.json first, each ONNX file read once into memory and checked
again there, tensors stored outside the file refused).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arch import Arch
from .errors import ConfigError, ExitnasError
from .export import (_check_replaceable, _clean_stale, _file_entry, _fsync_tree,
                     _swap_into_place)
from .rundir import RunDir
from .runtime import ExportError, read_manifest, sha256_file, verify

CALIB_BATCHES = 8  # default training batches for calibration
SETTINGS = {"tool": "onnxruntime.quantization.quantize_static", "pre_process": "quant_pre_process",
            "format": "QDQ", "weights": "int8, per output channel, symmetric",
            "activations": "uint8, per tensor, asymmetric", "calibrate_method": "MinMax",
            "reduce_range": False}


class QuantizeError(ExitnasError):
    """An export that cannot be quantised (or a quantised graph that fails its check)."""


@dataclass(frozen=True, kw_only=True)
class QuantizeResult:
    out: Path
    arch: Arch          # with the thresholds fitted for the int8 graphs
    manifest: dict      # what out/arch.json holds
    files: tuple[str, ...]  # relative to out, arch.json last


# ---- what may be quantised ----------------------------------------------------------------
def _ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError as err:
        raise QuantizeError(f"quantize needs {err.name} (pip install 'exitnas[onnx]')") from None
    return onnxruntime


def default_out(export: Path) -> Path:
    export = export.resolve()  # "." has no name
    return export.with_name(export.name + "-int8")


def check_inputs(run: RunDir, export: Path, out: Path, calib_batches: int) -> dict:
    """Every refusal, before anything is read from the data or written: returns the fp32
    export's manifest (its files verified)."""
    if not 1 <= calib_batches <= 100_000:
        raise ConfigError(f"{calib_batches} is not in 1..100000", file="--calib-batches")
    _ort()
    space = run.space()
    manifest = read_manifest(export)
    where = export / "arch.json"
    precision = manifest.get("precision", "fp32")
    if precision != "fp32":
        raise QuantizeError(f"{where}: precision is {str(precision)[:20]!r}; only an fp32 "
                            "export is quantised")
    if manifest.get("onnx_skipped"):
        raise QuantizeError(f"{export}: exported without ONNX ({manifest['onnx_skipped']}); "
                            "quantize needs the ONNX graphs: export again with the onnx extra")
    graphs, exits = manifest.get("graphs"), manifest.get("exits")
    k = len(exits) if isinstance(exits, list) else 0
    want = {"model", *(f"{g}_{i}" for i in range(k) for g in ("segment", "head"))}
    fused = want | {f"exit_{i}" for i in range(k)}  # format 3
    if not k or not isinstance(graphs, dict) or set(graphs) not in (want, fused):
        raise QuantizeError(f"{where}: graphs are not exit_k (format 3), segment_k, head_k (one "
                            "per exit) and model")
    listed = {f["path"] for f in manifest["files"]}
    for name, g in graphs.items():
        if not (isinstance(g, dict) and isinstance(g.get("onnx"), str) and g["onnx"] in listed):
            raise QuantizeError(f"{where}: graph {name} has no ONNX file listed in 'files'")
    fp = manifest["space"].get("fingerprint") if isinstance(manifest.get("space"), dict) else None
    if fp != space.fingerprint:
        raise QuantizeError(f"{where}: made for space fingerprint {str(fp)[:20]!r}, but "
                            f"{run.path} holds space {space.name!r} ({space.fingerprint}); "
                            "quantize with the run the export came from")
    src, dst = export.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        what = "is" if dst == src else "contains" if dst in src.parents else "is inside"
        raise QuantizeError(f"--out {out}: {what} the fp32 export {export}; the int8 export "
                            "goes to a folder of its own")
    _check_replaceable(out)
    verify(export, manifest)
    from .runtime import load

    p = load(export, "onnx", check=False)  # a manifest the runtime runs
    try:
        arch = Arch.from_json(manifest["arch"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ExportError(f"{where}: arch does not parse ({type(err).__name__}: "
                          f"{str(err)[:80]})") from None
    if (arch.policy, arch.thresholds) != (p.policy, p.thresholds):
        raise QuantizeError(f"{where}: arch {arch.id} disagrees with policy {p.policy} "
                            f"{list(p.thresholds)}")
    return manifest


def _model_bytes(export: Path, manifest: dict, name: str):
    """The fp32 graph ``name`` as an onnx ModelProto, read once and checked against arch.json;
    tensors stored outside the file are refused (they could name any file)."""
    import hashlib

    import onnx

    entry = manifest["graphs"][name]
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    path = export / entry["onnx"]
    data = path.read_bytes()
    if listed.get(entry["onnx"]) != hashlib.sha256(data).hexdigest():
        raise ExportError(f"{path}: sha256 does not match arch.json (file altered)")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:
        raise ExportError(f"{path}: not an ONNX model ({str(err).splitlines()[0][:120]})") from None
    if _external_tensor(model.graph):
        raise ExportError(f"{path}: holds tensors stored outside the file; refusing it")
    return model


def _external_tensor(graph) -> bool:
    """Whether any tensor of ``graph`` or its subgraphs has its data outside the file."""
    import onnx

    tensors = [*graph.initializer,
               *(t for s in graph.sparse_initializer for t in (s.values, s.indices))]
    subgraphs = []
    for node in graph.node:
        for a in node.attribute:
            tensors += [a.t, *a.tensors]
            subgraphs += [a.g, *a.graphs]
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors) or any(
        _external_tensor(g) for g in subgraphs)


# ---- running graphs through the runtime's ONNX backend -------------------------------------
def onnx_backend(root: Path, manifest: dict, threads: int | None = None):
    """The runtime's ONNX Runtime backend over the graphs of ``manifest`` under ``root``."""
    from .runtime import _Onnx

    return _Onnx(root, manifest, threads)


def _chain(backend, manifest: dict):
    """(segment calls, head calls) of every exit."""
    graphs, k = manifest["graphs"], len(manifest["exits"])
    return ([backend.graph(graphs[f"segment_{i}"]) for i in range(k)],
            [backend.graph(graphs[f"head_{i}"]) for i in range(k)])


def _graph_inputs(fp32_chain, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every graph's input in the fp32 network for images ``x``."""
    segments, _ = fp32_chain
    out = {"model": x}
    for k, segment in enumerate(segments):
        out[f"segment_{k}"] = out[f"exit_{k}"] = x
        x = segment(x)
        out[f"head_{k}"] = x
    return out


def _arrays(data) -> list[np.ndarray]:
    return [np.ascontiguousarray(x.numpy(), dtype=np.float32) for x, _ in data]


def exit_stats(backend, manifest: dict, space, splits, split: str = "val"):
    """The exit statistics the runtime decides on (its ONNX backend's ``stats``) for every
    exit over ``split``, in batches of ``data.eval_batch_size``, with the export's C_k."""
    from .data import batches
    from .evaluate import ArchStats
    from .units import MACS, unit_of

    from .runtime import exit_calls

    calls = exit_calls(backend, manifest["graphs"], *_chain(backend, manifest))
    parts, labels = [], []
    for x, y in batches(getattr(splits, split), batch_size=space.data.eval_batch_size,
                        mean=splits.mean, std=splits.std):
        x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        rows = []
        for call in calls:
            x, *stats = backend.row(call(x))
            rows.append(stats)
        parts.append([np.stack(r) for r in zip(*rows)])  # conf, entropy, pred: [K, n]
        labels.append(y.numpy())
    conf, ent, pred = (np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
    cost = manifest.get("cost")
    unit = unit_of(cost["unit"]) if cost else MACS
    exits = manifest["exits"]
    costs = [e["cost"] if cost else e["macs"] for e in exits]
    backbone = cost["backbone"] if cost else manifest["macs"]["backbone"]
    return ArchStats(conf, ent, pred, np.concatenate(labels), tuple(costs), backbone,
                     tuple(e["name"] for e in exits), unit)


# ---- quantisation -------------------------------------------------------------------------
class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, name: str, arrays: list[np.ndarray]) -> None:
        self._items = iter([{name: a} for a in arrays])

    def get_next(self):
        return next(self._items, None)


def _quantize_graph(model, inputs: list[np.ndarray], dst: Path, work: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / f"{dst.stem}.pre.onnx"
    quant_pre_process(model, str(pre))
    quantize_static(str(pre), str(dst), _Reader(model.graph.input[0].name, inputs),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()


def _max_diff(a, b) -> float:
    """Over the float outputs (an exit graph's pred is a class index)."""
    a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(a, b) if np.asarray(x).dtype.kind == "f")


def _check(fp32, int8, manifest: dict, x: np.ndarray) -> tuple[dict, list[float]]:
    """Max abs diff of every int8 graph vs its fp32 graph on the same inputs, and of every
    exit's logits through the int8 chain vs the fp32 chain. Refuses non-finite outputs."""
    graphs = manifest["graphs"]
    fp_chain, q_chain = _chain(fp32, manifest), _chain(int8, manifest)
    inputs = _graph_inputs(fp_chain, x)
    diffs = {}
    for name in graphs:
        got = int8.graph(graphs[name])(inputs[name])
        if not all(np.isfinite(g).all() for g in (got if isinstance(got, list) else [got])):
            raise QuantizeError(f"int8 graph {name} gives non-finite outputs on val")
        diffs[name] = _max_diff(fp32.graph(graphs[name])(inputs[name]), got)
    exits, a, b = [], x, x
    for (fs, fh), (qs, qh) in zip(zip(*fp_chain), zip(*q_chain)):
        a, b = fs(a), qs(b)
        exits.append(_max_diff(fh(a), qh(b)))
    return diffs, exits


def _int8_manifest(fp: dict, *, graphs: dict, exit_diffs: list[float]) -> dict:
    import onnxruntime

    m = json.loads(json.dumps(fp))
    m["precision"] = "int8"
    m["graphs"] = {name: {k: v for k, v in g.items()
                          if k not in ("pt2", "weights_prefix", "weights_map", "onnx_max_abs_diff")}
                   | {"int8_max_abs_diff": graphs[name]}
                   for name, g in fp["graphs"].items()}
    for e, d in zip(m["exits"], exit_diffs):
        e["int8_max_abs_diff"] = d
    m["versions"] = {**(m.get("versions") or {}), "onnxruntime": onnxruntime.__version__}
    return m


def quantize_export(run: RunDir | str | os.PathLike, export: str | os.PathLike,
                    out: str | os.PathLike | None = None, *, calib_batches: int = CALIB_BATCHES,
                    threads: int | None = None) -> QuantizeResult:
    """Quantise the fp32 export ``export`` of run ``run`` into ``out`` (default
    ``<export>-int8``), atomically; module docs. ``threads``: ONNX Runtime intra-op threads of
    the checks and val passes (None: its default)."""
    from .data import batches, load_splits

    run = run if isinstance(run, RunDir) else RunDir(run)
    export = Path(export)
    out = Path(out) if out is not None else default_out(export)
    fp = check_inputs(run, export, out, calib_batches)
    space = run.space()
    splits = load_splits(space)
    train = batches(splits.train, batch_size=space.data.batch_size, mean=splits.mean,
                    std=splits.std, shuffle=True, seed=space.supernet.seed)
    calib = _arrays(b for _, b in zip(range(calib_batches), train))
    with tempfile.TemporaryDirectory(prefix="exitnas-quantize-") as work:
        built = Path(work) / "int8"  # everything is made here, then copied next to out
        built.mkdir()
        _quantize_all(export, fp, calib, built, Path(work), threads)
        m = _describe(export, fp, built, space, splits, calib, threads)
        names = sorted(p.name for p in built.iterdir())
        m["files"] = [_file_entry(built, n) for n in names]
        (built / "arch.json").write_text(json.dumps(m, indent=2) + "\n")
        _clean_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(built, tmp)
            _fsync_tree(tmp)
            _swap_into_place(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeResult(out=out, arch=Arch.from_json(m["arch"]), manifest=m,
                          files=(*names, "arch.json"))


def _quantize_all(export: Path, fp: dict, calib: list[np.ndarray], built: Path, work: Path,
                  threads: int | None) -> None:
    """Every graph of ``fp`` quantised into ``built``, calibrated on its fp32 inputs."""
    fp_chain = _chain(onnx_backend(export, fp, threads), fp)
    per_graph = [_graph_inputs(fp_chain, x) for x in calib]
    for name, entry in fp["graphs"].items():
        model = _model_bytes(export, fp, name)
        try:
            _quantize_graph(model, [g[name] for g in per_graph], built / entry["onnx"], work)
        except Exception as err:  # an op or shape ONNX Runtime cannot quantise
            line = (str(err).strip().splitlines() or [""])[0][:200]
            raise QuantizeError(f"{export / entry['onnx']}: ONNX Runtime could not quantise "
                                f"graph {name} ({type(err).__name__}: {line})") from None


def _describe(export: Path, fp: dict, built: Path, space, splits, calib: list[np.ndarray],
              threads: int | None) -> dict:
    """The int8 manifest (but ``files``): the checks against fp32, thresholds fitted on val
    for the fp32 export's expected cost, what was calibrated on."""
    from .data import batches
    from .finetune import fit_arch

    fp32 = onnx_backend(export, fp, threads)
    int8 = onnx_backend(built, fp, threads)  # the int8 files under the fp32 graph entries
    check_x = _arrays([next(iter(batches(splits.val, batch_size=space.data.eval_batch_size,
                                         mean=splits.mean, std=splits.std)))])[0]
    diffs, exit_diffs = _check(fp32, int8, fp, check_x)
    before, after = exit_stats(fp32, fp, space, splits), exit_stats(int8, fp, space, splits)
    arch, unit = Arch.from_json(fp["arch"]), before.unit
    s = before.score(arch.policy, arch.thresholds)
    fitted, info = fit_arch(after, arch, space, s.expected_cost)
    expected = unit.name("expected")
    m = _int8_manifest(fp, graphs=diffs, exit_diffs=exit_diffs)
    m["arch"] = fitted.to_json()
    m["policy"] = {"name": fitted.policy, "thresholds": list(fitted.thresholds)}
    m["quantization"] = {
        **SETTINGS, "onnxruntime": m["versions"]["onnxruntime"],
        "calibration": {
            "split": "train", "batches": len(calib), "batch_size": space.data.batch_size,
            "images": int(sum(len(c) for c in calib)), "shuffle_seed": space.supernet.seed,
            "augmented": False,
            "inputs": "model, exit_0, segment_0: the images; exit_k, segment_k: segment "
                      "k-1's fp32 outputs; head_k: segment k's fp32 outputs"},
        "check": {"split": "val", "images": int(len(check_x)),
                  "what": "max abs diff int8 vs fp32: graphs.<name>.int8_max_abs_diff on the "
                          "same inputs, exits[k].int8_max_abs_diff through the chain"},
        "fp32_export": {"path": str(export.resolve()), "arch": arch.id,
                        "arch_json_sha256": sha256_file(export / "arch.json")},
        "thresholds": {"fitted_on": "val", "policy": fitted.policy,
                       **{k: v for k, v in info.items() if k not in ("accuracy", expected)},
                       "cost_unit": unit.key, unit.name("budget"): s.expected_cost,
                       "budget_is": "the fp32 export's expected cost on val at its thresholds "
                                    "(its ONNX graphs, this runtime's backend)"},
        "val": {"images": before.num_samples,
                "fp32": {"arch": arch.id, "accuracy": s.accuracy, expected: s.expected_cost,
                         "exit_accuracy": list(before.exit_accuracy)},
                "int8": {"arch": fitted.id, "accuracy": info["accuracy"],
                         expected: info[expected], "exit_accuracy": list(after.exit_accuracy)}},
        "costs": "C_k are the fp32 export's: fvcore MACs do not depend on the number format; a "
                 "latency cost model's were measured on the fp32 graphs"}
    return m


__all__ = ["quantize_export", "QuantizeResult", "QuantizeError", "check_inputs", "exit_stats",
           "onnx_backend", "default_out", "CALIB_BATCHES", "SETTINGS"]
