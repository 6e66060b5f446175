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
