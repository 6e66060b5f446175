"""Stage 0: the full-depth backbone with its final exit: it learns, its file holds the backbone
and nothing else, it loads into a supernet exactly, bad files are refused, kill -9 resumes."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli, tree_digest
from exitnas.backbone import BACKBONE_PREFIXES, load_backbone, train_backbone
from exitnas.errors import CheckpointError
from exitnas.io import load_weights, save_weights
from exitnas.rundir import RunDir
from exitnas.supernet import Supernet
from test_train import _weights_equal, kill_and_resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import TEST_DATA
    from exitnas.space import load_space

    tiny_space = load_space(TEST_DATA / "tiny.yaml")
    space = tiny_space.with_overrides({"backbone_training.epochs": 3,
                                       "backbone_training.optim.lr": 0.05,
                                       "data.synthetic_size": 1024})
    return space, train_backbone(RunDir(tmp_path_factory.mktemp("backbone") / "run"), space,
                                 log=None)


def test_backbone_learns_and_its_file_holds_only_the_backbone(trained):
    space, result = trained
    accs = [row["val_acc"] for row in result.history]
    assert len(accs) == 3 and accs[-1] >= 0.9, accs  # 4 classes: chance is 0.25
    state = load_weights(result.weights)
    net = Supernet(space)
    want = {k for k in net.state_dict() if k.startswith(BACKBONE_PREFIXES)}
    assert set(state) == want
    assert not any(k.startswith("heads.") for k in state)


def test_loaded_backbone_gives_the_trained_networks_final_logits(trained):
    space, result = trained
    net = load_backbone(Supernet(space), result.weights).eval()
    ref = Supernet(space)
    ref.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"])
    ref.eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = net.forward_exits(x, space.max_depths, exits=())[-1]
        want = ref.forward_exits(x, space.max_depths, exits=())[-1]
    assert torch.equal(got, want)


def test_heads_are_untouched_by_loading_a_backbone(trained):
    space, result = trained
    torch.manual_seed(7)
    net = Supernet(space)
    heads = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("heads.")}
    load_backbone(net, result.weights)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in heads.items())


def test_refuses_files_that_are_not_this_spaces_backbone(trained, tmp_path):
    space, result = trained
    state = load_weights(result.weights)
    net = Supernet(space)
    cases = {
        "extra": ({**state, "heads.s0b0=linear.fc.weight": torch.zeros(4, 8)}, "unexpected tensor"),
        "missing": ({k: v for k, v in state.items() if k != "final.fc.bias"}, "missing tensor"),
        "shape": ({**state, "final.fc.bias": torch.zeros(5)}, r"has shape \[5\]"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_weights(path, bad)
        with pytest.raises(CheckpointError, match=message):
            load_backbone(net, path)
    pickle = tmp_path / "pickle.safetensors"
    torch.save(state, pickle)
    with pytest.raises(CheckpointError, match="pickle"):
        load_backbone(net, pickle)


def test_cli_trains_then_reports_it_is_done_and_refuses_another_space(tmp_path, tiny_space_file,
                                                                       quick_space):
    run = tmp_path / "run"
    args = ["train-backbone", str(tiny_space_file), "--run-dir", str(run),
            "--set", "backbone_training.epochs=1"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "backbone weights:" in r.stdout
    before = tree_digest(run)
    r = run_cli(*args)
    assert r.returncode == 0 and "already trained (1 epochs)" in r.stdout
    assert tree_digest(run) == before
    r = run_cli("train-backbone", "search_spaces/quickstart.yaml", "--run-dir", str(run))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "belongs to space 'tiny'" in r.stderr
    assert tree_digest(run) == before


def test_kill_9_mid_epoch_then_rerun_gives_identical_backbone(tmp_path, tiny_space_file):
    cmd = ["train-backbone", str(tiny_space_file), "--run-dir", "{RUN}",
           "--set", "backbone_training.epochs=4", "--set", "data.synthetic_size=2048"]
    a, b, killed_at = kill_and_resume(cmd, "backbone", tmp_path, {"OMP_NUM_THREADS": "1"})
    assert killed_at in range(1, 4)
    assert _weights_equal(a / "weights.safetensors", b / "weights.safetensors")
