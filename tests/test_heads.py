"""Exit heads: every head of the registry exports to ONNX at every feature-map size and ONNX
Runtime equals torch; the adaptive max pooling ONNX gets is exactly torch's; SDN's head keeps
its weights' names and its MACs."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from exitnas.heads import HEADS, SDNPoolHead, adaptive_max_pool2d_windows, build_head

needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
SIZES = (1, 2, 3, 5, 7, 8, 14, 28)
CHANNELS = (1, 3)
CLASSES = 10


@pytest.mark.parametrize("h", SIZES + (4, 9))
def test_window_max_pooling_is_torchs(h):
    """Values bit for bit and flat indices equal F.adaptive_max_pool2d's, on random inputs and
    on inputs full of ties, batched and not, for outputs that divide the input, that do not
    (overlapping windows) and that are larger (repeated windows)."""
    gen = torch.Generator().manual_seed(h)
    for w in (1, 3, 7, 8, 28):
        for size in ((4, 4), (1, 1), (3, 5), (2, 7), (None, 2), 4):
            for x in (torch.randn(2, 3, h, w, generator=gen),
                      torch.randint(0, 3, (2, 3, h, w), generator=gen).float(),
                      torch.randn(3, h, w, generator=gen)):
                got, idx = adaptive_max_pool2d_windows(x, size)
                want, want_idx = F.adaptive_max_pool2d(x, size, return_indices=True)
                assert got.shape == want.shape and torch.equal(got, want), (h, w, size)
                assert torch.equal(idx, want_idx), (h, w, size)


class _EveryCase(nn.Module):
    """Head ``name`` once per (size, channels): a tuple of feature maps -> their logits."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.cases = [(s, c) for s in SIZES for c in CHANNELS]
        self.heads = nn.ModuleList(build_head(name, in_channels=c, num_classes=CLASSES)
                                   for _, c in self.cases)

    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(h(x) for h, x in zip(self.heads, xs))


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and SDN mixing weights (eval mode uses them)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, SDNPoolHead):
                m.mix_logit.fill_(float(torch.randn((), generator=gen)))


@needs_onnx
@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_exports_to_onnx_at_every_size(name, tmp_path):
    """The export's own path (torch.export with a dynamic batch, then exitnas.export's ONNX
    conversion) for ``name`` at every size x channels; ONNX Runtime within 1e-5 of torch at
    batch 1 and 5."""
    import onnxruntime as ort

    from exitnas.export import _to_onnx

    gen = torch.Generator().manual_seed(0)
    module = _EveryCase(name).eval()
    _randomise(module, gen)
    xs = tuple(torch.randn(2, c, s, s, generator=gen) for s, c in module.cases)
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(module, (xs,), dynamic_shapes=(tuple({0: batch} for _ in xs),),
                             strict=False)
    _to_onnx(ep, (xs,), tmp_path / "heads.onnx", len(xs))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tmp_path / "heads.onnx"), opts, providers=["CPUExecutionProvider"])
    for n in (1, 5):
        xs = tuple(torch.randn(n, c, s, s, generator=gen) for s, c in module.cases)
        with torch.no_grad():
            want = module(xs)
        got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})
        for (s, c), g, w in zip(module.cases, got, want):
            assert g.shape == (n, CLASSES)
            diff = float(np.abs(g - w.numpy()).max())
            assert diff <= 1e-5, f"{name} at {c}x{s}x{s}: ONNX Runtime differs by {diff:g}"


@pytest.mark.parametrize("size", SIZES)
def test_sdn_pool_head_names_and_macs(size):
    """Weights keep their names (saved supernets, retrained models and exports load), and
    fvcore counts what exitnas.cost documents: max and average pooling one MAC per input
    element, the mix (sigmoid, 1 - a, two products, a sum) one per output element, the Linear
    its multiply-adds."""
    from exitnas.cost import count_macs

    c = 3
    head = build_head("sdn_pool", in_channels=c, num_classes=CLASSES)
    assert sorted(head.state_dict()) == ["fc.bias", "fc.weight", "mix_logit"]
    pooled = c * 4 * 4
    want = 2 * c * size * size + (1 + 1 + 3 * pooled) + pooled * CLASSES
    assert count_macs(head, (c, size, size)) == want


def test_heads_on_wide_features_follow_the_width_rule(tmp_path):
    """exits.head_width caps a head's hidden layer: a conv head on ResNet-50's 2,048-channel
    7x7 features with the default 256 costs less than a third of the last stage's three
    blocks (uncapped it costs more than the whole stage); heads without a hidden layer are
    unchanged, and the supernet and its cost table build heads by the rule."""
    import yaml

    from exitnas import cost
    from exitnas.space import load_space
    from exitnas.supernet import Supernet

    capped = build_head("conv", in_channels=2048, num_classes=CLASSES, max_hidden=256)
    uncapped = build_head("conv", in_channels=2048, num_classes=CLASSES)
    assert capped.conv.out_channels == 256 and capped.fc.in_features == 256
    assert uncapped.conv.out_channels == 2048
    mlp = build_head("mlp", in_channels=2048, num_classes=CLASSES, max_hidden=256)
    assert [m.out_features for m in mlp.mlp if isinstance(m, nn.Linear)] == [256, CLASSES]
    narrow = build_head("mlp", in_channels=64, num_classes=CLASSES, max_hidden=256)
    assert narrow.mlp[0].out_features == 64
    linear = build_head("linear", in_channels=2048, num_classes=CLASSES, max_hidden=256)
    assert linear.fc.in_features == 2048

    spec = {"name": "r50", "num_classes": CLASSES, "input": {"channels": 3, "size": 224},
            "backbone": {"family": "torchvision", "model": "resnet50"},
            "exits": {"heads": ["conv"], "positions": [[3, 1]], "max_exits": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    space = load_space(tmp_path / "s.yaml")
    table = cost.build_cost_table(Supernet(space, pretrained=False))
    stage4 = sum(m for (s, _), m in table.blocks.items() if s == 3)
    assert table.heads[(3, 1, "conv")] < stage4 / 3
    assert cost.count_macs(uncapped, (2048, 7, 7)) > stage4
