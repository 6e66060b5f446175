"""int8 exports (exitnas.quantize): real ONNX Runtime quantisation of a real export of a briefly
trained tiny supernet. The int8 export runs with early exit, its graphs hold QDQ nodes, its
thresholds are the fit on its own val statistics for the fp32 export's budget, the fp32 export
is left byte for byte, and bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_DATA, tree_digest
from test_export import _train, needs_onnx

pytestmark = needs_onnx
ARCH_DEPTHS = "d2.2~s0b0=linear,s1b0=sdn_pool"  # exit 0 weak, exit 1 strong: the fit trades
# a larger val split than tiny.yaml's (19 images) so the fit has samples to trade; thresholds
# over all of [0, 1] (the linear head's max softmax stays near 1/4 after 2 epochs)
OVERRIDES = {"data.synthetic_size": 512, "data.val_fraction": 0.4,
             "policy.threshold_range": [0.0, 1.0]}


def _cli(*args) -> tuple[int, str, str]:
    from exitnas.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A run dir (tiny space, supernet trained 2 epochs), an fp32 export with ONNX whose
    thresholds send samples to every exit, and its int8 export made by the CLI."""
    from exitnas.arch import Arch
    from exitnas.data import load_splits, normalize
    from exitnas.export import export_run
    from exitnas.policy import ExitStats
    from exitnas.rundir import RunDir
    from exitnas.space import load_space
    from exitnas.supernet import Supernet, calibration_batches

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quantize")
    space = load_space(TEST_DATA / "tiny.yaml", OVERRIDES)
    run = RunDir(root / "run")
    space = run.init(space)
    splits = load_splits(space)
    torch.manual_seed(0)
    net = Supernet(space)
    _train(net, splits, epochs=2)
    net.save(run.sub("supernet") / "weights.safetensors")
    probe = Arch.parse(f"{ARCH_DEPTHS}~max_softmax=0.5,0.5")
    model = net.extract(probe, calib=calibration_batches(space, splits)).eval()
    with torch.no_grad():
        conf = ExitStats.stack(model.forward_exits(
            normalize(splits.val.images, splits.mean, splits.std))).conf.numpy()
    # about half leave at exit 0, 80 % of the rest at exit 1: a budget below C_1
    t0 = float(np.quantile(conf[0], 0.5))
    t1 = float(np.quantile(conf[1][conf[0] < t0], 0.2))
    arch = Arch.parse(f"{ARCH_DEPTHS}~max_softmax={t0:.4f},{t1:.4f}").validate(space)
    fp32 = export_run(run, arch, root / "exports" / "fp32").out
    before = tree_digest(fp32)
    out = root / "exports" / "int8"
    rc, stdout, stderr = _cli("quantize", run.path, "--export", fp32, "--out", out,
                              "--calib-batches", 4)
    assert rc == 0, stderr
    return {"root": root, "run": run, "space": space, "splits": splits, "arch": arch,
            "fp32": fp32, "out": out, "before": before, "stdout": stdout}


def _stats(p, manifest: dict, space, splits):
    """ArchStats of predictor ``p`` over val through its public exit calls (exit graph k:
    features for the next exit and the statistics the runtime decides on)."""
    from exitnas.data import batches
    from exitnas.evaluate import ArchStats
    from exitnas.units import unit_of

    parts, labels = [], []
    for x, y in batches(splits.val, batch_size=space.data.eval_batch_size, mean=splits.mean,
                        std=splits.std):
        h, rows = x.numpy(), []
        for k in range(p.num_exits):
            h, *stats = p.exit(k, h)
            rows.append(stats)
        parts.append([np.stack(r) for r in zip(*rows)])
        labels.append(y.numpy())
    conf, ent, pred = (np.concatenate([q[i] for q in parts], axis=1) for i in range(3))
    return ArchStats(conf, ent, pred, np.concatenate(labels),
                     tuple(e["cost"] for e in manifest["exits"]), manifest["cost"]["backbone"],
                     tuple(e["name"] for e in manifest["exits"]), unit_of(manifest["cost"]["unit"]))


def test_int8_export_runs_with_early_exit(made):
    from exitnas.data import normalize
    from exitnas.runtime import ExportError, load

    out, splits = made["out"], made["splits"]
    m = json.loads((out / "arch.json").read_text())
    assert m["precision"] == "int8"
    assert sorted(f["path"] for f in m["files"]) == sorted(p.name for p in out.glob("*.onnx"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f["path"] for f in m["files"]] + ["arch.json"])  # no .pt2, no weights.safetensors
    assert not any("pt2" in g for g in m["graphs"].values())
    p = load(out, "onnx")
    assert p.thresholds == tuple(m["policy"]["thresholds"])
    x = normalize(splits.test.images, splits.mean, splits.std).numpy()
    res = p.predict(x)
    counts = np.bincount(res.exit, minlength=p.num_exits)
    assert (counts > 0).sum() >= 2 and counts[:-1].sum() > 0, counts  # samples leave early
    assert np.array_equal(res.cost, p.exit_costs[res.exit])
    acc = float((res.pred == splits.test.labels.numpy()).mean())
    fp32 = load(made["fp32"], "onnx").predict(x)
    fp32_acc = float((fp32.pred == splits.test.labels.numpy()).mean())
    assert acc >= fp32_acc - 0.1, (acc, fp32_acc)  # 8-bit round-off, not a broken network
    assert "int8" in made["stdout"] and str(out) in made["stdout"]
    with pytest.raises(ExportError, match="int8 export holds ONNX graphs only.*use backend onnx"):
        load(out, "pt2")


def test_int8_graphs_hold_quantize_dequantize_nodes(made):
    import onnx
    from onnx import numpy_helper

    m = json.loads((made["out"] / "arch.json").read_text())
    for name, g in m["graphs"].items():
        model = onnx.load(made["out"] / g["onnx"])
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0, name
        assert np.isfinite(g["int8_max_abs_diff"]) and g["int8_max_abs_diff"] > 0, name
        fp32_ops = [n.op_type for n in onnx.load(made["fp32"] / g["onnx"]).graph.node]
        assert "QuantizeLinear" not in fp32_ops and "DequantizeLinear" not in fp32_ops
    # per-channel int8 weights: a conv weight's DequantizeLinear has one scale per out channel
    model = onnx.load(made["out"] / m["graphs"]["segment_0"]["onnx"])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_w = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert conv_w and all(w.dtype == np.int8 for w in conv_w)
    assert all(s.shape == (w.shape[0],) for w, s in zip(conv_w, scales))
    assert all(np.isfinite(e["int8_max_abs_diff"]) for e in m["exits"])


def test_thresholds_fitted_on_val_for_the_fp32_budget(made):
    from exitnas.policy import get_policy
    from exitnas.runtime import load
    from exitnas.thresholds import fit_thresholds

    space, splits, arch = made["space"], made["splits"], made["arch"]
    m = json.loads((made["out"] / "arch.json").read_text())
    fp_m = json.loads((made["fp32"] / "arch.json").read_text())
    fp32 = _stats(load(made["fp32"], "onnx"), fp_m, space, splits)
    int8 = _stats(load(made["out"], "onnx"), m, space, splits)
    assert not np.array_equal(fp32.conf, int8.conf)  # the int8 graphs' own statistics
    s = fp32.score(arch.policy, arch.thresholds)
    q = m["quantization"]
    assert q["thresholds"]["budget_macs"] == s.expected_cost
    assert q["val"]["fp32"]["accuracy"] == s.accuracy
    assert q["val"]["images"] == len(splits.val) == fp32.num_samples
    fit = fit_thresholds(int8, budget=s.expected_cost, policy=arch.policy,
                         value_range=get_policy(arch.policy).param_range(space.policy))
    assert tuple(m["policy"]["thresholds"]) == tuple(m["arch"]["thresholds"]) == fit.thresholds
    assert fit.feasible and q["thresholds"]["feasible"]
    assert q["val"]["int8"]["accuracy"] == fit.accuracy
    assert q["val"]["int8"]["expected_macs"] == fit.expected_cost <= s.expected_cost
    assert q["calibration"]["split"] == "train" and q["calibration"]["batches"] == 4
    assert q["calibration"]["images"] == 4 * space.data.batch_size
    # the runtime spends on val what the fit says: the same exits, sample by sample
    from exitnas.data import normalize

    res = load(made["out"], "onnx").predict(
        normalize(splits.val.images, splits.mean, splits.std).numpy())
    assert np.array_equal(res.exit, int8.exit_index(arch.policy, fit.thresholds))
    assert res.cost.mean() == fit.expected_cost
    assert len(set(res.exit.tolist())) >= 2  # a budget between C_0 and C_1: both are taken


def test_runtime_refuses_an_unknown_precision(made, tmp_path):
    from exitnas.runtime import ExportError, load

    bad = tmp_path / "fp16"
    shutil.copytree(made["out"], bad)
    m = json.loads((bad / "arch.json").read_text())
    m["precision"] = "fp16"
    (bad / "arch.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="precision 'fp16' is not fp32 or int8"):
        load(bad, "onnx")


def test_fp32_export_is_unchanged(made):
    assert tree_digest(made["fp32"]) == made["before"]
    assert sorted(p.name for p in made["fp32"].parent.iterdir()) == ["fp32", "int8"]


@pytest.fixture(scope="module")
def no_onnx(made) -> Path:
    from exitnas.export import export_run

    return export_run(made["run"], made["arch"], made["root"] / "no_onnx", onnx=False).out


@pytest.mark.parametrize("case, words", [
    ("not_an_export", "not an exitnas export (no arch.json)"),
    ("no_onnx", "exported without ONNX (--no-onnx)"),
    ("out_is_export", "is the fp32 export"),
    ("out_inside_export", "is inside the fp32 export"),
    ("int8_export", "precision is 'int8'"),
    ("out_not_an_export", "is not an exitnas export (no valid arch.json); refusing to replace"),
    ("calib_zero", "--calib-batches: 0 is not in 1..100000"),
])
def test_bad_input_is_refused_in_one_line(made, no_onnx, case, words):
    run, fp32, root = made["run"].path, made["fp32"], made["root"]
    args = {"not_an_export": ["--export", run],
            "no_onnx": ["--export", no_onnx],
            "out_is_export": ["--export", fp32, "--out", fp32],
            "out_inside_export": ["--export", fp32, "--out", fp32 / "int8"],
            "int8_export": ["--export", made["out"], "--out", root / "again"],
            "out_not_an_export": ["--export", fp32, "--out", run],
            "calib_zero": ["--export", fp32, "--out", root / "again", "--calib-batches", 0],
            }[case]
    before = tree_digest(root)
    dirs = sorted(p for p in root.rglob("*") if p.is_dir())
    rc, stdout, stderr = _cli("quantize", run, *args)
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitnas: error: "), stderr
    assert words in lines[0]
    assert tree_digest(root) == before  # nothing written, nothing changed
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == dirs


def test_predict_cli_refuses_pt2_on_int8(made):
    rc, _, stderr = _cli("predict", made["out"], made["run"].path / "config.yaml")
    assert rc == 2 and "use backend onnx" in stderr and len(stderr.strip().splitlines()) == 1
