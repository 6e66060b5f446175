"""Costs: per-segment fvcore MACs, C_k as DESIGN.md defines it, and reference networks."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import SPACES
from exitnas.arch import Arch, Exit, sample_arch
from exitnas.cli import main
from exitnas.cost import build_cost_table, cost_table, count_macs, model_segment_macs
from exitnas.heads import build_head
from exitnas.space import load_space, parse_space
from exitnas.supernet import Supernet


@pytest.mark.parametrize("name", ["quickstart", "resnet_cifar", "mobilenetv2_cifar"])
def test_segment_sum_equals_direct_count_of_extracted_model(name):
    space = load_space(SPACES / f"{name}.yaml")
    net = Supernet(space)
    table = build_cost_table(net)
    shape = (space.input.channels, space.input.size, space.input.size)
    rng = random.Random(3)
    for _ in range(4):
        arch = sample_arch(space, rng)
        costs = table.exit_costs(arch)
        assert costs == model_segment_macs(net.extract(arch), shape)
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


def test_cost_is_batch_one(tiny_space):
    """Counting is per image: the table does not depend on any batch size."""
    net = Supernet(tiny_space)
    assert count_macs(net.stem, (3, 8, 8)) == cost_table(tiny_space).stem
    x = torch.zeros(1, 3, 8, 8)
    assert net.stem(x).shape[0] == 1


def test_cost_cli_json(capsys):
    path = SPACES / "resnet_cifar.yaml"
    arch = "d3.3.3~s0b2=sdn_pool,s1b1=conv~max_softmax=0.9,0.8"
    assert main(["cost", str(path), "--arch", arch, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = cost_table(load_space(path))
    assert data["backbone_macs"] == table.backbone()
    assert [e["macs"] for e in data["exits"]] == table.exit_costs(Arch.from_id(arch))
    assert [(e["position"], e["head"]) for e in data["exits"]] == [
        ("s0b2", "sdn_pool"), ("s1b1", "conv"), ("final", "linear")]


def test_cost_cli_rejects_arch_outside_space(capsys):
    assert main(["cost", str(SPACES / "resnet_cifar.yaml"), "--arch",
                 "d6.3.3~none~max_softmax="]) == 2
    assert "depth 6 of stage 0" in capsys.readouterr().err
