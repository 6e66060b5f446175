"""Run an exitnas export with per-sample early exit, without exitnas's training code.

    from exitnas.runtime import load
    p = load("runs/r/export/ID")                  # or backend="onnx" (ONNX Runtime)
    pred, exit, cost = p.predict(p.preprocess(images_uint8_nchw))

A batch runs exit by exit; after each exit, the samples the policy lets go are dropped from the
rest of the computation. ONNX Runtime runs the fused exit graphs (segment k, head k and the exit
statistics in one graph, one session call per exit passed); pt2 runs segment k and head k and
computes the statistics on the host, which measured faster for torch.export programs on CPU
(results/runtime/README.md); exports before format 3 run that way on both. The statistics are
of exit k's logits divided by its temperature T_k (arch.json ``exits[k].temperature``, absent:
1): a constant inside the exit graphs, a division on the host otherwise; ``head`` and
``all_exits`` return raw logits (``p.temperatures`` holds every T_k). ONNX Runtime sessions:
CPU provider, all graph optimisations, sequential execution, ``threads`` intra-op threads and
one inter-op thread. ``cost`` is C_k of the exit each sample took, in the unit of the cost
model the search scored with (arch.json ``cost``: ``p.cost_unit`` is ``macs``
or ``ms``...; exports made before cost models: fvcore MACs). ``p.exit_macs`` holds every exit's
fvcore MACs whatever the cost model. Needs numpy, plus torch + safetensors for ``.pt2`` or onnxruntime for
``.onnx`` (the ONNX path imports no torch). The exit rules come from ``exit_rules.py``
(numpy only; exitnas's scorer applies the same ones, :mod:`exitnas.exit_rules`, exposed here as
``rules``): this file imports nothing else from exitnas, and a deployment copies the two files
side by side. A policy of your own: ``rules.register(name, rule)`` before :func:`load` (inside
exitnas, registering the policy did it).

``load`` verifies the export first: arch.json's format, every listed file present with its
sha256, the weights a safetensors file (a pickle is refused) whose tensor shapes match
arch.json. Every ``.pt2`` archive is checked against an allowlist of members and contents
(:func:`read_pt2`: raw tensor records, JSON whose strings cannot reach eval, imports or
generated code, no pickle at all) and torch reads a clean in-memory copy, never the file;
``.onnx`` files are handed to ONNX Runtime as bytes (no external data). Each failure is one
``ExportError`` line naming the file.

Export format 1 (before sample inputs were left out) also wrote ``weights.pt`` (a pickle: its
sha256 is checked, it is never opened) and pickled sample inputs into each ``.pt2`` (dropped
unread); format 2 writes neither.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

try:  # inside exitnas: the CLI prints it as one line, exit 2
    from .errors import CheckpointError as _Base
except ImportError:  # copied into a deployment
    _Base = Exception


def _exit_rules():
    """exitnas's exit_rules module, or (copied into a deployment) the exit_rules.py next to
    this file."""
    try:
        from . import exit_rules
        return exit_rules
    except ImportError:
        pass
    import importlib.util

    path = Path(__file__).with_name("exit_rules.py")
    if not path.is_file():
        raise ImportError(f"{path} is missing: copy exit_rules.py next to runtime.py")
    spec = importlib.util.spec_from_file_location("exit_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _exit_rules()

FORMAT = "exitnas-export"
FORMAT_VERSION = 3  # 3: exit_k graphs; 2: no weights.pt, .pt2 sample inputs empty (1: both pickled)
BACKENDS = ("pt2", "onnx")


class ExportError(_Base):
    """A missing, altered or foreign export."""


class Result(NamedTuple):
    pred: np.ndarray  # [N] class index
    exit: np.ndarray  # [N] exit taken (the last index is the final exit)
    cost: np.ndarray  # [N] C_k of the exit taken, in Predictor.cost_unit


# ---- verification -------------------------------------------------------------------------
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_pickle_head(head: bytes) -> bool:
    """Whether a file's first 9 bytes are a pickle (0x80) or a torch.save zip ("PK"), not
    safetensors: an 8-byte header length (any first byte, 0x80 included), then '{'."""
    return head[8:9] != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK")


def read_safetensors_header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors header; refuses pickles and zips."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
        if is_pickle_head(head):
            raise ExportError(f"{path}: is a pickle / torch.save archive, not safetensors; "
                              "refusing to load it")
        fh.seek(8)
        try:
            (n,) = struct.unpack("<Q", head[:8])
            if n > path.stat().st_size:
                raise ValueError("header longer than the file")
            meta = json.loads(fh.read(n))
            return {k: (v["dtype"], tuple(v["shape"])) for k, v in meta.items()
                    if k != "__metadata__"}
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ExportError(f"{path}: not a valid safetensors file ({err})") from None


def read_manifest(root) -> dict:
    path = Path(root) / "arch.json"
    if not path.is_file():
        raise ExportError(f"{root}: not an exitnas export (no arch.json)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: does not parse ({err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ExportError(f"{path}: not an exitnas export manifest (format is not {FORMAT!r})")
    version = m.get("format_version")
    if type(version) is not int or version < 1:
        raise ExportError(f"{path}: format_version {str(version)[:40]!r} is not a version number")
    if version > FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {version} is newer than this "
                          f"runtime's {FORMAT_VERSION}; upgrade exitnas")
    files = m.get("files")
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
            for f in files):
        raise ExportError(f"{path}: 'files' is not a list of {{path, sha256}} entries")
    for f in files:  # plain names: a listed path never leads out of the export folder
        if f["path"] in ("", ".", "..") or "/" in f["path"] or "\\" in f["path"]:
            raise ExportError(f"{path}: file {f['path'][:80]!r} is not a plain file name")
    return m


def verify(root, manifest: dict) -> None:
    """Check every file arch.json lists (see the module docstring); raises ExportError."""
    root = Path(root)
    files = manifest.get("files") or []
    for f in files:
        if not (root / f["path"]).is_file():
            raise ExportError(f"{root / f['path']}: missing (listed in arch.json)")
    for f in files:
        if "tensors" in f:
            header = read_safetensors_header(root / f["path"])
            if not isinstance(f["tensors"], dict) or not all(
                    isinstance(v, list) for v in f["tensors"].values()):
                raise ExportError(f"{root / 'arch.json'}: tensors of {f['path']} are not shapes")
            want = {k: tuple(v) for k, v in f["tensors"].items()}
            for name in sorted(set(want) | set(header)):
                got = header[name][1] if name in header else None
                if got != want.get(name):
                    raise ExportError(f"{root / f['path']}: tensor {name!r} has shape "
                                      f"{_fmt_shape(got)} but arch.json says "
                                      f"{_fmt_shape(want.get(name))}")
    for f in files:
        if sha256_file(root / f["path"]) != f["sha256"]:
            raise ExportError(f"{root / f['path']}: sha256 does not match arch.json (file altered "
                              "or truncated)")


def _fmt_shape(shape) -> str:
    return "absent" if shape is None else str(list(shape))


# ---- .pt2 archives: an allowlist, then a clean copy for torch ------------------------------
# torch.export.load unpickles with weights_only=False (legacy data/weights/<model>.pt and
# data/constants/<model>.pt, use_pickle payloads, custom and opaque objects, sample inputs, the
# pre-2.8 serialized_*.pt layout), evaluates every symbolic-shape expression of the graph JSON
# with sympy.sympify (Python eval), imports the modules its pytree specs name and writes names
# into generated Python source. So nothing of the file reaches torch unchecked: the members
# below are read with Python's zipfile, checked, and written into a new in-memory archive that
# torch.export.load reads instead. Anything else is refused.
_PT2_MEMBERS = ("archive_format", "archive_version", "byteorder", ".data/version",
                ".data/serialization_id", "models/model.json",
                "data/weights/model_weights_config.json",
                "data/constants/model_constants_config.json", "data/sample_inputs/model.pt")
_PT2_REQUIRED = {"archive_format", "archive_version", "models/model.json",
                 "data/weights/model_weights_config.json",
                 "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_PT2_PAYLOAD = {"data/weights/": "weight_", "data/constants/": "tensor_"}  # raw tensor bytes
_PT2_TEXT = {"archive_format": r"pt2", "archive_version": r"0", "byteorder": r"little|big",
             ".data/version": r"[0-9]{1,3}\n?", ".data/serialization_id": r"[0-9A-Za-z]{0,64}"}
_WORD = r"[A-Za-z0-9_.]*"  # every string and key of the JSON members, but for those below
_TARGET = r"torch\.ops\.aten\.[a-z_][a-z0-9_]*\.[A-Za-z0-9_]+|_operator\.getitem"
_NO_TARGET = {"torch.ops.aten.from_file.default"}  # the one aten op that reads a file
_SPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}
_SYMPY = {"Symbol", "Integer", "Add", "Mul", "Max", "Min", "Mod", "FloorDiv",
          "PythonMod", "CleanDiv", "CeilDiv", "CeilToInt", "FloorToInt", "Eq", "Ne", "Lt", "Le",
          "Gt", "Ge", "And", "Or", "Not"}
_SYMBOL_FLAGS = {"positive", "integer", "nonnegative", "negative", "real", "finite"}


class _Refused(Exception):
    """Why a .pt2 member is not on the allowlist (becomes one ExportError line)."""


def _pt2_word(text, where: str, pattern: str = _WORD) -> None:
    import re

    if not isinstance(text, str) or not re.fullmatch(pattern, text):
        raise _Refused(f"{where} {str(text)[:60]!r} is not allowed")


def _pt2_expr(text, where: str) -> None:
    """A symbolic-shape expression torch would sympify (eval): calls of sympy constructors on
    64-bit integers, booleans and symbol names only."""
    import ast

    def plain(node) -> bool:
        if isinstance(node, ast.Constant):
            return type(node.value) is bool or (type(node.value) is int and abs(node.value) < 2**63) \
                or (isinstance(node.value, str) and node.value.isidentifier())
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return isinstance(node.operand, ast.Constant) and type(node.operand.value) is int \
                and node.operand.value < 2**63
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _SYMPY and all(plain(a) for a in node.args)
                and all(k.arg in _SYMBOL_FLAGS and isinstance(k.value, ast.Constant)
                        and type(k.value.value) is bool for k in node.keywords))

    try:
        ok = isinstance(text, str) and len(text) < 4096 and plain(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise _Refused(f"{where}: shape expression {str(text)[:60]!r} is not a plain sympy expression")


def _pt2_spec(text, where: str) -> None:
    """A pytree spec (JSON text): [1, node], node = {"type": tuple, list, dict or null (a
    leaf), "context": null or JSON text of null or a list of key names, "children_spec":
    [node, ...]}. Nothing in it names a module for torch to import."""
    spec = _json(text, where) if isinstance(text, str) else None
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
        raise _Refused(f"{where}: not a pytree spec")
    todo = [spec[1]]
    while todo:
        node = todo.pop()
        if not (isinstance(node, dict) and set(node) == {"type", "context", "children_spec"}
                and node["type"] in _SPEC_TYPES and isinstance(node["children_spec"], list)):
            raise _Refused(f"{where}: pytree node {str(node)[:60]!r} is not a tuple, list, dict or leaf")
        context = _json(node["context"], where) if isinstance(node["context"], str) else node["context"]
        if context is not None and not (isinstance(context, list) and all(
                type(k) is int or isinstance(k, str) and k.isidentifier() for k in context)):
            raise _Refused(f"{where}: pytree context {str(context)[:60]!r} is not a list of names")
        todo.extend(node["children_spec"])


def _json(text, where: str):
    import json as _j

    try:
        return _j.loads(text)
    except (ValueError, RecursionError, TypeError):
        raise _Refused(f"{where}: not JSON") from None


def _pt2_json(node, where: str, key: str = "") -> None:
    """Every key and string of a JSON member: identifier characters and dots, except the
    fields that torch parses further, checked by their own rule."""
    if isinstance(node, dict):
        for k, v in node.items():
            _pt2_word(k, f"{where}: key")
            if k == "expr_str":
                _pt2_expr(v, where)
            elif k in ("in_spec", "out_spec"):
                _pt2_spec(v, f"{where}: {k}")
            elif k == "target":
                _pt2_word(v, f"{where}: op", _TARGET)
                if v in _NO_TARGET:
                    raise _Refused(f"{where}: op {v} is not allowed")
            elif k == "torch_version":
                _pt2_word(v, f"{where}: torch_version", r"[0-9A-Za-z.+_-]{1,64}")
            else:
                _pt2_json(v, where, k)
    elif isinstance(node, list):
        for v in node:
            _pt2_json(v, where, key)
    elif isinstance(node, str):
        _pt2_word(node, f"{where}: {key or 'value'}")


def _pt2_payloads(config, where: str, prefix: str) -> set[str]:
    """The raw tensor records a weights / constants config names (none pickled)."""
    if not isinstance(config, dict) or set(config) != {"config"} or not isinstance(config["config"], dict):
        raise _Refused(f"{where}: not a payload config")
    _pt2_json(config, where)
    names = set()
    for fqn, meta in config["config"].items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _Refused(f"{where}: {fqn[:60]!r} is pickled (use_pickle is not false)")
        _pt2_word(meta.get("path_name"), f"{where}: {fqn[:60]!r} path", rf"{prefix}[0-9]{{1,9}}")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _Refused(f"{where}: {fqn[:60]!r} has no tensor_meta")
        names.add(meta["path_name"])
    return names


def _strip_metadata(program: dict) -> dict:
    """Node and graph metadata (stack traces, module paths: debugging only) are dropped unread."""
    gm = program.get("graph_module")
    if isinstance(gm, dict):
        gm["metadata"] = {}
        graph = gm.get("graph")
        for node in graph.get("nodes", []) if isinstance(graph, dict) else []:
            if isinstance(node, dict):
                node["metadata"] = {}
    return program


def read_pt2(path, format_version: int = FORMAT_VERSION):
    """The .pt2 archive at ``path`` checked against the allowlist above and copied into a new
    in-memory archive (``io.BytesIO``) for ``torch.export.load``; raises ExportError naming the
    file and the member refused. Format 1 exports pickled their sample inputs: those are
    dropped unread; from format 2 the member must be empty."""
    import io
    import json as _j
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = _pt2_members(z, path, format_version)
    except _Refused as why:
        raise ExportError(f"{path}: {why}; refusing to load it") from None
    except RecursionError:
        raise ExportError(f"{path}: nested too deeply; refusing to load it") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            NotImplementedError, RuntimeError) as err:
        raise ExportError(f"{path}: not a .pt2 archive ({str(err)[:120]})") from None
    members["models/model.json"] = _j.dumps(members["models/model.json"]).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for rel, data in members.items():
            out.writestr(f"model/{rel}", data)
    buf.seek(0)
    return buf


def _pt2_members(z, path: Path, format_version: int) -> dict:
    """{member (without the archive's root folder): checked content} of an open .pt2 zip."""
    import re

    infos = z.infolist()
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names) or len(set(names)) != len(names):
        raise _Refused("members are not one torch.export archive (one root folder, no duplicates)")
    size = path.stat().st_size
    members: dict = {}
    for info in infos:
        rel = info.filename.split("/", 1)[1]
        folder, _, base = rel.rpartition("/")
        allowed = rel in _PT2_MEMBERS or (
            f"{folder}/" in _PT2_PAYLOAD and re.fullmatch(rf"{_PT2_PAYLOAD[folder + '/']}[0-9]{{1,9}}", base))
        if not allowed:
            raise _Refused(f"member {rel[:80]!r} is not one the runtime loads (pickled or unknown content)")
        if info.compress_type != 0 or info.flag_bits & 1 or info.file_size > size:
            raise _Refused(f"member {rel!r} is compressed or encrypted (torch.export.save stores)")
        members[rel] = z.read(info)
    missing = sorted(_PT2_REQUIRED - set(members))
    if missing:
        raise _Refused(f"member {missing[0]!r} is missing")
    for rel, pattern in _PT2_TEXT.items():
        if rel in members:
            _pt2_word(members[rel].decode("ascii", "replace"), f"member {rel}", pattern)
    weights = _pt2_payloads(_json(members["data/weights/model_weights_config.json"], "weights config"),
                            "weights config", "weight_")
    constants = _pt2_payloads(_json(members["data/constants/model_constants_config.json"],
                                    "constants config"), "constants config", "tensor_")
    records = {r.rpartition("/")[2] for r in members if r.startswith(tuple(_PT2_PAYLOAD))} - {
        "model_weights_config.json", "model_constants_config.json"}
    if records != weights | constants:
        odd = sorted(records ^ (weights | constants))[0]
        raise _Refused(f"tensor record {odd!r} is not both stored and listed in its config")
    program = _json(members["models/model.json"], "models/model.json")
    if not isinstance(program, dict):
        raise _Refused("models/model.json: not an exported program")
    _pt2_json(_strip_metadata(program), "models/model.json")
    members["models/model.json"] = program
    if members["data/sample_inputs/model.pt"] and format_version >= 2:
        raise _Refused("member 'data/sample_inputs/model.pt' is not empty (a pickle)")
    members["data/sample_inputs/model.pt"] = b""  # never read: the graphs run without them
    return members


# ---- backends -----------------------------------------------------------------------------
def _weights_map(entry: dict) -> dict[str, str]:
    """{graph state-dict prefix: weights.safetensors prefix} of a graph entry (format 2 and
    older: one ``weights_prefix``)."""
    if "weights_map" not in entry:
        return {"": entry["weights_prefix"]}
    m = entry["weights_map"]
    if not (isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in m.items())):
        raise ExportError(f"arch.json: weights_map {str(m)[:80]!r} is not a map of prefixes")
    return m


def session_options(ort, threads: int | None):
    """The ONNX Runtime session options every graph runs with: all graph optimisations,
    sequential execution, ``threads`` intra-op threads (None: ONNX Runtime's default) and one
    inter-op thread."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class _Torch:
    """``.pt2`` programs with the weights from weights.safetensors. Exits run as segment and
    head graphs with the statistics on the host (``fused_exits``): measured on CPU, one
    torch.export graph of segment + head + statistics runs slower than those parts
    (results/runtime/README.md)."""

    fused_exits = False

    def __init__(self, root: Path, manifest: dict, threads: int | None,
                 channels_last: bool = False) -> None:
        import torch
        from safetensors.torch import load_file

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.root = root
        self.channels_last = channels_last
        self.state = load_file(str(root / "weights.safetensors"))
        self.format_version = int(manifest.get("format_version", 1))

    def graph(self, entry: dict):
        torch = self.torch
        path = self.root / entry["pt2"]
        archive = read_pt2(path, self.format_version)
        try:
            module = torch.export.load(archive).module(check_guards=False)
        except Exception as err:
            raise ExportError(f"{path}: does not load ({str(err).splitlines()[0][:160]})") from None
        sub = {mine + k[len(theirs):]: v for mine, theirs in _weights_map(entry).items()
               for k, v in self.state.items() if k.startswith(theirs)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as err:
            raise ExportError(f"{path}: does not fit weights.safetensors "
                              f"({str(err).splitlines()[0][:160]})") from None
        # forward, not __call__: the module's pre-hooks re-check input constraints on every
        # call (~2x a small head's own time at batch 1); the Predictor checks shapes itself
        return module.forward

    def context(self):
        return self.torch.inference_mode()

    def as_input(self, x):
        x = self.torch.as_tensor(x, dtype=self.torch.float32)
        if self.channels_last and x.ndim == 4:  # convs keep it; boolean indexing keeps it
            x = x.contiguous(memory_format=self.torch.channels_last)
        return x

    def take(self, x, keep: np.ndarray):
        return x[self.torch.from_numpy(keep)]

    def row(self, outputs):
        """An exit graph's outputs -> (features or None, conf, entropy, pred), stats in numpy."""
        *features, conf, ent, pred = outputs
        stats = (t if isinstance(t, np.ndarray) else t.numpy() for t in (conf, ent, pred))
        return ((features[0] if features else None), *stats)

    def stats(self, logits, entropy: bool, temperature: float = 1.0):
        """(conf, entropy or None, pred) of ``logits / temperature`` exactly as
        exitnas.policy.ExitStats.from_logits of exitnas.calibration.scale_logits, so decisions
        match the in-repo model bit for bit."""
        if temperature != 1.0:
            logits = logits / temperature
        logp = self.torch.log_softmax(logits.float(), dim=1)
        prob = logp.exp()
        conf, pred = prob.max(dim=1)
        ent = -(prob * logp).sum(dim=1).numpy() if entropy else None
        return conf.numpy(), ent, pred.numpy()


class _Onnx:
    """ONNX Runtime sessions (weights inside the .onnx files); no torch. Exits run as the
    fused exit graphs (one session call per exit) where the export has them."""

    fused_exits = True

    def __init__(self, root: Path, manifest: dict, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("backend onnx needs onnxruntime (pip install onnxruntime)") from None
        if manifest.get("onnx_skipped"):
            raise ExportError(f"{root}: exported without ONNX ({manifest['onnx_skipped']}); "
                              "use backend pt2 or export again with onnx installed")
        self.ort, self.root, self.threads = ort, root, threads

    def graph(self, entry: dict):
        opts = session_options(self.ort, self.threads)
        path = self.root / entry["onnx"]
        try:  # from bytes: an external-data reference cannot read other files
            sess = self.ort.InferenceSession(path.read_bytes(), opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ExportError(f"{path}: does not load ({str(err).splitlines()[0][:160]})") from None
        name = sess.get_inputs()[0].name
        if isinstance(entry["output"][0], list):  # the whole model: every exit's logits
            return lambda x: sess.run(None, {name: x})
        return lambda x: sess.run(None, {name: x})[0]

    def as_input(self, x):
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))

    def context(self):
        return contextlib.nullcontext()

    def take(self, x, keep: np.ndarray):
        return x[keep]

    def row(self, outputs):
        """An exit graph's outputs -> (features or None, conf, entropy, pred)."""
        *features, conf, ent, pred = outputs
        return (features[0] if features else None), conf, ent, pred

    def stats(self, logits, entropy: bool, temperature: float = 1.0):
        """(conf, entropy or None, pred) in float32 of z = logits / float32(temperature): max
        softmax = 1 / sum(exp(z - max z)), entropy = log(sum) - sum(exp(z - max z) * (z - max
        z)) / sum."""
        z = logits.astype(np.float32, copy=False)
        if temperature != 1.0:
            z = z / np.float32(temperature)
        shifted = z - z.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        total = e.sum(axis=1)
        ent = np.log(total) - (e * shifted).sum(axis=1) / total if entropy else None
        return 1 / total, ent, z.argmax(axis=1)


# ---- the predictor ------------------------------------------------------------------------
def exit_temperatures(manifest: dict) -> tuple[float, ...]:
    """T_k of every exit from arch.json ``exits[k].temperature`` (absent: 1), each a number
    in [1e-30, 1e30] (a positive float32: the graphs divide in float32)."""
    out = []
    for k, e in enumerate(manifest["exits"]):
        t = e.get("temperature", 1.0)
        if type(t) not in (int, float) or not 1e-30 <= t <= 1e30:
            raise ExportError(f"arch.json: exits[{k}].temperature {repr(t)[:40]} is not a "
                              "number in [1e-30, 1e30]")
        out.append(float(t))
    return tuple(out)


def exit_calls(backend, graphs: dict, segments: list, heads: list,
               temperatures: tuple[float, ...] | None = None) -> list:
    """One call per exit, x -> (features, conf, entropy, pred) (the final exit: (conf,
    entropy, pred)): the ``exit_k`` graphs (format 3; T_k inside them) where the backend runs
    exits fused (``fused_exits``), else segment k, head k and the backend's statistics of the
    logits / T_k on the host (``temperatures``, None: all 1)."""
    if "exit_0" in graphs and backend.fused_exits:
        return [backend.graph(graphs[f"exit_{k}"]) for k in range(len(segments))]
    temperatures = temperatures or (1.0,) * len(segments)

    def unfused(k: int):
        segment, head, last = segments[k], heads[k], k == len(segments) - 1

        def call(x):
            features = segment(x)
            stats = backend.stats(head(features), True, temperatures[k])
            return stats if last else (features, *stats)
        return call
    return [unfused(k) for k in range(len(segments))]


class Predictor:
    """Segments, heads and the early-exit rule of one export (see :func:`load`)."""

    def __init__(self, root: Path, manifest: dict, backend) -> None:
        self.root, self.manifest, self._b = root, manifest, backend
        graphs = manifest["graphs"]
        self.num_exits = len(manifest["exits"])
        self.temperatures = exit_temperatures(manifest)
        self._segments = [backend.graph(graphs[f"segment_{k}"]) for k in range(self.num_exits)]
        self._heads = [backend.graph(graphs[f"head_{k}"]) for k in range(self.num_exits)]
        self._exits = exit_calls(backend, graphs, self._segments, self._heads, self.temperatures)
        self._whole = None
        self.exit_macs = np.array([e["macs"] for e in manifest["exits"]], dtype=np.int64)
        self.exit_names = [e["name"] for e in manifest["exits"]]
        self.classes = list(manifest["classes"])
        self.backbone_macs = int(manifest["macs"]["backbone"])
        cost = manifest.get("cost")  # absent before cost models: the cost was fvcore MACs
        self.cost_unit = str(cost["unit"]) if cost else "macs"
        self.cost_label = str(cost["label"]) if cost else "MACs"
        self.exit_costs = np.array([e["cost"] for e in manifest["exits"]], dtype=np.float64) \
            if cost else self.exit_macs
        self.backbone_cost = float(cost["backbone"]) if cost else self.backbone_macs
        inp = manifest["input"]
        self.input_shape = tuple(inp["shape"])
        self._mean = np.asarray(inp["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(inp["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.view = check_view(inp.get("view", {"resize": "square"}), self.input_shape[1])
        self.set_policy(manifest["policy"]["name"], manifest["policy"]["thresholds"])

    def set_policy(self, policy: str, thresholds) -> None:
        """Change the exit rule (the accuracy / cost trade-off) without re-exporting: one
        value per early exit (max_softmax, entropy thresholds) or one for the model
        (patience), as the policy's rule (``rules``) takes them."""
        try:
            rule = rules.get(policy)
        except LookupError:
            raise ExportError(f"arch.json: unknown exit policy {policy!r}") from None
        want = rule.num_params(self.num_exits - 1)
        if len(thresholds) != want:
            raise ExportError(f"policy {policy} needs {want} value(s), got {len(thresholds)}")
        self._rule, self._params = rule, rule.prepare(list(thresholds))
        self._entropy = "entropy" in rule.reads
        self.policy, self.thresholds = policy, tuple(float(t) for t in thresholds)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, C, H, W] -> float32, scaled to [0, 1] and normalised with arch.json's
        mean/std (what training saw)."""
        x = np.asarray(images)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ExportError(f"images are {list(x.shape)}, expected [N, {', '.join(map(str, self.input_shape))}]")
        return (x.astype(np.float32) / 255 - self._mean) / self._std

    def _input(self, x, graph: str):
        x = self._b.as_input(x)
        want = tuple(self.manifest["graphs"][graph]["input"][1:])
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ExportError(f"{graph} takes [N, {', '.join(map(str, want))}], got {list(x.shape)}")
        return x

    def segment(self, k: int, x):
        """Backbone segment k (from exit k-1, or the input, to exit k): a split deployment
        runs segments 0..k on one machine and the rest on another."""
        with self._b.context():
            return self._segments[k](self._input(x, f"segment_{k}"))

    def exit(self, k: int, x) -> tuple:
        """Exit k as :meth:`predict` runs it, on every sample of ``x`` (features of exit k-1,
        or the images): (features for exit k+1 or None at the final exit, conf, entropy,
        pred), the statistics in numpy."""
        with self._b.context():
            return self._b.row(self._exits[k](self._input(x, f"segment_{k}")))

    def head(self, k: int, features):
        """Logits of exit k from segment k's output (raw: the exit decides on them divided by
        ``temperatures[k]``)."""
        with self._b.context():
            return self._heads[k](self._input(features, f"head_{k}"))

    def all_exits(self, x) -> list:
        """Every exit's raw logits from the whole-model graph (no early exit)."""
        if self._whole is None:
            self._whole = self._b.graph(self.manifest["graphs"]["model"])
        with self._b.context():
            return list(self._whole(self._input(x, "model")))

    def predict(self, x) -> Result:
        """Per-sample early exit over a batch of preprocessed inputs [N, C, H, W]."""
        b = self._b
        x = self._input(x, "segment_0")
        with b.context():
            return self._predict(x)

    def _predict(self, x) -> Result:
        b, rule, params = self._b, self._rule, self._params
        n, last = int(x.shape[0]), self.num_exits - 1
        pred = np.zeros(n, dtype=np.int64)
        exit_idx = np.full(n, last, dtype=np.int64)
        alive = np.arange(n)
        state: tuple = ()  # the rule's per-sample state, rows of the samples still alive
        for k in range(self.num_exits):
            if alive.size == 0:
                break
            x, conf, ent, p = b.row(self._exits[k](x))
            if k == last:
                pred[alive] = p
                break
            leave, state = rule.leave(k, rules.Row(conf, ent, p), params, state)
            if leave.any():
                done = alive[leave]
                pred[done], exit_idx[done] = p[leave], k
                keep = ~leave
                alive = alive[keep]
                state = tuple(s[keep] for s in state)
                if alive.size:
                    x = b.take(x, keep)
        return Result(pred, exit_idx, self.exit_costs[exit_idx])


def load(root, backend: str = "pt2", *, threads: int | None = None, check: bool = True,
         channels_last: bool = False) -> Predictor:
    """Load an export directory. ``backend``: ``pt2`` (torch.export programs + safetensors
    weights) or ``onnx`` (ONNX Runtime). ``threads`` fixes the intra-op threads (stable
    timings). ``check`` verifies the files against arch.json first (module docstring).
    ``channels_last`` (pt2 only) runs the convolutions in NHWC: faster on CPU, equal to the
    default to float32 round-off rather than bit for bit. An int8 export (arch.json
    ``precision``, :mod:`exitnas.quantize`) holds ONNX graphs only: backend ``onnx``."""
    root = Path(root)
    if backend not in BACKENDS:
        raise ExportError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if channels_last and backend != "pt2":
        raise ExportError("channels_last applies to backend pt2 only")
    manifest = read_manifest(root)
    precision = manifest.get("precision", "fp32")  # int8: ONNX graphs only (exitnas.quantize)
    if precision not in ("fp32", "int8"):
        raise ExportError(f"{root / 'arch.json'}: precision {str(precision)[:40]!r} is not "
                          "fp32 or int8")
    if precision == "int8" and backend != "onnx":
        raise ExportError(f"{root}: an int8 export holds ONNX graphs only (no .pt2); use "
                          "backend onnx")
    if check:
        verify(root, manifest)
    impl = _Torch(root, manifest, threads, channels_last) if backend == "pt2" else \
        _Onnx(root, manifest, threads)
    try:
        return Predictor(root, manifest, impl)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise ExportError(f"{root / 'arch.json'}: malformed manifest ({type(err).__name__}: "
                          f"{str(err)[:120]})") from None


def check_view(view, size: int) -> dict:
    """arch.json's ``input.view`` (how a file becomes an input), checked by allowlist:
    ``{"resize": "square"}`` or ``{"resize": "shorter_side", "shorter": S, "crop": size}``
    with ``size <= S <= 16 * size``."""
    if view == {"resize": "square"}:
        return view
    ok = (isinstance(view, dict) and set(view) == {"resize", "shorter", "crop"}
          and view["resize"] == "shorter_side" and view["crop"] == size
          and type(view["shorter"]) is int and size <= view["shorter"] <= 16 * size)
    if not ok:
        raise ExportError(f"arch.json: input.view {str(view)[:120]!r} is not one this runtime "
                          "knows (square, or shorter_side with crop = the input size)")
    return view


def _apply_view(im, size: int, view: dict):
    """The evaluation view of exitnas's data pipeline, with Pillow only: square resize, or
    torchvision's ``Resize(shorter)`` (shorter side to S, the other int(S * long / short)) then
    ``CenterCrop(size)`` (offsets int(round((side - size) / 2))). Bilinear, as torchvision
    on PIL images."""
    from PIL import Image

    if view["resize"] == "square":
        return im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)
    w, h = im.size
    s = view["shorter"]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    new = (s, new_long) if w <= h else (new_long, s)
    if new != (w, h):
        im = im.resize(new, Image.BILINEAR)
    w, h = im.size  # both >= shorter >= size (check_view): the crop never pads
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def read_image(path, channels: int, size: int, view: dict | None = None) -> np.ndarray:
    """One image file -> uint8 [C, size, size]: converted, then the export's evaluation view
    (``input.view``; default square resize), exactly as exitnas.data read it for evaluation."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(_apply_view(im, size, view or {"resize": "square"}), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise ExportError(f"{path}: not a readable image ({err})") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)
