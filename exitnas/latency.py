"""Cost model ``latency``: milliseconds per image, measured with the runtime backend deployed on.

What is timed are graphs written exactly as an export writes them (torch.export with a dynamic
batch; ONNX through the dynamo exporter), loaded by :mod:`exitnas.runtime`'s backend
(``cost.backend``: ``pt2`` or ``onnx``, ``cost.threads`` intra-op threads), on a batch of
``cost.batch`` images:

- every prefix of the network at full depth: the stem, the stem and the first block, ... up to
  the last block. A block costs the difference of its prefix and the one before it: its time
  inside a graph (fused, in the layout the backend keeps between ops), not as a graph of its
  own, whose conversions and call would be counted once per block;
- per candidate head (and the final head), the exit as the runtime's backend runs it
  (:func:`exitnas.runtime.exit_calls`) with the block before the exit as its segment: ONNX
  Runtime one exit graph (:class:`~exitnas.model.ExitGraph`: segment, head and the exit
  statistics), pt2 the block's graph, the head's graph and the statistics on the host. The head
  costs that call less the block's prefix difference: the head, the statistics, the graph
  calls and what it costs to hand features in and out of a graph;
- a graph that does almost nothing (``overhead``), taken off the stem (whose prefix is a graph
  call of its own; the call is counted with the head of each exit graph).

So C_k = stem + blocks up to exit k + one exit's extra per exit passed, as the runtime runs
them. Each round times every graph once, in turn;
the cost is the median over ``cost.rounds`` rounds after ``cost.warmup``, in ms per image (the
batch's time / batch). Differences below 0 (noise on a block that costs next to nothing) are
0; a head costs at least the ``overhead`` call.

Tables are cached in ``$EXITNAS_CACHE/latency`` (default ``~/.cache/exitnas/latency``) per
measuring method (``METHOD``), space fingerprint, input size, backend, batch, threads, rounds,
library versions and machine, as a CSV of :mod:`exitnas.cost_csv`'s format next to a JSON
that records the machine and the settings. Delete the file to measure again.
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


METHOD = 3  # 3: prefixes, exits as the runtime runs them (2: exit graphs; 1: a graph per block)


def _settings(space: Space) -> dict:
    c = space.cost
    return {"method": METHOD, "fingerprint": space.fingerprint,
            "input": [space.input.channels, space.input.size],
            "backend": c.backend, "batch": c.batch, "threads": c.threads, "rounds": c.rounds,
            "warmup": c.warmup}


def _graphs(space: Space, fused: bool) -> tuple[nn.Module, list[tuple[tuple, list[nn.Module], torch.Tensor]]]:
    """The network and (key, graphs, example batch) of every call to time (module docs), eval
    mode: keys ``("overhead",)``, ``("stem",)``, ``("block", stage, block)`` (the prefix that
    ends with that block), each one graph; ``("head", stage, block, head)`` and ``("final",)``:
    an exit as the runtime runs it, the exit graph of the block before it and the head
    (``fused``) or that block's graph and the head's graph."""
    from .model import ExitGraph
    from .supernet import Supernet

    net = Supernet(space, pretrained=False).eval()
    shape = (space.input.channels, space.input.size, space.input.size)
    x = torch.randn(space.cost.batch, *shape, generator=torch.Generator().manual_seed(0))
    out = [(("overhead",), [_Overhead()], x), (("stem",), [net.stem], x)]
    images, chain, inputs = x, [net.stem], {}

    def exit_(block, head, final):
        return [ExitGraph(segment=block, head=head, final=final)] if fused else [block, head]
    with torch.no_grad():
        x = net.stem(x)
        for pos, block in net.walk(space.max_depths):
            inputs[pos] = (block, x)
            chain.append(block)
            out.append((("block", *pos), [nn.Sequential(*chain)], images))
            x = block(x)
        for e in net.candidate_exits(space.max_depths):
            block, inp = inputs[e.position]
            out.append((("head", e.stage, e.block, e.head), exit_(block, net.heads[e.key], False), inp))
        block, inp = inputs[pos]
        out.append((("final",), exit_(block, net.final, True), inp))
    return net, out


def _weights_map(module: nn.Module, names: dict[int, str]) -> dict[str, str]:
    """The runtime's weights map of a graph made of the network's modules: the module itself,
    or a wrapper (prefix chain, exit graph) whose children are the network's."""
    if id(module) in names:
        return {"": names[id(module)] + "."}
    return {f"{child}.": names[id(m)] + "." for child, m in module.named_children()}


def _write_graphs(root: Path, net: nn.Module, calls: list, backend: str) -> list[list[dict]]:
    """Each graph of each call as a runtime graph entry under ``root`` (the export's way of
    writing; a call's graphs chained on its example batch), the weights once, as ``net``'s
    state dict."""
    from . import _onnx
    from .export import EXAMPLE_BATCH
    from .io import save_weights

    batch = torch.export.Dim("batch", min=1)
    names = {id(m): n for n, m in net.named_modules() if n}
    entries, i = [], 0
    for _, modules, x in calls:
        example = x[:1].expand(EXAMPLE_BATCH, *x.shape[1:]).contiguous()  # batch 1 specialises
        entries.append([])
        for module in modules:
            ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
            ep.example_inputs = None
            entry = {"weights_map": _weights_map(module, names), "input": [None, *example.shape[1:]]}
            with torch.no_grad():
                outs = module(example)
            if backend == "pt2":
                torch.export.save(ep, root / f"g{i}.pt2")
                entry["pt2"] = f"g{i}.pt2"
            else:
                n_out = len(outs) if isinstance(outs, tuple) else 1
                _onnx.to_onnx(ep, (example,), root / f"g{i}.onnx", n_out)
                entry["onnx"] = f"g{i}.onnx"
            entry["output"] = [None]  # the runtime's ONNX call returns the first output
            entries[-1].append(entry)
            example, i = (outs[0] if isinstance(outs, tuple) else outs), i + 1
    save_weights(root / "weights.safetensors", net.state_dict())
    return entries


def _backend_class(space: Space):
    from . import runtime

    return runtime._Torch if space.cost.backend == "pt2" else runtime._Onnx


def _backend(root: Path, space: Space):
    from . import runtime

    if space.cost.backend == "pt2":
        return runtime._Torch(root, {"format_version": runtime.FORMAT_VERSION}, space.cost.threads)
    return runtime._Onnx(root, {}, space.cost.threads)


def _call(b, key: tuple, entries: list[dict]):
    """What the runtime calls for ``key``: one graph, or an exit (:func:`exitnas.runtime.
    exit_calls`: the exit graph, or the block's and the head's graphs and host statistics)."""
    from .runtime import exit_calls

    if key[0] not in ("head", "final"):
        return b.graph(entries[0])
    if len(entries) == 1:
        return exit_calls(b, {"exit_0": entries[0]}, [None], [None])[0]
    return exit_calls(b, {}, [b.graph(entries[0])], [b.graph(entries[1])])[0]


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
    net, graphs = _graphs(space, _backend_class(space).fused_exits)
    c = space.cost
    with tempfile.TemporaryDirectory(prefix="exitnas-latency-") as tmp:
        root = Path(tmp)
        entries = _write_graphs(root, net, graphs, c.backend)
        b = _backend(root, space)
        calls = [(_call(b, key, e), b.as_input(x.numpy())) for (key, _, x), e in zip(graphs, entries)]
        times: list[list[float]] = [[] for _ in calls]
        with b.context():
            for r in range(c.warmup + c.rounds):
                for i, (graph, inp) in enumerate(calls):
                    t = time.perf_counter()
                    graph(inp)
                    if r >= c.warmup:
                        times[i].append(time.perf_counter() - t)
    medians = {" ".join(map(str, g[0])): 1e3 * statistics.median(t) for g, t in zip(graphs, times)}
    per_image = {g[0]: 1e3 * statistics.median(t) / c.batch for g, t in zip(graphs, times)}
    prefixes = [(k[1:], v) for k, v in per_image.items() if k[0] == "block"]  # network order
    before = [per_image[("stem",)], *(v for _, v in prefixes)]
    blocks = {pos: max(v - b, 0.0) for (pos, v), b in zip(prefixes, before)}
    last, call = prefixes[-1][0], per_image[("overhead",)]
    table = CostTable(  # an exit graph costs at least a graph call
        unit=MS, stem=max(per_image[("stem",)] - call, 0.0),
        final=max(per_image[("final",)] - blocks[last], call),
        blocks=blocks,
        heads={k[1:]: max(v - blocks[k[1:3]], call) for k, v in per_image.items() if k[0] == "head"},
        counted=counted(space))
    return table, medians


def counted(space: Space) -> str:
    c = space.cost
    return (f"ms per image measured with the runtime's {c.backend} backend at batch {c.batch}, "
            f"{c.threads} thread(s), median of {c.rounds} interleaved rounds (exitnas.latency); "
            "blocks as prefix differences, each head as the runtime runs an exit less its "
            "block; C_k = stem + blocks up to exit k + every head on the way")


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
