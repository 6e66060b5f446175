"""The optional ONNX half of an export (see :mod:`exitnas.export`): torch.export programs
written with the dynamo exporter, each checked on ONNX Runtime against torch (float32
round-off, CPU, one thread). Nothing here is needed for the .pt2 graphs and weights."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch


def missing() -> str | None:
    """Why no ONNX files can be written (a package that is not installed), or None."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (pip install 'exitnas[onnx]')"
    return None


def decompositions() -> dict:
    """Ops ONNX lacks at some shapes, written with ops it has (exactly, see exitnas.heads)."""
    from .heads import adaptive_max_pool2d_windows

    return {torch.ops.aten.adaptive_max_pool2d.default: adaptive_max_pool2d_windows}


def to_onnx(ep, args: tuple, path: Path, n_out: int | list[str]) -> None:
    """Write ``ep`` (called on ``args``) as ONNX: inputs x (x_0, x_1... when ``args`` hold
    several tensors), outputs named ``n_out`` (a list) or logits (logits_0, logits_1... for
    ``n_out`` outputs)."""
    names = n_out if isinstance(n_out, list) else \
        ["logits"] if n_out == 1 else [f"logits_{k}" for k in range(n_out)]
    n_in = len(torch.utils._pytree.tree_leaves(args))
    inputs = ["x"] if n_in == 1 else [f"x_{k}" for k in range(n_in)]
    table = decompositions()
    if any(n.target in table for n in ep.graph.nodes):
        ep = ep.run_decompositions(table)
    # the dynamo exporter prints progress lines; keep the CLI's output ours
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(ep, args, str(path), dynamo=True, external_data=False,
                          input_names=inputs, output_names=names)


def failure(err: BaseException) -> str:
    """What an ONNX conversion failed on, in one line: the op (from the exporter's chained
    errors) and the innermost error's first line."""
    import re

    chain, inner = [], err
    while inner is not None and inner not in chain:
        chain.append(inner)
        inner = inner.__cause__ or inner.__context__
    op = None
    for e in chain:
        found = re.search(r"OpOverload\(op='([\w.:]+)', overload='(\w+)'\)", str(e)) or \
            re.search(r"target=torch\.ops\.([\w.]+)\]", str(e))
        op = op or (found and ".".join(found.groups()))
    text = (str(chain[-1]).strip().splitlines() or [""])[0][:200]
    if op and "No ONNX function found" in text:
        return f"op {op} has no ONNX function"
    return (f"at op {op}: " if op else "") + f"{type(chain[-1]).__name__}: {text}"


def check(path: Path, x: torch.Tensor, ref) -> float:
    """Max abs difference between ONNX Runtime and torch on the example input (nan when
    onnxruntime is absent); raises when it is not float32 round-off."""
    try:
        import onnxruntime as ort
    except ImportError:
        return float("nan")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    diff = max(float((torch.from_numpy(g) - r).abs().max()) for g, r in zip(got, refs))
    if not diff <= 1e-3 * (1 + max(float(r.abs().max()) for r in refs)):
        raise RuntimeError(f"ONNX Runtime differs from torch by {diff:g}")
    return diff


def write_all(tmp: Path, programs: list, graphs: dict) -> str | None:
    """The ONNX file of every program, each checked on ONNX Runtime against torch. Returns None
    when all are written; at the first graph that fails, removes the ONNX files written so far
    and returns why."""
    for name, ep, x, ref, outputs in programs:
        try:
            to_onnx(ep, (x,), tmp / f"{name}.onnx", outputs)
            diff = check(tmp / f"{name}.onnx", x, ref)
        except Exception as err:  # an optional exporter: never lose the required outputs
            for f in tmp.glob("*.onnx"):
                f.unlink()
            for g in graphs.values():
                g.pop("onnx", None)
                g.pop("onnx_max_abs_diff", None)
            return f"ONNX export of graph {name} failed: {failure(err)}"
        graphs[name]["onnx"] = f"{name}.onnx"
        graphs[name]["onnx_max_abs_diff"] = diff
    return None
