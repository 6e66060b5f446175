"""exitnas.blocks: every registered block gives the width its out_channels promises at stride
1 and 2, learns (gradients reach every parameter), and shortcuts when the shape changes; the
families' stems shrink the input as documented; a family refuses a block it does not list."""
from __future__ import annotations

import pytest
import torch

from exitnas.blocks import BLOCKS, FAMILIES
from exitnas.errors import ConfigError


@pytest.mark.parametrize("name", BLOCKS.names())
@pytest.mark.parametrize("stride", [1, 2])
def test_block_shapes_and_gradients(name, stride):
    cls = BLOCKS.get(name)
    torch.manual_seed(0)
    block = cls(in_channels=8, channels=16, stride=stride, expand_ratio=2)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    y = block(x)
    assert y.shape == (2, cls.out_channels(16), 8 // stride, 8 // stride)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("name", BLOCKS.names())
def test_same_shape_blocks_keep_an_identity_path(name):
    """With the input's width and stride 1 the block's output depends on its input through a
    residual path: with every parameter zeroed the output is the input (inverted residual) or
    its ReLU (basic, bottleneck)."""
    cls = BLOCKS.get(name)
    width = 16 if cls.out_channels(16) == 16 else None
    if width is None:  # bottleneck outputs 4x: feed it its own output width
        block = cls(in_channels=cls.out_channels(4), channels=4, stride=1, expand_ratio=2)
        cin = cls.out_channels(4)
    else:
        block = cls(in_channels=16, channels=16, stride=1, expand_ratio=2)
        cin = 16
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    block.eval()
    x = torch.rand(1, cin, 4, 4) - 0.5
    y = block(x)
    assert y.abs().sum() > 0  # a block without a residual path would give zeros here
    assert torch.allclose(y, torch.relu(x)) or torch.allclose(y, x)


@pytest.mark.parametrize("family,kind,shrink", [("resnet", "cifar", 1), ("resnet", "imagenet", 4),
                                                ("mobilenetv2", "cifar", 1)])
def test_stems_shrink_the_input_as_documented(family, kind, shrink):
    stem = FAMILIES.get(family).stem(kind, 3, 16)
    assert stem(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32 // shrink, 32 // shrink)


def test_a_family_refuses_a_block_it_does_not_list(tiny_space):
    with pytest.raises(ConfigError, match="backbone.block"):
        tiny_space.with_overrides({"backbone.family": "mobilenetv2"})
