"""Runtime: early-exit predictions equal the in-repo model's, per-sample MACs equal C_k, the
whole-model graph equals the segment chain, bad exports are refused, and the runtime works
without exitnas (and, on ONNX Runtime, without torch)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from test_export import HAVE_ONNX, _one_line_error, needs_onnx, trained_export

BACKENDS = ("pt2", "onnx") if HAVE_ONNX else ("pt2",)
BACKEND_PARAMS = ["pt2", pytest.param("onnx", marks=needs_onnx)]


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict:
    return trained_export(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="session")
def predictors(exported) -> dict:
    from exitnas.runtime import load

    return {b: load(exported["out"], backend=b) for b in BACKENDS}


def _native(x: torch.Tensor, backend: str):
    return x if backend == "pt2" else x.numpy()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_predictions_exits_and_macs_equal_the_model(exported, predictors, backend):
    from exitnas.cost import cost_table, model_segment_macs

    p, model, x = predictors[backend], exported["model"], exported["x"]
    ref = model.predict(x)
    got = p.predict(_native(x, backend))
    assert np.array_equal(got.pred, ref.pred.numpy())
    assert np.array_equal(got.exit, ref.exit.numpy())
    counts = np.bincount(got.exit, minlength=3)
    assert counts.min() >= 5, counts  # every exit is really taken
    costs = cost_table(exported["space"]).exit_costs(exported["arch"])
    assert costs == model_segment_macs(model, (3, 8, 8))
    assert np.array_equal(got.cost, np.asarray(costs)[got.exit])
    for i in range(0, len(x), 9):  # batch 1
        one = p.predict(_native(x[i:i + 1], backend))
        assert (one.pred[0], one.exit[0]) == (ref.pred[i], ref.exit[i])
    empty = p.predict(_native(x[:0], backend))
    assert empty.pred.shape == empty.exit.shape == empty.cost.shape == (0,)


def _between(values, q: float) -> float:
    """A threshold near quantile ``q`` halfway across the widest gap between neighbouring
    values there: ONNX Runtime's logits differ from torch's by float round-off, so a
    threshold equal to (or within 1e-6 of) a sample's value would let that sample go either
    way."""
    v = np.sort(np.unique(np.asarray(values, dtype=np.float64)))
    lo, hi = max(0, int(len(v) * (q - 0.1))), min(len(v) - 1, int(len(v) * (q + 0.1)))
    i = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_policy_equals_the_model(exported, predictors, backend):
    from exitnas.policy import ExitStats

    p, model, x = predictors[backend], exported["model"], exported["x"]
    with torch.no_grad():
        ent = ExitStats.stack(model.forward_exits(x)).entropy
    rules = [("entropy", (_between(ent[0], 0.4), _between(ent[1], 0.5))),
             ("patience", (2.0,)), ("patience", (1.0,)),
             ("max_softmax", exported["arch"].thresholds)]
    try:
        for policy, params in rules:
            ref = model.predict(x, thresholds=params, policy=policy)
            p.set_policy(policy, params)
            got = p.predict(_native(x, backend))
            assert np.array_equal(got.pred, ref.pred.numpy()), policy
            assert np.array_equal(got.exit, ref.exit.numpy()), policy
            assert len(set(got.exit.tolist())) >= 2 or params == (1.0,), policy
    finally:
        p.set_policy("max_softmax", exported["arch"].thresholds)
    assert p.policy == "max_softmax"


def test_runtime_equals_the_cached_scores(exported, predictors):
    """Fast evaluation's decision on val (from the exit cache) is what the export does."""
    from exitnas.data import normalize
    from exitnas.evaluate import decide

    splits = exported["splits"]
    pred, idx = decide(exported["cache"], exported["arch"])
    got = predictors["pt2"].predict(normalize(splits.val.images, splits.mean, splits.std))
    assert np.array_equal(got.pred, pred.numpy()) and np.array_equal(got.exit, idx.numpy())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("n", [1, 256])
def test_whole_model_equals_segment_chain(predictors, backend, n):
    p = predictors[backend]
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
    whole = p.all_exits(_native(x, backend))
    h, chain = _native(x, backend), []
    for k in range(p.num_exits):
        h = p.segment(k, h)
        chain.append(p.head(k, h))
    assert len(whole) == len(chain) == 3
    for w, c in zip(whole, chain):
        assert np.asarray(w).shape == (n, 4)
        assert float(np.abs(np.asarray(w) - np.asarray(c)).max()) <= 1e-5


def test_channels_last_option(exported):
    """NHWC convolutions (faster on CPU): equal to float32 round-off, same early exits here."""
    from exitnas.runtime import ExportError, load

    p = load(exported["out"], "pt2", channels_last=True, check=False)
    x, model = exported["x"], exported["model"]
    with torch.no_grad():
        ref = model.forward_exits(x)
    for got, want in zip(p.all_exits(x), ref):
        assert float((got - want).abs().max()) <= 1e-4
    res, want = p.predict(x), model.predict(x)
    assert np.array_equal(res.exit, want.exit.numpy()) and np.array_equal(res.pred, want.pred.numpy())
    with pytest.raises(ExportError, match="pt2 only"):
        load(exported["out"], "onnx", channels_last=True)


def test_preprocess_matches_training_normalisation(exported, predictors):
    from exitnas.data import normalize

    splits = exported["splits"]
    images = splits.test.images
    got = predictors["pt2"].preprocess(images.numpy())
    assert np.array_equal(got, normalize(images, splits.mean, splits.std).numpy())


# ---- refusals -----------------------------------------------------------------------------
def _corrupt(kind: str, out: Path) -> str:
    """Damage the copy ``out`` of an export; returns the file the error must name."""
    if kind == "pickle":
        state = {k: torch.zeros(1) for k in ("a", "b")}
        torch.save(state, out / "weights.safetensors")
        return "weights.safetensors"
    if kind == "shape":
        m = json.loads((out / "arch.json").read_text())
        w = next(f for f in m["files"] if f["path"] == "weights.safetensors")
        w["tensors"]["heads.0.fc.weight"][1] += 1
        (out / "arch.json").write_text(json.dumps(m))
        return "weights.safetensors"
    if kind == "missing":
        (out / "segment_1.pt2").unlink()
        return "segment_1.pt2"
    if kind == "sha256":
        data = bytearray((out / "head_0.pt2").read_bytes())
        data[-1] ^= 0xFF
        (out / "head_0.pt2").write_bytes(bytes(data))
        return "head_0.pt2"
    if kind == "manifest":
        (out / "arch.json").unlink()
        return "arch.json"
    raise ValueError(kind)


@pytest.mark.parametrize("kind,words", [("pickle", "pickle"), ("shape", "shape"),
                                        ("missing", "missing"), ("sha256", "sha256"),
                                        ("manifest", "not an exitnas export")])
def test_bad_export_is_refused(exported, tmp_path, kind, words):
    from exitnas.errors import CheckpointError
    from exitnas.runtime import ExportError, load

    out = tmp_path / "export"
    shutil.copytree(exported["out"], out)
    name = _corrupt(kind, out)
    image = tmp_path / "one.png"
    _write_png(image, exported["splits"].test.images[0])
    err = _one_line_error(run_cli("predict", out, image))
    assert words in err and (name in err or str(out) in err), err
    with pytest.raises(ExportError) as info:
        load(out)
    assert isinstance(info.value, CheckpointError)  # inside exitnas: exit 2 from the CLI


# ---- crafted .pt2 archives ------------------------------------------------------------------
class _Plant:
    """Unpickling this touches ``marker``: the payload a crafted export would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _members(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/", 1)[0]
        return root, {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def _write_members(path: Path, root: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for rel, data in members.items():
            z.writestr(f"{root}/{rel}" if root else rel, data)


def _plant(kind: str, members: dict[str, bytes], marker: Path, module_dir: Path) -> str | None:
    """Plant, in a .pt2's members, code that touches ``marker`` where torch.export.load
    (torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py) runs it. Returns
    a new root folder name ("" for none) or None to keep it."""
    weights, consts = "data/weights/model_weights_config.json", "data/constants/model_constants_config.json"
    plant = _Plant(marker)
    if kind == "legacy weights":  # _load_state_dict -> deserialize_torch_artifact fallback
        members["data/weights/model.pt"] = _saved(plant)
    elif kind == "legacy constants":  # _load_constants -> deserialize_torch_artifact fallback
        members["data/constants/model.pt"] = _saved(plant)
    elif kind == "sample inputs":  # deserialize_torch_artifact(example_inputs)
        members["data/sample_inputs/model.pt"] = _saved(plant)
    elif kind == "pickled weight":  # use_pickle: torch unpickles it without the weights-only guard
        config = json.loads(members[weights])
        meta = next(iter(config["config"].values()))
        meta["use_pickle"] = True
        members[f"data/weights/{meta['path_name']}"] = _saved(plant)
        members[weights] = json.dumps(config).encode()
    elif kind in ("pickled constant", "opaque object", "custom object"):
        name = {"pickled constant": "tensor_0", "opaque object": "opaque_obj_0",
                "custom object": "custom_obj_0"}[kind]
        config = json.loads(members[consts])
        config["config"]["planted"] = {"path_name": name, "is_param": False, "use_pickle": True,
                                       "tensor_meta": None}
        import pickle

        members[f"data/constants/{name}"] = _saved(plant) if kind == "pickled constant" else pickle.dumps(plant)
        members[consts] = json.dumps(config).encode()
    elif kind == "shape expression":  # GraphModuleDeserializer._parse_sym_expr: sympy.sympify
        program = members["models/model.json"].decode()
        sym = program.split('"expr_str": "', 1)[1].split('"', 1)[0]
        code = f"(__import__('pathlib').Path({str(marker)!r}).touch() and 0) or {sym}"
        members["models/model.json"] = program.replace(
            f'"expr_str": "{sym}"', json.dumps({"expr_str": code})[1:-1], 1).encode()
    elif kind == "pytree import":  # treespec_loads -> enum_object_hook -> importlib.import_module
        (module_dir / "planted_module.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
        program = json.loads(members["models/model.json"])
        sig = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(sig["in_spec"])
        spec[1]["context"] = json.dumps({"__enum__": True, "fqn": "planted_module", "name": "A"})
        sig["in_spec"] = json.dumps(spec)
        members["models/model.json"] = json.dumps(program).encode()
    elif kind == "pre-2.8 layout":  # torch.export.load's fallback when load_pt2 fails
        program = members["models/model.json"]
        members.clear()
        members.update({"version": b"8.20", "serialized_exported_program.json": program,
                        "serialized_state_dict.pt": _saved({}), "serialized_constants.pt": _saved(plant),
                        "serialized_example_inputs.pt": b""})
        return ""
    else:
        raise ValueError(kind)
    return None


# every place torch.export.load reads from that runs code; the TorchScript unpickler of custom
# objects runs no Python __reduce__, so that plant has no payload: refused all the same
PLANTS = ("legacy weights", "legacy constants", "sample inputs", "pickled weight",
          "pickled constant", "opaque object", "custom object", "shape expression",
          "pytree import", "pre-2.8 layout")
NO_PAYLOAD = {"custom object"}

RAW_LOAD = r"""
import logging, sys, warnings
import torch
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
for path in sys.argv[1:]:
    try:
        torch.export.load(path).module(check_guards=False)
    except Exception:
        pass
"""


def _rewrite_manifest(out: Path) -> None:
    """What whoever crafts the folder does: arch.json's sha256 and sizes match the files."""
    from exitnas.runtime import sha256_file

    m = json.loads((out / "arch.json").read_text())
    for f in m["files"]:
        f["sha256"], f["bytes"] = sha256_file(out / f["path"]), (out / f["path"]).stat().st_size
    (out / "arch.json").write_text(json.dumps(m, indent=2))


def test_crafted_pt2_archives_run_nothing(exported, tmp_path, monkeypatch):
    """A payload planted in every place torch.export.load reads from is real (raw
    torch.export.load runs it) and is refused by runtime.load and `exitnas predict` (exit 2,
    one line naming the graph) before torch sees the file: the marker never appears. The
    untouched copy, its manifest rewritten the same way, still loads and predicts."""
    from exitnas.runtime import ExportError, load

    module_dir = tmp_path / "modules"  # on the import path, as a planted module would need
    module_dir.mkdir()
    monkeypatch.syspath_prepend(str(module_dir))
    env = {"PYTHONPATH": str(module_dir)}
    image = tmp_path / "one.png"
    _write_png(image, exported["splits"].test.images[0])
    crafted = []
    for i, kind in enumerate(PLANTS):
        out = tmp_path / f"export_{i}"
        shutil.copytree(exported["out"], out)
        root, members = _members(out / "segment_0.pt2")
        new_root = _plant(kind, members, tmp_path / f"marker_{i}", module_dir)
        _write_members(out / "segment_0.pt2", root if new_root is None else new_root, members)
        _rewrite_manifest(out)
        shutil.copy(out / "segment_0.pt2", tmp_path / f"raw_{i}.pt2")
        crafted.append((kind, out, tmp_path / f"marker_{i}"))

    raw = subprocess.run([sys.executable, "-c", RAW_LOAD, *(str(tmp_path / f"raw_{i}.pt2")
                                                            for i in range(len(PLANTS)))],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert raw.returncode == 0, raw.stderr[-2000:]
    for kind, _, marker in crafted:
        assert marker.exists() == (kind not in NO_PAYLOAD), kind  # each plant is a real payload
        marker.unlink(missing_ok=True)
    sys.modules.pop("planted_module", None)  # it would touch its marker again if imported

    for kind, out, marker in crafted:
        with pytest.raises(ExportError, match="segment_0.pt2.*refusing to load it"):
            load(out)
        err = _one_line_error(run_cli("predict", out, image, env=env))
        assert "segment_0.pt2" in err and "refusing to load it" in err, (kind, err)
        assert not marker.exists(), kind

    clean = tmp_path / "clean"
    shutil.copytree(exported["out"], clean)
    _rewrite_manifest(clean)
    x, model = exported["x"], exported["model"]
    got, ref = load(clean).predict(x), model.predict(x)
    assert np.array_equal(got.pred, ref.pred.numpy()) and np.array_equal(got.exit, ref.exit.numpy())
    proc = run_cli("predict", clean, image)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].startswith("1 images"), proc.stderr


def test_format_1_export_loads_without_opening_its_pickles(exported, tmp_path):
    """An export of format 1 (weights.pt beside the weights, pickled sample inputs in each
    .pt2) still loads: weights.pt is only sha256-checked and the sample inputs are dropped
    unread (here they would run a payload). Format 2 refuses the same archive."""
    from exitnas.runtime import ExportError, load

    out = tmp_path / "v1"
    shutil.copytree(exported["out"], out)
    marker = tmp_path / "marker"
    torch.save(exported["model"].state_dict(), out / "weights.pt")
    for graph in out.glob("*.pt2"):
        root, members = _members(graph)
        members["data/sample_inputs/model.pt"] = _saved(_Plant(marker))
        _write_members(graph, root, members)
    m = json.loads((out / "arch.json").read_text())
    m["files"].append({"path": "weights.pt", "sha256": "", "bytes": 0})
    (out / "arch.json").write_text(json.dumps(m))
    _rewrite_manifest(out)
    with pytest.raises(ExportError, match="sample_inputs.*not empty"):
        load(out)
    m = json.loads((out / "arch.json").read_text())
    m["format_version"] = 1
    (out / "arch.json").write_text(json.dumps(m))
    x, model = exported["x"], exported["model"]
    p = load(out)
    got, ref = p.predict(x), model.predict(x)
    assert np.array_equal(got.pred, ref.pred.numpy()) and np.array_equal(got.exit, ref.exit.numpy())
    assert len(p.all_exits(x)) == 3
    assert not marker.exists()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_one_call_per_exit_passed(exported, backend):
    """ONNX Runtime runs exit graph k (segment, head and the statistics) once per exit a
    sample reaches and never the separate segment and head graphs; pt2 runs segment k and head
    k once each per exit reached and never loads the exit graphs (fused_exits)."""
    from exitnas.runtime import load

    p, model, x = load(exported["out"], backend), exported["model"], exported["x"]
    calls = []

    def counted(what, k, call):
        def wrapped(h):
            calls.append((what, k, int(h.shape[0])))
            return call(h)
        return wrapped

    fused = backend == "onnx"
    assert p._b.fused_exits is fused
    if fused:
        p._exits = [counted("exit", k, c) for k, c in enumerate(p._exits)]
    else:  # the exit calls close over these lists' items: wrap the graphs themselves
        from exitnas.runtime import exit_calls

        p._segments = [counted("segment", k, c) for k, c in enumerate(p._segments)]
        p._heads = [counted("head", k, c) for k, c in enumerate(p._heads)]
        p._exits = exit_calls(p._b, p.manifest["graphs"], p._segments, p._heads, p.temperatures)
    got, ref = p.predict(_native(x, backend)), model.predict(x)
    assert np.array_equal(got.pred, ref.pred.numpy()) and np.array_equal(got.exit, ref.exit.numpy())
    reached = [int((ref.exit >= k).sum()) for k in range(p.num_exits)]
    parts = ("exit",) if fused else ("segment", "head")
    assert calls == [(w, k, n) for k, n in enumerate(reached) for w in parts]  # left: not run


def test_format_2_export_runs_segments_and_heads(exported, tmp_path):
    """An export made before exit graphs (format 2: segment_k, head_k, weights_prefix) runs
    segment, head and the statistics on the host, with the same predictions and exits."""
    from exitnas.runtime import load

    out = tmp_path / "v2"
    shutil.copytree(exported["out"], out)
    m = json.loads((out / "arch.json").read_text())
    for name in [n for n in m["graphs"] if n.startswith("exit_")]:
        for ext in ("pt2", "onnx"):
            (out / f"{name}.{ext}").unlink(missing_ok=True)
        del m["graphs"][name]
    for g in m["graphs"].values():
        g["weights_prefix"] = g.pop("weights_map")[""]
    m["files"] = [f for f in m["files"] if not f["path"].startswith("exit_")]
    m["format_version"] = 2
    (out / "arch.json").write_text(json.dumps(m))
    x, model = exported["x"], exported["model"]
    for backend in BACKENDS:
        p = load(out, backend)
        assert "exit_0" not in p.manifest["graphs"]
        got, ref = p.predict(_native(x, backend)), model.predict(x)
        assert np.array_equal(got.pred, ref.pred.numpy()) and np.array_equal(got.exit, ref.exit.numpy())


@pytest.mark.parametrize("kind", ["member", "deflated", "op", "name", "not a zip"])
def test_pt2_outside_the_allowlist_is_refused(exported, tmp_path, kind):
    """What the allowlist keeps out besides pickles: unknown members, compressed members (torch
    stores), ops other than aten's, names that are not plain identifiers, non-zip files."""
    from exitnas.runtime import ExportError, read_pt2

    src = exported["out"] / "head_0.pt2"
    read_pt2(src)
    dst = tmp_path / "bad.pt2"
    root, members = _members(src)
    if kind == "member":
        members["extra/notes.txt"] = b"hello"
    elif kind == "op":
        program = members["models/model.json"].decode()
        target = program.split('"target": "', 1)[1].split('"', 1)[0]
        members["models/model.json"] = program.replace(target, "torch.ops.higher_order.cond").encode()
    elif kind == "name":
        config = json.loads(members["data/weights/model_weights_config.json"])
        fqn = next(iter(config["config"]))
        config["config"][f'{fqn}")'] = config["config"].pop(fqn)
        members["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    if kind == "deflated":
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
            for rel, data in members.items():
                z.writestr(f"{root}/{rel}", data)
    elif kind == "not a zip":
        dst.write_bytes(b"\x80\x04N.")
    else:
        _write_members(dst, root, members)
    with pytest.raises(ExportError, match="bad.pt2: .*(refusing to load it|not a .pt2 archive)"):
        read_pt2(dst)


# ---- predict CLI --------------------------------------------------------------------------
def _write_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def test_predict_cli_on_an_imagefolder_tree(exported, predictors, tmp_path):
    splits, model = exported["splits"], exported["model"]
    images, labels = splits.test.images[:24], splits.test.labels[:24]
    tree = tmp_path / "tree"
    for i, (im, y) in enumerate(zip(images, labels)):
        _write_png(tree / splits.classes[int(y)] / f"{i:03d}.png", im)
    proc = run_cli("predict", exported["out"], tree, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = data["predictions"]
    assert len(rows) == 24
    order = [int(Path(r["file"]).stem) for r in rows]
    from exitnas.data import normalize

    ref = model.predict(normalize(images[order], splits.mean, splits.std))
    assert [r["pred"] for r in rows] == [splits.classes[i] for i in ref.pred.tolist()]
    assert [r["exit"] for r in rows] == ref.exit.tolist()
    assert [r["label"] for r in rows] == [splits.classes[int(labels[i])] for i in order]
    acc = float((ref.pred == labels[order]).double().mean())
    assert data["summary"]["accuracy"] == pytest.approx(acc)
    macs = predictors["pt2"].exit_macs[ref.exit.numpy()]
    assert [r["macs"] for r in rows] == macs.tolist()
    assert data["summary"]["mean_macs"] == pytest.approx(float(macs.mean()))

    files = sorted(tree.rglob("*.png"))[:3]
    table = run_cli("predict", exported["out"], *files, "--backend", BACKENDS[-1])
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["file", "pred", "exit", "MACs"] and len(lines) == 5
    assert lines[-1].startswith("3 images, mean")

    err = _one_line_error(run_cli("predict", exported["out"], tmp_path / "nope.png"))
    assert "nope.png" in err
    (tmp_path / "bad.png").write_text("not an image")
    err = _one_line_error(run_cli("predict", exported["out"], tmp_path / "bad.png"))
    assert "bad.png" in err and "not a readable image" in err


# ---- standalone ---------------------------------------------------------------------------
STANDALONE = r"""
import importlib.util, json, sys
import numpy as np

class Block:
    blocked = {"torch", "exitnas"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"blocked: {name}")
        return None

block = Block()
sys.meta_path.insert(0, block)
spec = importlib.util.spec_from_file_location("deployed_runtime", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
x = np.load(sys.argv[3])
onnx = rt.load(sys.argv[2], backend="onnx").predict(x)
no_torch = not any(m.split(".")[0] in ("torch", "exitnas") for m in sys.modules)
block.blocked = {"exitnas"}
pt2 = rt.load(sys.argv[2], backend="pt2").predict(x)
print(json.dumps({"onnx": [onnx.pred.tolist(), onnx.exit.tolist(), onnx.cost.tolist()],
                  "pt2": [pt2.pred.tolist(), pt2.exit.tolist(), pt2.cost.tolist()],
                  "no_torch_for_onnx": no_torch, "error_base": rt.ExportError.__mro__[1].__name__,
                  "exitnas": sorted(m for m in sys.modules if m.startswith("exitnas"))}))
"""


@needs_onnx
def test_runtime_runs_without_exitnas_and_onnx_without_torch(exported, predictors, tmp_path):
    x = exported["x"]
    np.save(tmp_path / "x.npy", x.numpy())
    script = tmp_path / "deploy.py"
    script.write_text(STANDALONE)
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "exitnas" / "runtime.py"),
                           str(exported["out"]), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["no_torch_for_onnx"] is True
    assert data["exitnas"] == [] and data["error_base"] == "Exception"
    ref = exported["model"].predict(x)
    for backend in BACKENDS:
        pred, ex, macs = data[backend]
        assert pred == ref.pred.tolist() and ex == ref.exit.tolist(), backend
        assert macs == predictors[backend].exit_macs[ref.exit.numpy()].tolist()
