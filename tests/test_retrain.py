"""Retraining regimes: phase plans, the frozen backbone of phase 3, the re-initialised heads of
the mixed regime, checkpoints that belong to another arch / regime / space, and the CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from conftest import run_cli, tree_digest
from exitnas.arch import Arch
from exitnas.errors import CheckpointError, ConfigError, RunDirError
from exitnas.io import load_weights, save_weights
from exitnas.retrain import (REGIMES, backbone_modules, load_retrained, phase_plan, retrain,
                             retrain_dir)
from exitnas.rundir import RunDir
from exitnas.supernet import Supernet, build_model, calibration_batches
from exitnas.train import read_metrics

ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.9,0.9"  # the conv head has BatchNorm


@pytest.fixture
def run(tiny_run_dir):
    return tiny_run_dir  # conftest: an initialised tiny run directory; tiny_splits too


def _space(rd, **overrides):
    return rd.space({f"retrain.{k}": v for k, v in overrides.items()})


def _backbone_state(model):
    return {f"{i}.{k}": v.clone() for i, m in enumerate(backbone_modules(model))
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("epochs,fraction", [(2, 0.5), (3, 0.5), (10, 0.3), (7, 0.9), (5, 0.01)])
def test_every_regime_gets_the_same_total_epochs(epochs, fraction):
    plans = {r: phase_plan(r, epochs, fraction) for r in REGIMES}
    assert {len(p) for p in plans.values()} == {epochs}
    assert plans["joint"] == [2] * epochs
    p1 = plans["disjoint"].count(1)
    assert p1 in range(1, epochs)
    assert plans["disjoint"] == [1] * p1 + [3] * (epochs - p1)
    assert plans["mixed"] == [1] * p1 + [2] * (epochs - p1)


def test_two_phase_regimes_need_two_epochs():
    with pytest.raises(ConfigError, match="retrain.epochs"):
        phase_plan("disjoint", 1, 0.5)
    assert phase_plan("joint", 1, 0.5) == [2]


def test_disjoint_phase3_leaves_the_backbone_bit_for_bit_unchanged(run, tiny_splits):
    space = _space(run, epochs=4)
    seen, bn_modes = {}, []

    def on_phase(phase, epoch, model):
        seen[phase] = (_backbone_state(model), {k: v.clone() for k, v in
                                                model.heads[0].state_dict().items()})
        if phase == 3:
            backbone = [*model.segments.parameters(), *model.heads[-1].parameters()]
            assert backbone and all(not p.requires_grad for p in backbone)
            assert all(p.requires_grad for p in model.heads[:-1].parameters())
            for m in backbone_modules(model):
                for bn in m.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.register_forward_hook(lambda mod, i, o: bn_modes.append(mod.training))

    result = retrain(run, Arch.parse(ARCH), space=space, regime="disjoint", splits=tiny_splits,
                     log=None, on_phase_start=on_phase)
    assert sorted(seen) == [1, 3]
    before, heads_before = seen[3]
    after = _backbone_state(result.model)
    assert before.keys() == after.keys()
    assert any("running_mean" in k for k in after) and any("num_batches_tracked" in k for k in after)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert bn_modes and not any(bn_modes)  # backbone BN ran in eval mode throughout phase 3
    # ...while the heads did train (the conv head's BN statistics included)
    head_after = result.model.heads[0].state_dict()
    assert any(not torch.equal(heads_before[k], head_after[k]) for k in head_after)
    assert not torch.equal(heads_before["bn.running_mean"], head_after["bn.running_mean"])
    assert [int(r["phase"]) for r in read_metrics(result.out / "metrics.csv")] == [1, 1, 3, 3]


def test_mixed_reinitialises_the_heads_at_phase2(run, tiny_splits, tmp_path):
    """Heads come from the supernet (init_from_supernet) so phase 1 ends with trained heads;
    phase 2 must start from a fresh head initialisation instead."""
    from exitnas.train import train_supernet

    train_supernet(run, run.space({"supernet.epochs": 1}), splits=tiny_splits, log=None)
    space = _space(run, epochs=2, init_from_supernet=True)
    arch = Arch.parse(ARCH)
    seen = {}

    def on_phase(phase, epoch, model):
        seen[phase] = {k: v.clone() for k, v in model.state_dict().items()}

    retrain(run, arch, space=space, regime="mixed", splits=tiny_splits, log=None,
            on_phase_start=on_phase)
    supernet = Supernet(space).load(run.path / "supernet" / "weights.safetensors").extract(
        arch, calib=calibration_batches(space, tiny_splits))  # the model the search scored
    fresh = build_model(space, arch, seed=space.retrain.seed + 1)
    heads = [k for k in seen[2] if k.startswith("heads.") and not k.startswith("heads.2.")]
    assert heads
    for k in heads:
        assert torch.equal(seen[1][k], supernet.state_dict()[k]), k  # phase 1 starts from it
        assert torch.equal(seen[2][k], fresh.state_dict()[k]), k  # phase 2: fresh heads
    assert any(not torch.equal(seen[1][k], seen[2][k]) for k in heads)
    # the backbone trained in phase 1 is carried into phase 2, not re-initialised
    assert any(not torch.equal(seen[1][k], seen[2][k]) for k in seen[2] if k.startswith("segments."))


def test_regimes_write_outputs_with_equal_epochs(run, tiny_splits):
    space = _space(run, epochs=3)
    arch = Arch.parse(ARCH)
    phases = {}
    for regime in REGIMES:
        result = retrain(run, arch, space=space, regime=regime, splits=tiny_splits, log=None)
        out = retrain_dir(run, arch, regime)
        assert result.out == out
        for name in ("model.safetensors", "checkpoint.pt", "metrics.csv", "arch.json"):
            assert (out / name).is_file(), name
        rows = read_metrics(out / "metrics.csv")
        phases[regime] = [int(r["phase"]) for r in rows]
        meta = json.loads((out / "arch.json").read_text())
        assert meta["epochs"] == 3 and meta["regime"] == regime
        assert Arch.parse(str(out / "arch.json")) == arch
        model = load_retrained(run, arch, regime, space)
        for k, v in model.state_dict().items():
            assert torch.equal(v, result.model.state_dict()[k])
    assert phases == {"joint": [2, 2, 2], "disjoint": [1, 1, 3], "mixed": [1, 1, 2]}


def test_finished_run_is_not_retrained_and_other_settings_are_refused(run, tiny_splits):
    space = _space(run, epochs=2)
    arch = Arch.parse(ARCH)
    retrain(run, arch, space=space, regime="joint", splits=tiny_splits, log=None)
    out = retrain_dir(run, arch, "joint")
    before = tree_digest(out)
    again = retrain(run, arch, space=space, regime="joint", splits=tiny_splits, log=None)
    assert again.resumed_from == 2
    assert tree_digest(out) == before
    with pytest.raises(CheckpointError, match=r"made with retrain.loss='mean_ce', this run has "
                                              r"retrain.loss='sdn'"):
        retrain(run, arch, space=_space(run, epochs=2, loss="sdn"), regime="joint",
                splits=tiny_splits, log=None)
    assert tree_digest(out) == before
    restarted = retrain(run, arch, space=_space(run, epochs=2, loss="sdn"), regime="joint",
                        splits=tiny_splits, log=None, restart=True)
    assert restarted.resumed_from == 0


def test_checkpoint_of_another_arch_regime_or_space_is_refused(run, tiny_splits, tmp_path):
    space = _space(run, epochs=2)
    arch = Arch.parse(ARCH)
    retrain(run, arch, space=space, regime="joint", splits=tiny_splits, log=None)
    src = retrain_dir(run, arch, "joint") / "checkpoint.pt"
    other = Arch.parse("d2.2~s0b0=linear~max_softmax=0.8")
    cases = [(arch, "mixed", "regime 'joint', not 'mixed'"),
             (other, "joint", f"arch '{arch.id}', not '{other.id}'")]
    for target_arch, regime, message in cases:
        dst = retrain_dir(run, target_arch, regime)
        dst.mkdir(parents=True)
        shutil.copy(src, dst / "checkpoint.pt")
        with pytest.raises(CheckpointError, match=message):
            retrain(run, target_arch, space=space, regime=regime, splits=tiny_splits, log=None)
    # a run directory of another space holding this checkpoint
    other_space = space.with_overrides({"backbone.stem_channels": 4})
    rd = RunDir(tmp_path / "other")
    rd.init(other_space)
    dst = retrain_dir(rd, arch, "joint")
    dst.mkdir(parents=True)
    shutil.copy(src, dst / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="fingerprint"):
        retrain(rd, arch, space=other_space, regime="joint", splits=tiny_splits, log=None)


def test_init_from_supernet_needs_its_weights(run, tiny_splits):
    with pytest.raises(RunDirError, match="supernet/weights.safetensors: not found"):
        retrain(run, Arch.parse(ARCH), space=_space(run, init_from_supernet=True),
                regime="joint", splits=tiny_splits, log=None)


def test_cli_retrain_and_its_errors(run):
    r = run_cli("retrain", run.path, "--arch", ARCH, "--regime", "mixed", "--epochs", "2",
                "--loss", "sdn")
    assert r.returncode == 0, r.stderr
    out = retrain_dir(run, Arch.parse(ARCH), "mixed")
    assert str(out) in r.stdout and "next:" in r.stdout
    assert json.loads((out / "arch.json").read_text())["loss"] == "sdn"
    arch_file = out / "arch.json"
    before = tree_digest(run.path)
    bad = [
        (["--arch", ARCH, "--regime", "joint", "--loss", "focal"], "--loss: unknown loss 'focal' (known: boost, distill"),
        (["--arch", ARCH, "--regime", "disjoint", "--epochs", "1"], "retrain.epochs"),
        (["--arch", ARCH, "--regime", "mixed", "--epochs", "2", "--loss", "pabee"],
         "retrain.loss='sdn', this run has retrain.loss='pabee'"),
    ]
    for args, message in bad:
        r = run_cli("retrain", run.path, *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert tree_digest(run.path) == before
    # the arch.json written by retrain is accepted as --arch; the finished run is not redone
    r = run_cli("retrain", run.path, "--arch", arch_file, "--regime", "mixed", "--epochs", "2",
                "--loss", "sdn")
    assert r.returncode == 0 and "already retrained" in r.stdout, r.stderr
    assert tree_digest(run.path) == before


def test_bad_retrain_inputs_change_nothing(run, tiny_splits):
    from exitnas.errors import ArchError

    before = tree_digest(run.path)
    with pytest.raises(ArchError, match="depth 9 of stage 0"):
        retrain(run, Arch.parse("d9.9~none~max_softmax="), space=_space(run), regime="joint",
                splits=tiny_splits, log=None)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        retrain(run, Arch.parse(ARCH), space=_space(run), regime="joint", resume=True,
                splits=tiny_splits, log=None)
    with pytest.raises(ConfigError, match="phase1_fraction"):
        _space(run, phase1_fraction=2)
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir(run.path.parent / "missing").space()
    assert tree_digest(run.path) == before


def test_cli_from_scratch_needs_no_supernet_even_when_the_config_inherits(tmp_path, tiny_space):
    rd = RunDir(tmp_path / "run")
    rd.init(tiny_space.with_overrides({"retrain.init_from_supernet": True}))
    args = ["retrain", rd.path, "--arch", ARCH, "--regime", "joint", "--epochs", "1"]
    r = run_cli(*args)  # the config inherits, and there is no supernet
    assert r.returncode == 2 and "supernet/weights.safetensors: not found" in r.stderr, r.stderr
    r = run_cli(*args, "--from-scratch", "--set", "retrain.init_from_supernet=true")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--from-scratch: contradicts" in lines[0]
    r = run_cli(*args, "--from-scratch", "--set", "retrain.phase1=backbone")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--from-scratch: contradicts" in lines[0]
    r = run_cli(*args, "--from-scratch")
    assert r.returncode == 0, r.stderr
    meta = json.loads((retrain_dir(rd, Arch.parse(ARCH), "joint") / "arch.json").read_text())
    assert meta["init_from_supernet"] is False and meta["phase1"] == "train"


def test_phase1_backbone_reuses_stage0_and_trains_only_the_later_phase(run, tiny_splits):
    """``retrain.phase1: backbone`` (SDN's IC-only recipe with disjoint): the model starts from
    stage 0's backbone, every epoch is phase 3, the backbone stays bit-identical to the stage-0
    file, the fresh heads learn; mixed trains the backbone from there; joint is refused."""
    from exitnas.backbone import load_backbone, train_backbone

    space = run.space({"backbone_training.epochs": 2, "retrain.epochs": 2,
                       "retrain.phase1": "backbone"})
    with pytest.raises(RunDirError, match="no trained backbone"):
        retrain(run, Arch.parse(ARCH), space=space, regime="disjoint", splits=tiny_splits, log=None)
    stage0 = train_backbone(run, space, splits=tiny_splits, log=None)
    ref = load_backbone(Supernet(space), stage0.weights).extract(Arch.parse(ARCH))
    want = _backbone_state(ref)
    result = retrain(run, Arch.parse(ARCH), space=space, regime="disjoint", splits=tiny_splits,
                     log=None)
    assert [int(r["phase"]) for r in read_metrics(result.out / "metrics.csv")] == [3, 3]
    got = _backbone_state(result.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fresh = build_model(space, Arch.parse(ARCH), seed=0).heads[0].state_dict()
    trained = result.model.heads[0].state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained if "weight" in k)
    meta = json.loads((result.out / "arch.json").read_text())
    assert meta["phase1"] == "backbone" and meta["phase_epochs"] == {"heads": 2}

    mixed = retrain(run, Arch.parse(ARCH), space=space, regime="mixed", splits=tiny_splits,
                    log=None)
    assert [int(r["phase"]) for r in read_metrics(mixed.out / "metrics.csv")] == [2, 2]
    moved = _backbone_state(mixed.model)
    assert any(not torch.equal(moved[k], want[k]) for k in want if k.endswith("weight"))
    with pytest.raises(ConfigError, match="retrain.phase1"):
        retrain(run, Arch.parse(ARCH), space=space, regime="joint", splits=tiny_splits, log=None)


def test_phase1_backbone_checkpoint_is_tied_to_that_backbone(run, tiny_splits, tmp_path):
    """A checkpoint made on one backbone is refused when the backbone file changes."""
    from exitnas.backbone import train_backbone

    space = run.space({"backbone_training.epochs": 1, "retrain.epochs": 2,
                       "retrain.phase1": "backbone"})
    stage0 = train_backbone(run, space, splits=tiny_splits, log=None)
    retrain(run, Arch.parse(ARCH), space=space, regime="disjoint", splits=tiny_splits, log=None)
    state = load_weights(stage0.weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] += 1.0  # another backbone in the same place
    save_weights(stage0.weights, state, {})
    with pytest.raises(CheckpointError, match="backbone_sha256"):
        retrain(run, Arch.parse(ARCH), space=space, regime="disjoint", splits=tiny_splits,
                log=None)
