"""The literature's exit losses of issue 15 (neg_correlation: DNCC, synergy: DKS, quicknets:
QuickNets): each computes its paper's formula, written out here by hand; QuickNets' exit k gets
no gradient from a sample an earlier exit got right; each trains a tiny multi-exit model; each
is a choice of the config and of `exitnas retrain --loss`."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from conftest import TEST_DATA, run_cli, tree_digest
from exitnas.arch import Arch
from exitnas.errors import ConfigError
from exitnas.losses import LOSSES, build_loss, loss_from_config
from exitnas.losses_quicknets import CommitmentLayer, cascade_masks
from exitnas.retrain import retrain_dir
from exitnas.rundir import RunDir
from exitnas.space import load_space

NEW = ("neg_correlation", "synergy", "quicknets")
ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.9,0.9"

# 3 exits x 4 samples x 3 classes. Argmax right (labels Y): exit 0 [T, F, T, F] (sample 1
# confidently wrong, sample 2 right at p = 0.36), exit 1 [T, F, T, T], exit 2 [T, F, F, T].
Z = torch.tensor([
    [[2.0, 0.5, -1.0], [0.1, 5.0, 0.2], [0.0, 0.1, 0.0], [1.2, 1.0, -2.0]],
    [[1.0, -0.5, 0.3], [0.8, -0.2, 0.1], [0.0, 2.0, -1.0], [-1.0, 0.5, 1.5]],
    [[0.5, 0.0, 0.2], [-0.3, 1.2, 0.4], [0.7, 0.1, 1.1], [0.2, -0.4, 2.5]],
])
Y = torch.tensor([0, 2, 1, 2])


def _leaves():
    return [z.clone().requires_grad_(True) for z in Z]


def _probs(z):
    e = z.exp()
    return e / e.sum(dim=1, keepdim=True)


def _ce(p, y):  # per sample, nats
    return -p[torch.arange(len(y)), y].log()


def _kl(p, q):  # KL(p || q), batch mean
    return (p * (p / q).log()).sum(dim=1).mean()


# ---- neg_correlation (DNCC) -----------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_neg_correlation_is_each_exits_ce_minus_lambda_times_its_ambiguity(lam):
    p = [_probs(z) for z in Z]
    g = torch.stack([pk.log() for pk in p]).mean(dim=0).exp()
    q = g / g.sum(dim=1, keepdim=True)  # the exits' normalised geometric mean
    want = sum(_ce(pk, Y).mean() - lam * _kl(q, pk) for pk in p) / 3
    got = build_loss("neg_correlation", weight=lam)(list(Z), Y)
    assert torch.allclose(got, want, atol=1e-6)
    if lam == 1.0:  # the split is exact: the mean exit loss is the ensemble's cross-entropy
        assert torch.allclose(got, _ce(q, Y).mean(), atol=1e-6)


def test_neg_correlation_at_lambda_one_trains_every_exit_on_the_ensembles_error():
    z = _leaves()
    build_loss("neg_correlation", weight=1.0)(z, Y).backward()
    q = torch.softmax(Z.mean(dim=0), dim=1)
    want = (q - nn.functional.one_hot(Y, 3)) / (len(Y) * len(z))
    for leaf in z:
        assert torch.allclose(leaf.grad, want, atol=1e-6)
    # and at lambda 0 each exit learns from its own error only (mean_ce)
    z = _leaves()
    build_loss("neg_correlation", weight=0.0)(z, Y).backward()
    for k, leaf in enumerate(z):
        assert torch.allclose(leaf.grad, (_probs(Z[k]) - nn.functional.one_hot(Y, 3)) / 12,
                              atol=1e-6)


# ---- synergy (DKS) --------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_synergy_is_the_ces_plus_dense_pairwise_kl_over_k(lam):
    p = [_probs(z) for z in Z]
    pairs = sum(_kl(p[m], p[n]) for m in range(3) for n in range(3) if m != n)
    want = (sum(_ce(pk, Y).mean() for pk in p) + lam * pairs) / 3
    assert torch.allclose(build_loss("synergy", weight=lam)(list(Z), Y), want, atol=1e-6)


def test_synergy_targets_are_detached_so_each_exit_learns_only_as_the_student():
    z = _leaves()
    build_loss("synergy", weight=1.0)(z, Y).backward()
    for n in range(3):
        student = Z[n].clone().requires_grad_(True)
        ps = _probs(student)
        own = _ce(ps, Y).mean() + sum(_kl(_probs(Z[m]), ps) for m in range(3) if m != n)
        (own / 3).backward()
        assert torch.allclose(z[n].grad, student.grad, atol=1e-6)


# ---- quicknets --------------------------------------------------------------------------------

S = [{0, 1, 2, 3}, {1, 3}, {1}]  # per exit: the samples every earlier exit got wrong


def test_quicknets_cascade_masks_follow_argmax_correctness_not_confidence():
    masks = cascade_masks(list(Z), Y)
    assert [set(torch.nonzero(m).flatten().tolist()) for m in masks] == S
    # sample 2 is right at exit 0 with p = 0.36 and leaves the cascade; sample 1 is wrong with
    # p = 0.98 and stays; sample 3, wrong at exit 0 and right at exit 1, leaves before exit 2
    assert _probs(Z[0])[2, 1] < 0.4 and _probs(Z[0])[1].max() > 0.95


def test_quicknets_is_the_mean_over_exits_of_the_ce_over_their_cascade_sets():
    ce = [_ce(_probs(z), Y) for z in Z]
    want = (ce[0].mean() + (ce[1][1] + ce[1][3]) / 2 + ce[2][1]) / 3
    assert torch.allclose(build_loss("quicknets")(list(Z), Y), want, atol=1e-6)


def test_quicknets_exit_k_gets_no_gradient_from_samples_an_earlier_exit_got_right():
    z = _leaves()
    build_loss("quicknets")(z, Y).backward()
    for k, leaf in enumerate(z):
        for i in range(len(Y)):
            if i in S[k]:
                assert leaf.grad[i].abs().sum() > 1e-4, (k, i)
            else:
                assert torch.equal(leaf.grad[i], torch.zeros(3)), (k, i)


def test_quicknets_exit_with_no_sample_left_contributes_zero():
    right = nn.functional.one_hot(Y, 3).float() * 10  # exit 0 gets every sample right
    z = [right.clone().requires_grad_(True), Z[1].clone().requires_grad_(True)]
    loss = build_loss("quicknets")(z, Y)
    assert torch.allclose(loss, _ce(_probs(right), Y).mean() / 2, atol=1e-6)
    loss.backward()
    assert torch.equal(z[1].grad, torch.zeros_like(z[1]))


def test_commitment_layer_learns_whether_its_exit_is_right_without_touching_the_exit():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (64,), generator=g)
    logits = torch.randn(64, 4, generator=g) * 0.3
    logits[:32] += nn.functional.one_hot(labels[:32], 4) * 4.0  # confident and right ...
    logits[32:] += nn.functional.one_hot((labels[32:] + 1) % 4, 4) * 1.0  # ... unsure, wrong
    logits.requires_grad_(True)
    torch.manual_seed(0)
    layer = CommitmentLayer(num_classes=4)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    first = layer.loss(logits, labels)
    assert first.grad_fn is not None
    for _ in range(100):
        opt.zero_grad()
        loss = layer.loss(logits, labels)
        loss.backward()
        opt.step()
    assert logits.grad is None  # the exit's logits are detached
    assert loss.item() < 0.5 * first.item()
    right = logits.detach().argmax(dim=1) == labels
    assert (layer.commits(logits) == right).float().mean() > 0.9


# ---- every new loss trains a tiny multi-exit model -----------------------------------------

class TinyExits(nn.Module):
    """Three blocks, an exit after each."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(n, 16), nn.ReLU())
                                     for n in (8, 16, 16)])
        self.heads = nn.ModuleList([nn.Linear(16, 4) for _ in range(3)])

    def forward(self, x):
        out = []
        for block, head in zip(self.blocks, self.heads):
            x = block(x)
            out.append(head(x))
        return out


@pytest.mark.parametrize("name", NEW)
def test_each_new_loss_trains_a_tiny_multi_exit_model(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(dim=1)
    torch.manual_seed(0)
    model = TinyExits()
    loss_fn = build_loss(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
        acc_before = (model(x)[0].argmax(1) == y).float().mean().item()
    for _ in range(40):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
        acc_after = (model(x)[0].argmax(1) == y).float().mean().item()
    assert after < 0.6 * before, (before, after)
    assert acc_after > acc_before + 0.2, (acc_before, acc_after)


# ---- config and CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_each_new_loss_is_a_retrain_loss_of_the_yaml_and_of_set(tmp_path, name):
    data = yaml.safe_load((TEST_DATA / "tiny.yaml").read_text())
    data["retrain"]["loss"] = name
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    assert space.retrain.loss == name
    assert type(loss_from_config(space.retrain)) is LOSSES.get(name)
    assert load_space(TEST_DATA / "tiny.yaml", {"retrain.loss": name}).retrain.loss == name


def test_an_unknown_loss_is_still_refused_naming_the_new_ones(tmp_path):
    data = yaml.safe_load((TEST_DATA / "tiny.yaml").read_text())
    data["retrain"]["loss"] = "dkss"
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert "retrain.loss" in str(err.value) and "'dkss'" in str(err.value)
    for name in NEW:
        assert name in str(err.value)


def test_cli_retrain_accepts_each_new_loss_and_refuses_an_unknown_one(tmp_path, tiny_space):
    runs = {name: RunDir(tmp_path / name) for name in NEW}
    for rd in runs.values():
        rd.init(tiny_space)
    rd = runs["quicknets"]
    before = tree_digest(rd.path)
    r = run_cli("retrain", rd.path, "--arch", ARCH, "--regime", "joint", "--set",
                "retrain.loss=quicknet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "retrain.loss" in lines[0] and "'quicknet'" in lines[0], r.stderr
    assert all(name in lines[0] for name in NEW) and "Traceback" not in r.stderr
    assert tree_digest(rd.path) == before
    for name, rd in runs.items():
        r = run_cli("retrain", rd.path, "--arch", ARCH, "--regime", "joint", "--epochs", "1",
                    "--loss", name)
        assert r.returncode == 0, r.stderr
        out = retrain_dir(rd, Arch.parse(ARCH), "joint")
        assert json.loads((out / "arch.json").read_text())["loss"] == name
