"""Costs: per-segment fvcore MACs, C_k as DESIGN.md defines it, and reference networks."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import SPACES
from exitnas.arch import Arch, Exit, sample_arch
from exitnas.cli import main
from exitnas.cost import (EXTRA_HANDLES, build_cost_table, cost_table, count_macs,
                          model_segment_macs)
from exitnas.heads import build_head
from exitnas.space import load_space, parse_space
from exitnas.supernet import Supernet


class _AllExits(torch.nn.Module):
    """A whole extracted model as one module returning every exit's logits, so fvcore's
    tracer keeps every head."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_exits(x))


def _whole_model_macs(model, shape) -> int:
    """One fvcore pass over the whole model (not count_macs, not per segment)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(_AllExits(model.eval()), torch.zeros(1, *shape))
    analysis.set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


@pytest.mark.parametrize("name", ["quickstart", "resnet_cifar", "mobilenetv2_cifar"])
def test_segment_sum_equals_direct_count_of_extracted_model(name):
    """The table's C_k (supernet segments, summed) equal the extracted model's own segments,
    and the last one equals a single fvcore trace of the whole extracted model."""
    space = load_space(SPACES / f"{name}.yaml")
    net = Supernet(space)
    table = build_cost_table(net)
    shape = (space.input.channels, space.input.size, space.input.size)
    rng = random.Random(3)
    for _ in range(4):
        arch = sample_arch(space, rng)
        costs = table.exit_costs(arch)
        model = net.extract(arch)
        assert costs == model_segment_macs(model, shape)
        assert costs[-1] == _whole_model_macs(model, shape)
        assert costs == sorted(costs)  # C_k is non-decreasing in k
        assert all(b > a for a, b in zip(costs, costs[1:]))  # every segment costs something


def test_c_k_counts_every_head_on_the_way(tiny_space):
    table = cost_table(tiny_space)
    arch = Arch(depths=(2, 2), exits=(Exit(0, 0, "conv"), Exit(1, 0, "mlp")),
                policy="max_softmax", thresholds=(0.5, 0.5))
    c = table.exit_costs(arch)
    stem, b = table.stem, table.blocks
    h0, h1 = table.heads[(0, 0, "conv")], table.heads[(1, 0, "mlp")]
    assert c[0] == stem + b[(0, 0)] + h0
    assert c[1] == stem + b[(0, 0)] + b[(0, 1)] + b[(1, 0)] + h0 + h1
    assert c[2] == stem + sum(b.values()) + h0 + h1 + table.final
    assert table.backbone() == stem + sum(b.values()) + table.final
    assert table.expected_cost(arch, [0.5, 0.25, 0.25]) == pytest.approx(
        0.5 * c[0] + 0.25 * c[1] + 0.25 * c[2])


def test_sdn_pool_head_is_not_free():
    """fvcore ignores max pooling and element-wise ops; the registered handlers count them."""
    head = build_head("sdn_pool", in_channels=16, num_classes=10)
    macs = count_macs(head, (16, 8, 8))
    linear = 16 * 16 * 10
    avg_pool = 16 * 8 * 8  # fvcore's rule: one per input element
    max_pool = 16 * 8 * 8  # ours: the same rule
    mix = 3 * 16 * 4 * 4  # a*max, (1-a)*avg, their sum: one per output element
    scalar = 2  # a = sigmoid(mix_logit) and (1 - a), on one number each
    assert macs == linear + avg_pool + max_pool + mix + scalar


def _resnet18_space():
    return parse_space({
        "name": "resnet18", "num_classes": 1000, "input": {"channels": 3, "size": 224},
        "backbone": {"family": "resnet", "block": "basic", "stem": "imagenet", "stem_channels": 64,
                     "stages": [{"channels": c, "stride": s, "depths": [1, 2]}
                                for c, s in ((64, 1), (128, 2), (256, 2), (512, 2))]},
        "exits": {"heads": ["linear"]},
    })


def test_resnet18_matches_torchvision():
    space = _resnet18_space()
    net = Supernet(space)
    backbone_params = sum(p.numel() for m in (net.stem, net.stages, net.final) for p in m.parameters())
    assert backbone_params == 11_689_512  # torchvision.models.resnet18()
    macs = cost_table(space).backbone()
    assert abs(macs - 1.81e9) / 1.81e9 < 0.01, macs  # torchvision docs: 1.81 "GFLOPS" (MACs)


def test_resnet20_cifar_matches_fvcore_reference():
    space = load_space(SPACES / "resnet_cifar.yaml")
    macs = cost_table(space).backbone((3, 3, 3))
    assert abs(macs - 40.9e6) / 40.9e6 < 0.01, macs  # STACK.md: ResNet-20 w16 = 40,931,968


def test_tiny_table_matches_hand_counted_macs(tiny_space):
    """The table against MACs counted by hand (conv: Cout*Cin*k*k*Hout*Wout; eval-mode BN: 2
    per element, as fvcore counts it; residual add: 1 per element; global average pool: 1 per
    input element; linear: in*out). Input 3x8x8, stem 8, stages 8 (stride 1) and 16 (stride 2)."""
    table = cost_table(tiny_space)
    conv = lambda cout, cin, k, hw: cout * cin * k * k * hw * hw  # noqa: E731
    bn = lambda c, hw: 2 * c * hw * hw  # noqa: E731
    assert table.stem == conv(8, 3, 3, 8) + bn(8, 8) == 14_848
    same = 2 * (conv(8, 8, 3, 8) + bn(8, 8)) + 8 * 8 * 8  # two conv-BN, the add
    assert table.blocks[(0, 0)] == table.blocks[(0, 1)] == same == 76_288
    down = (conv(16, 8, 3, 4) + bn(16, 4) + conv(16, 16, 3, 4) + bn(16, 4)
            + conv(16, 8, 1, 4) + bn(16, 4) + 16 * 4 * 4)  # 1x1 conv-BN shortcut, the add
    assert table.blocks[(1, 0)] == down == 59_136
    assert table.blocks[(1, 1)] == 2 * (conv(16, 16, 3, 4) + bn(16, 4)) + 16 * 4 * 4
    assert table.heads[(1, 0, "linear")] == table.final == 16 * 4 * 4 + 16 * 4 == 320
    assert table.heads[(0, 1, "mlp")] == 8 * 8 * 8 + 8 * 8 + 8 * 4  # pool, Linear 8->8, 8->4
    assert table.heads[(0, 0, "conv")] == conv(8, 8, 3, 8) + bn(8, 8) + 8 * 8 * 8 + 8 * 4


def test_cost_is_batch_one(tiny_space):
    """Counting is per image: fvcore itself (no handlers of ours), run directly on a batch of
    4, counts 4x the table's entries for the stem and a linear head (ops fvcore counts)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    net = Supernet(tiny_space).eval()
    table = cost_table(tiny_space)
    for module, shape, want in ((net.stem, (3, 8, 8), table.stem),
                                (net.heads["s1b0=linear"], (16, 4, 4), table.heads[(1, 0, "linear")])):
        analysis = FlopCountAnalysis(module, torch.zeros(4, *shape))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        assert int(analysis.total()) == 4 * want


def test_cost_cli_json(capsys):
    path = SPACES / "resnet_cifar.yaml"
    arch = "d3.3.3~s0b2=sdn_pool,s1b1=conv~max_softmax=0.9,0.8"
    assert main(["cost", str(path), "--arch", arch, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = cost_table(load_space(path))
    assert data["backbone_macs"] == table.backbone()
    net = Supernet(load_space(path))
    assert data["backbone_params"] == sum(p.numel() for k, p in net.named_parameters()
                                          if not k.startswith("heads."))
    assert [e["macs"] for e in data["exits"]] == table.exit_costs(Arch.from_id(arch))
    assert [(e["position"], e["head"]) for e in data["exits"]] == [
        ("s0b2", "sdn_pool"), ("s1b1", "conv"), ("final", "linear")]


def test_cost_cli_rejects_arch_outside_space(capsys):
    assert main(["cost", str(SPACES / "resnet_cifar.yaml"), "--arch",
                 "d6.3.3~none~max_softmax="]) == 2
    assert "depth 6 of stage 0" in capsys.readouterr().err


# ---- rules for what torchvision's models add (exitnas.cost's module docs) ------------------
def _tv_space(name: str, size: int):
    return parse_space({"name": name, "num_classes": 1000, "input": {"channels": 3, "size": size},
                        "backbone": {"family": "torchvision", "model": name},
                        "exits": {"heads": ["linear"]}})


def test_activations_and_eval_identities_are_free():
    """hardswish, SiLU, GELU, dropout and stochastic depth (a module in train mode: counting
    is in eval mode, where it returns its input) add nothing to a convolution's count."""
    from torchvision.ops import StochasticDepth

    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    want = 8 * 8 * 9 * 4 * 4
    for extra in (torch.nn.Hardswish(), torch.nn.SiLU(inplace=True), torch.nn.GELU(),
                  torch.nn.Dropout(0.5, inplace=True), StochasticDepth(0.5, "row")):
        module = torch.nn.Sequential(conv, extra).train()
        assert count_macs(module, (8, 4, 4)) == want, extra
        assert module.training  # count_macs puts the mode back


@pytest.mark.parametrize("module", [torch.nn.Softplus(), torch.nn.Hardshrink()],
                         ids=["softplus", "hardshrink"])
def test_unknown_ops_still_raise(module):
    """Ops without a rule are refused, not counted 0: the free ops are matched by exact name
    (hardshrink is not hardswish)."""
    with pytest.raises(RuntimeError,
                       match=r"fvcore cannot count ops \['aten::(softplus|hardshrink)"):
        count_macs(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), module), (4, 4, 4))


def test_squeeze_excitation_with_hardsigmoid_by_hand():
    """MobileNetV3's squeeze-excitation on 16x4x4: pool (per input element), two 1x1 convs on
    1x1, the hardsigmoid gate (per output element, as sigmoid), the scaling multiply."""
    from torchvision.ops import SqueezeExcitation

    se = SqueezeExcitation(16, 8, scale_activation=torch.nn.Hardsigmoid)
    assert count_macs(se, (16, 4, 4)) == 16 * 16 + 16 * 8 + 8 * 16 + 16 + 16 * 16


def test_convnext_block_by_hand():
    """ConvNeXt's block on 8x4x4: depthwise 7x7, permutes (free), LayerNorm (fvcore: 5 per
    element), Linear 8->32 and 32->8 per pixel, GELU (free), layer scale and residual add (1
    per element each), stochastic depth (free in eval mode)."""
    from torchvision.models.convnext import CNBlock

    c, hw = 8, 16
    block = CNBlock(c, layer_scale=1e-6, stochastic_depth_prob=0.5)
    assert count_macs(block, (c, 4, 4)) == (c * 49 * hw + 5 * c * hw + 2 * hw * c * 4 * c
                                            + c * hw + c * hw)


def test_folded_batchnorm_is_only_the_one_after_a_convolution():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(8)
    conv_macs, bn_macs = 8 * 3 * 9 * 8 * 8, 2 * 8 * 8 * 8
    assert count_macs(torch.nn.Sequential(conv, bn), (3, 8, 8)) == conv_macs + bn_macs
    assert count_macs(torch.nn.Sequential(conv, bn), (3, 8, 8), fold_batchnorm=True) == conv_macs
    # after a ReLU there is no convolution to fold it into: counted
    after_relu = torch.nn.Sequential(conv, torch.nn.ReLU(), bn)
    assert count_macs(after_relu, (3, 8, 8), fold_batchnorm=True) == conv_macs + bn_macs


def test_torchvision_family_folds_batchnorm_and_resnet_family_does_not():
    """The same ResNet-18 as exitnas's ``resnet`` family and as ``torchvision``'s: the tables
    differ by exactly the BatchNorm MACs fvcore counts in torchvision's model."""
    import warnings

    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    ours = _resnet18_space().with_overrides({"input.size": 64})
    analysis = FlopCountAnalysis(models.resnet18().eval(), torch.zeros(1, 3, 64, 64))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    bn = analysis.by_operator()["batch_norm"]
    assert bn > 0
    assert cost_table(_tv_space("resnet18", 64)).backbone() == cost_table(ours).backbone() - bn


def _listed(default: tuple[str, ...]):
    """issue 14's models; the ones not in ``default`` run with the slow suite."""
    from test_tv_family import LISTED

    return [n if n in default else pytest.param(n, marks=pytest.mark.slow) for n in LISTED]


FAST_TV = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
           "regnet_y_400mf", "convnext_tiny")  # every op rule above, ~1 s each


@pytest.mark.parametrize("name", _listed(FAST_TV))
def test_table_sums_to_the_whole_torchvision_model(name):
    """Per-segment counting loses and doubles nothing: the table's plain backbone equals one
    count of the whole torchvision model with the same rules (64 px)."""
    from torchvision import models

    space = _tv_space(name, 64)
    model = models.get_model(name, weights=None)
    assert cost_table(space).backbone() == count_macs(model, (3, 64, 64), fold_batchnorm=True)


@pytest.mark.parametrize("name", _listed(FAST_TV))
def test_macs_within_1_5_percent_of_torchvision_published(name):
    """torchvision's ``_ops`` (its "GFLOPS" are GMACs of convolutions and linear layers),
    measured at the DEFAULT weights' evaluation crop (224 px; EfficientNet-B1/B2/B3: 240, 288,
    300 px)."""
    from torchvision import models

    weights = models.get_model_weights(name).DEFAULT
    size = weights.transforms().crop_size[0]
    macs = cost_table(_tv_space(name, size)).backbone()
    published = weights.meta["_ops"] * 1e9
    assert abs(macs - published) / published <= 0.015, (size, macs, published)


def test_cost_cli_json_torchvision(tmp_path, capsys):
    """``exitnas cost FILE --format json`` for a torchvision space with ``backbone.weights``:
    torchvision's parameter count and the table's MACs; the table format keeps its lines and
    adds the parameter count."""
    import yaml
    from torchvision import models

    spec = {"name": "tv", "num_classes": 10, "input": {"channels": 3, "size": 64},
            "backbone": {"family": "torchvision", "model": "mobilenet_v3_small",
                         "weights": str(tmp_path / "w.pth")}, "exits": {"heads": ["linear"]}}
    model = models.mobilenet_v3_small(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["cost", str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backbone_params"] == sum(p.numel() for p in model.parameters()) == 1_528_106
    assert data["backbone_macs"] == cost_table(load_space(path)).backbone()
    assert data["backbone_macs"] == count_macs(model, (3, 64, 64), fold_batchnorm=True)
    assert [e["position"] for e in data["exits"]] == ["final"]
    assert main(["cost", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"plain backbone: {data['backbone_macs']:,} MACs (fvcore, batch 1)"
    assert lines[2] == "backbone parameters: 1,528,106 (stem, blocks, final head; no exit heads)"
