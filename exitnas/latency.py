"""Cost model ``latency``: milliseconds per image, measured with the runtime backend deployed on.

Every segment of the space (stem, each block at each position at full depth, each candidate
head at each position, the final head) is exported on its own exactly as an export writes its
graphs (torch.export with a dynamic batch; ONNX through the dynamo exporter) and loaded by
:mod:`exitnas.runtime`'s backend (``cost.backend``: ``pt2`` or ``onnx``, ``cost.threads``
intra-op threads). Each round times every graph once, in turn, on a batch of ``cost.batch``
images (a head together with the runtime's softmax statistics of its logits, which it computes
after every exit); the cost is the median over ``cost.rounds`` rounds after ``cost.warmup``, in
ms per image (the batch's time / batch).

The runtime calls one graph per segment between exits, not one per block: the time of calling
a graph that does almost nothing (``overhead``, measured the same way) is taken off every block
and the stem and put on every head and the final head, so C_k counts one segment call and one
head call per exit passed, as the runtime makes them.

Tables are cached in ``$EXITNAS_CACHE/latency`` (default ``~/.cache/exitnas/latency``) per
space fingerprint, input size, backend, batch, threads, rounds, library versions and machine,
as a CSV of :mod:`exitnas.cost_csv`'s format next to a JSON that records the machine and the
settings. Delete the file to measure again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cost import COST_MODELS, CostModel, CostTable
from .errors import ConfigError
from .units import MS

if TYPE_CHECKING:
    from .space import Space


class _Overhead(nn.Module):
    """A graph that does almost nothing: one value per sample."""

    def forward(self, x):
        return x.flatten(1)[:, :1] + 0


def machine() -> dict:
    """What the measurement ran on (recorded with every table)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from . import __version__

    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use, not the host's
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "system": platform.platform(),
            "python": platform.python_version(), "exitnas": __version__,
            "torch": torch.__version__, "onnxruntime": _ort_version(),
            "onnx": _version("onnx"), "onnxscript": _version("onnxscript")}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


def cache_dir() -> Path:
    root = os.environ.get("EXITNAS_CACHE") or Path.home() / ".cache" / "exitnas"
    return Path(root) / "latency"


def _settings(space: Space) -> dict:
    c = space.cost
    return {"fingerprint": space.fingerprint, "input": [space.input.channels, space.input.size],
            "backend": c.backend, "batch": c.batch, "threads": c.threads, "rounds": c.rounds,
            "warmup": c.warmup}


def _segments(space: Space) -> list[tuple[tuple, nn.Module, torch.Tensor, bool]]:
    """(segment key, module, example batch, is a head) for every segment, eval mode."""
    from .supernet import Supernet

    net = Supernet(space, pretrained=False).eval()
    shape = (space.input.channels, space.input.size, space.input.size)
    x = torch.randn(space.cost.batch, *shape, generator=torch.Generator().manual_seed(0))
    out = [(("overhead",), _Overhead(), x, False), (("stem",), net.stem, x, False)]
    feats = {}
    with torch.no_grad():
        x = net.stem(x)
        for pos, block in net.walk(space.max_depths):
            out.append((("block", *pos), block, x, False))
            x = block(x)
            feats[pos] = x
        for e in net.candidate_exits(space.max_depths):
            out.append((("head", e.stage, e.block, e.head), net.heads[e.key], feats[e.position], True))
        out.append((("final",), net.final, x, True))
    return out


def _write_graphs(root: Path, segments: list, backend: str) -> list[dict]:
    """Each segment as a runtime graph entry under ``root`` (the export's way of writing)."""
    from . import _onnx
    from .export import EXAMPLE_BATCH
    from .io import save_weights

    batch = torch.export.Dim("batch", min=1)
    state, entries = {}, []
    for i, (_, module, x, _) in enumerate(segments):
        example = x[:1].expand(EXAMPLE_BATCH, *x.shape[1:]).contiguous()  # batch 1 specialises
        ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        ep.example_inputs = None
        entry = {"weights_prefix": f"g{i}.", "input": [None, *x.shape[1:]]}
        if backend == "pt2":
            torch.export.save(ep, root / f"g{i}.pt2")
            entry["pt2"] = f"g{i}.pt2"
        else:
            _onnx.to_onnx(ep, (example,), root / f"g{i}.onnx", 1)
            entry["onnx"] = f"g{i}.onnx"
        entry["output"] = [None]
        state.update({f"g{i}.{k}": v for k, v in module.state_dict().items()})
        entries.append(entry)
    save_weights(root / "weights.safetensors", state)
    return entries


def _backend(root: Path, space: Space):
    from . import runtime

    if space.cost.backend == "pt2":
        return runtime._Torch(root, {"format_version": runtime.FORMAT_VERSION}, space.cost.threads)
    return runtime._Onnx(root, {}, space.cost.threads)


def measure(space: Space) -> tuple[CostTable, dict]:
    """Measure every segment of ``space`` (module docs): the table and the raw medians (ms per
    batch, by segment name)."""
    from . import _onnx

    c = space.cost
    if c.backend == "onnx" and (_onnx.missing() or _ort_version() is None):
        raise ConfigError(f"cost.backend 'onnx' needs onnx, onnxscript and onnxruntime "
                          f"({_onnx.missing() or 'onnxruntime is not installed'})",
                          path="cost.backend")
    threads = torch.get_num_threads()  # the runtime's backend sets its own: put ours back
    try:
        return _measure(space)
    finally:
        torch.set_num_threads(threads)


def _measure(space: Space) -> tuple[CostTable, dict]:
    segments = _segments(space)
    c = space.cost
    with tempfile.TemporaryDirectory(prefix="exitnas-latency-") as tmp:
        root = Path(tmp)
        entries = _write_graphs(root, segments, c.backend)
        b = _backend(root, space)
        calls = []
        for (key, _, x, is_head), entry in zip(segments, entries):
            graph, inp = b.graph(entry), b.as_input(x.numpy())
            if is_head:
                calls.append(lambda g=graph, i=inp: b.stats(g(i), True))
            else:
                calls.append(lambda g=graph, i=inp: g(i))
        times: list[list[float]] = [[] for _ in calls]
        with b.context():
            for r in range(c.warmup + c.rounds):
                for i, call in enumerate(calls):
                    t = time.perf_counter()
                    call()
                    if r >= c.warmup:
                        times[i].append(time.perf_counter() - t)
    medians = {" ".join(map(str, s[0])): 1e3 * statistics.median(t) for s, t in zip(segments, times)}
    per_image = {s[0]: 1e3 * statistics.median(t) / c.batch for s, t in zip(segments, times)}
    o = per_image.pop(("overhead",))
    table = CostTable(
        unit=MS, stem=max(per_image[("stem",)] - o, 0.0), final=per_image[("final",)] + o,
        blocks={k[1:]: max(v - o, 0.0) for k, v in per_image.items() if k[0] == "block"},
        heads={k[1:]: v + o for k, v in per_image.items() if k[0] == "head"},
        counted=counted(space))
    return table, medians


def counted(space: Space) -> str:
    c = space.cost
    return (f"ms per image measured with the runtime's {c.backend} backend at batch {c.batch}, "
            f"{c.threads} thread(s), median of {c.rounds} interleaved rounds (exitnas.latency); "
            "C_k = segments up to exit k + every head evaluated on the way, one graph call per "
            "segment and per head")


def cached_table(space: Space) -> CostTable:
    """The measured table of ``space``, from the cache when this machine measured it with the
    same settings (module docs), else measured now and cached."""
    from .cost import mac_table
    from .cost_csv import read_table, write_table
    from .io import atomic_write_json

    settings, where = _settings(space), machine()
    key = hashlib.sha256(json.dumps([settings, where], sort_keys=True).encode()).hexdigest()[:16]
    csv_path = cache_dir() / f"{space.name}-{key}.csv"
    if csv_path.is_file():
        table = read_table(csv_path, mac_table(space), counted=counted(space))
        if table.unit is MS:
            return table
    table, medians = measure(space)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(csv_path.with_suffix(".json"), {"settings": settings, "machine": where,
                                                      "medians_ms_per_batch": medians,
                                                      "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_table(table, csv_path)  # last: a table on disk always has its record
    return table


@COST_MODELS.register("latency")
class Latency(CostModel):
    """ms per image, measured with the runtime (module docs)."""

    def table(self, space: Space) -> CostTable:
        return cached_table(space)


__all__ = ["measure", "cached_table", "machine", "cache_dir"]
