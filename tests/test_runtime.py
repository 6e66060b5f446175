"""Runtime: early-exit predictions equal the in-repo model's, per-sample MACs equal C_k, the
whole-model graph equals the segment chain, bad exports are refused, and the runtime works
without exitnas (and, on ONNX Runtime, without torch)."""
from __future__ import annotations

import json
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
    assert np.array_equal(got.macs, np.asarray(costs)[got.exit])
    for i in range(0, len(x), 9):  # batch 1
        one = p.predict(_native(x[i:i + 1], backend))
        assert (one.pred[0], one.exit[0]) == (ref.pred[i], ref.exit[i])
    empty = p.predict(_native(x[:0], backend))
    assert empty.pred.shape == empty.exit.shape == empty.macs.shape == (0,)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_policy_equals_the_model(exported, predictors, backend):
    from exitnas.policy import ExitStats

    p, model, x = predictors[backend], exported["model"], exported["x"]
    with torch.no_grad():
        ent = ExitStats.stack(model.forward_exits(x)).entropy
    rules = [("entropy", (float(np.quantile(ent[0], 0.4)), float(np.quantile(ent[1], 0.5)))),
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


def test_pt2_archive_with_pickles_is_refused(exported, tmp_path):
    """torch.export.load would unpickle these with weights_only=False."""
    from exitnas.runtime import ExportError, _check_pt2

    src = exported["out"] / "head_0.pt2"
    _check_pt2(src)
    for bad in ("use_pickle", "custom_obj"):
        dst = tmp_path / f"{bad}.pt2"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                if bad == "use_pickle" and item.filename.endswith("weights_config.json"):
                    data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
                zout.writestr(item, data)
            if bad == "custom_obj":
                zout.writestr("head_0/data/constants/custom_obj_0", b"\x80\x04N.")
        with pytest.raises(ExportError, match="refusing"):
            _check_pt2(dst)


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
print(json.dumps({"onnx": [onnx.pred.tolist(), onnx.exit.tolist(), onnx.macs.tolist()],
                  "pt2": [pt2.pred.tolist(), pt2.exit.tolist(), pt2.macs.tolist()],
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
