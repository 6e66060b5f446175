"""Per-exit temperature scaling (issue 15, calibration; Guo et al. 2017, Kubaty et al.): the fit
minimises val NLL (planted cases with a known optimum, a brute-force grid, a briefly trained
model), T_k = 1 on calibrated logits, what temperature changes and what it keeps, thresholds
fitted after calibration by finetune, calibration.json beside the weights (allowlist,
staleness), the export baking T_k (pt2 and ONNX format 3, host statistics, arch.json; the
ONNX case is marked slow: converting the graphs takes ~25 s), and ``policy.calibration``
refused in one line."""
from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import TEST_DATA, run_cli, tree_digest
from test_export import ARCH_DEPTHS, _one_line_error, needs_onnx, trained_export
from exitnas import calibration
from exitnas.arch import Arch
from exitnas.calibration import CALIBRATIONS, Fitted, fit_calibration, fit_temperature, nll
from exitnas.data import batches
from exitnas.errors import CheckpointError, ConfigError
from exitnas.policy import ExitStats


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict:
    return trained_export(tmp_path_factory.mktemp("exported"))


def _val(exported, space=None, splits=None):
    space, splits = space or exported["space"], splits or exported["splits"]
    return batches(splits.val, batch_size=space.data.eval_batch_size, mean=splits.mean,
                   std=splits.std)


def _exact(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``scale * log p`` with labels in exactly the proportions p: softmax(z / scale)
    is the labels' empirical distribution, so d NLL / d(1/T) = 0 at T = scale, and the NLL is
    strictly convex in 1/T: the optimum is T = scale exactly."""
    groups = [((1 / 2, 1 / 4, 1 / 4), (0, 0, 1, 2)), ((1 / 5, 3 / 5, 1 / 5), (0, 1, 1, 1, 2)),
              ((1 / 8, 1 / 8, 3 / 4), (0, 1, 2, 2, 2, 2, 2, 2))]
    z = [[scale * math.log(q) for q in p] for p, labels in groups for _ in labels]
    y = [label for _, labels in groups for label in labels]
    return torch.tensor(z, dtype=torch.float64), torch.tensor(y)


def _grid_min(z, y, points: int = 1201):
    grid = np.exp(np.linspace(math.log(calibration.T_MIN), math.log(calibration.T_MAX), points))
    values = [nll(z, y, float(t)) for t in grid]
    i = int(np.argmin(values))
    return float(grid[i]), values[i], math.log(grid[1] / grid[0])


# ---- the fit ------------------------------------------------------------------------------
def test_planted_over_confident_logits_give_their_known_temperature():
    for scale in (3.0, 0.4):  # over- and under-confident by a known factor
        z, y = _exact(scale)
        t = fit_temperature(z, y)
        assert abs(t / scale - 1) < 1e-4, (scale, t)
        assert nll(z, y, t) < nll(z, y) - 0.05
        assert t == float(np.float32(t))  # every path divides by the same float32


def test_calibrated_logits_keep_t_equal_to_one():
    z, y = _exact(1.0)
    assert abs(fit_temperature(z, y) - 1.0) < 1e-4
    g = torch.Generator().manual_seed(1)  # labels drawn from softmax(z): calibrated in law
    z = torch.randn(20000, 5, generator=g) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    assert abs(fit_temperature(z, y) - 1.0) < 0.03
    assert CALIBRATIONS.get("none")().fit([z, z], y) == (1.0, 1.0)


def test_the_fit_is_the_brute_force_grid_minimum():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3000, 10, generator=g) * 2
    y = torch.multinomial(torch.softmax(u, 1), 1, generator=g)[:, 0]
    z = (2.5 * u).float()  # over-confident: the true T is about 2.5
    t = fit_temperature(z, y)
    best_t, best, step = _grid_min(z, y)
    assert nll(z, y, t) <= best + 1e-9 and abs(math.log(t / best_t)) <= step
    assert abs(t - 2.5) < 0.2 and nll(z, y, t) < nll(z, y) - 0.1


def test_temperature_scaling_lowers_val_nll_of_a_trained_model(exported):
    model = exported["model"]
    cal = fit_calibration(model, "temperature", _val(exported))
    logits, labels = calibration.exit_logits(model, _val(exported))
    for k, (z, t) in enumerate(zip(logits, cal.temperatures)):
        assert cal.val_nll_before[k] == nll(z, labels) and cal.val_nll_after[k] == nll(z, labels, t)
        assert cal.val_nll_after[k] <= cal.val_nll_before[k] + 1e-12, k
        best_t, best, step = _grid_min(z, labels)
        assert cal.val_nll_after[k] <= best + 1e-9 and abs(math.log(t / best_t)) <= step, k
    assert sum(cal.val_nll_after) < sum(cal.val_nll_before) - 0.01, cal
    assert any(abs(t - 1) > 0.05 for t in cal.temperatures), cal
    none = fit_calibration(model, "none", _val(exported))
    assert none.temperatures == (1.0,) * 3 and none.val_nll_after == none.val_nll_before
    assert not model.training and model.temperatures == (1.0,) * 3  # nothing changed


def test_temperature_keeps_the_argmax_and_can_reorder_confidences():
    a = torch.tensor([[0.0, 0.0, -20.0]])
    b = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    (ca, _, pa), (cb, _, pb) = ExitStats.from_logits(a), ExitStats.from_logits(b)
    (ca2, _, pa2), (cb2, _, pb2) = ExitStats.from_logits(a / 2), ExitStats.from_logits(b / 2)
    assert float(cb) >= float(ca) and float(ca2) > float(cb2) + 0.05  # the order flips
    assert (pa, pb) == (pa2, pb2)
    g = torch.Generator().manual_seed(2)  # two classes: conf is monotone in the margin
    z = torch.randn(500, 2, generator=g, dtype=torch.float64)
    order = [torch.argsort(torch.softmax(z / t, 1).max(1).values, stable=True) for t in (1, 3)]
    assert torch.equal(order[0], order[1])


def test_patience_is_unaffected_and_max_softmax_is_not(exported):
    model, x = copy.deepcopy(exported["model"]), exported["x"]
    plain = [model.predict(x, p, pol) for pol, p in (("patience", (2.0,)),
                                                     ("max_softmax", exported["arch"].thresholds))]
    model.set_temperatures((3.0, 0.5, 2.0))
    hot = [model.predict(x, p, pol) for pol, p in (("patience", (2.0,)),
                                                   ("max_softmax", exported["arch"].thresholds))]
    assert torch.equal(plain[0].pred, hot[0].pred) and torch.equal(plain[0].exit, hot[0].exit)
    assert not torch.equal(plain[1].exit, hot[1].exit)


# ---- finetune and retrain: T_k fitted on val, then the thresholds on the calibrated stats ---
def _copy_run(exported, tmp_path):
    from exitnas.rundir import RunDir

    shutil.copytree(exported["run"].path, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    return RunDir(tmp_path / "run")


def _predict(model, arch, space, splits):
    """(accuracy, expected MACs) of ``model.predict`` per val batch at ``arch``'s thresholds."""
    from exitnas.cost import cost_table

    costs = np.asarray(cost_table(space).exit_costs(arch))
    hits = total = n = 0
    for x, y in _val(None, space, splits):
        p = model.predict(x, arch.thresholds, arch.policy)
        hits, total, n = hits + int((p.pred == y).sum()), total + int(costs[p.exit].sum()), n + len(y)
    return hits / n, total / n


def test_finetune_fits_temperatures_then_thresholds_and_the_export_carries_them(exported, tmp_path):
    from exitnas.data import load_splits
    from exitnas.export import export_run
    from exitnas.finetune import finetune, fit_arch, val_stats
    from exitnas.runtime import load

    # weak early heads (linear on pooled 8-channel features) and 230 val samples: after one
    # epoch the early exits are under-confident, and no exit is right on every val sample
    rd = _copy_run(exported, tmp_path)
    data = {"data.synthetic_size": 1024, "data.val_fraction": 0.3}
    plain_space = exported["space"].with_overrides(data)
    rd.init(plain_space)  # the export reads the run's data settings (its normalisation)
    space = plain_space.with_overrides({"policy.calibration": "temperature"})
    splits = load_splits(space)
    arch = Arch.parse("d2.2~s0b0=linear,s1b0=linear~max_softmax=0.6,0.6")
    result = finetune(rd, arch, space=space, regime="disjoint", epochs=1, splits=splits, log=None)
    weights, m = result.out / "model.safetensors", result.manifest
    stored = calibration.load(weights, 3)
    assert stored.method == "temperature" and stored.temperatures == result.model.temperatures
    assert m["calibration"] == stored.to_json() and any(abs(t - 1) > 0.05 for t in stored.temperatures)
    assert sum(stored.val_nll_after) < sum(stored.val_nll_before)
    # the thresholds were fitted on the calibrated statistics, within the inherited budget...
    assert m["val"]["feasible"] and m["val"]["expected_macs"] <= m["budget_macs"]
    assert _predict(result.model, result.arch, space, splits) == (m["val"]["accuracy"],
                                                                   m["val"]["expected_macs"])
    # ...and differ from those fitted on the same model's uncalibrated statistics
    plain = copy.deepcopy(result.model)
    plain.set_temperatures(None)
    uncal, _ = fit_arch(val_stats(plain, arch, space, splits), arch, space, m["budget_macs"])
    assert uncal.thresholds != result.arch.thresholds
    # the export bakes them in and its runtime scores what arch.json says on val
    out = export_run(rd, result.arch, tmp_path / "export", weights=weights, onnx=False).out
    em = json.loads((out / "arch.json").read_text())
    assert [e["temperature"] for e in em["exits"]] == list(stored.temperatures)
    assert em["source"]["calibration"] == {"method": "temperature",
                                           "path": str(result.out / "calibration.json")}
    p = load(out)
    got = p.predict(p.preprocess(splits.val.images.numpy()))
    assert float((got.pred == splits.val.labels.numpy()).mean()) == pytest.approx(
        m["val"]["accuracy"], abs=1e-12)
    assert float(got.cost.mean()) == pytest.approx(m["val"]["expected_macs"], rel=1e-12)
    # a finished rerun writes nothing; another calibration re-fits calibration.json and
    # arch.json, never the weights
    before = tree_digest(result.out)
    finetune(rd, arch, space=space, regime="disjoint", epochs=1, splits=splits, log=None)
    assert tree_digest(result.out) == before
    none = finetune(rd, arch, space=plain_space, regime="disjoint", epochs=1, splits=splits,
                    log=None)
    after = tree_digest(result.out)
    assert {k for k in after if after[k] != before[k]} == {"calibration.json", "arch.json"}
    assert none.model.temperatures == (1.0,) * 3 and none.manifest["calibration"]["method"] == "none"


def test_retrain_stores_temperatures_that_load_retrained_and_the_export_use(exported, tmp_path):
    from exitnas.export import export_run
    from exitnas.retrain import load_retrained, retrain

    rd, arch = _copy_run(exported, tmp_path), exported["arch"]
    space = exported["space"].with_overrides({"policy.calibration": "temperature"})
    result = retrain(rd, arch, space=space, regime="joint", splits=exported["splits"], log=None)
    plain = copy.deepcopy(result.model)
    plain.set_temperatures(None)
    assert result.model.temperatures == fit_calibration(plain, "temperature", _val(exported)).temperatures
    assert load_retrained(rd, arch, "joint", space).temperatures == result.model.temperatures
    em = json.loads((export_run(rd, arch, tmp_path / "export", onnx=False).out / "arch.json").read_text())
    assert em["source"]["kind"] == "retrain" and em["source"]["calibration"]["method"] == "temperature"
    assert [e["temperature"] for e in em["exits"]] == list(result.model.temperatures)


# ---- calibration.json: allowlist and staleness ---------------------------------------------
def test_calibration_file_is_read_by_allowlist(tmp_path):
    from exitnas.io import save_weights

    weights = tmp_path / "model.safetensors"
    save_weights(weights, {"w": torch.zeros(2)})
    good = Fitted(method="temperature", temperatures=(1.5, 0.75), val_nll_before=(1.0, 1.2),
                  val_nll_after=(0.9, 1.1))
    path = calibration.store(weights, good)
    assert calibration.load(weights, 2) == good
    base = json.loads(path.read_text())
    cases = [({"method": "platt"}, "method 'platt' is not one of none, temperature"),
             ({"temperatures": [1.5, -1.0]}, "temperature -1.0 is not a number in"),
             ({"temperatures": [1.5, float("nan")]}, "temperature nan is not a number in"),
             ({"temperatures": [1.5, True]}, "temperature True is not a number in"),
             ({"temperatures": [1.5]}, "1 temperature(s) for 2 exits"),
             ({"val_nll_after": [0.9, "x"]}, "val_nll_after: is not 2 finite numbers"),
             ({"extra": 1}, "key 'extra' is unknown"),
             ({"format": "exitnas-export"}, "not an exitnas calibration file"),
             ({"weights_sha256": "../../etc"}, "not a file name and a sha256")]
    for change, words in cases:
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(CheckpointError) as err:
            calibration.load(weights, 2)
        assert str(err.value).startswith(f"{path}: ") and words in str(err.value), change
        assert "\n" not in str(err.value)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not JSON"):
        calibration.load(weights, 2)
    path.write_text(json.dumps({**base, "weights": "other.safetensors"}))  # not these weights'
    assert calibration.load(weights, 2) is None
    path.write_text(json.dumps(base))
    save_weights(weights, {"w": torch.ones(2)})  # the weights changed after the fit
    with pytest.raises(CheckpointError, match="fitted for other weights"):
        calibration.load(weights, 2)
    assert calibration.load(weights, 2, stale="ignore") is None


def test_export_refuses_a_malformed_calibration_file_in_one_line(exported, tmp_path):
    from exitnas.io import save_weights
    from exitnas.supernet import build_model

    run, arch = exported["run"], exported["arch"]
    wfile = tmp_path / "model.safetensors"
    save_weights(wfile, build_model(exported["space"], arch, seed=5).state_dict())
    cal = calibration.store(wfile, Fitted(method="temperature", temperatures=(2.0, 1.0, 1.0),
                                          val_nll_before=(1.0,) * 3, val_nll_after=(1.0,) * 3))
    data = json.loads(cal.read_text())
    cal.write_text(json.dumps({**data, "temperatures": [2.0, 0.0, 1.0]}))
    out = tmp_path / "out"
    err = _one_line_error(run_cli("export", run.path, "--arch", arch.id, "--out", out,
                                  "--weights", wfile, "--no-onnx"))
    assert str(cal) in err and "temperature 0.0 is not a number" in err
    assert not out.exists()


# ---- the export: T_k baked into the exit graphs, the host path divides by arch.json's -------
def _gap_threshold(values, q: float) -> float:
    """A 4-decimal threshold near quantile ``q`` in a gap between samples (the runtimes differ
    from torch by float round-off, so no sample may sit at the threshold)."""
    v = np.sort(np.unique(np.asarray(values, dtype=np.float64)))
    lo, hi = max(0, int(len(v) * (q - 0.15))), min(len(v) - 1, int(len(v) * (q + 0.15)))
    i = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
    t = round(float((v[i] + v[i + 1]) / 2), 4)
    assert np.abs(v - t).min() > 1e-5, "no gap wide enough for a 4-decimal threshold"
    return t


def _format_2(src, dst, *, temperatures: bool) -> None:
    """A copy of export ``src`` without exit graphs (segment, head and host statistics), with
    or without arch.json's temperatures."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "arch.json").read_text())
    for name in [n for n in m["graphs"] if n.startswith("exit_")]:
        for ext in ("pt2", "onnx"):
            (dst / f"{name}.{ext}").unlink(missing_ok=True)
        del m["graphs"][name]
    m["files"] = [f for f in m["files"] if not f["path"].startswith("exit_")]
    if not temperatures:
        for e in m["exits"]:
            del e["temperature"]
    (dst / "arch.json").write_text(json.dumps(m))


@pytest.mark.parametrize("backend", ["pt2", pytest.param(
    "onnx", marks=[needs_onnx, pytest.mark.slow])])  # writing the ONNX graphs takes ~25 s
def test_export_with_temperatures_runs_as_the_model_on_every_path(exported, tmp_path, backend):
    from exitnas.export import write_export
    from exitnas.runtime import ExportError, load

    space, splits, x = exported["space"], exported["splits"], exported["x"]
    model = copy.deepcopy(exported["model"])
    temps = (2.5, 0.5, 1.75)  # exit 0 softer, exit 1 sharper: float32 numbers
    model.set_temperatures(temps)
    with torch.no_grad():
        stats = ExitStats.stack(model.calibrated_exits(x))
    t0 = _gap_threshold(stats.conf[0], 0.6)
    t1 = _gap_threshold(stats.conf[1][stats.conf[0] < t0], 0.5)
    arch = Arch.parse(f"{ARCH_DEPTHS}~max_softmax={t0:.4f},{t1:.4f}").validate(space)
    with torch.no_grad():  # nor does any uncalibrated confidence sit at them (export "old")
        raw_conf = ExitStats.stack(exported["model"].forward_exits(x)).conf
    assert all(float((raw_conf[k] - t).abs().min()) > 1e-5 for k, t in enumerate(arch.thresholds))
    ent = (_gap_threshold(stats.entropy[0], 0.4), _gap_threshold(stats.entropy[1], 0.5))
    out = write_export(model, space=space, arch=arch, splits=splits, out=tmp_path / "cal",
                       source={"kind": "weights", "path": "planted", "weights": "model"},
                       onnx=backend == "onnx").out
    m = json.loads((out / "arch.json").read_text())
    assert [e["temperature"] for e in m["exits"]] == list(temps)
    ref = model.predict(x, arch.thresholds, "max_softmax")
    assert np.bincount(ref.exit.numpy(), minlength=3).min() >= 5  # every exit is taken
    plain = exported["model"].predict(x, arch.thresholds, "max_softmax")
    assert not torch.equal(plain.exit, ref.exit)  # the temperatures change the exits
    ref_ent = model.predict(x, ent, "entropy")
    with torch.no_grad():  # model.pt2 and head_k keep the raw logits
        raw = model.forward_exits(x)
    _format_2(out, tmp_path / "host", temperatures=True)
    _format_2(out, tmp_path / "old", temperatures=False)
    native = x if backend == "pt2" else x.numpy()
    loaded = {}
    for root, want in ((out, ref), (tmp_path / "host", ref), (tmp_path / "old", plain)):
        p = loaded[root.name] = load(root, backend)
        got = p.predict(native)
        assert np.array_equal(got.pred, want.pred.numpy()), root.name
        assert np.array_equal(got.exit, want.exit.numpy()), root.name
    assert loaded["cal"].temperatures == loaded["host"].temperatures == temps
    assert loaded["old"].temperatures == (1.0,) * 3
    fused = loaded["cal"]
    fused.set_policy("entropy", ent)
    assert np.array_equal(fused.predict(native).exit, ref_ent.exit.numpy())
    for k, z in enumerate(fused.all_exits(native)):
        assert float(np.abs(np.asarray(z) - raw[k].numpy()).max()) <= 1e-5, k
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    for value in (-2.0, 0, "2", True):
        mb = json.loads((out / "arch.json").read_text())
        mb["exits"][1]["temperature"] = value
        (bad / "arch.json").write_text(json.dumps(mb))
        with pytest.raises(ExportError, match=r"exits\[1\]\.temperature .* is not a number"):
            load(bad, backend)


# ---- the config value ---------------------------------------------------------------------
def test_a_bad_policy_calibration_is_refused_in_one_line(tmp_path):
    from exitnas.cli.config import reference_rows
    from exitnas.space import load_space

    assert CALIBRATIONS.names() == ["none", "temperature"]
    assert load_space(TEST_DATA / "tiny.yaml").policy.calibration == "none"
    rows = {r[0]: r[1:] for r in reference_rows()}
    assert rows["policy.calibration"][:2] == ("str", "'none'")
    with pytest.raises(ConfigError, match=r"^--set: policy.calibration: unknown value "
                                          r"'Temperature' \(known: none, temperature\)$"):
        load_space(TEST_DATA / "tiny.yaml", {"policy.calibration": "Temperature"})
    text = (TEST_DATA / "tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  patience_range: [1, 2]\n",
                                "  patience_range: [1, 2]\n  calibration: platt\n"))
    line = _one_line_error(run_cli("space", "check", bad))
    assert line.endswith(f" {bad}: policy.calibration: unknown value 'platt' "
                         "(known: none, temperature)"), line
    bad.write_text(text.replace("  patience_range: [1, 2]\n",
                                "  patience_range: [1, 2]\n  calibration: 3\n"))
    with pytest.raises(ConfigError, match="policy.calibration: expected a string, got int 3"):
        load_space(bad)
