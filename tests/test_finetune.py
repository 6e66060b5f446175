"""Fine-tuning from the inherited weights (issue 13): mixed trains backbone and heads from the
supernet's sub-network (heads kept), disjoint trains the heads only (backbone tensors and BN
buffers bit-identical), the re-fitted thresholds score on val what arch.json says (also through
an export and its runtime), kill -9 resumes to identical weights, foreign checkpoints are
refused with one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TEST_DATA, run_cli, tree_digest
from exitnas.arch import Arch
from exitnas.cost import cost_table
from exitnas.data import batches, load_splits
from exitnas.errors import CheckpointError, ConfigError, RunDirError
from exitnas.finetune import finetune, finetune_dir, structure_id
from exitnas.io import load_weights, save_weights
from exitnas.retrain import backbone_modules, inherited_model
from exitnas.rundir import RunDir
from exitnas.space import load_space
from exitnas.supernet import build_model
from exitnas.train import read_metrics, train_supernet
from test_train import _weights_equal, kill_and_resume

ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.6,0.7"  # the conv head has BatchNorm
STRUCTURE = "d2.2~s0b1=conv,s1b0=linear~max_softmax"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny supernet (``supernet.init: scratch``, the default) trained once; tests copy it."""
    space = load_space(TEST_DATA / "tiny.yaml", {"data.synthetic_size": 512,
                                                 "retrain.optim.lr": 0.02})
    assert space.supernet.init == "scratch"
    run = RunDir(tmp_path_factory.mktemp("finetune") / "supernet-run")
    train_supernet(run, space, log=None)
    return run, space, load_splits(space)


@pytest.fixture
def run(trained, tmp_path):
    src, space, splits = trained
    shutil.copytree(src.path, tmp_path / "run")
    return RunDir(tmp_path / "run"), space, splits


def _state(model, modules=None) -> dict[str, torch.Tensor]:
    if modules is None:
        return {k: v.clone() for k, v in model.state_dict().items()}
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def _heads(model) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in h.state_dict().items()} for h in model.heads[:-1]]


def test_structure_id_drops_the_thresholds():
    arch = Arch.parse(ARCH)
    assert structure_id(arch) == STRUCTURE
    assert structure_id(arch.with_thresholds((0.9, 0.95))) == STRUCTURE
    assert structure_id(Arch.parse("d1.2~none~max_softmax=")) == "d1.2~none~max_softmax"


def test_mixed_starts_from_the_inherited_model_and_trains_backbone_and_heads(run):
    rd, space, splits = run
    arch = Arch.parse(ARCH)
    inherited = inherited_model(rd, space, arch, splits)
    start, heads0 = _state(inherited), _heads(inherited)
    # a learning rate of ~0: every weight stays where it started, at the inherited model's
    frozen = space.with_overrides({"retrain.optim.lr": 1e-12, "retrain.optim.weight_decay": 0.0})
    still = finetune(rd, arch, space=frozen, regime="mixed", epochs=1, splits=splits, log=None)
    params = {k for k, _ in still.model.named_parameters()}
    assert params and all(torch.allclose(still.model.state_dict()[k], start[k], atol=1e-6)
                          for k in params)
    # ...which would fail had the heads been re-initialised as retrain's mixed regime does
    fresh = build_model(space, arch, seed=space.retrain.seed + 1)
    for i, head in enumerate(fresh.heads[:-1]):
        assert any(not torch.allclose(p, heads0[i][k], atol=1e-6)
                   for k, p in head.named_parameters()), i

    result = finetune(rd, arch, space=space, regime="mixed", epochs=2, splits=splits, log=None,
                      restart=True)
    assert result.resumed_from == 0
    after = result.model.state_dict()
    changed = [k for k in params if not torch.equal(after[k], start[k])]
    assert any(k.startswith("segments.") for k in changed)
    assert any(k.startswith(f"heads.{len(arch.exits)}.") for k in changed)  # the final head
    for i, h in enumerate(_heads(result.model)):
        assert any(not torch.equal(h[k], heads0[i][k]) for k in h), f"head {i} did not train"
    rows = read_metrics(result.out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and {r["phase"] for r in rows} == {"2"}
    assert result.out == finetune_dir(rd, arch, "mixed") == rd.path / "finetune" / STRUCTURE / "mixed"


def test_disjoint_trains_the_heads_and_leaves_the_backbone_bit_identical(run):
    rd, space, splits = run
    arch = Arch.parse(ARCH)
    inherited = inherited_model(rd, space, arch, splits)
    backbone, heads0 = _state(inherited, backbone_modules(inherited)), _heads(inherited)
    result = finetune(rd, arch, space=space, regime="disjoint", epochs=2, splits=splits,
                      log=None)
    after = _state(result.model, backbone_modules(result.model))
    assert after.keys() == backbone.keys()
    assert any(k.endswith("running_mean") for k in after)
    assert any(k.endswith("num_batches_tracked") for k in after)
    for k in backbone:
        assert torch.equal(after[k], backbone[k]), k
    for i, h in enumerate(_heads(result.model)):
        assert any(not torch.equal(h[k], heads0[i][k]) for k in h), f"head {i} did not train"
    conv = _heads(result.model)[0]  # its BatchNorm learned too (train mode, heads only)
    assert not torch.equal(conv["bn.running_mean"], heads0[0]["bn.running_mean"])
    assert {r["phase"] for r in read_metrics(result.out / "metrics.csv")} == {"3"}


def _predict(model, arch, space, splits):
    """Per-sample early exit on val with ``model.predict``: (accuracy, expected MACs)."""
    costs = np.asarray(cost_table(space).exit_costs(arch))
    hits = total = n = 0
    model.eval()
    for x, y in batches(splits.val, batch_size=space.data.eval_batch_size, mean=splits.mean,
                        std=splits.std):
        p = model.predict(x, arch.thresholds, arch.policy)
        hits += int((p.pred == y).sum())
        total += int(costs[p.exit.numpy()].sum())
        n += len(y)
    return hits / n, total / n


def test_fitted_thresholds_score_what_arch_json_says_at_the_inherited_cost(run):
    rd, space, splits = run
    arch = Arch.parse(ARCH)
    result = finetune(rd, arch, space=space, regime="mixed", epochs=2, splits=splits, log=None)
    manifest = json.loads((result.out / "arch.json").read_text())
    fitted = Arch.parse(str(result.out / "arch.json"))
    assert fitted == result.arch and structure_id(fitted) == STRUCTURE
    assert manifest["val"]["fitted"] is True and manifest["val"]["feasible"] is True
    # the budget is the inherited model's expected MACs on val with the arch's own thresholds
    inh_acc, inh_macs = _predict(inherited_model(rd, space, arch, splits), arch, space, splits)
    assert manifest["inherited"] == {"arch": arch.id, "accuracy": inh_acc,
                                     "expected_macs": inh_macs}
    assert manifest["budget_macs"] == inh_macs
    # the model on disk, run with early exits at the fitted thresholds, scores what it says
    model = build_model(space, fitted)
    model.load_state_dict(load_weights(result.out / "model.safetensors"))
    acc, macs = _predict(model, fitted, space, splits)
    assert (acc, macs) == (manifest["val"]["accuracy"], manifest["val"]["expected_macs"])
    assert macs <= inh_macs
    # and the fit beats (or ties) the fine-tuned model with the arch's old thresholds there
    old_acc, old_macs = _predict(model, arch, space, splits)
    if old_macs <= inh_macs:
        assert acc >= old_acc


def test_the_fine_tuned_model_exports_and_its_runtime_scores_the_same(run, tmp_path):
    from exitnas.runtime import load

    rd, space, splits = run
    result = finetune(rd, Arch.parse(ARCH), space=space, regime="disjoint", epochs=2,
                      splits=splits, log=None)
    out = tmp_path / "export"
    r = run_cli("export", rd.path, "--arch", result.out / "arch.json", "--weights",
                result.out / "model.safetensors", "--out", out, "--no-onnx")
    assert r.returncode == 0, r.stderr
    exported = json.loads((out / "arch.json").read_text())
    assert exported["arch"]["id"] == result.arch.id
    predictor = load(out)
    x = predictor.preprocess(splits.val.images.numpy())
    got = predictor.predict(x)
    acc = float((got.pred == splits.val.labels.numpy()).mean())
    val = result.manifest["val"]
    assert acc == pytest.approx(val["accuracy"], abs=1e-12)
    assert float(got.cost.mean()) == pytest.approx(val["expected_macs"], rel=1e-12)


def test_finished_run_writes_nothing_and_other_thresholds_refit_only_arch_json(run):
    rd, space, splits = run
    arch = Arch.parse(ARCH)
    finetune(rd, arch, space=space, regime="mixed", epochs=2, splits=splits, log=None)
    out = finetune_dir(rd, arch, "mixed")
    before = tree_digest(out)
    again = finetune(rd, arch, space=space, regime="mixed", epochs=2, splits=splits, log=None)
    assert again.resumed_from == 2 and tree_digest(out) == before
    cheaper = arch.with_thresholds((0.3, 0.3))  # same structure, a lower cost target
    refit = finetune(rd, cheaper, space=space, regime="mixed", epochs=2, splits=splits,
                     log=None)
    after = tree_digest(out)
    assert {k for k in after if after[k] != before.get(k)} == {"arch.json"}
    assert refit.manifest["inherited"]["arch"] == cheaper.id
    assert refit.manifest["budget_macs"] < again.manifest["budget_macs"]
    with pytest.raises(CheckpointError, match="finetune.epochs=2, this run has finetune.epochs=3"):
        finetune(rd, arch, space=space, regime="mixed", epochs=3, splits=splits, log=None)
    weights = rd.path / "supernet" / "weights.safetensors"  # a retrained supernet
    state = load_weights(weights)
    state["stem.0.weight"] = state["stem.0.weight"] + 1e-3
    save_weights(weights, state)
    with pytest.raises(CheckpointError, match="made with supernet_sha256="):
        finetune(rd, arch, space=space, regime="mixed", epochs=2, splits=splits, log=None)


def test_bad_inputs_are_one_clear_error_and_change_nothing(run, tmp_path):
    rd, space, splits = run
    arch = Arch.parse(ARCH)
    before = tree_digest(rd.path)
    with pytest.raises(ConfigError, match="--regime: regime 'joint' does not fine-tune"):
        finetune(rd, arch, space=space, regime="joint", epochs=2, splits=splits, log=None)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        finetune(rd, arch, space=space, regime="mixed", epochs=2, resume=True, splits=splits,
                 log=None)
    empty = RunDir(tmp_path / "empty")
    empty.init(space)
    with pytest.raises(RunDirError, match="supernet/weights.safetensors: not found"):
        finetune(empty, arch, space=space, regime="mixed", epochs=2, splits=splits, log=None)
    assert tree_digest(rd.path) == before
    for args, message in [(["--regime", "joint"], "invalid choice: 'joint'"),
                          (["--regime", "mixed", "--epochs", "0"], "--epochs: 0 is not in"),
                          (["--arch", "d9.9~none~max_softmax=", "--regime", "mixed"],
                           "depth 9 of stage 0")]:
        cmd = ["finetune", rd.path, "--arch", ARCH, "--epochs", "2", *args]
        r = run_cli(*cmd)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
    assert tree_digest(rd.path) == before


def test_checkpoint_of_another_regime_or_structure_is_refused_with_one_line(run):
    rd, space, splits = run
    assert space.retrain.epochs == 2
    r = run_cli("finetune", rd.path, "--arch", ARCH)  # mixed, retrain.epochs: the defaults
    assert r.returncode == 0, r.stderr
    assert "fine-tuned (mixed, 2 epochs)" in r.stdout and "next: exitnas export" in r.stdout
    src = rd.path / "finetune" / STRUCTURE / "mixed" / "checkpoint.pt"
    other = "d2.2~s0b0=linear~max_softmax=0.8"
    cases = [(ARCH, "disjoint", f"{STRUCTURE}/disjoint", "regime 'mixed', not 'disjoint'"),
             (other, "mixed", "d2.2~s0b0=linear~max_softmax/mixed",
              f"arch '{STRUCTURE}', not 'd2.2~s0b0=linear~max_softmax'")]
    for arch, regime, rel, message in cases:
        dst = rd.path / "finetune" / rel
        dst.mkdir(parents=True)
        shutil.copy(src, dst / "checkpoint.pt")
        before = tree_digest(rd.path)
        r = run_cli("finetune", rd.path, "--arch", arch, "--regime", regime, "--epochs", "2")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "refusing to resume" in lines[0] and message in lines[0], lines[0]
        assert tree_digest(rd.path) == before


def test_kill_9_mid_epoch_then_rerun_gives_identical_weights(trained, tmp_path):
    src, _, _ = trained
    for name in ("a", "b"):
        shutil.copytree(src.path, tmp_path / name)
    cmd = ["finetune", "{RUN}", "--arch", ARCH, "--regime", "mixed", "--epochs", "4",
           "--set", "data.synthetic_size=2048"]
    a, b, killed_at = kill_and_resume(cmd, f"finetune/{STRUCTURE}/mixed", tmp_path,
                                      {"OMP_NUM_THREADS": "1"})
    assert killed_at in range(1, 4)
    assert _weights_equal(a / "model.safetensors", b / "model.safetensors")
    assert json.loads((a / "arch.json").read_text()) == json.loads((b / "arch.json").read_text())


def test_a_policy_without_fitted_thresholds_keeps_its_parameter(run):
    rd, space, splits = run
    arch = Arch.parse("d2.2~s0b1=conv,s1b0=linear~patience=2")
    result = finetune(rd, arch, space=space, regime="disjoint", epochs=1, splits=splits,
                      log=None)
    assert result.arch == arch and result.manifest["val"]["fitted"] is False
    model = build_model(space, arch)
    model.load_state_dict(load_weights(result.out / "model.safetensors"))
    acc, macs = _predict(model, arch, space, splits)
    assert (acc, macs) == (result.manifest["val"]["accuracy"],
                           result.manifest["val"]["expected_macs"])
    assert result.out == rd.path / "finetune" / "d2.2~s0b1=conv,s1b0=linear~patience" / "disjoint"
