"""Two training options of issue 15. l2w (L2W-DEN): positive sample weights averaging 1, the
meta step's exit assignment, a meta step that lowers the held-out meta loss without touching the
model, an end-to-end retrain that resumes exactly. label_free (online layer caching): heads
learn only the KL to the final exit (labels ignored), the unlabelled folder is read by
allowlist, a disjoint retrain trains on it with the backbone untouched, and wrong combinations
are refused in one line (API and CLI)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tree_digest
from exitnas.arch import Arch
from exitnas.data import batches
from exitnas.errors import ConfigError, DataError
from exitnas.finetune import finetune
from exitnas.io import load_checkpoint
from exitnas.losses_label_free import LabelFree, read_unlabelled
from exitnas.losses import build_loss
from exitnas.losses_l2w import L2W, exit_assignment, target_shares
from exitnas.loop import Epoch
from exitnas.retrain import (PhaseForward, backbone_modules, retrain, retrain_dir, set_phase,
                             train_mode)
from exitnas.rundir import RunDir
from exitnas.space import OptimConfig
from exitnas.supernet import build_model

ARCH = "d2.2~s0b1=conv,s1b0=linear~max_softmax=0.9,0.9"  # the conv head has BatchNorm


@pytest.fixture
def run(tiny_run_dir):
    return tiny_run_dir  # conftest: an initialised tiny run directory; tiny_splits too


@pytest.fixture(scope="module")
def batch(tiny_splits):
    return next(iter(batches(tiny_splits.train, batch_size=64, mean=tiny_splits.mean,
                             std=tiny_splits.std)))


def _model(space, phase):
    model = build_model(space, Arch.parse(ARCH), seed=0)
    set_phase(model, phase)
    train_mode(model, phase)
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- l2w ----------------------------------------------------------------------------------

def test_l2w_weights_are_positive_and_average_exactly_one():
    loss = L2W()
    g = torch.Generator().manual_seed(0)
    for ce in (torch.rand(64, 3, generator=g) * 3,
               torch.cat([torch.zeros(8, 3), torch.full((8, 3), 1e4)])):  # tanh saturated
        w = loss.weights(ce)
        v = loss.net(ce)
        assert torch.allclose(w, 1 + L2W.EPSILON * (v - v.mean()))  # the paper's "mat" form
        assert abs(w.mean().item() - 1.0) < 1e-6
        assert w.min() > 1 - 2 * L2W.EPSILON > 0 and w.max() < 1 + 2 * L2W.EPSILON
        assert w.std() > 1e-3  # not all ones: the net does weight the samples


def test_l2w_training_loss_is_the_weighted_mean_with_the_weights_held_fixed():
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(16, 4, generator=g).requires_grad_(True) for _ in range(3)]
    y = torch.randint(0, 4, (16,), generator=g)
    loss = L2W()
    value = loss(z, y)
    ce = torch.stack([torch.nn.functional.cross_entropy(t, y, reduction="none") for t in z], 1)
    w = loss.weights(ce).detach()
    assert torch.allclose(value, (w * ce).mean())
    value.backward()
    for k, t in enumerate(z):  # d/dz of w_ik CE_ik / (B K): the weights get no gradient path
        p = torch.softmax(t.detach(), 1) - torch.nn.functional.one_hot(y, 4)
        assert torch.allclose(t.grad, w[:, k:k + 1] * p / (16 * 3), atol=1e-7)


def test_with_one_exit_l2w_weights_its_samples_and_label_free_has_nothing_to_teach():
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(16, 4, generator=g).requires_grad_(True) for _ in range(2)]
    y = torch.randint(0, 4, (16,), generator=g)
    loss = L2W()
    ce = torch.nn.functional.cross_entropy(z[0], y, reduction="none")[:, None]
    assert torch.allclose(loss(z[:1], y), (loss.weights(ce) * ce).mean())
    free = build_loss("label_free")
    assert free(z[:1], y).item() == 0.0
    free(z, y).backward()  # the final exit is the teacher: no gradient reaches it
    assert z[1].grad is None and z[0].grad.abs().sum() > 0


def test_meta_loss_assigns_exits_by_confidence_with_the_target_shares():
    q = target_shares(3, 0.75)
    p = torch.tensor([0.75, 0.75 ** 2, 0.75 ** 3], dtype=torch.float64)
    assert torch.allclose(q, p / p.sum(), atol=0, rtol=1e-12)
    n = 10  # floor(10 q) = 4, 3, and the final exit the remaining 3
    conf0 = torch.tensor([9., 1, 8, 2, 7, 3, 6, 4, 5, 0])  # exit 0 likes 0, 2, 4, 6
    conf1 = torch.tensor([0., 9, 9, 8, 9, 1, 9, 7, 6, 5])  # exit 1 then: 1, 3, 7
    logits = [torch.stack([c, torch.zeros(n)], 1) for c in (conf0, conf1)] + [torch.zeros(n, 2)]
    take = exit_assignment(logits, q)
    assert [sorted(t.tolist()) for t in take] == [[0, 2, 4, 6], [1, 3, 7], [5, 8, 9]]


def test_meta_step_lowers_the_held_out_meta_loss_and_leaves_the_model_untouched(tiny_space,
                                                                                  batch):
    model = _model(tiny_space, 2)
    module = PhaseForward(model, 2)
    x, y = batch
    train, held_out = (x[:32], y[:32]), (x[32:], y[32:])
    loss = L2W()
    before_state = _state(model)
    kw = {"lr": 0.05, "weight_decay": 5e-4}
    before = loss.meta_loss(module, train, held_out, **kw)
    grads = torch.autograd.grad(before, list(loss.net.parameters()))
    phi = [p.detach().clone() for p in loss.net.parameters()]
    probe = torch.rand(8, 3) * 2
    out_before = loss.net(probe).detach()
    loss.meta_update(module, train, held_out, **kw)
    after = loss.meta_loss(module, train, held_out, **kw)
    assert after.item() < before.item() - 1e-5, (before.item(), after.item())
    step = [p.detach() - p0 for p, p0 in zip(loss.net.parameters(), phi)]
    assert sum((s * g).sum() for s, g in zip(step, grads)) < 0  # a descent direction
    assert not torch.allclose(loss.net(probe), out_before)
    # the virtual step touched neither the parameters nor the BatchNorm statistics
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert any("running_mean" in k for k in before_state)
    assert all(p.grad is None for p in model.parameters())


def test_before_step_trains_on_the_first_half_and_holds_out_the_second(tiny_space, batch):
    model = _model(tiny_space, 2)
    x, y = batch
    loss = L2W()
    seen = []
    loss.meta_update = lambda module, train, held_out, **kw: (
        seen.append((train, held_out)) or torch.tensor(0.0))
    ctx = Epoch(0, 1, None)
    xt, yt = loss.before_step(PhaseForward(model, 2), x, y, epoch=ctx, optim=OptimConfig())
    assert torch.equal(xt, x[:32]) and torch.equal(yt, y[:32])
    (tr, ho), = seen
    assert torch.equal(tr[0], x[:32]) and torch.equal(ho[0], x[32:]) and torch.equal(ho[1], y[32:])
    assert "l2w_meta_loss" in ctx.records


def test_l2w_retrains_end_to_end_and_a_resumed_run_matches_an_uninterrupted_one(run,
                                                                               tiny_splits,
                                                                               tmp_path):
    space = run.space({"retrain.loss": "l2w", "retrain.epochs": 2})
    arch = Arch.parse(ARCH)
    full = retrain(run, arch, space=space, regime="joint", splits=tiny_splits, log=None)
    assert json.loads((full.out / "arch.json").read_text())["loss"] == "l2w"
    assert all(r["l2w_meta_loss"] > 0 for r in full.history)
    saved = load_checkpoint(full.out / "checkpoint.pt")["phase_state"]
    assert saved["steps"] > 0 and saved["exits"] == 3

    other = RunDir(tmp_path / "other")
    other.init(space)

    class Killed(Exception):
        pass

    def die_after_epoch_1(text):
        if "epoch 1/2" in text and ": loss" in text:
            raise Killed  # after epoch 1's checkpoint is written

    with pytest.raises(Killed):
        retrain(other, arch, space=space, regime="joint", splits=tiny_splits,
                log=die_after_epoch_1)
    resumed = retrain(other, arch, space=space, regime="joint", splits=tiny_splits, log=None,
                      resume=True)
    assert resumed.resumed_from == 1
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = load_checkpoint(retrain_dir(other, arch, "joint") / "checkpoint.pt")["phase_state"]
    assert again["steps"] == saved["steps"]
    for k, v in saved["net"].items():  # the weight net resumed too, not re-initialised
        assert torch.equal(v, again["net"][k]), k


# ---- label_free ---------------------------------------------------------------------------

def _plant_folder(path, n=6, size=12, seed=0):
    """n real JPEG / PNG files written by PIL: some at the top, some in a class subfolder, a
    hidden file that is skipped. Returns the expected decoded images in reading order."""
    rng = np.random.default_rng(seed)
    (path / "cats").mkdir(parents=True)
    names = [f"a{i}.jpg" for i in range(n // 2)] + [f"cats/b{i}.png" for i in range(n - n // 2)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path / name)
    (path / ".DS_Store").write_bytes(b"\0junk")
    want = []
    for name in names:  # already in reading order: a*.jpg sort before cats/
        with Image.open(path / name) as im:
            arr = np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR))
        want.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(want)


def test_the_unlabelled_folder_is_read_like_imagefolder_and_refuses_what_is_no_image(tmp_path):
    want = _plant_folder(tmp_path / "u")
    got = read_unlabelled(tmp_path / "u", channels=3, size=8)
    assert got.dtype == torch.uint8 and got.shape == (6, 3, 8, 8)
    assert torch.equal(got, want)  # a0..a2 then cats/b0..b2, resized like imagefolder
    assert read_unlabelled(tmp_path / "u", channels=1, size=8).shape == (6, 1, 8, 8)
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        read_unlabelled(tmp_path / "u", channels=3, size=8)
    assert "notes.txt" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_unlabelled(tmp_path / "empty", channels=3, size=8)


def test_label_free_heads_learn_only_the_kl_to_the_final_exit(tiny_space, batch):
    x, y = batch
    model = _model(tiny_space, 3)
    forward = PhaseForward(model, 3)
    loss = build_loss("label_free")
    grads = []
    for labels in (y, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))],
                   torch.full_like(y, -1)):
        model.zero_grad(set_to_none=True)
        loss(forward(x), labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys()
    for g in grads[1:]:  # the labels change nothing
        assert all(torch.equal(grads[0][n], g[n]) for n in g)
    backbone = {id(p) for m in backbone_modules(model) for p in m.parameters()}
    named = dict(model.named_parameters())
    assert grads[0] and all(id(named[n]) not in backbone for n in grads[0])
    # the gradient is that of KL(final || head), written out by hand
    model.zero_grad(set_to_none=True)
    logits = forward(x)
    pf = torch.softmax(logits[-1].detach(), 1)
    want = sum((pf * (pf.log() - torch.log_softmax(z, 1))).sum(1).mean() for z in logits[:-1]) / 2
    assert torch.allclose(loss(logits, y), want, atol=1e-6)
    want.backward()
    for n, g in grads[0].items():
        assert torch.allclose(named[n].grad, g, atol=1e-6), n


def test_label_free_steps_draw_their_batches_from_the_unlabelled_folder(tmp_path, tiny_splits,
                                                                        batch):
    from conftest import TEST_DATA
    from exitnas.space import load_space

    _plant_folder(tmp_path / "u", n=10)
    space = load_space(TEST_DATA / "tiny.yaml", {"data.unlabelled": str(tmp_path / "u"),
                                                 "data.augment": False})
    loss = build_loss("label_free")
    loss.check(regime="disjoint", space=space)
    loss.prepare(space=space, splits=tiny_splits)
    x, y = batch[0][:16], batch[1][:16]
    folder = read_unlabelled(tmp_path / "u", channels=3, size=8)
    norm = (folder.float() / 255 - torch.tensor(tiny_splits.mean).view(1, -1, 1, 1)) / \
        torch.tensor(tiny_splits.std).view(1, -1, 1, 1)
    ctx = Epoch(3, 5, None)
    xu, yu = loss.before_step(None, x, y, epoch=ctx, optim=OptimConfig())
    assert xu.shape == x.shape and torch.equal(yu, torch.full((16,), -1))
    dist = torch.cdist(xu.flatten(1), norm.flatten(1))
    assert dist.min(1).values.max() < 1e-4  # every image of the batch is one of the folder's
    assert len(set(dist.argmin(1).tolist())) == 10  # 16 draws from 10 files: a full pass first
    again = build_loss("label_free")
    again.prepare(space=space, splits=tiny_splits)
    assert torch.equal(again.before_step(None, x, y, epoch=Epoch(3, 5, None),
                                         optim=OptimConfig())[0], xu)  # (seed, epoch, step)
    nxt = loss.before_step(None, x, y, epoch=ctx, optim=OptimConfig())[0]
    assert not torch.equal(nxt, xu)
    again.seed, again.augment = 2**32 - 1, True  # the largest retrain.seed, augmented
    assert again.batch(10**6, 10**6, 16).shape == x.shape


def test_label_free_disjoint_retrain_trains_the_heads_on_the_folder_only(run, tmp_path,
                                                                         tiny_splits,
                                                                         monkeypatch):
    _plant_folder(tmp_path / "u", n=8)
    drawn = []
    real_batch = LabelFree.batch

    def spy(self, epoch, step, size, **kw):  # the real method, its calls counted
        drawn.append((epoch, step, size))
        return real_batch(self, epoch, step, size, **kw)

    monkeypatch.setattr(LabelFree, "batch", spy)
    space = run.space({"retrain.loss": "label_free", "retrain.epochs": 2,
                       "data.unlabelled": str(tmp_path / "u")})
    seen = {}

    def on_phase(phase, epoch, model):
        seen[phase] = _state(model)

    result = retrain(run, Arch.parse(ARCH), space=space, regime="disjoint", splits=tiny_splits,
                     log=None, on_phase_start=on_phase)
    after = result.model.state_dict()
    backbone = [k for k in after if k.startswith("segments.") or k.startswith("heads.2.")]
    heads = [k for k in after if k.startswith("heads.0.") or k.startswith("heads.1.")]
    assert backbone and heads and sorted(seen) == [1, 3]
    assert all(torch.equal(seen[3][k], after[k]) for k in backbone)
    assert any(not torch.equal(seen[3][k], after[k]) for k in heads)
    # every step of phase 3 (epoch 2), and only those, trained on an unlabelled batch
    steps = len(tiny_splits.train) // space.data.batch_size
    assert drawn == [(1, i, space.data.batch_size) for i in range(steps)]
    assert [r["phase"] for r in result.history] == [1, 3]


def test_label_free_outside_the_disjoint_regime_or_without_its_folder_is_refused(run, tmp_path):
    (tmp_path / "u").mkdir()
    arch = Arch.parse(ARCH)
    space = run.space({"retrain.loss": "label_free", "data.unlabelled": str(tmp_path / "u")})
    for regime in ("joint", "mixed"):
        with pytest.raises(ConfigError) as err:
            retrain(run, arch, space=space, regime=regime, log=None)
        assert str(err.value) == (f"retrain.loss: 'label_free' trains with regime disjoint "
                                  f"only, not {regime!r}")
    with pytest.raises(ConfigError, match="retrain.loss: 'label_free' trains with regime "
                                          "disjoint only, not 'mixed'"):
        finetune(run, arch, space=space, regime="mixed", log=None)  # before any supernet
    with pytest.raises(ConfigError, match=r"^data.unlabelled: 'label_free' trains on unlabelled"):
        retrain(run, arch, space=run.space({"retrain.loss": "label_free"}), regime="disjoint",
                log=None)
    assert not (run.path / "retrain").exists()


def test_cli_refuses_a_missing_unlabelled_folder_and_a_wrong_regime_in_one_line(run, tmp_path):
    _plant_folder(tmp_path / "u", n=2)
    before = tree_digest(run.path)
    missing = tmp_path / "nowhere"
    for args, words in (
            (("--regime", "disjoint", "--set", f"data.unlabelled={missing}"),
             ("data.unlabelled", repr(str(missing)), "is not a folder")),
            (("--regime", "joint", "--set", f"data.unlabelled={tmp_path / 'u'}"),
             ("retrain.loss", "'label_free'", "disjoint", "'joint'"))):
        r = run_cli("retrain", run.path, "--arch", ARCH, "--loss", "label_free", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
        assert "Traceback" not in r.stderr
    assert tree_digest(run.path) == before
