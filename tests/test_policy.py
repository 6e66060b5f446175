"""Exit policies own themselves: each declares its space keys, its genes, its torch and numpy
rules and whether its thresholds are fitted; a policy registered in a test runs through a
search, an export and the runtime with no other file knowing its name."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from exitnas import exit_rules
from exitnas.policy import POLICIES, ExitStats, Param, Policy, first_exit, get_policy
from search_support import TINY, train_tiny_run


@pytest.fixture
def scratch_registry(monkeypatch):
    """Policies a test registers leave with it: both registries are module-level, so they are
    swapped for copies the test may fill."""
    monkeypatch.setattr(POLICIES, "_items", dict(POLICIES._items))
    monkeypatch.setattr(exit_rules, "_RULES", dict(exit_rules._RULES))


class AgreeRule(exit_rules.Rule):
    """Leave at exit k >= 1 when exit k has the class exit k-1 had and its max softmax is
    >= t (one t for the arch); never at exit 0. No built-in policy decides this way."""

    reads = ("conf", "pred")
    per_exit = False

    def leave(self, k, row, params, state):
        if k == 0:
            hit = np.zeros(row.pred.shape[0], dtype=bool)
        else:
            hit = (row.pred == state[0]) & (row.conf >= params[0])
        return hit, (row.pred,)


def register_agree() -> type[Policy]:
    """The whole of a new policy: its numpy rule above, this class, one decorator."""

    @POLICIES.register("agree")
    class Agree(Policy):
        rule = AgreeRule()
        param = Param(key="agree_range", default=(0.0, 1.0), ge=0.0, le=1.0, gene="agree",
                      fill="high", doc="max softmax an agreeing exit needs")

        def exit_mask(self, stats, params):
            t = torch.tensor(params[0], dtype=torch.float32)
            mask = torch.zeros_like(stats.conf, dtype=torch.bool)
            mask[1:] = (stats.pred[1:] == stats.pred[:-1]) & (stats.conf[1:] >= t)
            return mask

    return Agree


def _agree_by_hand(logits: list[np.ndarray], t: float) -> np.ndarray:
    """The exit each sample takes under "agree" from every exit's logits, written out."""
    z = [np.asarray(x, dtype=np.float32) for x in logits]
    e = [np.exp(x - x.max(axis=1, keepdims=True)) for x in z]
    conf = [1 / s.sum(axis=1) for s in e]
    pred = [x.argmax(axis=1) for x in z]
    out = np.full(len(z[0]), len(z) - 1)
    for n in range(len(out)):
        for k in range(1, len(z) - 1):
            if pred[k][n] == pred[k - 1][n] and conf[k][n] >= np.float32(t):
                out[n] = k
                break
    return out


# ---- what the built-in policies declare -------------------------------------------------------
def test_builtin_policies_read_the_space_keys_they_always_had():
    from exitnas.cli.config import reference_rows
    from exitnas.space import PolicyConfig, parse_space

    space = parse_space({"name": "x", "num_classes": 2, "backbone": {
        "family": "resnet", "block": "basic", "stages": [{"channels": 4, "depths": [2]}]}})
    p = space.policy
    assert isinstance(p, PolicyConfig) and p.names == ("max_softmax",)
    assert (p.threshold_range, p.entropy_range, p.patience_range) == ((0.5, 1.0), (0.0, 1.5), (1, 3))
    rows = {r[0]: r[1:] for r in reference_rows() if r[0].startswith("policy.")}
    assert list(rows) == ["policy.names", "policy.threshold_range", "policy.entropy_range",
                          "policy.patience_range", "policy.calibration"]
    assert rows["policy.patience_range"] == ("tuple[int, int]", "[1, 3]", "patience p (exits that agree)")
    assert rows["policy.names"][2].endswith("max_softmax, entropy, patience")
    fitted = {n: (get_policy(n).fitted, get_policy(n).budgeted_batch) for n in POLICIES.in_order()}
    assert fitted == {"max_softmax": (True, True), "entropy": (True, False), "patience": (False, False)}
    for name in POLICIES.in_order():  # scorer and runtime share the numpy rule of the policy
        assert exit_rules.get(name) is POLICIES.get(name).rule


def test_registration_refuses_what_would_not_work(scratch_registry):
    class Half(Policy):
        rule = AgreeRule()
        param = Param(key="half_range", default=(0.0, 1.0), gene="half", doc="")

    with pytest.raises(ValueError, match="'max_softmax' is already registered"):
        POLICIES.register("max_softmax")(Half)
    Fitted = type("Fitted", (Half,), {"fitted": True})
    with pytest.raises(TypeError, match="is fitted but its rule is not an exit_rules.Threshold"):
        POLICIES.register("half")(Fitted)
    Clash = type("Clash", (Half,), {"param": Param(key="threshold_range", default=(0.0, 1.0),
                                                    gene="half", doc="")})
    with pytest.raises(ValueError, match="declares policy.threshold_range unlike 'max_softmax'"):
        POLICIES.register("half")(Clash)
    exit_rules.register("half", exit_rules.Patience())  # a deployment's rule took the name
    with pytest.raises(ValueError, match="exit rule 'half' is already registered"):
        POLICIES.register("half")(Half)
    assert "half" not in POLICIES
    with pytest.raises(LookupError, match="unknown exit policy 'nope'"):
        exit_rules.get("nope")


def test_a_fitted_policy_registered_here_is_fitted_like_max_softmax(scratch_registry):
    """thresholds.py and the search's Fitter fit whatever a policy declares: a copy of
    max_softmax under another name and key gets max_softmax's thresholds."""
    from exitnas.evaluate import ArchStats
    from exitnas.space import load_space
    from exitnas.thresholds import fit_thresholds

    @POLICIES.register("conf_copy")
    class ConfCopy(Policy):
        rule = exit_rules.Threshold("conf", below=False)
        param = Param(key="conf_copy_range", default=(0.2, 1.0), ge=0.0, le=1.0, gene="cc",
                      fill="high", doc="copy of max_softmax")
        fitted = budgeted_batch = True

    rng = np.random.default_rng(0)
    conf = (rng.integers(0, 40, (3, 500)) / 40).astype(np.float32)
    stats = ArchStats(conf, np.zeros_like(conf), rng.integers(0, 3, (3, 500)),
                      rng.integers(0, 3, 500), (100, 300, 700), 600)
    for budget in (250.0, 450.0):
        want = fit_thresholds(stats, budget=budget, value_range=(0.2, 1.0))
        got = fit_thresholds(stats, budget=budget, policy="conf_copy", value_range=(0.2, 1.0))
        assert got == want and got.start in ("sweep", "budgeted_batch")
    space = load_space(TINY, {"policy.names": ["conf_copy", "patience"],
                              "policy.conf_copy_range": [0.3, 0.9]})
    from exitnas.search import Genome
    from exitnas.search._objective import Fitter

    from exitnas.units import MACS

    class Budget:
        deploy, backbone, unit = (500.0,), 600, MACS

    assert Fitter.from_space(space, Budget()).ranges == {"conf_copy": (0.3, 0.9)}
    evolved = Genome(space.with_overrides({"search.thresholds": "evolved"}))
    assert evolved.genes == ("patience", "cc") and Genome(space).genes == ("patience",)


# ---- one file: search, export, runtime -------------------------------------------------------
DEPLOYED = r"""
import importlib.util, json, sys
import numpy as np

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "exitnas":
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("deployed_runtime", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)

class AgreeRule(rt.rules.Rule):
    reads, per_exit = ("conf", "pred"), False
    def leave(self, k, row, params, state):
        hit = np.zeros(row.pred.shape[0], bool) if k == 0 else (row.pred == state[0]) & (row.conf >= params[0])
        return hit, (row.pred,)

rt.rules.register("agree", AgreeRule())
got = rt.load(sys.argv[2]).predict(np.load(sys.argv[3]))
print(json.dumps({"exit": got.exit.tolist(), "pred": got.pred.tolist(),
                  "exitnas": sorted(m for m in sys.modules if m.startswith("exitnas"))}))
"""


def test_a_policy_registered_here_runs_through_search_export_and_runtime(scratch_registry,
                                                                         tmp_path):
    from exitnas.arch import Arch
    from exitnas.cli.config import reference_markdown
    from exitnas.data import load_splits, normalize
    from exitnas.errors import ConfigError
    from exitnas.evaluate import decide, load_or_build_cache
    from exitnas.export import export_run
    from exitnas.rundir import RunDir
    from exitnas.runtime import load
    from exitnas.search import SearchOptions, run_search
    from exitnas.space import load_space
    from exitnas.supernet import Supernet, calibration_batches
    from search_support import study_of

    register_agree()
    # the space file's policy section is read through the policy: its key, its checks, its docs
    assert "| `policy.agree_range` | tuple[float, float] | `[0.0, 1.0]` | max softmax an " \
           "agreeing exit needs |" in reference_markdown()
    with pytest.raises(ConfigError, match=r"policy.agree_range: low end 0.9 is above high end 0.1"):
        load_space(TINY, {"policy.agree_range": [0.9, 0.1]})
    torch.set_num_threads(1)
    run_path = train_tiny_run(tmp_path / "run")
    space = load_space(TINY, {"policy.names": ["agree"], "policy.agree_range": [0.5, 1.0],
                              "data.synthetic_size": 640})
    RunDir(run_path).init(space)

    result = run_search(run_path, SearchOptions(trials=12), log=None)
    assert result.trials == 12
    trials = study_of(run_path).get_trials()
    assert all(0.5 <= t.params["agree"] <= 1.0 for t in trials)  # the genome drew its gene
    assert all(t.user_attrs["arch"]["policy"] == "agree" for t in trials)
    # the scorer applied the rule: exit 0 is never taken, later exits are
    assert all(t.user_attrs["exit_fractions"][0] == 0 for t in trials if t.user_attrs["arch"]["exits"])
    two = [t for t in trials if len(t.user_attrs["arch"]["exits"]) == 2]
    best = max(two, key=lambda t: min(t.user_attrs["exit_fractions"][1:]))  # exit 1 and final
    assert min(best.user_attrs["exit_fractions"][1:]) > 0, [
        (t.params["agree"], t.user_attrs["exit_fractions"]) for t in two]
    arch = Arch.from_json(best.user_attrs["arch"])

    out = export_run(run_path, arch, tmp_path / "export", onnx=False).out
    manifest = json.loads((out / "arch.json").read_text())
    assert manifest["policy"] == {"name": "agree", "thresholds": list(arch.thresholds)}
    splits = load_splits(space)
    x = normalize(splits.val.images, splits.mean, splits.std)
    predictor = load(out)
    got = predictor.predict(x.numpy())
    # the runtime's exits are the rule's, written out by hand from every exit's logits ...
    want = _agree_by_hand(predictor.all_exits(x), arch.thresholds[0])
    assert np.array_equal(got.exit, want) and 0 < (got.exit == 1).sum() < len(x)
    assert 0 not in got.exit.tolist()
    # ... the scores the search kept (cache) and the model's torch rule decide the same
    net = Supernet(space).load(run_path / "supernet" / "weights.safetensors")
    pred, idx = decide(load_or_build_cache(RunDir(run_path), net, arch.depths, None), arch)
    assert np.array_equal(got.exit, idx.numpy()) and np.array_equal(got.pred, pred.numpy())
    model = net.extract(arch, calib=calibration_batches(space, splits)).eval()
    assert np.array_equal(model.predict(x).exit.numpy(), got.exit)
    # max_softmax at the same threshold would have decided otherwise
    stats = ExitStats.stack(model.forward_exits(x))
    other = first_exit(get_policy("max_softmax").exit_mask(
        ExitStats(stats.conf[:2], stats.entropy[:2], stats.pred[:2]), arch.thresholds * 2))
    assert not np.array_equal(other.numpy(), got.exit)

    # a deployment without exitnas registers the numpy rule with the runtime's rules module
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "deploy.py").write_text(DEPLOYED)
    proc = subprocess.run([sys.executable, str(tmp_path / "deploy.py"),
                           str(ROOT / "exitnas" / "runtime.py"), str(out), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    deployed = json.loads(proc.stdout)
    assert deployed["exitnas"] == []
    assert deployed["exit"] == got.exit.tolist() and deployed["pred"] == got.pred.tolist()
