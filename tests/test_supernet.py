"""Supernet: elastic depth, every candidate head, exact extraction, early-exit forward."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import SPACES
from exitnas.arch import Arch, Exit, sample_arch
from exitnas.errors import ArchError
from exitnas.heads import HEADS, build_head
from exitnas.model import exits_from_logits
from exitnas.space import load_space
from exitnas.supernet import Supernet

SHIPPED = sorted(SPACES.glob("*.yaml"))


def _perturb_bn(net: torch.nn.Module, seed: int) -> None:
    """Give BN layers non-trivial statistics so eval-mode equality is a real check."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_extraction_is_exact(path):
    torch.manual_seed(0)
    space = load_space(path)
    net = Supernet(space, pretrained=False)  # the shipped weights files are not here
    _perturb_bn(net, 1)
    net.eval()
    rng = random.Random(0)
    x = torch.randn(6, space.input.channels, space.input.size, space.input.size)
    for _ in range(20 if space.input.size <= 64 else 4):  # 224 px spaces: fewer, same checks
        arch = sample_arch(space, rng)
        model = net.extract(arch).eval()
        with torch.no_grad():
            ref = net.forward_exits(x, arch.depths, arch.exits)
            got = model.forward_exits(x)
        assert len(got) == len(arch.exits) + 1
        for a, b in zip(ref, got):
            assert (a - b).abs().max().item() <= 1e-5
        pred = model.predict(x)
        want = exits_from_logits(ref, arch.policy, arch.thresholds)
        assert torch.equal(pred.exit, want.exit)
        assert torch.equal(pred.pred, want.pred)


def test_extracted_model_holds_only_the_chosen_blocks(tiny_space):
    net = Supernet(tiny_space)
    arch = Arch(depths=(1, 2), exits=(Exit(0, 0, "conv"),), policy="max_softmax", thresholds=(0.9,))
    model = net.extract(arch)
    blocks = sum(1 for seg in model.segments for m in seg if type(m).__name__ == "BasicBlock")
    assert blocks == 3
    assert len(model.heads) == 2
    assert type(model.heads[0]).__name__ == "ConvHead"
    # copies, not shared modules
    p_model = next(model.heads[0].parameters())
    p_net = next(net.heads["s0b0=conv"].parameters())
    assert p_model.data_ptr() != p_net.data_ptr()
    assert torch.equal(p_model, p_net)


def test_elastic_depth_skips_blocks(tiny_space):
    net = Supernet(tiny_space).eval()
    x = torch.randn(2, 3, 8, 8)
    # the skipped blocks do not influence the output
    out_a = net.forward_exits(x, (1, 1), [])[-1]
    torch.nn.init.constant_(net.stages[0][1].conv1.weight, 5.0)
    torch.nn.init.constant_(net.stages[1][1].conv1.weight, 5.0)
    out_b = net.forward_exits(x, (1, 1), [])[-1]
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, net.forward_exits(x, (2, 2), [])[-1])


def test_forward_exits_defaults_to_every_candidate(tiny_space):
    net = Supernet(tiny_space).eval()
    x = torch.randn(2, 3, 8, 8)
    cands = net.candidate_exits((2, 2))
    assert len(cands) == 3 * 4
    assert len(net.forward_exits(x, (2, 2))) == len(cands) + 1


def test_early_exit_drops_samples(tiny_space):
    """A sample that left at exit 0 is not computed by the later segments."""
    net = Supernet(tiny_space).eval()
    arch = Arch(depths=(2, 2), exits=(Exit(0, 0, "linear"),), policy="max_softmax", thresholds=(0.0,))
    model = net.extract(arch).eval()
    seen = []
    model.segments[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = model.predict(torch.randn(5, 3, 8, 8))
    assert out.exit.tolist() == [0] * 5
    assert seen == []  # threshold 0: everyone leaves at exit 0
    model.predict(torch.randn(5, 3, 8, 8), thresholds=(1.01,))
    assert seen == [5]


@pytest.mark.parametrize("name", HEADS.names())
def test_heads_map_features_to_logits(name):
    head = build_head(name, in_channels=8, num_classes=5)
    assert head(torch.randn(3, 8, 6, 6)).shape == (3, 5)
    assert head(torch.randn(3, 8, 2, 2)).shape == (3, 5)


def test_sdn_pool_mixes_max_and_avg():
    head = build_head("sdn_pool", in_channels=2, num_classes=3)
    assert head.mix.item() == 0.5
    assert any(p is head.mix_logit for p in head.parameters())
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        head.mix_logit.fill_(50.0)  # a -> 1: pure max pooling
        pure_max = head(x)
        head.mix_logit.fill_(-50.0)  # a -> 0: pure average pooling
        pure_avg = head(x)
    flat = lambda t: head.fc(torch.flatten(t, 1))  # noqa: E731
    assert torch.allclose(pure_max, flat(head.max_pool(x)))
    assert torch.allclose(pure_avg, flat(head.avg_pool(x)))


def test_extract_rejects_archs_outside_the_space(tiny_space):
    net = Supernet(tiny_space)
    with pytest.raises(ArchError, match="depth 3 of stage 1"):
        net.extract(Arch(depths=(1, 3), exits=(), policy="max_softmax"))
    with pytest.raises(ArchError, match="not a candidate"):
        net.extract(Arch(depths=(1, 1), exits=(Exit(0, 1, "linear"),), policy="max_softmax",
                         thresholds=(0.5,)))


def _bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def test_calibration_batches_are_fixed_train_batches(tiny_space):
    """``supernet.bn_calib_batches`` un-augmented train batches in the ``supernet.seed`` order,
    the same on every call."""
    from exitnas.data import batches, load_splits
    from exitnas.supernet import calibration_batches

    space = tiny_space.with_overrides({"data.augment": True, "supernet.bn_calib_batches": 3})
    splits = load_splits(space)
    got = list(calibration_batches(space, splits))
    assert len(got) == 3 and all(len(y) == space.data.batch_size for _, y in got)
    again = list(calibration_batches(space, splits))
    want = list(batches(splits.train, batch_size=space.data.batch_size, mean=splits.mean,
                        std=splits.std, shuffle=True, seed=space.supernet.seed))[:3]
    for (x, y), (x2, y2), (xw, yw) in zip(got, again, want):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x, xw) and torch.equal(y, yw)
    other = next(calibration_batches(space.with_overrides({"supernet.seed": 7}), splits))
    assert not torch.equal(other[1], got[0][1])


def test_calibrated_extract_leaves_the_supernet_as_it_was(tiny_space):
    """``extract(arch, calib=...)`` equals recalibrating ``arch.depths`` then extracting, for
    any depth setting asked before; the supernet's own BN statistics and mode are restored."""
    import copy

    from exitnas.data import load_splits
    from exitnas.supernet import calibration_batches

    torch.manual_seed(0)
    splits = load_splits(tiny_space)
    net = Supernet(tiny_space)
    _perturb_bn(net, 2)
    net.train()
    before = _bn_state(net)
    arch = Arch(depths=(1, 2), exits=(Exit(0, 0, "conv"),), thresholds=(0.5,))
    ref = copy.deepcopy(net)
    ref.recalibrate_bn(arch.depths, calibration_batches(tiny_space, splits))
    want = ref.extract(arch).state_dict()
    with net.calibrated((2, 1), calibration_batches(tiny_space, splits)) as inside:
        assert inside is net and not net.training
        assert not torch.equal(net.stages[1][0].bn1.running_mean, before["stages.1.0.bn1.running_mean"])
    for other in ((2, 1), (2, 2)):  # whatever was asked before does not leak into the extract
        net.extract(Arch(depths=other, exits=(), policy="max_softmax"),
                    calib=calibration_batches(tiny_space, splits))
        model = net.extract(arch, calib=calibration_batches(tiny_space, splits))
        assert model.training  # the supernet's mode
        got = model.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert net.training
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    plain = net.extract(arch).state_dict()  # no calib: the supernet's own statistics
    assert not all(torch.equal(want[k], plain[k]) for k in want)


def test_calibrated_restores_after_an_error(tiny_space):
    net = Supernet(tiny_space)
    _perturb_bn(net, 3)
    net.eval()
    before = _bn_state(net)
    with pytest.raises(ValueError, match="no batches"):
        with net.calibrated((1, 1), iter(())):
            pass
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not net.training
