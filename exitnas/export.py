"""Export an arch as deployable artifacts that load without exitnas's training code.

    exitnas export RUN --arch ID --out DIR          # CLI
    result = export_run(RunDir(RUN), arch, out=DIR)  # -> ExportResult

DIR holds:

    arch.json            manifest: space, arch, policy + thresholds, C_k and the backbone's cost
                         in the cost model's unit (``cost``, what the search scored) and in
                         fvcore MACs (``macs``),
                         input shape + normalisation, classes, versions, weight source, graphs,
                         every file with its sha256 (and the weights' tensor shapes)
    weights.safetensors  the MultiExitModel state dict (segments.k.*, heads.k.*)
    exit_k.pt2           what the runtime calls per exit passed: segment k, head k and the
                         exit statistics in one graph, features of exit k-1 (or images) ->
                         (features, conf, entropy, pred); the final exit -> (conf, entropy, pred);
                         the statistics are of the logits divided by T_k (a constant)
    segment_k.pt2        backbone from exit k-1 (or the input) to exit k: images -> features
    head_k.pt2           features -> logits of exit k (the last k is the final exit); with
                         segment_k, for split deployments and per-exit logits (raw: not
                         divided by T_k)
    model.pt2            images -> every exit's logits (a list, final last; raw)
    *.onnx               the same graphs (dynamo exporter) when onnx + onnxscript import

Every graph has a dynamic batch dimension (1 and up). Each graph entry of arch.json names the
weights it takes from weights.safetensors (``weights_map``: graph state-dict prefix -> model
prefix). Format 3 added the ``exit_k`` graphs (format 2 exports run segment + head + the
statistics on the host). The .pt2 archives hold no pickle: their
weights are torch.export's raw tensor records and their sample inputs are empty (format 2;
format 1 also wrote a pickled ``weights.pt``, read by nothing, and pickled sample inputs).

ONNX is optional, the rest is not: the .pt2 graphs, weights and arch.json are written first. If
a graph does not convert (an op without an ONNX function) or ONNX Runtime disagrees with torch,
the export is still completed without ONNX files (arch.json's ``onnx_skipped`` says which graph
and why) and then :class:`OnnxExportError` is raised: one line, exit status 2 from the CLI.
``--no-onnx`` skips ONNX on purpose.

**Calibration.** ``arch.json`` ``exits[k].temperature`` is T_k (:mod:`exitnas.calibration`):
the one stored with the exported weights (``calibration.json`` beside a retrained / fine-tuned
``model.safetensors``, checked against its sha256; ``source.calibration`` says which), else 1.
The exit graphs divide by it, a runtime that computes the statistics on the host divides by
it, and an export without the field behaves as T_k = 1 (``source`` has no ``calibration``
entry when none was stored). The supernet's sub-network ships with
T_k = 1: its thresholds were fitted by the search on uncalibrated statistics.

The weights come from ``--weights``, else the retrained model (RUN/retrain/<arch id>/<regime>/,
the config's regime first; an arch with the same depths and exits but other thresholds also
fits), else the trained supernet with the arch's BatchNorm statistics recalibrated exactly as
the evaluation cache does. The directory is built next to DIR and swapped in with one rename, so
a kill -9 leaves the old or the new export whole.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import _onnx
from .arch import Arch
from .errors import ExitnasError, RunDirError
from .model import ExitGraph, MultiExitModel
from .runtime import FORMAT, FORMAT_VERSION, sha256_file
from .rundir import RunDir
from .space import Space

EXAMPLE_BATCH = 2  # traced batch; the exported batch dimension is dynamic (>= 1)
_to_onnx = _onnx.to_onnx  # the export's own ONNX conversion (tests/test_heads.py uses it)


class OnnxExportError(ExitnasError):
    """A graph did not convert to ONNX; the export was written without ONNX files."""


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    out: Path
    arch: Arch
    source: dict            # where the weights came from (also in arch.json)
    files: tuple[str, ...]  # relative to out, arch.json last
    onnx_skipped: str | None  # why no ONNX was written (None: written)


# ---- where the weights come from ----------------------------------------------------------
def _calibrated_extract(net, space: Space, arch: Arch, splits) -> MultiExitModel:
    """``arch`` extracted with BN re-estimated for its depths on the calibration batches the
    evaluation cache uses, so the export matches the cached scores."""
    from .supernet import calibration_batches

    return net.extract(arch, calib=calibration_batches(space, splits)).eval()


def _supernet_source(path: Path, space: Space, arch: Arch, splits, kind: str) -> tuple[MultiExitModel, dict]:
    from .supernet import Supernet

    net = Supernet(space, pretrained=False).load(path)
    model = _calibrated_extract(net, space, arch, splits)
    return model, {"kind": kind, "path": str(path), "weights": "supernet",
                   "bn_recalibrated": {"batches": space.supernet.bn_calib_batches,
                                       "batch_size": space.data.batch_size,
                                       "seed": space.supernet.seed}}


def _retrained(run: RunDir, space: Space, arch: Arch):
    """(model.safetensors, regime) retrained for ``arch``: its own id first, then archs with the
    same depths and exits but other thresholds (thresholds do not change trained weights); the
    config's regime first, then the others."""
    from .errors import ArchError

    root = run.path / "retrain"
    same = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        try:
            other = Arch.from_id(d.name)
        except ArchError:
            continue
        if (other.depths, other.exits) == (arch.depths, arch.exits):
            same.append((d.name != arch.id, d))
    for _, d in sorted(same):
        regimes = [space.retrain.regime] + sorted(p.name for p in d.glob("*") if p.name != space.retrain.regime)
        for regime in regimes:
            if (d / regime / "model.safetensors").is_file():
                yield d / regime / "model.safetensors", regime


def _calibrated(model: MultiExitModel, path: Path, source: dict) -> tuple[MultiExitModel, dict]:
    """``model`` (the weights of ``path``) with the temperatures stored beside them, if any."""
    from . import calibration

    fitted = calibration.load(path, model.num_exits)  # malformed or stale: one line
    if fitted is None:  # none stored: T_k = 1
        return model, source
    model.set_temperatures(fitted.temperatures)
    return model, {**source, "calibration": {"method": fitted.method,
                                             "path": str(path.parent / calibration.FILE)}}


def resolve_weights(run: RunDir, space: Space, arch: Arch, splits,
                    weights: str | os.PathLike | None = None) -> tuple[MultiExitModel, dict]:
    """The model to export (with its temperatures) and a description of its source:
    ``weights`` (a model or supernet safetensors), else the retrained model (see
    :func:`_retrained`), else the supernet."""
    from .io import load_weights
    from .supernet import load_model

    if weights is not None:
        path = Path(weights)
        state = load_weights(path)  # refuses pickles
        if any(k.startswith("segments.") for k in state):
            return _calibrated(load_model(space, arch, path, state), path, {
                "kind": "weights", "path": str(path), "weights": "model"})
        return _supernet_source(path, space, arch, splits, "weights")
    for path, regime in _retrained(run, space, arch):
        return _calibrated(load_model(space, arch, path), path, {
            "kind": "retrain", "path": str(path), "regime": regime, "weights": "model"})
    path = run.path / "supernet" / "weights.safetensors"
    if path.is_file():
        return _supernet_source(path, space, arch, splits, "supernet")
    raise RunDirError(f"{run.path}: no weights for {arch.id} (no retrain/{arch.id}/<regime>/"
                      "model.safetensors, no supernet/weights.safetensors); train first or "
                      "pass --weights")


# ---- graphs -------------------------------------------------------------------------------
def _graphs(model: MultiExitModel, shape: tuple[int, ...]) -> list[tuple[str, nn.Module, torch.Tensor, dict]]:
    """(name, module, example input, weights map) of every graph to export."""
    x = torch.randn(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0))
    out = [("model", model, x, {"": ""})]
    last = model.num_exits - 1
    with torch.no_grad():
        for k, (segment, head) in enumerate(zip(model.segments, model.heads)):
            fused = ExitGraph(segment=segment, head=head, final=k == last,
                              temperature=model.temperatures[k])
            out.append((f"exit_{k}", fused, x, {"segment.": f"segments.{k}.", "head.": f"heads.{k}."}))
            out.append((f"segment_{k}", segment, x, {"": f"segments.{k}."}))
            x = segment(x)
            out.append((f"head_{k}", head, x, {"": f"heads.{k}."}))
    return out


def _shape(t) -> list:
    return [None, *t.shape[1:]]


# ---- the manifest -------------------------------------------------------------------------
def _manifest(*, space: Space, arch: Arch, splits, source: dict, graphs: dict,
              onnx_skipped: str | None, temperatures: tuple[float, ...]) -> dict:
    from . import __version__
    from .cost import cost_table, mac_table

    table, macs = cost_table(space), mac_table(space)
    costs, mac_costs = table.exit_costs(arch), macs.exit_costs(arch)
    backbone, mac_backbone = table.backbone(), macs.backbone()
    names = [e.key for e in arch.exits] + ["final"]
    heads = [e.head for e in arch.exits] + [space.backbone.final_head]
    positions = [[e.stage, e.block] for e in arch.exits] + [None]
    # per-graph costs (per image, as the cost table) for split deployments: C_k = C_{k-1} +
    # segment k + head k
    for key, t, c_k in (("macs", macs, mac_costs), ("cost", table, costs)):
        head_cost = [t.heads[(e.stage, e.block, e.head)] for e in arch.exits] + [t.final]
        for k, (c, h) in enumerate(zip(c_k, head_cost)):
            graphs[f"segment_{k}"][key] = c - (c_k[k - 1] if k else 0) - h
            graphs[f"head_{k}"][key] = h
            graphs[f"exit_{k}"][key] = c - (c_k[k - 1] if k else 0)
        graphs["model"][key] = c_k[-1]
    versions = {"exitnas": __version__, "torch": torch.__version__}
    if onnx_skipped is None:
        import onnx

        versions["onnx"] = onnx.__version__
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "space": {"name": space.name, "version": space.version, "fingerprint": space.fingerprint},
        "arch": arch.to_json(),
        "policy": {"name": arch.policy, "thresholds": list(arch.thresholds)},
        "exits": [{"index": k, "name": n, "position": p, "head": h, "macs": m,
                   "relative_macs": m / mac_backbone, "cost": c, "relative_cost": c / backbone,
                   "temperature": t}
                  for k, (n, p, h, m, c, t) in enumerate(zip(names, positions, heads, mac_costs,
                                                             costs, temperatures))],
        "macs": {"backbone": mac_backbone, "arch_backbone": macs.backbone(arch.depths),
                 "counted": macs.counted},
        "cost": {"model": space.cost.model, "unit": table.unit.key, "label": table.unit.label,
                 "backbone": backbone, "arch_backbone": table.backbone(arch.depths),
                 "counted": table.counted},
        "input": {"shape": [space.input.channels, space.input.size, space.input.size],
                  "dtype": "float32", "layout": "NCHW", "mean": list(splits.mean),
                  "std": list(splits.std), "view": splits.test.view,
                  "preprocess": "view (resize / crop), x / 255, then (x - mean) / std"},
        "classes": list(splits.classes),
        "backbone_weights": space.family.weights_meta(space.backbone),
        "source": source,
        "versions": versions,
        "graphs": graphs,
        "onnx_skipped": onnx_skipped,
    }


def _file_entry(root: Path, name: str) -> dict:
    entry = {"path": name, "sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    if name.endswith(".safetensors"):
        from .runtime import read_safetensors_header

        entry["tensors"] = {k: list(v[1]) for k, v in read_safetensors_header(root / name).items()}
    return entry


def write_export(model: MultiExitModel, *, space: Space, arch: Arch, splits, source: dict,
                 out: str | os.PathLike, onnx: bool = True) -> ExportResult:
    """Write the export of ``model`` (eval mode; its ``temperatures`` go into the exit graphs
    and arch.json) to ``out`` atomically. Raises
    :class:`OnnxExportError` after writing it without ONNX when a graph does not convert."""
    from .io import save_weights

    out = Path(out)
    _check_replaceable(out)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    failed = None
    try:
        model = model.eval()
        state = model.state_dict()
        save_weights(tmp / "weights.safetensors", state, {"arch": arch.id, "space": space.name})
        os.chmod(tmp / "weights.safetensors", 0o666 & ~_umask())  # mkstemp made it 0600
        onnx_skipped = None if onnx else "--no-onnx"
        onnx_skipped = onnx_skipped or _onnx.missing()
        shape = (space.input.channels, space.input.size, space.input.size)
        batch = torch.export.Dim("batch", min=1)
        graphs: dict[str, dict] = {}
        programs = []
        for name, module, x, weights in _graphs(model, shape):
            ep = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
            ep.example_inputs = None  # else torch.export.save pickles them into the archive
            torch.export.save(ep, tmp / f"{name}.pt2")
            with torch.no_grad():
                ref = module(x)
            outs = ref if isinstance(ref, (list, tuple)) else [ref]
            graphs[name] = {"pt2": f"{name}.pt2", "weights_map": weights, "input": _shape(x),
                            "output": _shape(outs[0]) if len(outs) == 1 and name != "model"
                            else [_shape(o) for o in outs]}
            programs.append((name, ep, x, ref, getattr(module, "output_names", len(outs))))
        if onnx_skipped is None:
            onnx_skipped = failed = _onnx.write_all(tmp, programs, graphs)
        manifest = _manifest(space=space, arch=arch, splits=splits, source=source, graphs=graphs,
                             onnx_skipped=onnx_skipped, temperatures=model.temperatures)
        names = sorted(p.name for p in tmp.iterdir())
        manifest["files"] = [_file_entry(tmp, n) for n in names]
        (tmp / "arch.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(tmp)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if failed is not None:
        raise OnnxExportError(f"{out}: {failed}; the .pt2 graphs, weights and arch.json are "
                              "written without ONNX (arch.json: onnx_skipped); --no-onnx skips ONNX")
    return ExportResult(out=out, arch=arch, source=source, files=(*names, "arch.json"),
                        onnx_skipped=onnx_skipped)


def export_run(run: RunDir | str | os.PathLike, arch: Arch, out: str | os.PathLike | None = None,
               *, weights: str | os.PathLike | None = None, onnx: bool = True) -> ExportResult:
    """Export ``arch`` of run directory ``run`` (default out: RUN/export/<arch id>/)."""
    from .data import load_splits

    run = run if isinstance(run, RunDir) else RunDir(run)
    space = run.space()
    arch.validate(space)
    out = Path(out) if out is not None else run.path / "export" / arch.id
    _check_replaceable(out)
    splits = load_splits(space)
    model, source = resolve_weights(run, space, arch, splits, weights)
    return write_export(model, space=space, arch=arch, splits=splits, source=source, out=out,
                        onnx=onnx)


# ---- atomic replacement -------------------------------------------------------------------
def _check_replaceable(out: Path) -> None:
    """Only an absent path, an empty folder or an earlier export may be replaced: ``--out ~``
    must never delete a home directory."""
    from .errors import ExitnasError

    if not out.exists():
        return
    if not out.is_dir():
        raise ExitnasError(f"--out {out}: exists and is not a directory")
    if any(out.iterdir()):
        try:
            fmt = json.loads((out / "arch.json").read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise ExitnasError(f"--out {out}: exists and is not an exitnas export (no valid "
                               "arch.json); refusing to replace it")


def _clean_stale(out: Path) -> None:
    """Remove what an earlier killed export left next to ``out``."""
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for p in [*root.iterdir(), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    call is unavailable."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # tmp now holds the old export
    else:  # two renames: a kill between them leaves no out, the old export in .old-*
        old = out.parent / f".{out.name}.tmp-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
