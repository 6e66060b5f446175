"""Stage 1: the supernet grown from a trained backbone, and the sampled exit sets of
``supernet.heads: sampled`` (their losses reach the backbone; the other heads stay detached)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from exitnas.arch import Exit, sample_exits
from exitnas.backbone import train_backbone
from exitnas.errors import CheckpointError, RunDirError
from exitnas.io import load_weights, save_weights
from exitnas.rundir import RunDir
from exitnas.supernet import Supernet
from exitnas.train import SandwichStep, train_supernet


def _stem_grad(net, fn) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    fn().backward()
    return net.stem[0].weight.grad.clone()


def test_sampled_exits_train_the_backbone_and_the_others_do_not(tiny_space):
    torch.manual_seed(0)
    net = Supernet(tiny_space)
    step = SandwichStep(net, distill=False, temperature=1.0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    full = tiny_space.max_depths
    chosen = (Exit(0, 1, "conv"), Exit(1, 0, "linear"))
    detached = _stem_grad(net, lambda: step(x, y, [], [()])[0])
    sampled = _stem_grad(net, lambda: step(x, y, [], [chosen])[0])
    # by hand: the final exit's loss plus the chosen exits' losses, with whole gradients
    final_only = _stem_grad(net, lambda: F.cross_entropy(net.forward_exits(x, full, [])[-1], y))
    by_hand = _stem_grad(net, lambda: sum(F.cross_entropy(z, y)
                                          for z in net.forward_exits(x, full, chosen)))
    assert torch.allclose(detached, final_only, atol=1e-6)
    assert torch.allclose(sampled, by_hand, atol=1e-6)
    assert not torch.allclose(sampled, detached, atol=1e-4)


def test_sampled_exit_sets_are_exit_sets_the_search_can_pick(tiny_space):
    rng = random.Random(3)
    seen = set()
    for _ in range(200):
        depths = tuple(rng.choice(st.depths) for st in tiny_space.backbone.stages)
        exits = sample_exits(tiny_space, depths, rng)
        active = set(tiny_space.positions(depths))
        assert tiny_space.exits.min_exits <= len(exits) <= tiny_space.exits.max_exits
        assert {e.position for e in exits} <= active and len({e.position for e in exits}) == len(exits)
        seen.update(e.head for e in exits)
    assert seen == set(tiny_space.exits.heads)


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
    from conftest import TEST_DATA
    from exitnas.space import load_space

    space = load_space(TEST_DATA / "tiny.yaml").with_overrides(
        {"backbone_training.epochs": 1, "supernet.init": "backbone", "supernet.epochs": 1})
    run = RunDir(tmp_path_factory.mktemp("grow") / "run")
    train_backbone(run, space, log=None)
    return run, space


def test_supernet_starts_from_the_trained_backbone(backbone_run, tmp_path):
    run, space = backbone_run
    bb = load_weights(run.path / "backbone" / "weights.safetensors")
    # a learning rate of ~0 keeps the weights where they started: at the backbone's
    space = space.with_overrides({"supernet.optim.lr": 1e-12, "supernet.optim.weight_decay": 0.0})
    other = RunDir(tmp_path / "grown")
    space = space.with_overrides({"backbone.weights": str(run.path / "backbone" / "weights.safetensors")})
    result = train_supernet(other, space, log=None)
    grown = load_weights(result.weights)
    weights = [k for k in bb if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert weights and all(torch.allclose(grown[k], bb[k], atol=1e-6) for k in weights)
    fresh = Supernet(space, pretrained=False).state_dict()  # fresh weights, not backbone.weights
    assert not torch.allclose(fresh["stem.0.weight"], bb["stem.0.weight"])


def test_no_backbone_is_one_clear_error(tmp_path, tiny_space):
    space = tiny_space.with_overrides({"supernet.init": "backbone"})
    with pytest.raises(RunDirError, match="run `exitnas train-backbone` first"):
        train_supernet(RunDir(tmp_path / "run"), space, log=None)
    space = space.with_overrides({"backbone.weights": str(tmp_path / "absent.safetensors")})
    with pytest.raises(RunDirError, match="file not found"):
        train_supernet(RunDir(tmp_path / "run2"), space, log=None)


def test_a_changed_backbone_is_not_resumed_from(backbone_run, tmp_path):
    run, space = backbone_run
    path = tmp_path / "bb.safetensors"
    state = load_weights(run.path / "backbone" / "weights.safetensors")
    save_weights(path, state)
    space = space.with_overrides({"backbone.weights": str(path), "supernet.epochs": 2})
    other = RunDir(tmp_path / "grown")
    with pytest.raises(KeyboardInterrupt):  # stop after the first epoch's checkpoint
        train_supernet(other, space, log=_stop_after_epoch)
    state["stem.0.weight"] = state["stem.0.weight"] + 1
    save_weights(path, state)
    with pytest.raises(CheckpointError, match="backbone_sha256"):
        train_supernet(other, space, log=None)


def _stop_after_epoch(message: str) -> None:
    if message.startswith("supernet epoch 1/"):
        raise KeyboardInterrupt


def test_backbone_teacher_loss_is_labels_plus_distillation_from_the_frozen_backbone(backbone_run):
    """``supernet.teacher: backbone``: every pass (largest included) learns from CE + KL to
    the frozen backbone's final exit, computed by hand here; the teacher gets no gradient."""
    from exitnas.losses import soft_distill
    from exitnas.train import frozen_teacher

    run, space = backbone_run
    space = space.with_overrides({"supernet.teacher": "backbone"})
    teacher = frozen_teacher(space, run.path / "backbone" / "weights.safetensors", "cpu")
    torch.manual_seed(0)
    net = Supernet(space)
    step = SandwichStep(net, distill=True, temperature=2.0, teacher=teacher)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    full, small = space.max_depths, space.min_depths
    with torch.no_grad():
        soft = teacher.forward_exits(x, full, ())[-1]
    crit = lambda z: F.cross_entropy(z, y) + soft_distill(z, soft, 2.0)  # noqa: E731
    got, _ = step(x, y, [small])
    want = 0.0
    for d in (full, small):
        logits = net.forward_exits(x, d, net.candidate_exits(d))
        want = want + crit(logits[-1]) + 0.5 * sum(crit(z) for z in logits[:-1])
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_backbone_teacher_stays_frozen_through_training(backbone_run, tmp_path, monkeypatch):
    """A supernet epoch with the backbone teacher trains the supernet, leaves the teacher's
    weights and BN statistics as the backbone file holds them, and the setting is refused
    without a backbone to teach."""
    from exitnas.errors import ConfigError
    from exitnas.train import frozen_teacher

    run, space = backbone_run
    path = run.path / "backbone" / "weights.safetensors"
    space = space.with_overrides({"supernet.teacher": "backbone", "backbone.weights": str(path)})
    seen = []
    real = frozen_teacher

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr("exitnas.train.frozen_teacher", spy)  # a spy: the real teacher
    result = train_supernet(RunDir(tmp_path / "grown"), space, log=None)
    bb = load_weights(path)
    after = seen[0].state_dict()
    assert all(torch.equal(after[k], bb[k]) for k in bb)
    grown = load_weights(result.weights)
    assert not torch.equal(grown["stem.0.weight"], bb["stem.0.weight"])
    with pytest.raises(ConfigError, match="supernet.teacher"):
        space.with_overrides({"supernet.init": "scratch"})
